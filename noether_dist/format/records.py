"""The record schema: commit records, artifacts, files and aliases, and their JSON form.

Pure data (no I/O, no torch): :mod:`noether_dist.stage.commit` reads and writes these
records on a :class:`~noether_dist.io.storage.Storage`, :mod:`noether_dist.io.dcp_io`
fills :class:`FileRecord` while it writes. A record that cannot be parsed raises
:class:`CorruptRecordError`.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import StorageError
from .names import ArtifactFormat, TrainingIteration

__all__ = ["FileRecord", "ArtifactRecord", "CommitRecord", "AliasRecord", "CorruptRecordError", "FORMAT_VERSION"]

FORMAT_VERSION = 1


class CorruptRecordError(StorageError):
    """A commit record or alias exists but cannot be parsed."""


@dataclass(frozen=True)
class FileRecord:
    """One file written into a DCP directory: name relative to it, bytes, CRC32."""

    name: str
    size: int
    crc32: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"name": self.name, "size": self.size, "crc32": self.crc32}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FileRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(str(data["name"]), int(data["size"]), int(data["crc32"]))


@dataclass(frozen=True)
class ArtifactRecord:
    """One artifact of a checkpoint (a Noether name) and the files it consists of."""

    name: str
    """The Noether file name, e.g. ``transformer_cp=E1_U10_S80_model.th``."""
    kind: str
    """model, optim or trainer."""
    model_info: str | None = None
    """e.g. ``ema_factor=0.9999`` for an EMA model."""
    format: ArtifactFormat = ArtifactFormat.DCP
    """A DCP directory or one consolidated file; given as a member or its stored value."""
    files: tuple[FileRecord, ...] = ()
    """Every file written, over all ranks."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "format", ArtifactFormat.parse(self.format))

    @property
    def total_bytes(self) -> int:
        """Sum of the sizes of the artifact's files."""
        return sum(f.size for f in self.files)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        out = {k: v for k, v in asdict(self).items() if k != "files"}
        out["format"] = self.format.value
        out["files"] = [f.to_dict() for f in self.files]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArtifactRecord:
        """Inverse of :meth:`to_dict`."""
        return cls(data["name"], data["kind"], data.get("model_info"),
                   ArtifactFormat.parse(data.get("format", ArtifactFormat.DCP.value)),
                   tuple(FileRecord.from_dict(f) for f in data.get("files", [])))


@dataclass(frozen=True)
class CommitRecord:
    """The commit record of one checkpoint (one training point)."""

    iteration: TrainingIteration
    run_id: str
    stage_name: str | None
    model_name: str
    world_size: int
    artifacts: tuple[ArtifactRecord, ...]
    metrics: dict[str, float] = field(default_factory=dict)
    created_at: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def checkpoint(self) -> str:
        """The training-point name, ``E.._U.._S..``."""
        return str(self.iteration)

    @property
    def total_bytes(self) -> int:
        """Bytes of all artifacts."""
        return sum(a.total_bytes for a in self.artifacts)

    def artifact(self, kind: str, model_info: str | None = None) -> ArtifactRecord | None:
        """The artifact of that kind (and model_info), or None."""
        for art in self.artifacts:
            if art.kind == kind and (art.model_info or None) == (model_info or None):
                return art
        return None

    def to_json(self) -> bytes:
        """Serialised form, as stored."""
        data = {
            "format_version": self.format_version,
            "checkpoint": self.checkpoint,
            "training_iteration": self.iteration.to_dict(),
            "run_id": self.run_id,
            "stage_name": self.stage_name,
            "model_name": self.model_name,
            "world_size": self.world_size,
            "metrics": self.metrics,
            "created_at": self.created_at or _now(),
            "artifacts": [a.to_dict() for a in self.artifacts],
        }
        return json.dumps(data, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str = "commit record") -> CommitRecord:
        """Parse a stored record; CorruptRecordError if it is not one."""
        try:
            data = json.loads(raw)
            return cls(
                iteration=TrainingIteration.from_dict(data["training_iteration"]),
                run_id=data["run_id"], stage_name=data.get("stage_name"), model_name=data["model_name"],
                world_size=int(data["world_size"]),
                artifacts=tuple(ArtifactRecord.from_dict(a) for a in data["artifacts"]),
                metrics=dict(data.get("metrics") or {}), created_at=data.get("created_at", ""),
                format_version=int(data.get("format_version", 1)),
            )
        except Exception as exc:  # noqa: BLE001 - anything unparsable is corrupt
            raise CorruptRecordError(f"{where} is corrupt: {type(exc).__name__}: {exc}") from exc


@dataclass(frozen=True)
class AliasRecord:
    """An alias: ``name`` (latest, last, best.<metric>) points at training point ``iteration``.

    For best.<metric> aliases, ``value`` and ``mode`` (min/max) say why it was chosen.
    """

    name: str
    iteration: TrainingIteration
    value: float | None = None
    mode: str | None = None
    updated_at: str = ""

    def to_json(self) -> bytes:
        """Serialised form, as stored."""
        return json.dumps({"alias": self.name, "checkpoint": str(self.iteration), "value": self.value,
                           "mode": self.mode, "updated_at": self.updated_at or _now()}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str = "alias") -> AliasRecord:
        """Parse a stored alias; CorruptRecordError if it is not one."""
        try:
            data = json.loads(raw)
            return cls(data["alias"], TrainingIteration.parse(data["checkpoint"]), data.get("value"),
                       data.get("mode"), data.get("updated_at", ""))
        except Exception as exc:  # noqa: BLE001
            raise CorruptRecordError(f"{where} is corrupt: {type(exc).__name__}: {exc}") from exc


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
