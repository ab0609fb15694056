"""Real ranks for tests and benchmarks: N processes, one gloo process group, file rendezvous.

The one place tests and benchmarks start ranks. Every rank is a fork of one forkserver that
imported torch, DCP and noether_dist once per pytest session (or benchmark run), so a launch
costs a fork per rank instead of torch's import per rank. Each rank is still its own process
with its own process group (gloo on CPU, rendezvous through a file in a temp folder: no ports
to guess), and it runs with the caller's environment and working directory as they are at
the launch (as a spawned process would).

Every wait is bounded: ranks still alive ``timeout_s`` after the launch are killed (SIGKILL)
and reported; once a rank has failed, the others (likely waiting for it in a collective) get
``FAILURE_GRACE_S`` more. A rank that raises reports its traceback; what a rank printed
reaches the caller's stderr (so pytest shows it beside the failure), its last lines also in
the failure message of a rank that hung or died.
"""

from __future__ import annotations

import datetime as _dt
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

__all__ = ["FAILURE_GRACE_S", "RankFailure", "RankReport", "launch", "run_jobs", "run_ranks"]

log = logging.getLogger(__name__)

FAILURE_GRACE_S = 20.0
"""Once a rank failed, the others (likely waiting in a collective for it) get this long."""

PRELOAD = ["torch", "torch.distributed", "torch.distributed.checkpoint", "torch.distributed.fsdp", "torch._dynamo",
           "s3fs", "numpy", "pytest", "noether_dist", "noether_dist.save", "noether_dist.resume",
           "noether_dist.io.dcp_io", "tests.support.models"]
"""Imported once by the forkserver every rank is forked from (one that is missing is skipped):
what nearly every rank imports, so that no rank pays for it. ``torch._dynamo`` is imported
lazily by FSDP's ``fully_shard`` and the optimizers' first step (about 1.5 CPU s per process
here, more than the rest of a small rank's work); ``s3fs`` by every rank that touches S3."""

_LOG_TAIL_LINES = 30


class RankFailure(AssertionError):
    """One or more ranks raised, died or hung; the message holds what each reported."""


Job = tuple[Callable[..., Any], tuple, dict]
"""A rank-side function (module level, so that it pickles by name), its positional and its
keyword arguments; it is called as ``fn(rank, world_size, *args, **kwargs)``."""


@dataclass(frozen=True)
class RankReport:
    """What one rank of a launch came to."""

    rank: int
    values: list[Any] | None
    """One value per job, or None when the rank raised, died or hung."""
    error: str | None = None
    """The rank's traceback when it raised."""
    error_type: str = ""
    error_message: str = ""
    hung: bool = False
    """Still running at the deadline (then killed)."""
    exitcode: int | None = None
    output_tail: str = ""
    """The last lines the rank printed (stdout and stderr)."""

    @property
    def ok(self) -> bool:
        """True when every job returned."""
        return self.values is not None

    def why(self, timeout_s: float) -> str:
        """One paragraph for a failure message."""
        if self.error is not None:
            return f"rank {self.rank}: {self.error}"
        what = f"hung, killed after {timeout_s:.0f}s" if self.hung else "died without a result"
        tail = f"; its last output:\n{self.output_tail}" if self.output_tail else ""
        return f"rank {self.rank}: {what} (exit code {self.exitcode}){tail}"


_CONTEXT: Any = None


def _context() -> Any:
    """The forkserver context (started at the first launch, then reused by every launch of
    this process). Its server imports ``PRELOAD`` before any thread or process group exists
    in it, so forking it is safe."""
    global _CONTEXT
    if _CONTEXT is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _CONTEXT = ctx
    return _CONTEXT


def _child(jobs: list[Job], rank: int, world_size: int, folder: str, environ: dict[str, str], pg_timeout_s: float,
           log_level: int | None, capture: bool) -> None:
    if capture:  # this rank's output goes to a file the parent reads back
        out = os.open(os.path.join(folder, f"rank{rank}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(out, 1)
        os.dup2(out, 2)
        os.close(out)
    # the caller's environment now, not the forkserver's from when it started
    os.environ.clear()
    os.environ.update(environ)
    if log_level is not None:
        logging.basicConfig(level=log_level, format=f"%(asctime)s rank{rank} %(name)s: %(message)s", force=True)
        logging.getLogger("noether_dist").setLevel(max(log_level, logging.WARNING))
    result_path = os.path.join(folder, f"rank{rank}.pkl")
    try:
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"file://{os.path.join(folder, 'rdzv')}", rank=rank,
                                world_size=world_size, timeout=_dt.timedelta(seconds=pg_timeout_s))
        values = []
        for i, (fn, args, kwargs) in enumerate(jobs):
            if log_level is not None and rank == 0 and len(jobs) > 1:
                logging.getLogger("benchmarks").info("job %d/%d on %d ranks: %s", i + 1, len(jobs), world_size,
                                                     fn.__name__)
            values.append(fn(rank, world_size, *args, **kwargs))
        payload: tuple = ("ok", values)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        payload = ("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", type(exc).__name__, str(exc))
    with open(result_path + ".tmp", "wb") as fh:
        try:
            pickle.dump(payload, fh)
        except Exception as exc:  # noqa: BLE001 - an unpicklable value is this rank's failure
            fh.seek(0)
            fh.truncate()
            pickle.dump(("error", f"unpicklable result ({exc}): {payload!r:.300}", "PicklingError", str(exc)), fh)
    os.replace(result_path + ".tmp", result_path)
    try:
        import torch.distributed as dist

        if dist.is_initialized():
            from noether_dist.dist.comm import destroy_distributed

            destroy_distributed()
    finally:
        exit_now(0)


def exit_now(code: int) -> None:
    """Flush stdout and stderr, then end this forked process at once (``os._exit``: no
    atexit handler or finalizer inherited from the forkserver runs)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    os._exit(code)


def _read(folder: str, rank: int) -> tuple | None:
    path = os.path.join(folder, f"rank{rank}.pkl")
    if not os.path.exists(path):
        return None
    with open(path, "rb") as fh:
        return pickle.load(fh)


def _failed(folder: str, rank: int, expect_dead: Collection[int]) -> bool:
    """A finished rank that raised, or died without a result while it was not allowed to."""
    payload = _read(folder, rank)
    return payload[0] != "ok" if payload is not None else rank not in expect_dead


def _output(folder: str, rank: int) -> str:
    path = os.path.join(folder, f"rank{rank}.log")
    if not os.path.exists(path):
        return ""
    with open(path, errors="replace") as fh:
        return fh.read()


def launch(jobs: list[Job], world_size: int, *, timeout_s: float, env: dict[str, str] | None = None,
           pg_timeout_s: float | None = None, expect_dead: Collection[int] = (), log_level: int | None = None,
           capture_output: bool = True) -> list[RankReport]:
    """Run ``jobs`` in order on ``world_size`` ranks (one process group for all of them);
    return one report per rank, in rank order. Never raises for a rank's failure: see
    :func:`run_ranks` and :func:`run_jobs` for that.

    ``env`` is added to the caller's environment; ``pg_timeout_s`` is the process group's
    timeout (default ``max(60, timeout_s)``); ranks in ``expect_dead`` may die without a
    result without cutting the others' time short. ``log_level`` configures logging in the
    ranks (the benchmarks' progress lines); with ``capture_output`` what the ranks print is
    collected and written to this process's stderr once they are done (pytest then shows it
    with the test), otherwise it goes straight to the forkserver's stderr."""
    ctx = _context()
    pg_timeout_s = pg_timeout_s or max(60.0, timeout_s)
    environ = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with tempfile.TemporaryDirectory(prefix="nd-ranks-") as folder:
        procs = []
        for r in range(world_size):
            rank_env = {**environ, "RANK": str(r), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(r)}
            procs.append(ctx.Process(target=_child, name=f"rank{r}", daemon=False,
                                     args=(jobs, r, world_size, folder, rank_env, pg_timeout_s, log_level,
                                           capture_output)))
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        cut_short = False
        while time.monotonic() < deadline:
            running = [p.sentinel for p in procs if p.exitcode is None]
            if not running:
                break
            mp.connection.wait(running, timeout=max(0.0, min(1.0, deadline - time.monotonic())))
            if not cut_short and any(p.exitcode is not None and _failed(folder, r, expect_dead)
                                     for r, p in enumerate(procs)):
                cut_short = True
                if deadline - time.monotonic() > FAILURE_GRACE_S:
                    log.warning("a rank failed: the others get %.0fs to finish", FAILURE_GRACE_S)
                    deadline = time.monotonic() + FAILURE_GRACE_S
        hung = set()
        for r, p in enumerate(procs):
            if p.exitcode is None:
                hung.add(r)
                log.error("rank %d still running after the deadline: killing it", r)
                os.kill(p.pid, signal.SIGKILL)
            p.join(10)
        reports = []
        for r, p in enumerate(procs):
            output = _output(folder, r)
            if output and capture_output:
                sys.stderr.write(f"---- rank {r} of {world_size} printed ----\n{output}")
                if not output.endswith("\n"):
                    sys.stderr.write("\n")
            tail = "\n".join(output.splitlines()[-_LOG_TAIL_LINES:])
            payload = _read(folder, r)
            if payload is None:
                reports.append(RankReport(r, None, hung=r in hung, exitcode=p.exitcode, output_tail=tail))
            elif payload[0] == "ok":
                reports.append(RankReport(r, payload[1], exitcode=p.exitcode))
            else:
                reports.append(RankReport(r, None, error=payload[1], error_type=payload[2],
                                          error_message=payload[3], exitcode=p.exitcode, output_tail=tail))
        return reports


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 120.0,
              env: dict[str, str] | None = None, pg_timeout_s: float = 60.0,
              expect_dead: Collection[int] | None = None, raise_on_error: bool = True) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` ranks; return the values in
    rank order. ``fn`` must be importable (module level). Raises :class:`RankFailure` with
    every failed rank's traceback (or its last output when it hung or died). With
    ``raise_on_error=False`` the list holds ("error", type name, message) tuples for ranks
    that raised and None for ranks without a result; ranks named in ``expect_dead`` may die
    (None) in either case."""
    expect_dead = set(expect_dead or ())
    reports = launch([(fn, args, {})], world_size, timeout_s=timeout_s, env=env, pg_timeout_s=pg_timeout_s,
                     expect_dead=expect_dead)
    errors = [rep.why(timeout_s) for rep in reports
              if rep.error is not None or (not rep.ok and (rep.hung or rep.rank not in expect_dead))]
    if errors and raise_on_error:
        raise RankFailure("\n".join(errors))
    return [rep.values[0] if rep.ok else (("error", rep.error_type, rep.error_message) if rep.error else None)
            for rep in reports]


def run_jobs(jobs: list[tuple[Callable[..., Any], dict[str, Any]]], world_size: int, *, timeout_s: float,
             env: dict[str, str] | None = None, pg_timeout_s: float | None = None) -> list[list[Any]]:
    """Run ``fn(rank, world_size, **kwargs)`` for each ``(fn, kwargs)`` of ``jobs``, in order,
    on ``world_size`` ranks (one launch, one process group); return ``results[job][rank]``.
    The ranks log at this process's level. Raises :class:`RankFailure` when a rank raised,
    died or hung."""
    reports = launch([(fn, (), kwargs) for fn, kwargs in jobs], world_size, timeout_s=timeout_s, env=env,
                     pg_timeout_s=pg_timeout_s, log_level=logging.getLogger().getEffectiveLevel(),
                     capture_output=False)
    errors = [rep.why(timeout_s) for rep in reports if not rep.ok]
    if errors:
        raise RankFailure("\n".join(errors))
    return [[rep.values[j] for rep in reports] for j in range(len(jobs))]
