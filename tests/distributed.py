"""Run a test function on N real ranks (separate processes, gloo on CPU).

The only place tests start process groups. Rendezvous is a file in a temp folder (no
ports to guess). A rank that raises makes ``run_ranks`` raise with that rank's
traceback; a rank that hangs is killed after ``timeout_s`` and the test fails.
"""

from __future__ import annotations

import datetime as _dt
import multiprocessing as mp
import os
import pickle
import signal
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

__all__ = ["run_ranks", "RankFailure"]


class RankFailure(AssertionError):
    """One or more ranks failed; the message holds their tracebacks."""


def _child(fn: Callable, rank: int, world_size: int, rdzv: str, out_dir: str, args: tuple, env: dict,
           pg_timeout_s: float) -> None:
    os.environ.update({"OMP_NUM_THREADS": "1", "RANK": str(rank), "WORLD_SIZE": str(world_size),
                       "LOCAL_RANK": str(rank), **env})
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    result_path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        if world_size > 0:
            dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=rank, world_size=world_size,
                                    timeout=_dt.timedelta(seconds=pg_timeout_s))
        value = fn(rank, world_size, *args)
        payload = ("ok", value)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        payload = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", exc.__class__.__name__, str(exc))
    with open(result_path + ".tmp", "wb") as fh:
        try:
            pickle.dump(payload, fh)
        except Exception:  # noqa: BLE001
            pickle.dump(("error", f"unpicklable result: {payload!r:.200}", "PickleError", ""), fh)
    os.replace(result_path + ".tmp", result_path)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            from noether_dist.dist.comm import destroy_distributed

            destroy_distributed()
    finally:
        os._exit(0)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
              env: dict[str, str] | None = None, pg_timeout_s: float = 60.0,
              expect_dead: set[int] | None = None, raise_on_error: bool = True) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return the values in
    rank order. ``fn`` must be importable (module level). With ``raise_on_error=False`` the
    list holds ("error", type name, message) tuples for failed ranks and None for ranks that
    died without a result (those named in ``expect_dead`` are allowed to die)."""
    ctx = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="nd-ranks-") as tmp:
        rdzv = os.path.join(tmp, "rdzv")
        procs = [ctx.Process(target=_child, args=(fn, r, world_size, rdzv, tmp, args, dict(env or {}), pg_timeout_s),
                             daemon=False) for r in range(world_size)]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        for p in procs:
            p.join(max(0.1, deadline - time.monotonic()))
        hung = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in hung:
            os.kill(procs[r].pid, signal.SIGKILL)
            procs[r].join(5)
        results: list[Any] = []
        errors = []
        for r in range(world_size):
            path = os.path.join(tmp, f"rank{r}.pkl")
            if not os.path.exists(path):
                results.append(None)
                if r not in (expect_dead or set()):
                    errors.append(f"rank {r}: {'hung, killed after timeout' if r in hung else 'died without a result'} "
                                  f"(exit code {procs[r].exitcode})")
                continue
            with open(path, "rb") as fh:
                payload = pickle.load(fh)
            if payload[0] == "ok":
                results.append(payload[1])
            else:
                results.append(("error", payload[2], payload[3]))
                errors.append(f"rank {r}: {payload[1]}")
        if errors and raise_on_error:
            raise RankFailure("\n".join(errors))
        return results
