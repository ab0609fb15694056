"""DCP metadata at thousands of ranks, modelled in one process (no ranks are launched).

A model of ``tensors`` parameters (FSDP2: each sharded along dim 0 over ``world_size``
ranks) and its AdamW state (``exp_avg`` and ``exp_avg_sq`` sharded like the parameter, a
replicated ``step`` per parameter) are described the way DCP's save planners describe
them once they ran: one chunk per rank per sharded tensor, one storage entry per chunk,
replicated entries spread over the ranks' files by dedup. From that:

- ``.metadata`` bytes of each artifact (pickled exactly as our writer stores it);
- seconds to unpickle it (what a rank spends after reading it), as DCP does it and with
  Python's garbage collector paused, as ours does;
- one non-coordinator rank's resume work on it, before (the whole metadata broadcast to
  every rank: receive and unpickle all of it, cut it to the rank's chunks, plan) and after
  (:mod:`noether_dist.io.dcp_slices`: describe what the rank loads, receive and unpickle
  its slice alone, rebuild DCP metadata of it, plan): bytes and seconds, and that both
  plans make the same reads; DCP's own planner on the whole metadata (plain ``dcp.load``)
  beside them;
- the coordinator's extra work: cutting and pickling a slice for every rank (after) against
  pickling the whole metadata for the broadcast (before), and the descriptions it receives;
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
        self.dtype = torch.float32

    @property
    def shape(self) -> Any:
        return self._size

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


def _shared(key: str, value: Any) -> bool:
    """Replicated entries (as resume's rule: not a shard): AdamW ``step``, hyperparameters."""
    return not isinstance(value, _LocalShard)


def all_wants(metadata: Any, world_size: int, step: int = 1) -> Any:
    """Every ``step``-th rank's description (what :func:`dcp_slices.describe` gives on that
    rank), made straight from the layout, one at a time."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from noether_dist.io.dcp_slices import Want

    keys = []
    for fqn, md in metadata.state_dict_metadata.items():
        if not isinstance(md, TensorStorageMetadata):
            keys.append((fqn, None, None))
        elif len(md.chunks) == 1:
            keys.append((fqn, tuple(md.size), None))
        else:
            keys.append((fqn, tuple(md.size), [(tuple(c.offsets), tuple(c.sizes)) for c in md.chunks]))
    for rank in range(0, world_size, step):
        yield [Want(fqn, shape, None, True) if chunks is None else Want(fqn, shape, (chunks[rank],), False)
               for fqn, shape, chunks in keys]


def measure(world_size: int, tensors: int, *, rank: int | None = None, optimizer: bool = False,
            with_gc: bool = True, full_plan: bool = True) -> dict[str, Any]:
    """Bytes and seconds of one artifact's metadata at ``world_size`` (see the module doc)."""
    from torch.distributed.checkpoint.default_planner import create_default_local_load_plan

    from noether_dist.io.dcp_io import paused_gc, reader_of
    from noether_dist.io.dcp_slices import MetadataCutter, Slice, describe

    rank = world_size // 2 if rank is None else rank
    gc.collect()
    t0 = time.perf_counter()
    with paused_gc():
        metadata = synthesize(world_size, tensors, optimizer=optimizer)
    built = time.perf_counter() - t0
    # before: the coordinator pickles the whole metadata for the broadcast (collector paused)
    gc.collect()
    t0 = time.perf_counter()
    with paused_gc():
        raw = pickle.dumps(metadata, protocol=pickle.HIGHEST_PROTOCOL)
    pickle_whole_s = time.perf_counter() - t0
    del metadata
    unpickle_gc_s = None
    if with_gc:
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
    metadata_bytes = len(raw)
    del raw
    state = local_state(metadata, rank)
    shared_keys = sorted(k for k, v in state.items() if _shared(k, v)) if world_size > 1 else []
    readers = {k: reader_of(k, metadata, world_size) for k in shared_keys}
    mine = [k for k in shared_keys if readers[k] == rank]
    own = {k: v for k, v in state.items() if k not in set(shared_keys) or k in mine}

    def plan(md: Any) -> tuple[float, Any]:
        # what DefaultLoadPlanner.create_local_plan runs on a flat state dict
        t = time.perf_counter()
        local = create_default_local_load_plan(own, md, True)
        return time.perf_counter() - t, local

    plan_full_s, local_full = plan(metadata) if full_plan else (None, None)  # plain DCP: on the whole
    # before: this rank cut the whole metadata it had unpickled (indexing it), then planned on its part
    with paused_gc():
        t0 = time.perf_counter()
        cutter = MetadataCutter(metadata)
        cutter.cut(describe(own, _shared)[:1], shared_keys, mine)  # (the index is built on first use)
        index_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        cut_before = cutter.cut(describe(own, _shared), shared_keys, mine).metadata()
        cut_before_s = index_s + time.perf_counter() - t0
        plan_before_s, local_before = plan(cut_before)
    # after: the rank describes what it loads (sent), the coordinator cuts its slice (received).
    # A real rank then holds no big heap, so the collector is cheap there; in this process it
    # would walk the whole metadata: paused
    with paused_gc():
        t0 = time.perf_counter()
        wants = describe(state, _shared)
        describe_s = time.perf_counter() - t0
        description_bytes = len(pickle.dumps(wants, protocol=pickle.HIGHEST_PROTOCOL))
        data = cutter.cut(wants, shared_keys, mine).to_bytes()
        t0 = time.perf_counter()
        part = Slice.from_bytes(data)
        sliced = part.metadata()
        receive_s = time.perf_counter() - t0
        plan_after_s, local_after = plan(sliced)

    def reads(plan_: Any) -> list[tuple]:  # (MetadataIndex.index is a position hint: left out)
        return sorted((i.storage_index.fqn, tuple(i.storage_index.offset or ()), tuple(i.storage_offsets),
                       tuple(i.dest_offsets), tuple(i.lengths)) for i in plan_.items)

    same = reads(local_before) == reads(local_after) and (local_full is None or reads(local_full) == reads(local_after))
    plan_bytes = len(pickle.dumps(local_after, protocol=pickle.HIGHEST_PROTOCOL))
    # the coordinator's extra work: index the metadata (once), cut and pickle every rank's
    # slice (collector paused, as resume does it); the ranks' cuts cost alike, so above 256
    # ranks every (ws / 256)-th is timed and the sum scaled; making the descriptions is the
    # ranks' work: not counted
    gc.collect()
    step = max(1, world_size // 256)
    cut_s, slices_bytes, description_sizes = 0.0, 0, []
    with paused_gc():
        for r, rank_wants in enumerate(all_wants(metadata, world_size, step)):
            if r % 16 == 0:  # (every 16th one's size, for the total: they are alike)
                description_sizes.append(len(pickle.dumps(rank_wants, protocol=pickle.HIGHEST_PROTOCOL)))
            t = time.perf_counter()
            mine_r = [k for k in shared_keys if readers[k] == r * step]
            slices_bytes += len(cutter.cut(rank_wants, shared_keys, mine_r).to_bytes()) * step
            cut_s += time.perf_counter() - t
    coordinator_total_s = index_s + cut_s * step
    descriptions_bytes = sum(description_sizes) * world_size // len(description_sizes)
    files = {sliced.storage_data[item.storage_index].relative_path for item in local_after.items}
    read = sum(sliced.storage_data[item.storage_index].length for item in local_after.items)
    entries = sum(len(md.chunks) if hasattr(md, "chunks") else 1 for md in metadata.state_dict_metadata.values())
    before_s = unpickle_s + cut_before_s + plan_before_s
    after_s = describe_s + receive_s + plan_after_s
    out = {"world_size": world_size, "tensors": tensors, "optimizer": optimizer, "entries": entries,
           "metadata_bytes": metadata_bytes, "synthesize_s": built,
           # one non-coordinator rank, before
           "rank_bytes_before": metadata_bytes, "unpickle_s": unpickle_s, "unpickle_gc_s": unpickle_gc_s,
           "cut_before_s": cut_before_s, "plan_before_s": plan_before_s, "rank_before_s": before_s,
           "plan_full_s": plan_full_s,
           # the same rank, after
           "description_bytes": description_bytes, "rank_bytes_after": len(data), "slice_entries": part.stored_entries,
           "describe_s": describe_s, "receive_s": receive_s, "plan_after_s": plan_after_s, "rank_after_s": after_s,
           "rank_bytes_ratio": len(data) / metadata_bytes, "rank_time_ratio": after_s / before_s, "same_plan": same,
           # the coordinator
           "pickle_whole_s": pickle_whole_s, "coordinator_total_s": coordinator_total_s, "slices_bytes": slices_bytes,
           "descriptions_bytes": descriptions_bytes, "dcp_plan_gather_bytes": plan_bytes * world_size,
           "rank_read_items": len(local_after.items), "rank_files": len(files), "rank_bytes_read": read}
    del metadata, state, sliced, cut_before, cutter
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
