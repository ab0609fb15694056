"""Run benchmark jobs on N real ranks: separate processes, gloo on CPU, file rendezvous.

``run_jobs(jobs, world_size)`` starts ``world_size`` processes (forks of a forkserver that
imported torch once); each initialises a
gloo process group (rendezvous through a file in a temp folder: no ports to guess) and runs
the jobs in order, ``fn(rank, world_size, **kwargs)``, collecting one result per job. A
rank that raises makes ``run_jobs`` raise with its traceback (the other ranks, likely stuck
in a collective, get ``FAILURE_GRACE_S`` more); ranks still alive after ``timeout_s`` are
killed (SIGKILL) and reported. Every wait is bounded.
"""

from __future__ import annotations

import datetime as _dt
import logging
import multiprocessing as mp
import os
import pickle
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["Job", "run_jobs", "RanksFailed"]

log = logging.getLogger(__name__)

Job = tuple[Callable[..., Any], dict[str, Any]]
"""A rank-side function ``fn(rank, world_size, **kwargs)`` (module level) and its kwargs."""


class RanksFailed(RuntimeError):
    """One or more ranks failed, hung or died; the message holds what each reported."""


def _child(jobs: list[Job], rank: int, world_size: int, rdzv: str, out_dir: str, env: dict[str, str],
           pg_timeout_s: float, log_level: int) -> None:
    os.environ.update({"OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank), **env})
    logging.basicConfig(level=log_level, format=f"%(asctime)s rank{rank} %(name)s: %(message)s", force=True)
    logging.getLogger("noether_dist").setLevel(max(log_level, logging.WARNING))
    result_path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world_size,
                                timeout=_dt.timedelta(seconds=pg_timeout_s))
        values = []
        for i, (fn, kwargs) in enumerate(jobs):
            if rank == 0:
                logging.getLogger("benchmarks").info("job %d/%d on %d ranks: %s", i + 1, len(jobs), world_size,
                                                     fn.__name__)
            values.append(fn(rank, world_size, **kwargs))
        payload: tuple = ("ok", values)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        payload = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
    with open(result_path + ".tmp", "wb") as fh:
        pickle.dump(payload, fh)
    os.replace(result_path + ".tmp", result_path)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            from noether_dist.dist.comm import destroy_distributed

            destroy_distributed()
    finally:
        os._exit(0)


FAILURE_GRACE_S = 20.0
"""Once a rank failed, the others (likely waiting in a collective for it) get this long."""


def _succeeded(folder: str, rank: int) -> bool:
    """True when ``rank`` wrote a successful result."""
    path = os.path.join(folder, f"rank{rank}.pkl")
    if not os.path.exists(path):
        return False
    with open(path, "rb") as fh:
        return pickle.load(fh)[0] == "ok"


_PRELOAD = ["torch", "torch.distributed.checkpoint", "torch.distributed.fsdp", "noether_dist", "benchmarks.common"]


def _context() -> Any:
    """A forkserver context that has torch imported once: every later rank is a fork of it,
    which saves the seconds each fresh process spends importing torch (the server is
    started before any thread or process group exists, so forking it is safe)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def run_jobs(jobs: list[Job], world_size: int, *, timeout_s: float, env: dict[str, str] | None = None,
             pg_timeout_s: float | None = None) -> list[list[Any]]:
    """Run ``jobs`` on ``world_size`` ranks; return ``results[job][rank]``.

    Raises :class:`RanksFailed` when a rank raised, died without a result, or was still
    running after ``timeout_s`` seconds (it is killed then)."""
    ctx = _context()
    pg_timeout_s = pg_timeout_s or max(60.0, timeout_s)
    with tempfile.TemporaryDirectory(prefix="nd-bench-ranks-") as tmp:
        rdzv = os.path.join(tmp, "rdzv")
        procs = [ctx.Process(target=_child, args=(jobs, r, world_size, rdzv, tmp, dict(env or {}), pg_timeout_s,
                                                  logging.getLogger().getEffectiveLevel()),
                             name=f"bench-rank{r}") for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            failed = [r for r, p in enumerate(procs) if not p.is_alive() and not _succeeded(tmp, r)]
            if failed and deadline - time.monotonic() > FAILURE_GRACE_S:
                log.error("rank(s) %s failed: the others get %.0fs to finish", failed, FAILURE_GRACE_S)
                deadline = time.monotonic() + FAILURE_GRACE_S
            procs[0].join(0.2)
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            log.error("rank %d still running after %.0fs: killing it", r, timeout_s)
            os.kill(procs[r].pid, signal.SIGKILL)
            procs[r].join(10)
        errors, per_rank = [], []
        for r in range(world_size):
            path = os.path.join(tmp, f"rank{r}.pkl")
            if not os.path.exists(path):
                why = f"hung, killed after {timeout_s:.0f}s" if r in hung else "died without a result"
                errors.append(f"rank {r}: {why} (exit code {procs[r].exitcode})")
                continue
            with open(path, "rb") as fh:
                payload = pickle.load(fh)
            if payload[0] == "ok":
                per_rank.append(payload[1])
            else:
                errors.append(f"rank {r}: {payload[1]}")
        if errors:
            raise RanksFailed("\n".join(errors))
    return [[per_rank[r][j] for r in range(world_size)] for j in range(len(jobs))]
