"""The one module that talks to torch.distributed.

Control messages (choice of checkpoint, agreement, commit reports) travel on a dedicated
gloo group with its own timeout, so they never need a GPU and never wait forever. Every
cross-rank step has the shape DCP uses: each rank (or the coordinator) runs its part, the
outcome, value or exception, is exchanged, and then every rank returns the same value or
raises the same error. No rank ever skips a collective that another rank enters.

Works in a plain single process too (no process group): then every step is local.
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from .errors import DistributedTimeoutError, NoetherDistError, RemoteRankError

__all__ = ["Comm", "DistEnv", "init_distributed", "destroy_distributed", "current_rank", "is_distributed", "new_gloo_group", "training_group"]

log = logging.getLogger(__name__)
T = TypeVar("T")

try:  # DCP's CheckpointException derives from BaseException: catch it explicitly.
    from torch.distributed.checkpoint.api import CheckpointException as _DcpError
except ImportError:  # pragma: no cover
    _DcpError = Exception  # type: ignore[misc,assignment]

DEFAULT_TIMEOUT_S = float(os.environ.get("NOETHER_DIST_TIMEOUT_S", "600"))
_CONTROL_GROUPS: dict[tuple[int, float], Any] = {}


@dataclass(frozen=True)
class _Outcome:
    rank: int
    ok: bool
    value: Any = None
    error: BaseException | None = None
    error_text: str = ""


def _capture(rank: int, fn: Callable[[], Any]) -> _Outcome:
    try:
        return _Outcome(rank, True, fn())
    except (Exception, _DcpError) as exc:  # noqa: BLE001 - re-raised on every rank below
        text = f"{type(exc).__name__}: {exc}"
        try:
            pickle.dumps(exc)
            return _Outcome(rank, False, error=exc, error_text=text)
        except Exception:  # noqa: BLE001 - unpicklable exceptions travel as text
            return _Outcome(rank, False, error=None, error_text=text)


def _raise_same(outcomes: list[_Outcome], local: _Outcome | None) -> None:
    failed = [o for o in outcomes if not o.ok]
    if not failed:
        return
    first = failed[0]
    summary = {o.rank: o.error_text for o in failed}
    if isinstance(first.error, NoetherDistError):
        # Our own errors carry a message meant for the user: raise it as is, everywhere.
        cause = local.error if local is not None and not local.ok else None
        raise first.error from cause
    detail = "; ".join(f"rank {r}: {t}" for r, t in sorted(summary.items()))
    err = RemoteRankError(f"failed on {len(failed)} rank(s): {detail}", summary)
    if local is not None and not local.ok and local.error is not None:
        raise err from local.error
    raise err


class Comm:
    """Collectives for control messages among the ranks of the default process group.

    ``Comm()`` in a job without an initialised process group is a one-rank Comm.
    Every method is a collective: all ranks must call it, in the same order.
    ``Comm(private=True)`` has a gloo group of its own (for a background writer thread).
    """

    def __init__(self, timeout_s: float | None = None, *, private: bool = False) -> None:
        self.timeout_s = float(timeout_s or DEFAULT_TIMEOUT_S)
        self.distributed = dist.is_available() and dist.is_initialized()
        if self.distributed:
            self.rank = dist.get_rank()
            self.world_size = dist.get_world_size()
            # private: a group of its own, for a background thread (gloo groups must not be
            # shared between threads that run collectives concurrently). Creating one is a
            # collective itself.
            self.group = new_gloo_group(self.timeout_s) if private else _control_group(self.timeout_s)
        else:
            self.rank, self.world_size, self.group = 0, 1, None

    @property
    def is_coordinator(self) -> bool:
        """True on rank 0, which selects, commits and writes aliases."""
        return self.rank == 0

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RuntimeError as exc:  # gloo reports timeouts and dead peers as RuntimeError
            raise DistributedTimeoutError(
                f"{what} did not complete within {self.timeout_s:.0f}s on rank {self.rank} "
                f"(a rank died or is stuck): {exc}"
            ) from exc

    def broadcast(self, obj: T | None, src: int = 0) -> T:
        """Send ``obj`` from ``src`` to every rank; return it everywhere."""
        if not self.distributed:
            return obj  # type: ignore[return-value]
        box = [obj]
        self._guard("broadcast", lambda: dist.broadcast_object_list(box, src=src, group=self.group))
        return box[0]  # type: ignore[return-value]

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._guard("all_gather", lambda: dist.all_gather_object(out, obj, group=self.group))
        return out

    def barrier(self) -> None:
        """Wait for every rank, at most the timeout; names the missing ranks on failure."""
        if not self.distributed:
            return
        self._guard(
            "barrier",
            lambda: dist.monitored_barrier(group=self.group, timeout=_dt.timedelta(seconds=self.timeout_s), wait_all_ranks=True),
        )

    def on_coordinator(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only; every rank returns its value or raises its error."""
        outcome = _capture(self.rank, fn) if self.is_coordinator else None
        outcome = self.broadcast(outcome)
        _raise_same([outcome], outcome if self.is_coordinator else None)
        return outcome.value

    def on_all(self, fn: Callable[[], T]) -> list[T]:
        """Run ``fn`` on every rank; return all values in rank order on every rank, or, if
        any rank failed, raise the same error on every rank."""
        local = _capture(self.rank, fn)
        outcomes = self.all_gather(local)
        _raise_same(outcomes, local)
        return [o.value for o in outcomes]

    def each(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank and return this rank's value; only success or failure
        travels (values may be large, e.g. state dicts). If any rank failed, every rank
        raises the same error."""
        local = _capture(self.rank, fn)
        outcomes = self.all_gather(_Outcome(local.rank, local.ok, None, local.error, local.error_text))
        _raise_same(outcomes, local)
        return local.value

    def all_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on every rank."""
        return all(self.all_gather(bool(flag)))


def _control_group(timeout_s: float):
    key = (id(dist.group.WORLD), timeout_s)
    group = _CONTROL_GROUPS.get(key)
    if group is None:
        group = dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=timeout_s))
        _CONTROL_GROUPS[key] = group
    return group


def new_gloo_group(timeout_s: float):
    """A fresh gloo group over all ranks (collective). For background writers that must
    not share a group with the training loop."""
    return dist.new_group(backend="gloo", timeout=_dt.timedelta(seconds=timeout_s))


def training_group():
    """The process group DCP uses for planning (the default group), or None when not
    distributed."""
    return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, read from torchrun or SLURM variables."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> DistEnv:
        """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK/MASTER_*, else srun's SLURM_PROCID/
        SLURM_NTASKS/SLURM_LOCALID with the master on the first host of the node list,
        else a single process."""
        env = dict(os.environ if env is None else env)
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")),
                       env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", "29500")), "torchrun")
        if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
            job = int(env.get("SLURM_JOB_ID", "0"))
            return cls(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", "0")),
                       env.get("MASTER_ADDR") or first_host(nodelist),
                       int(env.get("MASTER_PORT") or 20000 + job % 20000), "slurm")
        return cls(0, 1, 0, "127.0.0.1", 0, "single")


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list such as ``node[01-04,07],gpu2`` -> ``node01``."""
    head = nodelist.split(",", 1)[0] if "[" not in nodelist.split(",", 1)[0] else nodelist.split("]", 1)[0] + "]"
    if "[" in head:
        prefix, rest = head.split("[", 1)
        first = rest.rstrip("]").split(",", 1)[0].split("-", 1)[0]
        return prefix + first
    return head


def init_distributed(timeout_s: float | None = None, backend: str | None = None) -> DistEnv:
    """Initialise the default process group from the environment (torchrun, srun or a plain
    process) and return where this process sits. NCCL when CUDA is available, else gloo;
    a plain single process gets no process group. Idempotent."""
    env = DistEnv.from_env()
    if dist.is_initialized() or env.world_size == 1 and env.launcher == "single":
        return env
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(env.local_rank)
    timeout = _dt.timedelta(seconds=float(timeout_s or DEFAULT_TIMEOUT_S))
    if env.launcher == "slurm":
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        os.environ.setdefault("RANK", str(env.rank))
        os.environ.setdefault("WORLD_SIZE", str(env.world_size))
        os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    dist.init_process_group(backend=backend, timeout=timeout, rank=env.rank, world_size=env.world_size,
                            init_method=f"tcp://{env.master_addr}:{env.master_port}" if env.launcher == "slurm" else "env://")
    log.info("process group ready: rank %d of %d via %s (%s)", env.rank, env.world_size, env.launcher, backend)
    return env


def destroy_distributed() -> None:
    """Tear down the process group and the control groups, if any."""
    _CONTROL_GROUPS.clear()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def current_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
