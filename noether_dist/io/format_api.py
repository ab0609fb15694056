"""The interface every artifact format implements (see :mod:`noether_dist.io.formats`, which
looks the implementations up): how one artifact of a checkpoint is checked, listed, loaded
and written, whatever lies on storage.

An artifact (model, EMA model, optimizer or trainer state) lies on storage in one of the
:class:`~noether_dist.format.names.ArtifactFormat` formats, which its commit record names.
:func:`noether_dist.io.formats.artifact_io` looks up the implementation; callers never test
the format themselves:

- :class:`noether_dist.io.dcp_format.DcpFormat`: a DCP directory (sharded; loading reshards);
- :class:`noether_dist.io.consolidated_format.ConsolidatedFormat`: one ``torch.save`` file
  laid out as Noether writes it (ours after ``noether-ckpt convert --to consolidated``, and
  Noether's own files, which have no commit record).

Order of calls when a checkpoint is resumed (``stage`` and the agreement are collectives
over the control group; see :mod:`noether_dist.resume`):

1. :meth:`ArtifactIO.check_target` on every rank: can this format load into these targets;
2. :meth:`ArtifactIO.prefetch` on the coordinator only, for every artifact at once: what the
   coordinator reads for everyone (DCP metadata), so that the reads overlap;
3. :meth:`ArtifactIO.stage` (collective): load into staging memory, check keys, shapes and
   the bytes read; a file that is missing, short or corrupt is a reason, not an error;
4. the ranks agree on the reasons (in :mod:`noether_dist.resume`), then
   :meth:`ArtifactIO.apply` puts what was staged into the live model or optimizer.

Outside resume, in one process: :meth:`ArtifactIO.check` (is it there), :meth:`ArtifactIO.keys`
(names, shapes, dtypes), :meth:`ArtifactIO.read` / :meth:`ArtifactIO.write` (the whole
content, for conversion) and, collectively, :meth:`ArtifactIO.load_weights` (model weights
only, with a key plan: initializers).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ..format.names import ArtifactFormat, ArtifactKind, TrainingIteration

if TYPE_CHECKING:
    from ..dist.comm import Comm
    from .dcp_io import FileRecord
    from .storage import Storage

__all__ = ["ArtifactIO", "LoadTarget", "TrainerContent", "WriteContext", "KeyInfo", "flat_keys",
           "VERIFY_MAX_BYTES_LOCAL", "VERIFY_MAX_BYTES_REMOTE", "default_verify_max_bytes"]

VERIFY_MAX_BYTES_LOCAL = 256 * 2**20
"""Every file a rank reads whole is checked (size and CRC32) on the bytes it loads. A file of
which a rank needs only a part is read whole when it is at most this size (so that it can be
checked), else only the parts it needs."""
VERIFY_MAX_BYTES_REMOTE = 2**20
"""The same bound on object stores, where the extra bytes cost more."""


def default_verify_max_bytes(storage: Any) -> int:
    """The bound above that fits ``storage`` (a local disk or not)."""
    return VERIFY_MAX_BYTES_LOCAL if storage.is_local else VERIFY_MAX_BYTES_REMOTE


@dataclass
class LoadTarget:
    """One artifact to load and what it loads into."""

    art: Any
    """The artifact's entry in the commit record (``ArtifactRecord``: name, format, files)."""
    role: str
    """``model``, ``ema:<model_info>``, ``optim`` or ``trainer``."""
    state: dict[str, Any]
    """The live state dict to load into (``{}`` for the trainer artifact)."""
    module: Any = None
    """The model (``nn.Module`` or a plain state dict) or the optimizer; None for the trainer."""
    owner: Any = None
    """The model an optimizer belongs to."""


@dataclass(frozen=True)
class TrainerContent:
    """A trainer artifact's content, whatever its format."""

    state: dict[str, Any]
    """The trainer state saved by rank 0 (progress, callbacks, grad scaler, ...)."""
    ranks: dict[int, Any] = field(default_factory=dict)
    """Each rank's own saved state (RNG, data position), by rank."""


@dataclass(frozen=True)
class WriteContext:
    """What a written artifact records beside its state (consolidated files carry it)."""

    iteration: TrainingIteration
    run_id: str
    model_info: str | None = None
    """The artifact's model_info (an EMA's factor goes into its file)."""
    model_config: Mapping[str, Any] | None = None
    """``model_config`` / ``config_kind`` of the model, when known."""
    checkpoint_tag: str | None = None
    """The checkpoint a model file names (Noether's tag, e.g. ``latest``, for its tag copies);
    None: the training point."""


@dataclass(frozen=True)
class KeyInfo:
    """One entry of an artifact: key, shape (None for a non-tensor), dtype, bytes (None: unknown)."""

    key: str
    shape: tuple[int, ...] | None
    dtype: str
    bytes: int | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``noether-ckpt inspect --json``)."""
        return {"key": self.key, "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype,
                "bytes": self.bytes}


class ArtifactIO(ABC):
    """How one format is checked, listed, loaded and written (see the module docstring for
    the order of calls). Implementations hold no state: one instance per format."""

    format: ClassVar[ArtifactFormat]

    # -- one process ----------------------------------------------------------------------
    @abstractmethod
    def check(self, storage: Storage, path: str) -> str | None:
        """Why the artifact at ``path`` cannot be read from here (one existence check),
        or None when it is there."""

    @abstractmethod
    def keys(self, storage: Storage, path: str, kind: ArtifactKind) -> list[KeyInfo]:
        """Every entry of the artifact, sorted by key for models; FileNotFoundError when it is
        absent, ConfigError when it is not what its kind says."""

    @abstractmethod
    def read(self, storage: Storage, path: str, kind: ArtifactKind) -> Any:
        """The whole content in this process: a model's state dict, an optimizer state dict
        keyed by parameter name, or a :class:`TrainerContent`."""

    @abstractmethod
    def write(self, storage: Storage, path: str, kind: ArtifactKind, content: Any,
              context: WriteContext) -> tuple[FileRecord, ...]:
        """Write what :meth:`read` returns (from either format) to ``path`` in this process;
        return the files written, as a commit record lists them."""

    @abstractmethod
    def artifact_name(self, model_name: str, checkpoint: str, kind: ArtifactKind, model_info: str | None) -> str:
        """The file name this format gives an artifact (Noether's own files spell an EMA
        ``ema=<factor>``, ours ``ema_factor=<factor>``)."""

    # -- resume, in the order of the module docstring (stage and load_weights are collectives)
    def check_target(self, target: LoadTarget) -> None:
        """ConfigError when this format cannot load into ``target``'s kind of object."""

    def prefetch(self, storage: Storage, path: str) -> Any:
        """Coordinator only, before :meth:`stage`: what it reads once for every rank, or
        None when this format reads nothing ahead. Runs on a thread beside the others."""
        return None

    @abstractmethod
    def stage(self, comm: Comm, storage: Storage, path: str, target: LoadTarget, verify_max_bytes: int,
              prefetched: Any = None) -> tuple[Any, str | None]:
        """Load the artifact into staging memory, nothing of the targets yet (collective);
        (staged, None) or (staged or None, why this rank cannot use it). Keys and shapes
        that do not match raise StateMismatchError on every rank. Files read whole are
        checked against the commit record (size, CRC32) when ``verify_max_bytes`` > 0."""

    @abstractmethod
    def apply(self, staged: Any, target: LoadTarget, rank: int) -> tuple[dict[str, Any], Any] | None:
        """Put what :meth:`stage` loaded into ``target`` (every rank, after the agreement).
        For the trainer artifact: (trainer state, this rank's own state or None)."""

    @abstractmethod
    def load_weights(self, comm: Comm, storage: Storage, path: str, model: Any,
                     plan: Callable[[dict[str, tuple[int, ...] | None]], dict[str, str]], art: Any) -> int:
        """Load model weights into ``model`` (collective; any sharding): ``plan`` gets every
        stored key's shape (None: not a tensor) and returns model key -> stored key of what
        to load; the other model keys keep their values. ``art``: the artifact's entry in the
        commit record (its files' sizes and CRC32s; none for an uncommitted one). Returns the
        number loaded; a file that is missing or damaged raises on every rank."""


def flat_keys(obj: Any, prefix: str = "") -> list[KeyInfo]:
    """Every leaf of a nested dict / list of tensors and values, keys joined with dots."""
    import torch

    if isinstance(obj, dict):
        return [e for k, v in obj.items() for e in flat_keys(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, (list, tuple)) and obj and any(isinstance(v, (dict, torch.Tensor)) for v in obj):
        return [e for i, v in enumerate(obj) for e in flat_keys(v, f"{prefix}.{i}" if prefix else str(i))]
    if isinstance(obj, torch.Tensor):
        return [KeyInfo(prefix, tuple(obj.shape), str(obj.dtype).replace("torch.", ""), obj.numel() * obj.element_size())]
    return [KeyInfo(prefix, None, type(obj).__name__, None)]
