"""Bytes on storage when half the state is replicated on every rank (rank side).

The state: half of its bytes are DTensors sharded over all ranks (each rank holds 1/N),
the other half plain tensors, identical on every rank (replicated, as DCP sees any plain
tensor that every rank has). Unique bytes = the sharded half + ONE copy of the replicated
half. A save that wrote the replicated half once per rank would store N copies.
"""

from __future__ import annotations

import os
from typing import Any

from benchmarks.common import barrier, layer_dim

TENSORS_PER_HALF = 4


def dedup(rank: int, world_size: int, *, out: str, total_bytes: int) -> dict[str, Any]:
    """Save the half-replicated state with Checkpointer; sizes of what landed in storage."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    from noether_dist import Checkpointer, CheckpointerConfig, TrainingIteration

    mesh = init_device_mesh("cpu", (world_size,))
    d = layer_dim(total_bytes // 2, TENSORS_PER_HALF, 4, multiple=8 * world_size)
    state: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(1234 + rank)
    for i in range(TENSORS_PER_HALF):
        local = torch.rand(d // world_size, d, generator=gen)
        state[f"sharded.{i}"] = DTensor.from_local(local, mesh, [Shard(0)], run_check=False, shape=(d, d),
                                                   stride=(d, 1))
    same = torch.Generator().manual_seed(99)  # the same values on every rank
    for i in range(TENSORS_PER_HALF):
        state[f"replicated.{i}"] = torch.rand(d, d, generator=same)
    sharded_bytes = TENSORS_PER_HALF * d * d * 4
    replicated_bytes = TENSORS_PER_HALF * d * d * 4
    work = os.path.join(out, "dedup")
    ck = Checkpointer(CheckpointerConfig(output_dir=work, run_id="dedup", model_name="m", timeout_s=600))
    result = ck.save(TrainingIteration(0, 1, 1), model=state)
    barrier()
    art = result.record.artifact("model")
    data = sum(f.size for f in art.files if f.name != ".metadata")
    meta = sum(f.size for f in art.files if f.name == ".metadata")
    on_disk = sum(os.path.getsize(os.path.join(ck.layout.artifact_path(art.name), n))
                  for n in os.listdir(ck.layout.artifact_path(art.name)) if n != ".metadata")
    return {"data_bytes": data, "data_bytes_on_disk": on_disk, "metadata_bytes": meta,
            "checkpoint_bytes": result.record.total_bytes, "sharded_bytes": sharded_bytes,
            "replicated_bytes": replicated_bytes, "unique_bytes": sharded_bytes + replicated_bytes,
            "naive_bytes": sharded_bytes + world_size * replicated_bytes, "files": len(art.files)}
