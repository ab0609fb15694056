"""Configs: frozen keyword-only dataclasses, validated on creation, loadable from YAML."""

from __future__ import annotations

import difflib
import enum
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .dist.timeouts import DEFAULT_TIMEOUT_S
from .errors import ConfigError
from .format.names import CheckpointRef, parse_resume_checkpoint, validate_name
from .stage.retention import RetentionPolicy
from .io.storage import StorageOptions

__all__ = ["AsyncMode", "CheckpointerConfig", "ResumeConfig", "load_yaml", "check_known_keys", "parse_async_mode",
           "Replicate", "parse_replicate", "LocalTier", "DurableTier", "TiersConfig"]


def check_known_keys(data: Mapping[str, Any], allowed: set[str] | list[str], where: str) -> None:
    """Raise ConfigError for keys not in ``allowed``, suggesting the closest valid key."""
    allowed = set(allowed)
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {sorted(allowed)}"
            raise ConfigError(f"unknown key {key!r} in {where}{hint}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; ConfigError if the file is missing or not a mapping."""
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top, got {type(data).__name__}")
    return data


class AsyncMode(enum.Enum):
    """How a save runs: blocking, in a background thread, or in a background process."""

    OFF = "off"
    THREAD = "thread"
    PROCESS = "process"


def parse_async_mode(value: Any) -> AsyncMode:
    """An AsyncMode from a config value. YAML 1.1 reads an unquoted ``off`` (or ``no``) as
    false: that is the mode ``off`` the user wrote."""
    if isinstance(value, AsyncMode):
        return value
    if value is False:
        return AsyncMode.OFF
    try:
        return AsyncMode(str(value).lower())
    except ValueError:
        raise ConfigError(f"async_mode {value!r} is not valid; use off, thread or process") from None


class Replicate(enum.Enum):
    """Where else a node-local checkpoint is kept: nowhere, or on the next node's disk."""

    NONE = "none"
    PEER = "peer"


def parse_replicate(value: Any, where: str = "replicate") -> Replicate:
    """A Replicate from a config value (``peer``; ``none``, null or false for none)."""
    if isinstance(value, Replicate):
        return value
    if value is None or value is False:
        return Replicate.NONE
    try:
        return Replicate(str(value).lower())
    except ValueError:
        raise ConfigError(f"{where} {value!r} is not valid; use none or peer") from None


def _positive_int(value: Any, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{where} must be an int >= 1, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class LocalTier:
    """The fast tier: every node saves to its own disk (node-local, as ``node_local``)."""

    dir: str
    """Node-local folder (the same path on every node, a different disk behind it), e.g.
    /local_nvme/ckpt; runs live under it as under ``output_dir``."""
    every_updates: int
    """Save to this tier when the update count is a multiple of this (see ``Checkpointer.due``)."""
    keep_last: int = 2
    """Committed points this tier keeps (the newest, alias targets and a point whose upload is
    running are always kept)."""
    replicate: Replicate = Replicate.NONE
    """``peer``: also copy each node's shards to one other node's local disk."""

    def __post_init__(self) -> None:
        if not isinstance(self.dir, str) or not self.dir:
            raise ConfigError(f"tiers.local.dir must be a non-empty path, got {self.dir!r}")
        if "://" in self.dir and not self.dir.startswith("file://"):
            raise ConfigError(f"tiers.local.dir must be a node-local path, got the URL {self.dir!r}; "
                              "object stores belong in tiers.durable.output_dir")
        _positive_int(self.every_updates, "tiers.local.every_updates")
        _positive_int(self.keep_last, "tiers.local.keep_last")
        if not isinstance(self.replicate, Replicate):
            raise ConfigError(f"tiers.local.replicate must be none or peer, got {self.replicate!r}")


@dataclass(frozen=True, kw_only=True)
class DurableTier:
    """The durable tier: every ``every_updates`` a point of the local tier is uploaded to
    ``output_dir`` (an object store) in the background."""

    every_updates: int
    """Upload the point when the update count is a multiple of this (a multiple of the local
    tier's ``every_updates``: only a point saved locally can be uploaded)."""
    output_dir: str | None = None
    """The durable store, e.g. s3://bucket/runs; defaults to the Checkpointer's ``output_dir``
    (and must equal it when both are set)."""
    retention: RetentionPolicy | None = None
    """Which durable points to keep (applied after each durable commit); None keeps all."""
    bandwidth_mb_s: float | None = None
    """Upper bound of each rank's upload rate in MB/s (10**6 bytes), averaged over the upload
    (paced in pieces of about a second's worth); None: as fast as the store takes it."""
    timeout_s: float = 3600.0
    """How long the ranks wait for each other's uploads before the upload fails."""

    def __post_init__(self) -> None:
        _positive_int(self.every_updates, "tiers.durable.every_updates")
        if self.output_dir is not None and (not isinstance(self.output_dir, str) or not self.output_dir):
            raise ConfigError(f"tiers.durable.output_dir must be a non-empty path or URL, got {self.output_dir!r}")
        if self.retention is not None and not isinstance(self.retention, RetentionPolicy):
            raise ConfigError(f"tiers.durable.retention must be a mapping (keep_last, keep_every), got {self.retention!r}")
        if self.bandwidth_mb_s is not None and (isinstance(self.bandwidth_mb_s, bool) or not isinstance(
                self.bandwidth_mb_s, (int, float)) or not self.bandwidth_mb_s > 0):
            raise ConfigError(f"tiers.durable.bandwidth_mb_s must be a number > 0 or null, got {self.bandwidth_mb_s!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ConfigError(f"tiers.durable.timeout_s must be > 0 (a number of seconds), got {self.timeout_s!r}")


@dataclass(frozen=True, kw_only=True)
class TiersConfig:
    """Two tiers driven by one Checkpointer: a fast node-local tier saved often and a durable
    tier (an object store) that receives some of its points, uploaded in the background."""

    local: LocalTier
    """The node-local tier."""
    durable: DurableTier
    """The durable tier."""

    def __post_init__(self) -> None:
        if not isinstance(self.local, LocalTier) or not isinstance(self.durable, DurableTier):
            raise ConfigError("tiers needs both a local and a durable block")
        if self.durable.every_updates % self.local.every_updates:
            raise ConfigError(f"tiers.durable.every_updates ({self.durable.every_updates}) must be a multiple of "
                              f"tiers.local.every_updates ({self.local.every_updates}): only a point saved to the "
                              "local tier can be uploaded")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TiersConfig:
        """From the ``tiers:`` block: ``local: {dir, every_updates, keep_last, replicate}``,
        ``durable: {output_dir, every_updates, retention, bandwidth_mb_s, timeout_s}``."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"tiers must be a mapping with local and durable, got {data!r}")
        check_known_keys(data, {"local", "durable"}, "tiers")
        blocks = {}
        for name, kind in (("local", LocalTier), ("durable", DurableTier)):
            block = data.get(name)
            if not isinstance(block, Mapping):
                raise ConfigError(f"tiers.{name} must be a mapping, got {block!r}")
            check_known_keys(block, {f.name for f in fields(kind)}, f"tiers.{name}")
            blocks[name] = dict(block)
        local, durable = blocks["local"], blocks["durable"]
        for key in ("dir", "every_updates"):
            if key not in local:
                raise ConfigError(f"tiers.local.{key} is missing")
        if "every_updates" not in durable:
            raise ConfigError("tiers.durable.every_updates is missing")
        if "replicate" in local:
            local["replicate"] = parse_replicate(local["replicate"], "tiers.local.replicate")
        if isinstance(durable.get("retention"), Mapping):
            durable["retention"] = RetentionPolicy.from_dict(dict(durable["retention"]))
        return cls(local=LocalTier(**local), durable=DurableTier(**durable))


@dataclass(frozen=True, kw_only=True)
class CheckpointerConfig:
    """Where and how a Checkpointer saves."""

    output_dir: str
    """Local path, file:// or s3://bucket/prefix under which runs live."""
    run_id: str
    """The run's id (see ``layout.default_run_id``)."""
    stage_name: str | None = None
    """Stage folder; None or "" for none."""
    model_name: str = "model"
    """The ``{model_name}`` of every file name."""
    best_metrics: dict[str, str] = field(default_factory=dict)
    """metric name -> "min" or "max": which values make a ``best.<metric>`` checkpoint."""
    storage: StorageOptions = field(default_factory=StorageOptions)
    """Store options (S3 endpoint, profile, region, retries)."""
    timeout_s: float = DEFAULT_TIMEOUT_S
    """Upper bound of every collective wait; by default ``NOETHER_DIST_TIMEOUT_S`` or 600 s,
    the same default as :func:`~noether_dist.resume` and ``Comm``."""
    thread_count: int = 1
    """Writer threads per rank (DCP); more helps object stores."""
    async_mode: AsyncMode = AsyncMode.OFF
    """off, thread or process."""
    retention: RetentionPolicy | None = None
    """Which checkpoints to keep (applied after each commit); None keeps all."""
    node_local: bool = False
    """Every node saves to its own disk at ``output_dir``: rank 0's files, the DCP metadata
    and the commit and alias records are mirrored to the first rank of every node, so that
    each node can resume on the same placement from its own disk."""
    tiers: TiersConfig | None = None
    """Two tiers (see :class:`TiersConfig`): every save goes to the node-local tier, some are
    uploaded to ``output_dir`` in the background. None: one tier, ``output_dir``."""
    replicate: Replicate = Replicate.NONE
    """With ``node_local``: ``peer`` also keeps each node's own files on the next node's
    disk (see :mod:`noether_dist.stage.peer`), so that losing one node loses nothing."""

    def __post_init__(self) -> None:
        from .format.names import validate_model_name

        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ConfigError(f"output_dir must be a non-empty path or URL, got {self.output_dir!r}")
        validate_name(self.run_id, "run_id")
        if self.stage_name:
            validate_name(self.stage_name, "stage_name")
        validate_model_name(self.model_name)
        for metric, mode in self.best_metrics.items():
            validate_name(metric, "metric name")
            if mode not in ("min", "max"):
                raise ConfigError(f"best_metrics[{metric!r}] must be 'min' or 'max', got {mode!r}")
        if isinstance(self.timeout_s, bool) or not isinstance(self.timeout_s, (int, float)) or not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0 (a number of seconds), got {self.timeout_s!r}")
        if not isinstance(self.thread_count, int) or self.thread_count < 1:
            raise ConfigError(f"thread_count must be an int >= 1, got {self.thread_count!r}")
        if not isinstance(self.async_mode, AsyncMode):
            raise ConfigError(f"async_mode must be an AsyncMode (off, thread, process), got {self.async_mode!r}")
        if self.tiers is not None:
            if not isinstance(self.tiers, TiersConfig):
                raise ConfigError(f"tiers must be a TiersConfig (a mapping with local and durable), got {self.tiers!r}")
            durable = self.tiers.durable.output_dir
            if durable is not None and durable.rstrip("/") != self.output_dir.rstrip("/"):
                raise ConfigError(f"tiers.durable.output_dir {durable!r} differs from output_dir {self.output_dir!r}; "
                                  "set one of them (the durable tier is output_dir)")
            if self.node_local:
                raise ConfigError("node_local and tiers exclude each other: the local tier is node-local already, "
                                  "the durable tier (output_dir) is shared")
            if self.retention is not None:
                raise ConfigError("with tiers, set retention per tier (tiers.local.keep_last, tiers.durable.retention), "
                                  "not the top-level retention")
        if not isinstance(self.replicate, Replicate):
            raise ConfigError(f"replicate must be a Replicate (peer or none), got {self.replicate!r}")
        if self.replicate is Replicate.PEER:
            if self.tiers is not None:
                raise ConfigError("with tiers, set tiers.local.replicate: peer (the local tier is the node-local one), "
                                  "not the top-level replicate")
            if not self.node_local:
                raise ConfigError("replicate: peer copies node-local disks; it needs node_local: true")
            if "://" in self.output_dir and not self.output_dir.startswith("file://"):
                raise ConfigError(f"replicate: peer needs output_dir on a node-local disk, not {self.output_dir!r}")

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "checkpointer config") -> CheckpointerConfig:
        """Build from a mapping (e.g. a YAML block): every field by its name, nested blocks
        (``storage``, ``retention``) and ``async_mode`` parsed. An unknown key is a ConfigError
        naming ``where`` and the closest field."""
        check_known_keys(data, {f.name for f in fields(cls)}, where)
        data = dict(data)
        if "storage" in data and not isinstance(data["storage"], StorageOptions):
            data["storage"] = StorageOptions.from_dict(data["storage"])
        if "retention" in data and isinstance(data["retention"], dict):
            data["retention"] = RetentionPolicy.from_dict(data["retention"])
        if "async_mode" in data:
            data["async_mode"] = parse_async_mode(data["async_mode"])
        if data.get("tiers") is not None and not isinstance(data["tiers"], TiersConfig):
            data["tiers"] = TiersConfig.from_dict(data["tiers"])
        if "replicate" in data:
            data["replicate"] = parse_replicate(data["replicate"])
        return cls(**data)

    @classmethod
    def from_block(cls, block: Mapping[str, Any] | None, *, where: str,
                   decided: Mapping[str, tuple[Any, str]]) -> CheckpointerConfig:
        """A trainer's ``checkpointer:`` block completed with the fields the trainer decides
        itself: ``decided`` maps a field to (its value, where the trainer takes it from). A
        decided field set in the block is a ConfigError saying where it comes from; the block's
        other keys are :meth:`from_dict`'s (so a new field is accepted by its name)."""
        data = dict(block or {})
        for key, (_, source) in decided.items():
            if key in data:
                raise ConfigError(f"{where}.{key} cannot be set: it is taken from {source}")
        check_known_keys(data, {f.name for f in fields(cls)} - set(decided), where)
        return cls.from_dict({**data, **{key: value for key, (value, _) in decided.items()}}, where=where)


@dataclass(frozen=True, kw_only=True)
class ResumeConfig:
    """What to resume, with the user's root config keys.

    ``stage_name`` (where the continued run saves) defaults to ``resume_stage_name``;
    ``resume_checkpoint`` defaults to ``latest``.
    """

    output_dir: str
    """Where the previous run lives."""
    resume_run_id: str
    """Id of the previous run."""
    resume_stage_name: str | None = None
    """Stage of the previous run; None when it had no stage folder."""
    stage_name: str | None = None
    """Stage of the continued run; defaults to resume_stage_name."""
    resume_checkpoint: str | None = None
    """latest (default), last, best.<metric>, or one of E<n>, U<n>, S<n>."""
    storage: StorageOptions = field(default_factory=StorageOptions)
    """Store options."""

    def __post_init__(self) -> None:
        if not isinstance(self.output_dir, str) or not self.output_dir:
            raise ConfigError(f"output_dir must be a non-empty path or URL, got {self.output_dir!r}")
        validate_name(self.resume_run_id, "resume_run_id")
        if self.resume_stage_name:
            validate_name(self.resume_stage_name, "resume_stage_name")
        if self.stage_name:
            validate_name(self.stage_name, "stage_name")
        self.checkpoint_ref  # parse now: a bad value fails at creation

    @property
    def checkpoint_ref(self) -> CheckpointRef:
        """The parsed ``resume_checkpoint``."""
        return parse_resume_checkpoint(self.resume_checkpoint)

    @property
    def explicit(self) -> bool:
        """True when a checkpoint was asked for by name (no silent fallback then)."""
        return self.resume_checkpoint not in (None, "", "latest")

    @property
    def continue_stage_name(self) -> str | None:
        """The stage the continued run saves into."""
        return self.stage_name if self.stage_name else self.resume_stage_name

    @classmethod
    def from_root_config(cls, root: Mapping[str, Any], output_dir: str | None = None,
                         storage: StorageOptions | None = None) -> ResumeConfig | None:
        """The resume part of a root config (keys as in the user's document), or None when
        ``resume_run_id`` is not set."""
        if not root.get("resume_run_id"):
            for key in ("resume_stage_name", "resume_checkpoint"):
                if root.get(key):
                    raise ConfigError(f"{key} is set but resume_run_id is not; set resume_run_id to the run to resume")
            return None
        out = output_dir or root.get("output_dir")
        if not out:
            raise ConfigError("resume needs output_dir (where the previous run lives)")
        return cls(output_dir=out, resume_run_id=root["resume_run_id"],
                   resume_stage_name=root.get("resume_stage_name"), stage_name=root.get("stage_name"),
                   resume_checkpoint=None if root.get("resume_checkpoint") is None else str(root["resume_checkpoint"]),
                   storage=storage or StorageOptions())
