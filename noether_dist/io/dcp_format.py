"""The sharded format behind :class:`~noether_dist.io.formats.ArtifactIO`: a DCP directory
per artifact, read and written through :mod:`noether_dist.io.dcp_io`; loading reshards
(saved on N ranks, loaded on M).

Staging one artifact for resume (collective), in order:

1. every rank describes what it will load (its keys, shapes and shard chunks) and sends it
   to the coordinator, which reads ``.metadata`` (the only read of it, or taken from
   :meth:`DcpFormat.prefetch`), checks every rank's keys and shapes (a mismatch raises the
   same one-line error on every rank), names the replicated entries that one rank reads for
   everyone (:func:`dcp_io.reader_of`), and sends each rank only its part of the metadata
   (:mod:`noether_dist.io.dcp_slices`): no rank but the coordinator holds it whole;
2. every rank allocates its staging;
3. one DCP load per rank, planned on its part (no DCP collective: nothing in the plan needs
   another rank): each rank reads its own entries and the shared ones that lie in its own
   files, checking each file it reads whole against the commit record;
4. the shared entries are exchanged (one all_gather of small values).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from ..errors import NoetherDistError, StorageError
from ..format.names import ArtifactFormat, ArtifactKind, format_artifact, normalize_model_info
from ..format.trainer_keys import (TRAINER_COMMON_KEY, common_entry, rank_of_trainer_key, state_of_common_entry,
                                   trainer_rank_key)
from . import dcp_io, dcp_slices
from .format_api import ArtifactIO, KeyInfo, LoadTarget, TrainerContent, WriteContext, default_verify_max_bytes
from .statedict import (apply_model_state, apply_optimizer_state, empty_like_packed, model_state, pack_object,
                        unpack_object)

__all__ = ["DcpFormat", "REPLICATED_MAX_BYTES"]

log = logging.getLogger(__name__)

REPLICATED_MAX_BYTES = 2**20
"""Plain (not DTensor) entries up to this size are read by one rank and shared."""


def _same_kind(staged: torch.Tensor, value: torch.Tensor) -> bool:
    """True when ``value`` can stand in for the staged tensor as it is: both DTensors with the
    same placements and mesh, or both plain, of one shape, dtype and device."""
    if dcp_io.is_sharded(staged) != dcp_io.is_sharded(value):
        return False
    if dcp_io.is_sharded(staged) and (staged.placements != value.placements or staged.device_mesh != value.device_mesh):
        return False
    return staged.size() == value.size() and staged.dtype == value.dtype and staged.device == value.device


def _replicated_small(key: str, value: Any) -> bool:
    """Entries one rank reads for everyone: every value that is not a DTensor shard and is
    small (optimizer ``step``, hyperparameters). DCP's dedup stores each once, in whichever
    rank's file, so every rank reading them costs ws x ws requests."""
    if dcp_io.is_sharded(value):
        return False
    return not isinstance(value, torch.Tensor) or value.numel() * value.element_size() <= REPLICATED_MAX_BYTES


def _trainer_placeholders(metadata: Any, rank: int) -> dict[str, Any]:
    """What this rank loads from a trainer artifact: the common state and its own, if saved."""
    sd: dict[str, Any] = {}
    for key in (TRAINER_COMMON_KEY, trainer_rank_key(rank)):
        meta = metadata.state_dict_metadata.get(key)
        if meta is not None:
            sd[key] = empty_like_packed(meta.size[0])
    return sd


def _metadata_or_reason(storage: Any, path: str) -> tuple[Any, str | None]:
    """(DCP metadata, None), or (None, why it cannot be read)."""
    try:
        return dcp_io.read_metadata(path, storage), None
    except FileNotFoundError:
        return None, f"{path} has no DCP metadata"
    except NoetherDistError:
        raise
    except Exception as exc:  # noqa: BLE001 - unreadable metadata is a reason to fall back
        return None, f"{path}/.metadata is unreadable: {type(exc).__name__}: {exc}"


class DcpFormat(ArtifactIO):
    """A DCP directory (``.metadata`` and shard files) with the artifact's name."""

    format = ArtifactFormat.DCP

    def check(self, storage: Any, path: str) -> str | None:
        probe = f"{path}/{dcp_io.METADATA_FILE}"
        return None if storage.exists(probe) else f"{probe} is missing"

    def keys(self, storage: Any, path: str, kind: ArtifactKind) -> list[KeyInfo]:
        metadata = dcp_io.read_metadata(path, storage)
        stored: dict[str, int] = {}
        for index, info in (metadata.storage_data or {}).items():
            stored[index.fqn] = stored.get(index.fqn, 0) + int(getattr(info, "length", 0) or 0)
        out = []
        for key, meta in sorted(metadata.state_dict_metadata.items()):
            if isinstance(meta, TensorStorageMetadata):
                dtype = meta.properties.dtype
                numel = 1
                for dim in meta.size:
                    numel *= int(dim)
                out.append(KeyInfo(key, tuple(meta.size), str(dtype).replace("torch.", ""),
                                   numel * torch.empty((), dtype=dtype).element_size()))
            else:
                out.append(KeyInfo(key, None, "object", stored.get(key)))
        return out

    def read(self, storage: Any, path: str, kind: ArtifactKind) -> Any:
        full = dcp_io.load_full(path, storage)
        if kind is not ArtifactKind.TRAINER:
            return full
        common = unpack_object(full[TRAINER_COMMON_KEY]) if TRAINER_COMMON_KEY in full else {}
        ranks = {rank: unpack_object(v) for k, v in full.items() if (rank := rank_of_trainer_key(k)) is not None}
        return TrainerContent(state_of_common_entry(common), ranks)

    def write(self, storage: Any, path: str, kind: ArtifactKind, content: Any,
              context: WriteContext) -> tuple[dcp_io.FileRecord, ...]:
        state = content
        if kind is ArtifactKind.TRAINER:
            state = {TRAINER_COMMON_KEY: pack_object(common_entry(context.iteration.to_dict(), content.state))}
            state.update({trainer_rank_key(r): pack_object(v) for r, v in content.ranks.items()})
        return tuple(dcp_io.save_state(state, path, storage, process_group=None))

    def artifact_name(self, model_name: str, checkpoint: str, kind: ArtifactKind, model_info: str | None) -> str:
        return format_artifact(model_name, checkpoint, kind, normalize_model_info(model_info))

    def prefetch(self, storage: Any, path: str) -> Any:
        return _metadata_or_reason(storage, path)

    def stage(self, comm: Any, storage: Any, path: str, target: LoadTarget, verify_max_bytes: int,
              prefetched: Any = None) -> tuple[dcp_io.Staging | None, str | None]:
        if target.role == "trainer":  # every rank's own state: each rank loads its part
            def state_of(md: Any) -> dict[str, Any]:
                return _trainer_placeholders(md, comm.rank)

            def shared(key: str, _value: Any) -> bool:
                return key == TRAINER_COMMON_KEY
        else:
            def state_of(md: Any) -> dict[str, Any]:
                return target.state

            shared = _replicated_small
        return _stage(comm, storage, path, target, state_of, shared, verify_max_bytes, prefetched)

    def apply(self, staged: dcp_io.Staging, target: LoadTarget, rank: int) -> tuple[dict[str, Any], Any] | None:
        if target.role == "trainer":
            flat = staged.flat
            common = unpack_object(flat[TRAINER_COMMON_KEY]) if TRAINER_COMMON_KEY in flat else {}
            own = unpack_object(flat[trainer_rank_key(rank)]) if trainer_rank_key(rank) in flat else None
            return state_of_common_entry(common), own
        if target.role == "optim":
            apply_optimizer_state(target.owner, target.module, staged.nested())
        elif isinstance(target.module, nn.Module):
            apply_model_state(target.module, staged.nested())
        else:
            staged.copy_into(target.state)
        return None

    def load_weights(self, comm: Any, storage: Any, path: str, model: Any,
                     plan: Callable[[dict[str, tuple[int, ...] | None]], dict[str, str]], art: Any) -> int:
        # The coordinator reads .metadata once and sends every rank the stored keys and shapes
        # (small), then each rank its part of the metadata, as resume does (_stage): not the
        # whole file to every rank (at thousands of ranks that is hundreds of MiB each), nor a
        # read of it by every rank.
        read: list[Any] = []

        def stored_shapes() -> dict[str, tuple[int, ...] | None]:
            metadata, reason = _metadata_or_reason(storage, path)
            if reason:
                raise StorageError(f"cannot initialise from {path}: {reason}")
            read.append(metadata)
            return {k: tuple(m.size) if isinstance(m, TensorStorageMetadata) else None
                    for k, m in metadata.state_dict_metadata.items()}

        shapes = comm.broadcast_from_coordinator(stored_shapes)
        chosen: dict[str, str] = {}

        def target() -> dict[str, Any]:
            chosen.update(plan(shapes))
            current = model_state(model)
            return {src: current[model_key] for model_key, src in chosen.items()}

        loaded = comm.run_everywhere(target)
        staged, reason = _stage(comm, storage, path, LoadTarget(art, "model", loaded), lambda _md: loaded,
                                _replicated_small, default_verify_max_bytes(storage),
                                (read[0], None) if read else None, subset=True)
        reasons = [r for r in comm.all_gather(reason) if r]
        if reasons:
            raise StorageError(f"cannot initialise from {path}: {'; '.join(sorted(set(reasons)))}")
        current = model_state(model)
        for model_key, src in chosen.items():
            current[model_key] = staged.flat[src]
        comm.run_everywhere(lambda: set_model_state_dict(model, current, options=StateDictOptions(strict=False)))
        return len(loaded)


def _stage(comm: Any, storage: Any, path: str, target: LoadTarget, state_of: Callable[[Any], dict[str, Any]],
           shared: Callable[[str, Any], bool], verify_max_bytes: int, prefetched: Any, subset: bool = False
           ) -> tuple[dcp_io.Staging | None, str | None]:
    """Steps 1-4 of the module docstring; ``subset``: load some of the stored keys only
    (weights-only initialization), not the whole artifact."""
    art, role = target.art, target.role
    trainer = role == "trainer"

    def describe() -> list[dcp_slices.Want]:
        if trainer:  # whole entries of whatever size was saved: this rank's and the common one
            keys = (TRAINER_COMMON_KEY, trainer_rank_key(comm.rank))
            return dcp_slices.wants_whole(keys, shared=[k for k in keys if shared(k, None)])
        return dcp_slices.describe(dcp_io.staging(target.state).flat, shared)

    def cut(wants: list[list[dcp_slices.Want]]) -> list[bytes]:
        with dcp_io.paused_gc():  # millions of objects at thousands of ranks: see paused_gc
            return cut_all(wants)

    def cut_all(wants: list[list[dcp_slices.Want]]) -> list[bytes]:
        if isinstance(prefetched, BaseException):
            raise prefetched
        metadata, reason = prefetched if prefetched is not None else _metadata_or_reason(storage, path)
        if reason:
            return [dcp_slices.Slice((), reason=reason).to_bytes()] * len(wants)
        cutter = dcp_slices.MetadataCutter(metadata)
        own = wants[comm.coordinator_group_rank]  # the coordinator's view decides
        shared_keys = sorted(w.key for w in own if w.shared and w.key in metadata.state_dict_metadata)
        if len(wants) == 1:
            shared_keys = []
        readers = {k: dcp_io.reader_of(k, metadata, len(wants)) for k in shared_keys}
        parts = []
        for rank, rank_wants in enumerate(wants):  # one pass: a rank's description is dropped once cut
            if not trainer:  # (a trainer artifact holds every rank's own state: each rank loads a part)
                cutter.check(rank_wants, f"{role} checkpoint {art.name}", subset=subset)
            parts.append(cutter.cut(rank_wants, shared_keys, [k for k in shared_keys if readers[k] == rank]).to_bytes())
            wants[rank] = []
        return parts

    data = comm.gather_scatter(describe, cut)
    part = dcp_slices.Slice.from_bytes(data)
    if part.reason:
        return None, part.reason  # the same on every rank: every rank stops here
    metadata = part.metadata()
    log.debug("rank %d: %s metadata part of %d entries (%d bytes)", comm.rank, art.name, part.stored_entries,
              len(data), extra={"metadata_part": {"artifact": art.name, "entries": part.stored_entries,
                                                  "keys": len(part.entries), "bytes": len(data)}})
    staged = comm.run_everywhere(lambda: dcp_io.staging(state_of(metadata)))
    shared_set = set(part.shared)
    own = {k: v for k, v in staged.flat.items() if k not in shared_set}
    own.update({k: dcp_io.placeholder(k, metadata) for k in part.mine})
    # this rank alone (no DCP collective): the plan needs nothing from the other ranks
    report = comm.run_everywhere(lambda: dcp_io.load_checked(
        own, path, storage, metadata=metadata, files=art.files, verify=verify_max_bytes > 0,
        whole_max_bytes=verify_max_bytes, collective=False, adopt=True))
    own.update(report.adopted)
    if part.any_shared:
        for got in comm.all_gather({k: own.pop(k) for k in part.mine}):
            for key, value in got.items():
                if key in staged.flat and not dcp_io.is_sharded(staged.flat[key]):
                    own[key] = value
    for key, value in own.items():  # DCP replaced non-tensors, the reader adopted tensors (fresh ones)
        old = staged.flat[key]
        if (isinstance(old, torch.Tensor) and isinstance(value, torch.Tensor) and old is not value
                and not _same_kind(old, value)):
            old.copy_(value)
        else:
            staged.flat[key] = value
    return staged, "; ".join(report.problems) or None
