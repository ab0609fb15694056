"""DCP metadata at thousands of ranks, modelled in one process (no ranks are launched).

A model of ``tensors`` parameters (FSDP2: each sharded along dim 0 over ``world_size``
ranks) and its AdamW state (``exp_avg`` and ``exp_avg_sq`` sharded like the parameter, a
replicated ``step`` per parameter) are described the way DCP's save planners describe
them once they ran: one chunk per rank per sharded tensor, one storage entry per chunk,
replicated entries spread over the ranks' files by dedup. From that:

- ``.metadata`` bytes of each artifact (pickled exactly as our writer stores it);
- seconds to unpickle it (what a rank spends after reading it), as DCP does it and with
  Python's garbage collector paused, as ours does;
- seconds for one rank's load plan on it with DCP's own ``DefaultLoadPlanner`` (its local
  shards stand in for DTensors through ``__create_chunk_list__``, which is what DCP asks
  a DTensor for), and with the metadata cut down to that rank's chunks first
  (:func:`noether_dist.io.dcp_io.metadata_for`);
- bytes each rank reads (its shards), requests per rank and per resume, by the counts
  that ``benchmarks/bench_requests.py`` measures at 1..16 ranks.

Run from run.py (``--only metadata``) or alone: ``python -m benchmarks.bench_metadata``.
"""

from __future__ import annotations

import gc
import logging
import pickle
import time
from typing import Any

log = logging.getLogger(__name__)


class _LocalShard:
    """Stands in for one rank's DTensor shard in DCP's load planner (no process group)."""

    def __init__(self, size: tuple[int, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> None:
        import torch

        self._size = torch.Size(size)
        self._chunk = (offsets, sizes)

    def size(self) -> Any:
        return self._size

    def __create_chunk_list__(self) -> list[Any]:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        import torch

        return [ChunkStorageMetadata(torch.Size(self._chunk[0]), torch.Size(self._chunk[1]))]


def _shapes(tensors: int, hidden: int) -> list[tuple[int, int]]:
    """Parameter shapes of a transformer-like model: weights and biases/norms in turn."""
    return [(hidden * (1 + i % 4), hidden) if i % 2 == 0 else (hidden * (1 + i % 4), 1) for i in range(tensors)]


def synthesize(world_size: int, tensors: int, hidden: int = 1024, optimizer: bool = False) -> Any:
    """The DCP Metadata a save of the model (or its AdamW state) at ``world_size`` writes."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                       MetadataIndex, TensorProperties, TensorStorageMetadata)

    props = TensorProperties(dtype=torch.float32)
    state: dict[str, Any] = {}
    storage: dict[Any, Any] = {}
    offsets = [0] * world_size
    for i, (rows, cols) in enumerate(_shapes(tensors, hidden)):
        names = [f"state.layers.{i}.exp_avg", f"state.layers.{i}.exp_avg_sq"] if optimizer else [f"layers.{i}"]
        per = -(-rows // world_size)
        for fqn in names:
            chunks = []
            for r in range(world_size):
                start = min(rows, r * per)
                length = min(rows, start + per) - start
                chunk = ChunkStorageMetadata(torch.Size((start, 0)), torch.Size((length, cols)))
                chunks.append(chunk)
                nbytes = length * cols * 4 + 1100  # + torch.save's framing of one tensor
                storage[MetadataIndex(fqn, chunk.offsets)] = _StorageInfo(f"__{r}_0.distcp", offsets[r], nbytes)
                offsets[r] += nbytes
            state[fqn] = TensorStorageMetadata(props, torch.Size((rows, cols)), chunks)
        if optimizer:
            fqn, r = f"state.layers.{i}.step", i % world_size  # replicated: dedup keeps one copy
            chunk = ChunkStorageMetadata(torch.Size(()), torch.Size(()))
            state[fqn] = TensorStorageMetadata(props, torch.Size(()), [chunk])
            storage[MetadataIndex(fqn, chunk.offsets)] = _StorageInfo(f"__{r}_0.distcp", offsets[r], 1100)
            offsets[r] += 1100
    if optimizer:
        for key in ("lr", "betas", "eps", "weight_decay"):
            fqn = f"param_groups.0.{key}"
            state[fqn] = BytesStorageMetadata()
            storage[MetadataIndex(fqn)] = _StorageInfo("__0_0.distcp", offsets[0], 64)
            offsets[0] += 64
    return Metadata(state_dict_metadata=state, storage_data=storage)


def local_state(metadata: Any, rank: int) -> dict[str, Any]:
    """What ``rank`` holds: its shard of every sharded tensor, replicated entries whole."""
    import torch
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    out: dict[str, Any] = {}
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            out[fqn] = 0.0
        elif len(md.chunks) == 1:
            out[fqn] = torch.empty(tuple(md.size))
        else:
            chunk = md.chunks[rank]
            out[fqn] = _LocalShard(tuple(md.size), tuple(chunk.offsets), tuple(chunk.sizes))
    return out


def measure(world_size: int, tensors: int, *, rank: int | None = None, optimizer: bool = False) -> dict[str, Any]:
    """Bytes and seconds of one artifact's metadata at ``world_size`` (see the module doc)."""
    from torch.distributed.checkpoint.default_planner import create_default_local_load_plan

    from noether_dist.io.dcp_io import metadata_for, paused_gc

    rank = world_size // 2 if rank is None else rank
    gc.collect()
    t0 = time.perf_counter()
    with paused_gc():
        metadata = synthesize(world_size, tensors, optimizer=optimizer)
    built = time.perf_counter() - t0
    raw = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
    del metadata
    gc.collect()
    t0 = time.perf_counter()
    metadata = pickle.loads(raw)  # as DCP's reader does it
    unpickle_gc_s = time.perf_counter() - t0
    del metadata
    gc.collect()
    t0 = time.perf_counter()
    with paused_gc():  # as ours does it
        metadata = pickle.loads(raw)
    unpickle_s = time.perf_counter() - t0
    state = local_state(metadata, rank)

    def plan(md: Any) -> tuple[float, Any]:
        # what DefaultLoadPlanner.create_local_plan runs on a flat state dict
        t = time.perf_counter()
        local = create_default_local_load_plan(state, md, True)
        return time.perf_counter() - t, local

    plan_full_s, local = plan(metadata)
    t0 = time.perf_counter()
    sliced = metadata_for(state, metadata)
    slice_s = time.perf_counter() - t0
    plan_sliced_s, local_sliced = plan(sliced)
    def reads(plan_: Any) -> list[tuple]:  # (MetadataIndex.index is a position hint: left out)
        return sorted((i.storage_index.fqn, tuple(i.storage_index.offset or ()), tuple(i.storage_offsets),
                       tuple(i.dest_offsets), tuple(i.lengths)) for i in plan_.items)

    same = reads(local) == reads(local_sliced)
    files = {metadata.storage_data[item.storage_index].relative_path for item in local.items}
    read = sum(metadata.storage_data[item.storage_index].length for item in local.items)
    entries = sum(len(md.chunks) if hasattr(md, "chunks") else 1 for md in metadata.state_dict_metadata.values())
    out = {"world_size": world_size, "tensors": tensors, "optimizer": optimizer, "entries": entries,
           "metadata_bytes": len(raw), "sliced_metadata_bytes": len(pickle.dumps(sliced)),
           "synthesize_s": built, "unpickle_s": unpickle_s, "unpickle_gc_s": unpickle_gc_s, "plan_full_s": plan_full_s,
           "slice_s": slice_s, "plan_sliced_s": plan_sliced_s, "same_plan": same,
           "rank_read_items": len(local.items), "rank_files": len(files), "rank_bytes_read": read}
    del metadata, raw, state, sliced
    gc.collect()
    return out


def main() -> None:
    logging.basicConfig(level=logging.INFO)
    for ws in (1024, 4096):
        for optimizer in (False, True):
            r = measure(ws, 1000, optimizer=optimizer)
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()})


if __name__ == "__main__":
    main()
