"""Where things live: run, stage and checkpoint folders, commit records and aliases. No I/O.

::

    <output_dir>/<run_id>/<stage_name>/checkpoints/     (no stage folder when stage is empty)
        {model_name}[_{model_info}]_cp={E..._U..._S...}_{model|optim|trainer}.th   DCP directories
        _commits/{E..._U..._S...}.json     commit record: written last, once, never overwritten
        _aliases/{latest|last|best.<metric>}.json   alias: replaced in one write
        _peer/node<i>/<artifact>/<file>    node-local tiers: copies of node i's files (replicate: peer)
"""

from __future__ import annotations

import datetime as _dt
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from .names import CheckpointRef, TrainingIteration, validate_name

__all__ = [
    "COMMITS_DIR",
    "ALIASES_DIR",
    "PEER_DIR",
    "CHECKPOINTS_DIR",
    "StageLayout",
    "join_url",
    "default_run_id",
]

CHECKPOINTS_DIR = "checkpoints"
COMMITS_DIR = "_commits"
ALIASES_DIR = "_aliases"
PEER_DIR = "_peer"
_RECORD_SUFFIX = ".json"


def join_url(base: str, *parts: str) -> str:
    """Join a local path or URL with path components using '/' (what fsspec expects)."""
    out = base.rstrip("/") if base not in ("/",) else base
    for part in parts:
        if part:
            out = f"{out}/{part.strip('/')}" if out != "/" else f"/{part.strip('/')}"
    return out


@dataclass(frozen=True)
class StageLayout:
    """The folders of one stage of one run under ``output_dir``.

    ``stage_name`` None or "" means the run has no stage folder.
    """

    output_dir: str
    run_id: str
    stage_name: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ValueError(f"output_dir must be a non-empty path or URL, got {self.output_dir!r}")
        validate_name(self.run_id, "run_id")
        if self.stage_name:
            validate_name(self.stage_name, "stage_name")

    @property
    def run_dir(self) -> str:
        """``<output_dir>/<run_id>``"""
        return join_url(self.output_dir, self.run_id)

    @property
    def stage_dir(self) -> str:
        """``<output_dir>/<run_id>[/<stage_name>]``"""
        return join_url(self.run_dir, self.stage_name or "")

    @property
    def checkpoints_dir(self) -> str:
        """``<stage_dir>/checkpoints``"""
        return join_url(self.stage_dir, CHECKPOINTS_DIR)

    @property
    def commits_dir(self) -> str:
        """Folder of commit records."""
        return join_url(self.checkpoints_dir, COMMITS_DIR)

    @property
    def aliases_dir(self) -> str:
        """Folder of alias records."""
        return join_url(self.checkpoints_dir, ALIASES_DIR)

    @property
    def peer_root(self) -> str:
        """Folder of the copies this node keeps of other nodes' files (``replicate: peer``)."""
        return join_url(self.checkpoints_dir, PEER_DIR)

    def peer_dir(self, node: int) -> str:
        """Folder of the copies of node ``node``'s files: ``<peer_root>/node<node>``."""
        return join_url(self.peer_root, f"node{int(node)}")

    def artifact_path(self, artifact_name: str) -> str:
        """Path of one artifact (a DCP directory or a consolidated file). The name may come
        from a stored record: it must be one safe path component (InvalidNameError)."""
        return join_url(self.checkpoints_dir, validate_name(artifact_name, "artifact name"))

    def commit_path(self, iteration: TrainingIteration) -> str:
        """Path of the commit record of one training point."""
        return join_url(self.commits_dir, f"{iteration}{_RECORD_SUFFIX}")

    def alias_path(self, ref: CheckpointRef | str) -> str:
        """Path of an alias record (latest, last, best.<metric>)."""
        name = ref.alias_name if isinstance(ref, CheckpointRef) else ref
        return join_url(self.aliases_dir, f"{validate_name(name, 'alias name')}{_RECORD_SUFFIX}")

    @staticmethod
    def iteration_of_commit_file(filename: str) -> TrainingIteration | None:
        """The training point a commit-record file name stands for, or None if it is not one."""
        base = filename.rsplit("/", 1)[-1]
        if not base.endswith(_RECORD_SUFFIX):
            return None
        try:
            return TrainingIteration.parse(base[: -len(_RECORD_SUFFIX)])
        except ValueError:
            return None

    @staticmethod
    def alias_of_file(filename: str) -> str | None:
        """The alias name an alias-record file name stands for, or None."""
        base = filename.rsplit("/", 1)[-1]
        return base[: -len(_RECORD_SUFFIX)] if base.endswith(_RECORD_SUFFIX) else None


def default_run_id(env: Mapping[str, str] | None = None, now: _dt.datetime | None = None) -> str:
    """A run id for a new run.

    Under SLURM it is derived from the job so that every task of an array job and every
    requeue of a job continue the same run: ``slurm-<SLURM_ARRAY_JOB_ID>`` for array jobs,
    else ``slurm-<SLURM_JOB_ID>``. Under torchrun with an explicit ``--rdzv-id`` it is
    ``torchrun-<id>``. Otherwise the date and a random suffix, e.g. ``2026-11-28_213005_k3f9a1``.
    Callers in a distributed job must create it on one rank and broadcast it.
    """
    env = os.environ if env is None else env
    if env.get("SLURM_ARRAY_JOB_ID"):
        return validate_name(f"slurm-{env['SLURM_ARRAY_JOB_ID']}", "run_id")
    if env.get("SLURM_JOB_ID"):
        return validate_name(f"slurm-{env['SLURM_JOB_ID']}", "run_id")
    rdzv = env.get("TORCHELASTIC_RUN_ID")
    if rdzv and rdzv != "none":
        return validate_name(f"torchrun-{rdzv}", "run_id")
    now = now or _dt.datetime.now()
    return f"{now:%Y-%m-%d_%H%M%S}_{secrets.token_hex(3)}"
