"""Asynchronous (THREAD mode) saves: how long the caller is blocked, and whether memory
grows from save to save (rank side).

``async_stall``: ``saves`` async saves; before each the previous one has finished
(``wait``), so the stall (``Checkpointer.last_stall_s``: capture + staging copy) is
measured on its own, and right before it the baseline: one plain copy of this
rank's state (its local shards) into preallocated, already touched memory, the least any
staging can cost. The staging buffers are allocated by ``Checkpointer.prepare`` before
the first save; every save reuses them. One more Checkpointer, not prepared, saves once
beside it: its first save allocates the buffers (what ``prepare`` moves out of the stall).

``async_rss``: resident memory (VmRSS) after ``warmup`` async saves and after ``saves``
more, all finished; the growth is compared with this rank's state size.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

from benchmarks.common import barrier, build_model, local_tensors, nbytes, proc_status_bytes, rss_bytes

log = logging.getLogger(__name__)


class CopyBaseline:
    """One plain copy of this rank's tensors into preallocated, already touched buffers: the
    least any staging can cost. Timed right before each save, because this machine's memory
    bandwidth drifts: each stall is compared with the copy measured next to it."""

    def __init__(self, tensors: list[Any]) -> None:
        import torch

        self.tensors = tensors
        self.bufs = [torch.empty_like(t) for t in tensors]
        self._copy()  # first touch: page faults are not part of the baseline

    def _copy(self) -> None:
        for b, t in zip(self.bufs, self.tensors):
            b.copy_(t)

    def time(self, repeats: int = 3) -> float:
        """Median seconds of ``repeats`` copies (all ranks copy at the same time); the CPU
        seconds of the same copy (``time.thread_time``) are left in ``last_cpu``."""
        samples = []
        for _ in range(repeats):
            barrier()
            start, start_cpu = time.perf_counter(), time.thread_time()
            self._copy()
            samples.append((time.perf_counter() - start, time.thread_time() - start_cpu))
        wall, self.last_cpu = sorted(samples)[len(samples) // 2]
        return wall


def _checkpointer(out: str, run_id: str) -> Any:
    from noether_dist import AsyncMode, Checkpointer, CheckpointerConfig

    return Checkpointer(CheckpointerConfig(output_dir=out, run_id=run_id, model_name="m", timeout_s=600,
                                           async_mode=AsyncMode.THREAD))


def async_stall(rank: int, world_size: int, *, out: str, total_bytes: int, saves: int,
                settle: bool = True) -> dict[str, Any]:
    """Stall of each of ``saves`` async saves of a Checkpointer whose staging was prepared
    (``Checkpointer.prepare``) before its first save, completion time of each, and the copy
    baseline; and, for comparison, the stall of the first save of a Checkpointer that was
    not prepared (it allocates its staging buffers during that save)."""
    from noether_dist import TrainingIteration
    from noether_dist.io.statedict import model_state

    model = build_model(total_bytes)
    tensors = local_tensors(model_state(model))
    baseline = CopyBaseline(tensors)

    def settle_down() -> None:
        gc.collect()
        if settle:
            os.sync()  # the previous save's dirty pages go to disk now, not during the next stall

    cold = _checkpointer(os.path.join(out, "async-cold"), "cold")
    settle_down()
    cold_copy = baseline.time()
    barrier()
    cold.save(TrainingIteration(0, 1, 1), model=model)
    cold_stall = cold.last_stall_s
    cold.close()
    del cold

    ck = _checkpointer(os.path.join(out, "async"), "stall")
    barrier()
    started = time.perf_counter()
    ck.prepare(model=model)
    prepare_s = time.perf_counter() - started
    stalls, completed, copies, stalls_cpu, copies_cpu = [], [], [], [], []
    for i in range(1, saves + 1):
        ck.wait()
        settle_down()
        copies.append(baseline.time())
        copies_cpu.append(baseline.last_cpu)
        barrier()
        start = time.perf_counter()
        ck.save(TrainingIteration(0, i, i), model=model)
        ck.wait()
        completed.append(time.perf_counter() - start)
        stalls.append(ck.last_stall_s)
        stalls_cpu.append(getattr(ck, "last_stall_cpu_s", float("nan")))  # nan: code from before it existed
        if rank == 0:
            log.info("async save %d/%d: stall %.4fs (copy %.4fs), written after %.3fs", i, saves, stalls[-1],
                     copies[-1], completed[-1])
    ck.close()
    del baseline
    return {"copy_s": copies, "stalls": stalls, "copy_cpu_s": copies_cpu, "stalls_cpu": stalls_cpu,
            "completed_s": completed, "local_bytes": nbytes(tensors),
            "prepare_s": prepare_s, "unprepared_first_stall_s": cold_stall, "unprepared_first_copy_s": cold_copy,
            "parts": stall_parts(model)}


def stall_parts(model: Any, repeats: int = 5) -> dict[str, float]:
    """Median seconds of each piece an async save's stall is made of, timed on their own:
    capturing the state dict, the deep copy of a small trainer state (packed later by the
    writer thread), and the staging copy into already allocated buffers (``SaveStaging``, as
    the Checkpointer uses it). The stall has no collective: the ranks agree on the writer
    thread."""
    import copy

    from noether_dist.io.statedict import SaveStaging, model_state

    staging = SaveStaging()
    staging.stage("model:", model_state(model))  # allocate the staging buffers
    samples: dict[str, list[float]] = {"capture_s": [], "snapshot_s": [], "stage_s": []}
    for _ in range(repeats):
        barrier()
        t0 = time.perf_counter()
        sd = model_state(model)
        t1 = time.perf_counter()
        copy.deepcopy({"training_iteration": {"epoch": 0, "update": 1, "sample": 1}, "state": {}})
        t2 = time.perf_counter()
        staging.stage("model:", sd)
        staging.synchronize()
        t3 = time.perf_counter()
        samples["capture_s"].append(t1 - t0)
        samples["snapshot_s"].append(t2 - t1)
        samples["stage_s"].append(t3 - t2)
    staging.close()
    return {k: sorted(v)[len(v) // 2] for k, v in samples.items()}


def async_rss(rank: int, world_size: int, *, out: str, total_bytes: int, warmup: int, saves: int) -> dict[str, Any]:
    """VmRSS after warm-up and after ``saves`` more async saves (all finished)."""
    import torch

    from noether_dist import TrainingIteration
    from noether_dist.io.statedict import model_state

    model = build_model(total_bytes)
    local = nbytes(local_tensors(model_state(model)))
    ck = _checkpointer(os.path.join(out, "rss"), "rss")
    trace = []
    for i in range(1, warmup + saves + 1):
        with torch.no_grad():  # a training step changes the weights between saves
            for p in model.parameters():
                (p.to_local() if hasattr(p, "to_local") else p).mul_(0.999)
        ck.save(TrainingIteration(0, i, i), model=model)
        if i == warmup:
            ck.wait()
            gc.collect()
            rss_warm = rss_bytes()
        elif i > warmup:
            trace.append(rss_bytes())
    ck.wait()
    gc.collect()
    rss_end = rss_bytes()
    ck.close()
    if rank == 0:
        log.info("async rss: %.1f MiB after warm-up, %.1f MiB after %d more saves (state %.1f MiB)",
                 rss_warm / 2**20, rss_end / 2**20, saves, local / 2**20)
    return {"rss_warm": rss_warm, "rss_end": rss_end, "rss_trace": trace, "hwm": proc_status_bytes("VmHWM"),
            "local_bytes": local}
