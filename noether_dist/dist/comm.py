"""The one module that talks to torch.distributed.

Control messages (choice of checkpoint, agreement, commit reports) travel on a dedicated
gloo group with its own timeout, so they never need a GPU and never wait forever. Every
cross-rank step has the shape DCP uses: each rank (or the coordinator) runs its part, the
outcome, value or exception, is exchanged, and then every rank returns the same value or
raises the same error. No rank ever skips a collective that another rank enters.

A :class:`Comm` runs on one process group, the default one or a subgroup (a pipeline
stage, a replica group of HSDP), with one coordinator among its ranks, as DCP's
``_DistWrapper(group, use_dist, coordinator_rank)`` does: ranks outside the group take no
part, so several subgroups can save and resume at the same time.

Works in a plain single process too (no process group): then every step is local.
"""

from __future__ import annotations

import atexit
import datetime as _dt
import logging
import os
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from ..errors import ConfigError, DistributedTimeoutError, NoetherDistError, RemoteRankError
from .timeouts import DEFAULT_TIMEOUT_S
from .launch_env import DistEnv

__all__ = ["Comm", "init_distributed", "destroy_distributed", "current_rank", "is_distributed"]

log = logging.getLogger(__name__)
T = TypeVar("T")

try:  # DCP's CheckpointException derives from BaseException: catch it explicitly.
    from torch.distributed.checkpoint.api import CheckpointException as _DcpError
except ImportError:  # pragma: no cover
    _DcpError = Exception  # type: ignore[misc,assignment]

_CONTROL_GROUPS: dict[tuple[int, tuple[int, ...] | None, float], Any] = {}
_TAG_SIZE, _TAG_DATA = 7301, 7302  # point-to-point tags of Comm.exchange
_SCATTER_BATCH = 256  # ranks whose replies gather_scatter pickles and sends at once


@dataclass(frozen=True)
class _Outcome:
    rank: int
    ok: bool
    value: Any = None
    error: BaseException | None = None
    error_text: str = ""


def _describe(exc: BaseException) -> str:
    """One line per cause: DCP's CheckpointException carries a traceback per failed rank;
    keep each rank's last line (the error itself) instead."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        parts = []
        for rank, failure in sorted(failures.items()):
            err = getattr(failure, "exception", None)  # DCP wraps (exception, traceback)
            if err is None and isinstance(failure, tuple) and failure and isinstance(failure[0], BaseException):
                err = failure[0]
            parts.append(f"rank {rank}: {type(err).__name__}: {err}" if err is not None else f"rank {rank}: {failure}")
        return "; ".join(parts)
    return f"{type(exc).__name__}: {exc}"


def _capture(rank: int, fn: Callable[[], Any]) -> _Outcome:
    try:
        return _Outcome(rank, True, fn())
    except (Exception, _DcpError) as exc:  # noqa: BLE001 - re-raised on every rank below
        text = _describe(exc)
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
    """Collectives for control messages among the ranks of one process group.

    ``Comm()`` works on the default process group with rank 0 as the coordinator; in a job
    without an initialised process group it is a one-rank Comm. ``process_group`` (a
    subgroup) and ``coordinator_rank`` (a global rank inside it; default: its first rank)
    are DCP's: only the group's ranks take part, ``rank`` and ``world_size`` are within the
    group, and the control traffic travels on a gloo group over the same ranks, made once
    per group and timeout (its making is a collective of the group's ranks alone).
    Every method is a collective: all ranks of the group must call it, in the same order.
    ``Comm(private=True)`` has a gloo group of its own (for a background writer thread).

    Three ways to run a function, named after what travels between the ranks:

    - :meth:`broadcast_from_coordinator`: the coordinator runs it; its value (or error)
      is broadcast to every rank;
    - :meth:`all_gather_results`: every rank runs it; every rank gets all values in rank
      order;
    - :meth:`run_everywhere`: every rank runs it and keeps its own value; only success or
      failure travels;
    - :meth:`gather_scatter`: every rank runs one function, the coordinator combines all
      values into one result per rank, and each rank receives its own (bytes per rank
      bounded by its own share, e.g. its part of a checkpoint's metadata).

    In each, a failure on any rank raises the same error on every rank.

    :meth:`exchange` is the one exception to "every method is a collective": point to point
    between the ranks it names (bulk bytes, e.g. peer copies), each wait bounded.
    """

    def __init__(self, timeout_s: float | None = None, *, process_group: Any = None,
                 coordinator_rank: int | None = None, private: bool = False) -> None:
        self.timeout_s = float(timeout_s or DEFAULT_TIMEOUT_S)
        self.distributed = dist.is_available() and dist.is_initialized()
        self.process_group = process_group
        """The group given (None: the default group)."""
        if not self.distributed:
            if process_group is not None:
                raise ConfigError("process_group needs an initialised torch.distributed process group; "
                                  "leave it None in a single process")
            if coordinator_rank not in (None, 0):
                raise ConfigError(f"coordinator_rank {coordinator_rank} is not a rank of this single process; use 0")
            self.rank, self.world_size, self.group_ranks, self.coordinator_rank = 0, 1, (0,), 0
            self.control_group = None
            self._subgroup: tuple[int, ...] | None = None
        else:
            self._subgroup = _subgroup_ranks(process_group)
            self.group_ranks = self._subgroup or tuple(range(dist.get_world_size()))
            """The global ranks of the group, in group-rank order."""
            self.rank = self.group_ranks.index(dist.get_rank())
            self.world_size = len(self.group_ranks)
            self.coordinator_rank = self.group_ranks[0] if coordinator_rank is None else coordinator_rank
            """The global rank of the coordinator."""
            if self.coordinator_rank not in self.group_ranks:
                raise ConfigError(f"coordinator_rank {coordinator_rank} is not a rank of the process group; "
                                  f"its global ranks are {list(self.group_ranks)}")
            # private: a group of its own, for a background thread (gloo groups must not be
            # shared between threads that run collectives concurrently). Creating one is a
            # collective itself.
            self.control_group = (_new_gloo_group(self._subgroup, self.timeout_s) if private
                                  else _control_group(self._subgroup, self.timeout_s))
        self._parallel: list[Any] = [self.control_group]

    @property
    def is_default_group(self) -> bool:
        """True when this Comm spans every rank of the job (or there is no process group)."""
        return self._subgroup is None

    def parallel_groups(self, count: int) -> list[Any]:
        """``count`` gloo groups of these ranks for as many DCP saves running at once on
        threads (a gloo group must not carry two collectives at the same time): this Comm's
        control group first, then groups made on first need, in the same order on every
        rank (making them is a collective). None for each when not distributed."""
        if not self.distributed:
            return [None] * count
        while len(self._parallel) < count:
            self._parallel.append(_new_gloo_group(self._subgroup, self.timeout_s))
        return self._parallel[:count]

    @property
    def global_rank(self) -> int:
        """This rank in the whole job (what error messages name)."""
        return self.group_ranks[self.rank] if self.distributed else 0

    @property
    def coordinator_group_rank(self) -> int:
        """The coordinator's rank within the group (``coordinator_rank`` is its global rank)."""
        return self.group_ranks.index(self.coordinator_rank) if self.distributed else 0

    @property
    def is_coordinator(self) -> bool:
        """True on the coordinator (``coordinator_rank``), which selects, commits and writes
        aliases."""
        return self.global_rank == self.coordinator_rank

    def _guard(self, what: str, fn: Callable[[], T]) -> T:
        try:
            return fn()
        except RuntimeError as exc:  # gloo reports timeouts and dead peers as RuntimeError
            raise DistributedTimeoutError(
                f"{what} did not complete within {self.timeout_s:.0f}s on rank {self.global_rank} "
                f"(a rank died or is stuck): {exc}"
            ) from exc

    def broadcast(self, obj: T | None, src: int | None = None) -> T:
        """Send ``obj`` from ``src`` (a global rank of the group; default: the coordinator)
        to every rank; return it everywhere."""
        if not self.distributed:
            return obj  # type: ignore[return-value]
        box = [obj]
        source = self.coordinator_rank if src is None else src
        self._guard("broadcast", lambda: dist.broadcast_object_list(box, src=source, group=self.control_group))
        return box[0]  # type: ignore[return-value]

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        self._guard("all_gather", lambda: dist.all_gather_object(out, obj, group=self.control_group))
        return out

    def barrier(self) -> None:
        """Wait for every rank, at most the timeout; names the missing ranks on failure."""
        if not self.distributed:
            return
        self._guard(
            "barrier",
            lambda: dist.monitored_barrier(group=self.control_group, timeout=_dt.timedelta(seconds=self.timeout_s),
                                           wait_all_ranks=True),
        )

    def broadcast_from_coordinator(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the coordinator only; every rank returns its value or raises its
        error."""
        return self.broadcast_from(self.coordinator_group_rank, fn)

    def broadcast_from(self, rank: int, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the rank ``rank`` of the group only (e.g. the one that holds some
        files); every rank returns its value or raises its error."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is not a rank of this group of {self.world_size}")
        mine = rank == self.rank
        outcome = _capture(self.global_rank, fn) if mine else None
        outcome = self.broadcast(outcome, src=self.group_ranks[rank] if self.distributed else None)
        _raise_same([outcome], outcome if mine else None)
        return outcome.value

    def host_store(self, rank: int, host_name: str) -> tuple[Any, int]:
        """A TCPStore server on the rank ``rank`` of the group, reached at ``host_name``, on a
        port the system assigns and that stays bound as long as the store lives (no other
        process can take it meanwhile). Returns the store (None on the other ranks) and its
        port (on every rank); a failure to host it is raised on every rank."""
        hosted: list[Any] = []

        def host() -> int:
            hosted.append(_new_store(host_name, self.timeout_s))
            return hosted[0].port

        port = self.broadcast_from(rank, host)
        return (hosted[0] if hosted else None), port

    def all_gather_results(self, fn: Callable[[], T]) -> list[T]:
        """Run ``fn`` on every rank; return all values in rank order on every rank, or, if
        any rank failed, raise the same error on every rank."""
        local = _capture(self.global_rank, fn)
        outcomes = self.all_gather(local)
        _raise_same(outcomes, local)
        return [o.value for o in outcomes]

    def run_everywhere(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank and return this rank's value; only success or failure
        travels (values may be large, e.g. state dicts). If any rank failed, every rank
        raises the same error."""
        local = _capture(self.global_rank, fn)
        if self.all_true(local.ok):  # the common case costs one tiny all_reduce
            return local.value
        outcomes = self.all_gather(_Outcome(local.rank, local.ok, None, local.error, local.error_text))
        _raise_same(outcomes, local)
        return local.value

    def exchange(self, outgoing: Mapping[int, Any], sources: Iterable[int]) -> dict[int, Any]:
        """Point to point: send ``outgoing[dst]`` (any picklable object) to each rank
        ``dst`` and receive one object from each rank in ``sources``; return them by
        source. Only the ranks named take part (not a collective over all ranks): every
        rank that sends to ``d`` must be in ``d``'s ``sources`` in the same call, and the
        k-th call between two ranks pairs with the k-th. Sizes travel first, then the
        bytes, on the control group; every wait is bounded by the timeout (a dead or stuck
        partner raises DistributedTimeoutError here, on this rank: callers agree after)."""
        sources = sorted(set(sources))
        if not self.distributed:
            if sources or outgoing:
                raise ValueError("exchange needs a process group: a single process has no one to send to")
            return {}
        payloads = {dst: pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL) for dst, obj in outgoing.items()}
        sizes = {src: torch.zeros(1, dtype=torch.int64) for src in sources}

        def run_round(sends: dict[int, torch.Tensor], recvs: dict[int, torch.Tensor], tag: int) -> None:
            to, grp = self.group_ranks, self.control_group  # dist takes global ranks
            works = [dist.isend(t, dst=to[dst], group=grp, tag=tag) for dst, t in sends.items()]
            works += [dist.irecv(t, src=to[src], group=grp, tag=tag) for src, t in recvs.items()]
            wait = _dt.timedelta(seconds=self.timeout_s)
            for work in works:
                work.wait(wait)

        self._guard("exchange (sizes)", lambda: run_round(
            {dst: torch.tensor([len(p)], dtype=torch.int64) for dst, p in payloads.items()}, sizes, _TAG_SIZE))
        buffers = {src: torch.empty(int(n.item()), dtype=torch.uint8) for src, n in sizes.items()}
        self._guard("exchange (data)", lambda: run_round(
            {dst: torch.frombuffer(bytearray(p), dtype=torch.uint8) for dst, p in payloads.items()}, buffers, _TAG_DATA))
        return {src: pickle.loads(buf.numpy().tobytes()) for src, buf in buffers.items()}

    def gather_scatter(self, local: Callable[[], T], combine: Callable[[list[T]], list[Any]]) -> Any:
        """Run ``local`` on every rank; the coordinator gets every rank's value (in rank
        order of the group) and runs ``combine`` on them, which returns one value per rank;
        each rank returns its own (DCP's ``reduce_scatter`` shape). Point to point
        (:meth:`exchange`): each rank sends its value to the coordinator and receives its own
        result, nothing else, so a rank's bytes are bounded by its own share (the coordinator
        handles all). A failure in ``local`` on any rank, or in ``combine``, raises the same
        error on every rank; every wait is bounded by the timeout."""
        mine = _capture(self.global_rank, local)
        if not self.distributed:
            failures, value = self._combine([mine], combine)[0]
        else:
            coordinator = self.coordinator_group_rank
            others = [r for r in range(self.world_size) if r != coordinator]
            if self.is_coordinator:
                got = self.exchange({}, others)
                outcomes = [mine if r == coordinator else got.pop(r) for r in range(self.world_size)]
                replies = self._combine(outcomes, combine)
                for start in range(0, len(others), _SCATTER_BATCH):  # bounded memory for the pickled replies
                    self.exchange({r: replies[r] for r in others[start:start + _SCATTER_BATCH]}, [])
                failures, value = replies[coordinator]
            else:
                self.exchange({coordinator: mine}, [])
                failures, value = self.exchange({}, [coordinator])[coordinator]
        _raise_same(failures, mine)
        return value

    def _combine(self, outcomes: list[_Outcome], combine: Callable[[list[Any]], list[Any]]
                 ) -> list[tuple[list[_Outcome], Any]]:
        """The coordinator's part of :meth:`gather_scatter`: (failures, value) per rank
        (``outcomes`` is emptied)."""
        count = len(outcomes)
        failed = [_Outcome(o.rank, False, None, o.error, o.error_text) for o in outcomes if not o.ok]
        if not failed:
            values = [o.value for o in outcomes]
            outcomes.clear()  # combine may drop each value once used (memory at thousands of ranks)

            def run() -> list[Any]:
                results = combine(values)
                if len(results) != count:
                    raise ValueError(f"gather_scatter: {len(results)} results for {count} ranks")
                return results
            result = _capture(self.global_rank, run)
            if result.ok:
                return [([], v) for v in result.value]
            failed = [result]
        return [(failed, None)] * count

    def all_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on every rank (one all_reduce)."""
        if not self.distributed:
            return bool(flag)
        value = torch.tensor([1 if flag else 0], dtype=torch.int32)
        self._guard("all_reduce", lambda: dist.all_reduce(value, op=dist.ReduceOp.MIN, group=self.control_group))
        return bool(value.item())


def _new_store(host_name: str, timeout_s: float) -> Any:
    """A TCPStore server at ``host_name`` on a port the system assigns (``.port``)."""
    return dist.TCPStore(host_name, 0, is_master=True, wait_for_workers=False, timeout=_dt.timedelta(seconds=timeout_s))


def _subgroup_ranks(group: Any) -> tuple[int, ...] | None:
    """The global ranks of ``group``, or None when it spans the whole job (or is None)."""
    if group is None or group is dist.group.WORLD:
        return None
    if group is dist.GroupMember.NON_GROUP_MEMBER:
        raise ConfigError(f"rank {dist.get_rank()} is not a member of the process_group it was given; "
                          "pass the group this rank belongs to")
    ranks = tuple(dist.get_process_group_ranks(group))
    if dist.get_rank() not in ranks:
        raise ConfigError(f"rank {dist.get_rank()} is not a member of the process_group it was given "
                          f"(global ranks {list(ranks)})")
    return None if ranks == tuple(range(dist.get_world_size())) else ranks


def _control_group(ranks: tuple[int, ...] | None, timeout_s: float):
    key = (id(dist.group.WORLD), ranks, timeout_s)
    group = _CONTROL_GROUPS.get(key)
    if group is None:
        group = _new_gloo_group(ranks, timeout_s)
        _CONTROL_GROUPS[key] = group
    return group


def _new_gloo_group(ranks: tuple[int, ...] | None, timeout_s: float):
    """A fresh gloo group over ``ranks`` (None: all ranks), a collective of those ranks.
    A subgroup's is made by its ranks alone (use_local_synchronization), so that subgroups
    never wait for each other; they must make their groups in the same order, which every
    collective here does."""
    timeout = _dt.timedelta(seconds=timeout_s)
    if ranks is None:
        return dist.new_group(backend="gloo", timeout=timeout)
    return dist.new_group(ranks=list(ranks), backend="gloo", timeout=timeout, use_local_synchronization=True)


def init_distributed(timeout_s: float | None = None, backend: str | None = None) -> DistEnv:
    """Initialise the default process group from the environment (torchrun, srun or a plain
    process) and return where this process sits. Idempotent.

    Backend: with CUDA ``cpu:gloo,cuda:nccl`` (NCCL for CUDA tensors, gloo for CPU tensors
    in the same group), else gloo; control messages use their own gloo groups (see
    :class:`Comm`). A plain single process gets no process group. ``timeout_s`` bounds
    every collective of the default group (default: NOETHER_DIST_TIMEOUT_S or 600 s).
    Under srun the torchrun variables (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
    MASTER_PORT) are set from the SLURM ones for libraries that read them.
    """
    env = DistEnv.from_env()
    if dist.is_initialized() or env.launcher == "single":
        return env
    if backend is None:
        backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if "nccl" in backend:
        # With one GPU visible per task (srun --gpus-per-task, CUDA_VISIBLE_DEVICES) the
        # local rank can exceed the device count: map it onto the visible devices.
        torch.cuda.set_device(env.local_rank % max(1, torch.cuda.device_count()))
    timeout = _dt.timedelta(seconds=float(timeout_s or DEFAULT_TIMEOUT_S))
    if env.launcher == "slurm":
        os.environ.update(env.torchrun_variables())
        init_method = f"tcp://{env.master_addr}:{env.master_port}"
    else:
        init_method = "env://"
    dist.init_process_group(backend=backend, timeout=timeout, rank=env.rank, world_size=env.world_size,
                            init_method=init_method)
    # Tear the groups down before the interpreter finalises: a gloo worker thread that drops
    # its last reference to a finished collective after Py_FinalizeEx began cannot take the
    # GIL any more and aborts the process ("terminate called without an active exception",
    # SIGABRT, seen on ~1 exit in 20 of the trainer under torchrun). Collecting the groups
    # now joins their worker threads (torch releases the GIL in that destructor); the short
    # sleep lets a thread that is still finishing a collective take the GIL.
    def _teardown_before_finalize() -> None:
        import gc
        import time

        destroy_distributed()
        gc.collect()
        time.sleep(0.05)

    atexit.register(_teardown_before_finalize)
    log.info("process group ready: rank %d of %d via %s (%s, master %s:%d)", env.rank, env.world_size,
             env.launcher, backend, env.master_addr, env.master_port)
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
