"""Synchronous save to local disk, measured side by side with its baselines (rank side).

In every repetition, in a rotating order, each on an empty folder with the page cache
written back first:

- ``raw``: every rank writes its own shard bytes to one file and fsyncs it (the disk);
- ``torch_save``: every rank ``torch.save``s each of its tensors into one file, one after
  the other, and fsyncs it: how DCP serialises data, without planning or metadata;
- ``dcp``: plain ``dcp.save`` of the model's state dict (FileSystemWriter, fsync on);
- ``writer``: our DCP writer alone (``dcp_io.save_state``: fsspec + size/CRC32 recording),
  no commit protocol: separates the writer's cost from the protocol's;
- ``ours``: ``Checkpointer.save`` (capture, agreement, model + trainer artifacts, reports,
  commit record, alias);
- ``ours_no_zip_crc``: the same with torch.save's own zip CRC32 turned off
  (``torch.utils.serialization.config.save.compute_crc32``): the commit record already
  holds a CRC32 of every file, so this measures what that second checksum pass costs;
- ``ours_tiny``: ``Checkpointer.save`` of a 64 KiB model: the fixed cost of one save
  (protocol, two DCP saves, commit, alias), independent of the state's size.

A first, unrecorded repetition warms up the page cache and allocators. Each time is the
wall time of the slowest rank (barrier to barrier); run.py takes the median over
repetitions of the ratio of two steps timed in the same repetition.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

from benchmarks.common import barrier, build_model, clear_dir, local_tensors, nbytes, raw_write, timed

log = logging.getLogger(__name__)

STEPS = ("raw", "torch_save", "dcp", "writer", "ours", "ours_no_zip_crc", "ours_tiny")
TINY_BYTES = 64 * 1024


def sync_save(rank: int, world_size: int, *, out: str, total_bytes: int, repeats: int,
              profile_top: bool = False, settle: bool = True) -> dict[str, Any]:
    """Time every step ``repeats`` times; per-step lists of seconds (and, with
    ``profile_top``, a cProfile summary of one more ``ours``)."""
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from noether_dist import Checkpointer, CheckpointerConfig, TrainingIteration
    from noether_dist.io import dcp_io
    from noether_dist.io.statedict import model_state
    from noether_dist.io.storage import open_storage

    model = build_model(total_bytes)
    local = nbytes(local_tensors(model_state(model)))
    work = os.path.join(out, "sync")
    os.makedirs(work, exist_ok=True)
    storage = open_storage(work)
    ck = Checkpointer(CheckpointerConfig(output_dir=work, run_id="bench", model_name="m", timeout_s=600))

    def raw() -> None:
        raw_write(os.path.join(work, f"raw_rank{rank}.bin"), local_tensors(model_state(model)))

    def torch_save() -> None:
        with open(os.path.join(work, f"torch_save_rank{rank}.bin"), "wb") as fh:
            for t in local_tensors(model_state(model)):
                torch.save(t, fh)
            fh.flush()
            os.fsync(fh.fileno())

    def plain_dcp() -> None:
        dcp.save(get_model_state_dict(model), checkpoint_id=os.path.join(work, "dcp"))

    def writer() -> None:
        dcp_io.save_state(model_state(model), os.path.join(work, "writer"), storage)

    counter = iter(range(1, 1_000_000))

    def ours() -> None:
        step = next(counter)
        ck.save(TrainingIteration(0, step, step), model=model)

    def ours_no_zip_crc() -> None:
        from torch.utils.serialization import config

        config.save.compute_crc32 = False
        try:
            ours()
        finally:
            config.save.compute_crc32 = True

    tiny = build_model(TINY_BYTES)
    ck_tiny = Checkpointer(CheckpointerConfig(output_dir=work, run_id="tiny", model_name="m", timeout_s=600))

    def ours_tiny() -> None:
        step = next(counter)
        ck_tiny.save(TrainingIteration(0, step, step), model=tiny)

    fns = {"raw": raw, "torch_save": torch_save, "dcp": plain_dcp, "writer": writer, "ours": ours,
           "ours_no_zip_crc": ours_no_zip_crc, "ours_tiny": ours_tiny}
    times: dict[str, list[float]] = {k: [] for k in STEPS}
    clear_dir(work, rank, settle)
    for rep in range(-1, repeats):  # rep -1 warms up (page cache, allocator, DCP caches): not recorded
        order = STEPS[rep % len(STEPS):] + STEPS[:rep % len(STEPS)]
        for name in order:
            gc.collect()
            seconds, _ = timed(fns[name])
            clear_dir(work, rank, settle)
            if rep >= 0:
                times[name].append(seconds)
        if rank == 0 and rep >= 0:
            log.info("sync rep %d/%d: %s", rep + 1, repeats,
                     ", ".join(f"{k} {times[k][-1]:.3f}s" for k in STEPS))
    profile = _profiled(ours, rank) if profile_top else None
    clear_dir(work, rank, settle)
    ck.close()
    ck_tiny.close()
    return {"times": times, "local_bytes": local, "profile": profile}


def _profiled(fn: Any, rank: int, top: int = 25) -> str:
    """One more run of ``fn`` under cProfile; the top functions by cumulative and by own time."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    barrier()
    prof.enable()
    fn()
    prof.disable()
    barrier()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(top)
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(top)
    return f"rank {rank}:\n" + buf.getvalue()
