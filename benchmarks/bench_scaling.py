"""Save and load time of one fixed total state at a given world size (rank side).

run.py launches this at world size 1, 2 and 4 with the same total state: each rank holds
1/N of it (FSDP2). Save: ``Checkpointer.save`` (sync). Load: ``noether_dist.resume`` into a
freshly built model of the same shape (selection, agreement, DCP load). The files were
just written, so loads read mostly from the page cache.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

from benchmarks.common import build_model, clear_dir, timed

log = logging.getLogger(__name__)


def scaling(rank: int, world_size: int, *, out: str, total_bytes: int, repeats: int,
            settle: bool = True) -> dict[str, Any]:
    """Seconds of each save and each load (slowest rank)."""
    from noether_dist import Checkpointer, CheckpointerConfig, TrainingIteration, resume

    work = os.path.join(out, f"scaling_ws{world_size}")
    os.makedirs(work, exist_ok=True)
    clear_dir(work, rank, settle)
    model = build_model(total_bytes)
    ck = Checkpointer(CheckpointerConfig(output_dir=work, run_id="scale", model_name="m", timeout_s=600))
    saves, loads = [], []
    for i in range(1, repeats + 1):
        gc.collect()
        seconds, _ = timed(lambda: ck.save(TrainingIteration(0, i, i), model=model))
        saves.append(seconds)
    ck.close()
    target = build_model(total_bytes, seed=1)
    cfg = {"output_dir": work, "resume_run_id": "scale"}
    for _ in range(repeats):
        gc.collect()
        seconds, res = timed(lambda: resume(cfg, model=target, model_name="m", timeout_s=600))
        loads.append(seconds)
    ok = all((a.to_local() if hasattr(a, "to_local") else a).equal(b.to_local() if hasattr(b, "to_local") else b)
             for a, b in zip(model.parameters(), target.parameters()))
    if rank == 0:
        log.info("scaling ws=%d: save %s s, load %s s", world_size, [round(s, 3) for s in saves],
                 [round(s, 3) for s in loads])
    clear_dir(work, rank, settle)
    return {"save_s": saves, "load_s": loads, "loaded_equal": ok, "checkpoint": res.checkpoint}
