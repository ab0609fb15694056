"""A Comm for one-process tests: one rank, or a few ranks as threads of this process.

:class:`LocalComm` is a subclass of the real :class:`~noether_dist.dist.comm.Comm`. Only
the primitives that would reach torch.distributed (``broadcast``, ``all_gather``,
``barrier``, ``all_true``, ``exchange``, ``parallel_groups``) are replaced by in-memory
ones; the steps built on them (``broadcast_from_coordinator``, ``all_gather_results``,
``run_everywhere``: run, exchange the outcome, raise the same error on every rank) are the
library's own code, inherited. tests/unit/test_local_comm.py keeps the two in step (same
public names and signatures, every method of Comm that touches torch.distributed
overridden here) and compares a one-rank LocalComm with the real Comm of a plain process.

Ranks as threads (:class:`LocalGroup`) behave as gloo ranks do where a test can see it:
every value crosses as a pickled copy (an unpicklable value fails on its sender, the
others time out), each collective waits at most the group's timeout (then
DistributedTimeoutError, through Comm's own guard) and a group whose wait broke stays
broken. What threads share and ranks do not (the environment, signal handlers, the
current directory) is the caller's to keep apart; DCP's own collectives need a real
process group, so saves and resumes on more than one rank belong in tests/dist.

The library builds its own Comm inside ``Checkpointer`` and ``resume``; in one process
that is the real Comm of a plain process (world size 1, no process group), which is what
the unit tests of saving and resuming run on. LocalComm serves the code that takes a Comm
as an argument (the node-local mirror, the peer-copy protocol) and tests of the agreement
rules on several ranks, without starting a process.
"""

from __future__ import annotations

import pickle
import queue
import threading
from collections.abc import Callable, Iterable, Mapping
from typing import Any, TypeVar

from noether_dist.dist.comm import Comm

__all__ = ["LocalComm", "LocalGroup", "run_on_threads"]

T = TypeVar("T")


class LocalGroup:
    """The shared state of ``world_size`` ranks that are threads of this process; each
    thread takes its own :meth:`comm`. ``timeout_s`` bounds every wait."""

    def __init__(self, world_size: int = 1, timeout_s: float = 30.0) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        self.world_size = world_size
        self.timeout_s = float(timeout_s)
        self._barrier = threading.Barrier(world_size, timeout=self.timeout_s)
        self._slots: list[bytes | None] = [None] * world_size
        self._mail = {(src, dst): queue.Queue() for src in range(world_size) for dst in range(world_size)}

    def comm(self, rank: int = 0, *, coordinator_rank: int | None = None) -> LocalComm:
        """The Comm of ``rank`` (one per thread)."""
        return LocalComm(self, rank, coordinator_rank=coordinator_rank)

    def _wait(self, what: str) -> None:
        try:
            self._barrier.wait()
        except threading.BrokenBarrierError as exc:  # what gloo reports for a timeout: RuntimeError
            raise RuntimeError(f"{what}: a rank did not arrive within {self.timeout_s:.1f}s "
                               "(or an earlier wait of this group broke)") from exc

    def collect(self, rank: int, value: Any, what: str) -> list[Any]:
        """Every rank's ``value``, in rank order, each a copy made by pickling."""
        self._slots[rank] = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        self._wait(what)
        out = [pickle.loads(blob) for blob in self._slots]  # type: ignore[arg-type]
        self._wait(what)  # nobody writes the next round's slot before every rank read this one
        return out

    def send(self, src: int, dst: int, obj: Any) -> None:
        self._mail[(src, dst)].put(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))

    def receive(self, src: int, dst: int) -> Any:
        try:
            return pickle.loads(self._mail[(src, dst)].get(timeout=self.timeout_s))
        except queue.Empty as exc:
            raise RuntimeError(f"exchange: nothing from rank {src} within {self.timeout_s:.1f}s") from exc


class LocalComm(Comm):
    """Comm's interface without torch.distributed: rank ``rank`` of ``group`` (default: a
    group of one, which behaves as ``Comm()`` in a plain process)."""

    def __init__(self, group: LocalGroup | None = None, rank: int = 0, *,
                 coordinator_rank: int | None = None) -> None:
        # Comm.__init__ is not called: it asks torch.distributed about the process group.
        self._group = group if group is not None else LocalGroup(1)
        size = self._group.world_size
        if not 0 <= rank < size:
            raise ValueError(f"rank {rank} is not a rank of a group of {size}")
        coordinator = 0 if coordinator_rank is None else coordinator_rank
        if not 0 <= coordinator < size:
            raise ValueError(f"coordinator_rank {coordinator_rank} is not a rank of a group of {size}")
        self.timeout_s = self._group.timeout_s
        self.distributed = size > 1
        self.process_group = None
        self.rank, self.world_size, self.group_ranks, self.coordinator_rank = rank, size, tuple(range(size)), coordinator
        self.control_group = None
        self._subgroup = None
        self._parallel = [None]

    def parallel_groups(self, count: int) -> list[Any]:
        """``[None] * count``: there is no gloo group to hand to DCP."""
        return [None] * count

    def broadcast(self, obj: T | None, src: int | None = None) -> T:
        """``obj`` of ``src`` (default: the coordinator) on every rank, as a copy."""
        values = self._guard("broadcast", lambda: self._group.collect(self.rank, obj if self._is_source(src) else None,
                                                                       "broadcast"))
        return values[self.coordinator_rank if src is None else src]

    def _is_source(self, src: int | None) -> bool:
        return self.rank == (self.coordinator_rank if src is None else src)

    def all_gather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order, on every rank (copies)."""
        return self._guard("all_gather", lambda: self._group.collect(self.rank, obj, "all_gather"))

    def barrier(self) -> None:
        """Wait for every rank, at most the timeout."""
        self._guard("barrier", lambda: self._group.collect(self.rank, None, "barrier"))

    def all_true(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on every rank."""
        return all(self._guard("all_reduce", lambda: self._group.collect(self.rank, bool(flag), "all_true")))

    def exchange(self, outgoing: Mapping[int, Any], sources: Iterable[int]) -> dict[int, Any]:
        """Point to point, as Comm's: send ``outgoing[dst]`` to each ``dst``, receive one
        object from each rank in ``sources``; each wait bounded by the timeout."""
        sources = sorted(set(sources))
        if self.world_size == 1:
            if sources or outgoing:
                raise ValueError("exchange needs a process group: a single process has no one to send to")
            return {}
        for dst, obj in outgoing.items():
            self._group.send(self.rank, dst, obj)
        return self._guard("exchange", lambda: {src: self._group.receive(src, self.rank) for src in sources})


def run_on_threads(world_size: int, fn: Callable[[LocalComm], T], *, timeout_s: float = 30.0,
                   coordinator_rank: int | None = None) -> list[tuple[bool, Any]]:
    """Run ``fn(comm)`` on ``world_size`` thread-ranks of one :class:`LocalGroup`; return,
    in rank order, ``(True, value)`` or ``(False, exception)`` per rank. A thread still
    running after twice the timeout fails the call (AssertionError): nothing hangs."""
    group = LocalGroup(world_size, timeout_s)
    results: list[tuple[bool, Any] | None] = [None] * world_size

    def one(rank: int) -> None:
        try:
            results[rank] = (True, fn(group.comm(rank, coordinator_rank=coordinator_rank)))
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            results[rank] = (False, exc)

    threads = [threading.Thread(target=one, args=(r,), name=f"local-rank{r}", daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(2 * timeout_s + 5)
    hung = [r for r, t in enumerate(threads) if t.is_alive()]
    assert not hung, f"thread-ranks {hung} still running after {2 * timeout_s + 5:.0f}s"
    return results  # type: ignore[return-value]
