"""The consolidated format behind :class:`~noether_dist.io.formats.ArtifactIO`: one
``torch.save`` file per artifact, laid out as Noether writes it (see
:mod:`noether_dist.io.consolidated`). Every rank reads the whole file (memory-mapped on a
local disk) and keeps its own shard of each tensor.

Staging one artifact for resume (collective): every rank reads the file and checks it against
the commit record on the bytes it loads (object stores: size and CRC32 of the one read; local
disks: streamed through the CRC32 in pieces when at most ``verify_max_bytes``; Noether's own
files have no record), and checks it against its targets (keys and shapes; an optimizer file is matched
by parameter name), nothing applied yet.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from ..errors import ConfigError, NoetherDistError
from ..format.names import ArtifactFormat, ArtifactKind, ema_factor_of, format_artifact, noether_model_info
from . import consolidated
from .checksum import crc32
from .dcp_io import FileRecord
from .storage import Storage
from .format_api import ArtifactIO, KeyInfo, LoadTarget, TrainerContent, WriteContext, flat_keys
from .optim_file import names_from_file, to_noether_layout

__all__ = ["ConsolidatedFormat"]


def _read_single(storage: Storage, path: str, art: Any, limit: int) -> tuple[Any, str | None]:
    """A single file's content, checked against its commit record before anything uses it;
    (content, None) or (None, why this rank cannot use it). The bytes checked are the bytes
    loaded: on an object store the file is read once (one GET) and its size and CRC32
    checked on those bytes; on a local disk a file of at most ``limit`` bytes is streamed
    through the CRC32 in pieces (memory bounded by a piece, not the file), then memory-mapped.
    ``limit`` 0: no CRC32 check. Noether's own files have no record: only read."""
    rec = next((r for r in art.files if r.name == ""), None)
    try:
        if storage.local_path(path) is None:
            data = storage.read(path)
            reason = _mismatch(path, rec, len(data), crc32(data)) if rec is not None and limit > 0 else None
            return (None, reason) if reason else (consolidated.load_bytes(data), None)
        if rec is not None and 0 < limit and rec.size <= limit:
            reason = _mismatch(path, rec, *_streamed_crc32(storage, path))
            if reason:
                return None, reason
        return consolidated.read_file(storage, path), None
    except FileNotFoundError:
        return None, f"{path} is missing"
    except NoetherDistError:
        raise
    except Exception as exc:  # noqa: BLE001 - a damaged file is a reason to fall back
        return None, f"{path} is unreadable: {type(exc).__name__}: {exc}"


def _streamed_crc32(storage: Storage, path: str) -> tuple[int, int]:
    size, crc = 0, 0
    with storage.open_read(path) as stream:
        while chunk := stream.read(_CHUNK_BYTES):
            crc = crc32(chunk, crc)
            size += len(chunk)
    return size, crc


_CHUNK_BYTES = 8 << 20


def _mismatch(path: str, rec: FileRecord, size: int, crc: int) -> str | None:
    """Why a file of ``size`` bytes and CRC32 ``crc`` is not the one ``rec`` records, or None."""
    if size != rec.size:
        return f"{path} has {size} bytes, the commit record says {rec.size}"
    if crc & 0xFFFFFFFF != rec.crc32:
        return f"{path} is corrupt: CRC32 {crc & 0xFFFFFFFF:08x}, the commit record says {rec.crc32:08x}"
    return None


def _check_file(storage: Any, path: str, need: LoadTarget, verify_max_bytes: int) -> tuple[Any, str | None]:
    """(what to apply, None) or (None, why this rank cannot use the file)."""
    obj, reason = _read_single(storage, path, need.art, verify_max_bytes)
    if reason:
        return None, reason
    if need.role == "optim":
        # matched by name and every shape checked here, before anything is loaded
        return consolidated.check_optimizer_file(need.owner, need.module, obj, f"optimizer file {path}",
                                                 target=need.state), None
    consolidated.check_model_keys(need.module, consolidated.state_dict_of(obj, path),
                                  f"{need.role} checkpoint {need.art.name}")
    return obj, None


class ConsolidatedFormat(ArtifactIO):
    """One ``torch.save`` file with the artifact's name (ours or Noether's own)."""

    format = ArtifactFormat.CONSOLIDATED

    def check(self, storage: Any, path: str) -> str | None:
        return None if storage.exists(path) else f"{path} is missing"

    def keys(self, storage: Any, path: str, kind: ArtifactKind) -> list[KeyInfo]:
        obj = consolidated.read_file(storage, path)
        if kind is ArtifactKind.MODEL:
            return sorted(flat_keys(consolidated.state_dict_of(obj, path)), key=lambda e: e.key)
        if not isinstance(obj, dict):
            raise ConfigError(f"{path} is not a Noether {kind.value} file: expected a dict, got {type(obj).__name__}")
        return flat_keys(obj)

    def read(self, storage: Any, path: str, kind: ArtifactKind) -> Any:
        obj = consolidated.read_file(storage, path)
        if kind is ArtifactKind.MODEL:
            return consolidated.state_dict_of(obj, path)
        if kind is ArtifactKind.OPTIM:
            state = names_from_file(obj, path)
            if state is None:
                raise ConfigError(f"{path} keys optimizer state by parameter index without param_idx_to_name; "
                                  "converting it needs the model: load it with resume() and save again")
            return state
        return TrainerContent(*consolidated.trainer_state_of(obj))

    def file_object(self, kind: ArtifactKind, content: Any, context: WriteContext) -> Any:
        """What Noether stores in the file of an artifact with that content."""
        it = context.iteration
        if kind is ArtifactKind.MODEL:
            return consolidated.model_file(content, it, context.run_id, context.checkpoint_tag or str(it),
                                           ema_factor_of(context.model_info), context.model_config)
        if kind is ArtifactKind.OPTIM:
            return to_noether_layout(content, f"optimizer of {it}")
        return consolidated.trainer_file(content.state, content.ranks, it)

    def write_object(self, storage: Any, path: str, obj: Any) -> FileRecord:
        """``torch.save`` ``obj`` to ``path``, streamed; the file's record (size, CRC32)."""
        with storage.open_write(path) as stream:
            torch.save(obj, stream)
        return FileRecord("", stream.size, stream.crc)

    def write(self, storage: Any, path: str, kind: ArtifactKind, content: Any,
              context: WriteContext) -> tuple[FileRecord, ...]:
        return (self.write_object(storage, path, self.file_object(kind, content, context)),)

    def artifact_name(self, model_name: str, checkpoint: str, kind: ArtifactKind, model_info: str | None) -> str:
        return format_artifact(model_name, checkpoint, kind, noether_model_info(model_info))

    def check_target(self, target: LoadTarget) -> None:
        if not isinstance(target.module, (nn.Module, torch.optim.Optimizer)):
            raise ConfigError("loading a consolidated (single-file) checkpoint needs nn.Module / optimizer targets")

    def stage(self, comm: Any, storage: Any, path: str, target: LoadTarget, verify_max_bytes: int,
              prefetched: Any = None) -> tuple[Any, str | None]:
        if target.role != "trainer":
            return comm.run_everywhere(lambda: _check_file(storage, path, target, verify_max_bytes))

        return comm.run_everywhere(lambda: _read_single(storage, path, target.art, verify_max_bytes))

    def apply(self, staged: Any, target: LoadTarget, rank: int) -> tuple[dict[str, Any], Any] | None:
        if target.role == "trainer":
            common, ranks = consolidated.trainer_state_of(staged)
            return dict(common), ranks.get(rank)
        if target.role == "optim":
            consolidated.apply_optimizer_file(target.owner, target.module, staged)
        else:
            consolidated.load_model_file(target.module, consolidated.state_dict_of(staged, target.art.name))
        return None

    def load_weights(self, comm: Any, storage: Any, path: str, model: Any,
                     plan: Callable[[dict[str, tuple[int, ...] | None]], dict[str, str]], art: Any) -> int:
        def load_file() -> int:
            stored = consolidated.state_dict_of(consolidated.read_file(storage, path), path)
            wanted = plan({k: v.shape for k, v in stored.items()})
            full = {model_key: stored[src] for model_key, src in wanted.items()}
            count = len(full)  # (torch fills the dict it is given with the keys it lacked)
            set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
            return count

        return comm.run_everywhere(load_file)
