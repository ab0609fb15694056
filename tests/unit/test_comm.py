"""Comm in one process, without a process group: the real Comm of a plain process (one
rank), and tests/support/local_comm.py against it: the same interface (so the fake cannot
drift), the same answers on one rank, and Comm's agreement rules on several thread-ranks.
Comm on real ranks and subgroups: tests/dist/test_comm_groups.py."""

from __future__ import annotations

import ast
import inspect
import pickle
from pathlib import Path

import pytest

import noether_dist.dist.comm as comm_module
from noether_dist.dist.comm import Comm
from noether_dist.errors import ConfigError, DistributedTimeoutError, RemoteRankError
from noether_dist.dist.topology import NodeTopology
from noether_dist.io.mirror import mirror_from
from noether_dist.io.storage import open_storage
from tests.support.local_comm import LocalComm, LocalGroup, run_on_threads

pytestmark = pytest.mark.torch_compat

COMPOSITES = ("broadcast_from_coordinator", "all_gather_results", "run_everywhere", "gather_scatter")
"""Comm's agreement steps: LocalComm must inherit them, so that tests run the real ones."""


def _comm_class() -> ast.ClassDef:
    tree = ast.parse(Path(comm_module.__file__).read_text(encoding="utf-8"))
    return next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Comm")


def _public(cls: type) -> dict[str, object]:
    return {name: inspect.getattr_static(cls, name) for name in dir(cls) if not name.startswith("_")}


# ------------------------------------------------------------ the real Comm, one process

def test_a_single_process_refuses_a_group_or_another_coordinator():
    with pytest.raises(ConfigError, match="process_group needs an initialised torch.distributed process group"):
        Comm(5, process_group=object())
    with pytest.raises(ConfigError, match="coordinator_rank 1 is not a rank of this single process"):
        Comm(5, coordinator_rank=1)
    comm = Comm(5, coordinator_rank=0)
    assert (comm.rank, comm.world_size, comm.is_coordinator, comm.is_default_group) == (0, 1, True, True)
    assert comm.broadcast_from_coordinator(lambda: 7) == 7 and comm.all_gather_results(lambda: 8) == [8]


# ------------------------------------------------------------------- the interface in sync

def test_every_public_name_of_comm_has_the_same_signature_on_local_comm():
    real, fake = _public(Comm), _public(LocalComm)
    assert set(real) <= set(fake), f"LocalComm lacks {sorted(set(real) - set(fake))}"
    assert set(fake) == set(real), f"LocalComm has names Comm lacks: {sorted(set(fake) - set(real))}"
    for name, attr in real.items():
        other = fake[name]
        assert type(attr) is type(other), f"{name}: {type(attr).__name__} on Comm, {type(other).__name__} here"
        if callable(attr):
            assert inspect.signature(attr) == inspect.signature(other), (
                f"{name}{inspect.signature(attr)} on Comm, {name}{inspect.signature(other)} on LocalComm")


def test_local_comm_overrides_every_method_of_comm_that_touches_torch_distributed():
    """A method of Comm whose body names ``dist`` or ``torch`` would reach torch.distributed
    from a LocalComm: each must be replaced; the agreement steps must not be."""
    touching = set()
    for node in _comm_class().body:
        if isinstance(node, ast.FunctionDef):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            if names & {"dist", "torch"}:
                touching.add(node.name)
    assert {"__init__", "broadcast", "all_gather", "barrier", "exchange", "all_true"} <= touching  # the reader works
    missing = sorted(name for name in touching if name not in vars(LocalComm))
    assert not missing, f"LocalComm inherits methods that call torch.distributed: {missing}; override them"
    for name in COMPOSITES:
        assert name not in vars(LocalComm), f"LocalComm must inherit Comm.{name}, not replace it"
        assert not {"dist", "torch"} & {n.id for n in ast.walk(next(
            f for f in _comm_class().body if isinstance(f, ast.FunctionDef) and f.name == name))
            if isinstance(n, ast.Name)}, f"Comm.{name} now calls torch.distributed itself: override it in LocalComm"


def test_local_comm_sets_every_attribute_comm_sets():
    init = next(n for n in _comm_class().body if isinstance(n, ast.FunctionDef) and n.name == "__init__")
    attrs = set()
    for node in ast.walk(init):
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) else []
        for target in targets:
            for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                    attrs.add(t.attr)
    assert {"rank", "world_size", "coordinator_rank", "control_group", "timeout_s"} <= attrs
    for comm in (LocalComm(), LocalGroup(3).comm(2)):
        assert not attrs - set(vars(comm)), f"LocalComm does not set {sorted(attrs - set(vars(comm)))}"


def test_local_comm_never_imports_torch_distributed():
    import tests.support.local_comm as module

    tree = ast.parse(Path(module.__file__).read_text(encoding="utf-8"))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}, imported


# -------------------------------------------------------- one rank: the same as a plain Comm

def _scenario(comm: Comm) -> list:
    """What a caller can see of a one-rank Comm: values, errors (type and message), properties."""

    def outcome(fn):
        try:
            return ("ok", fn())
        except Exception as exc:  # noqa: BLE001 - compared below
            return ("error", type(exc).__name__, str(exc), type(exc.__cause__).__name__)

    def fail(exc):
        def raiser():
            raise exc
        return raiser

    return [
        (comm.rank, comm.world_size, comm.group_ranks, comm.coordinator_rank, comm.global_rank, comm.is_coordinator,
         comm.is_default_group, comm.process_group, comm.control_group),
        outcome(lambda: comm.broadcast({"a": 1})), outcome(lambda: comm.broadcast(5, src=0)),
        outcome(lambda: comm.all_gather([1, 2])), outcome(comm.barrier),
        outcome(lambda: (comm.all_true(True), comm.all_true(False))),
        outcome(lambda: comm.broadcast_from_coordinator(lambda: "x")),
        outcome(lambda: comm.broadcast_from_coordinator(fail(ValueError("bad value")))),
        outcome(lambda: comm.all_gather_results(lambda: 3)),
        outcome(lambda: comm.all_gather_results(fail(KeyError("k")))),
        outcome(lambda: comm.run_everywhere(lambda: [4])),
        outcome(lambda: comm.run_everywhere(fail(ConfigError("one clear line")))),
        outcome(lambda: comm.exchange({}, [])), outcome(lambda: comm.exchange({0: b"x"}, [])),
        outcome(lambda: comm.exchange({}, [1])), outcome(lambda: comm.parallel_groups(3)),
    ]


def test_one_rank_local_comm_answers_as_comm_in_a_plain_process():
    real = Comm(5)
    assert not real.distributed, "this test needs a process without a process group"
    expected = _scenario(real)
    assert expected[7] == ("error", "RemoteRankError", "failed on 1 rank(s): rank 0: ValueError: bad value",
                           "ValueError")  # the scenario sees errors
    assert _scenario(LocalComm(LocalGroup(1, timeout_s=5))) == expected


# ---------------------------------------------------------------- several ranks as threads

def _values(results: list) -> list:
    bad = [(r, v) for r, (ok, v) in enumerate(results) if not ok]
    assert not bad, bad
    return [v for _, v in results]


def test_three_ranks_run_the_three_ways_and_get_copies():
    def body(comm: LocalComm):
        shared = comm.broadcast({"from": comm.rank} if comm.is_coordinator else None)
        shared["touched by"] = comm.rank  # a copy: no other rank sees this
        return {"rank": comm.rank, "coordinator": comm.is_coordinator, "shared": shared,
                "from_coordinator": comm.broadcast_from_coordinator(lambda: comm.rank * 100),
                "gathered": comm.all_gather_results(lambda: comm.rank * 10),
                "own": comm.run_everywhere(lambda: comm.rank), "all_true": comm.all_true(comm.rank != 1),
                "from_1": comm.broadcast(comm.rank, src=1)}

    out = _values(run_on_threads(3, body, timeout_s=10, coordinator_rank=2))
    assert [(o["rank"], o["coordinator"]) for o in out] == [(0, False), (1, False), (2, True)]
    assert [o["shared"] for o in out] == [{"from": 2, "touched by": r} for r in range(3)]
    assert [o["from_coordinator"] for o in out] == [200] * 3
    assert [o["gathered"] for o in out] == [[0, 10, 20]] * 3
    assert [o["own"] for o in out] == [0, 1, 2]
    assert [o["all_true"] for o in out] == [False] * 3 and [o["from_1"] for o in out] == [1] * 3


def test_a_failure_on_one_rank_raises_the_same_error_on_every_rank():
    def body(comm: LocalComm):
        errors = []
        for step in (lambda fn: comm.all_gather_results(fn), lambda fn: comm.run_everywhere(fn)):
            def work():
                if comm.rank == 1:
                    raise ValueError("disk full on rank 1")
                return comm.rank
            try:
                step(work)
            except RemoteRankError as exc:
                errors.append((type(exc).__name__, str(exc), exc.failed_ranks, type(exc.__cause__).__name__))
        def refuse():
            raise ConfigError("bad config, on rank 0 only")
        try:
            comm.broadcast_from_coordinator(refuse)
        except ConfigError as exc:
            errors.append((type(exc).__name__, str(exc)))
        return errors

    out = _values(run_on_threads(3, body, timeout_s=10))
    message = "failed on 1 rank(s): rank 1: ValueError: disk full on rank 1"
    for rank, errors in enumerate(out):
        cause = "ValueError" if rank == 1 else "NoneType"  # only the failed rank chains its own error
        assert errors == [("RemoteRankError", message, {1: "ValueError: disk full on rank 1"}, cause)] * 2 + [
            ("ConfigError", "bad config, on rank 0 only")], (rank, errors)


def test_gather_scatter_gives_each_rank_its_own_result_and_fails_alike():
    def body(comm: LocalComm):
        seen = []

        def combine(values):
            seen.append(values)
            return [f"for {r}: {v}" for r, v in enumerate(values)]

        own = comm.gather_scatter(lambda: comm.rank * 10, combine)
        errors = []

        def fails_on_1():
            if comm.rank == 1:
                raise ValueError("no shard on rank 1")
            return comm.rank
        for local, merge in ((fails_on_1, combine), (lambda: 0, lambda values: [0])):
            try:
                comm.gather_scatter(local, merge)
            except RemoteRankError as exc:
                errors.append(str(exc))
        return own, seen[:1], errors

    out = _values(run_on_threads(3, body, timeout_s=10, coordinator_rank=1))
    assert [o[0] for o in out] == ["for 0: 0", "for 1: 10", "for 2: 20"]
    assert [o[1] for o in out] == [[], [[0, 10, 20]], []]  # only the coordinator combined
    assert all(o[2] == out[0][2] for o in out) and len(out[0][2]) == 2, out
    assert "rank 1: ValueError: no shard on rank 1" in out[0][2][0]
    assert "gather_scatter: 1 results for 3 ranks" in out[0][2][1]


def test_a_rank_that_never_arrives_times_the_others_out():
    def body(comm: LocalComm):
        if comm.rank == 2:
            return "skipped the collective"
        return comm.all_gather_results(lambda: comm.rank)

    out = run_on_threads(3, body, timeout_s=0.2)
    assert out[2] == (True, "skipped the collective")
    for ok, exc in out[:2]:
        assert not ok and isinstance(exc, DistributedTimeoutError), exc
        assert "all_gather did not complete within" in str(exc) and "a rank died or is stuck" in str(exc), exc


def test_an_unpicklable_value_fails_on_its_rank_as_with_gloo():
    def body(comm: LocalComm):
        return comm.all_gather((lambda: 0) if comm.rank == 0 else comm.rank)

    out = run_on_threads(2, body, timeout_s=0.2)
    assert not out[0][0] and isinstance(out[0][1], (pickle.PicklingError, AttributeError, TypeError)), out[0]
    assert not out[1][0] and isinstance(out[1][1], DistributedTimeoutError), out[1]


def test_exchange_sends_point_to_point_in_a_ring():
    def body(comm: LocalComm):
        n = comm.world_size
        return comm.exchange({(comm.rank + 1) % n: f"from {comm.rank}".encode()}, [(comm.rank - 1) % n])

    out = _values(run_on_threads(4, body, timeout_s=10))
    assert out == [{3: b"from 3"}, {0: b"from 0"}, {1: b"from 1"}, {2: b"from 2"}]
    lonely = run_on_threads(2, lambda comm: comm.exchange({}, [1 - comm.rank]), timeout_s=0.2)
    assert all(not ok and isinstance(exc, DistributedTimeoutError) for ok, exc in lonely), lonely


def test_a_bad_rank_or_coordinator_is_refused():
    with pytest.raises(ValueError, match="rank 3 is not a rank of a group of 3"):
        LocalGroup(3).comm(3)
    with pytest.raises(ValueError, match="coordinator_rank 5 is not a rank of a group of 2"):
        LocalGroup(2).comm(0, coordinator_rank=5)
    with pytest.raises(ValueError, match="world_size must be >= 1"):
        LocalGroup(0)


# ------------------------------------------------------- library code that takes a Comm

def test_mirror_from_the_coordinator_copies_its_files_to_the_other_node_once(tmp_path):
    """Two ranks, each the leader of its own "node" with its own folder: rank 1's folder
    gets rank 0's files; names in ``once`` are written once and never replaced; a second
    mirror writes only what changed."""
    folders = [tmp_path / "node0", tmp_path / "node1"]
    storage = open_storage(str(tmp_path))
    storage.replace(f"{folders[0]}/_commits/E0_U1_S1.json", b"record")
    storage.replace(f"{folders[0]}/_aliases/latest.json", b"U1")
    storage.replace(f"{folders[1]}/_commits/E0_U1_S1.json", b"kept: write_once never replaces")
    names = ["_commits/E0_U1_S1.json", "_aliases/latest.json"]

    def mirror(comm: LocalComm) -> list[int]:
        base = str(folders[comm.rank])
        nodes = NodeTopology(nodes=((0,), (1,)), leaders=(0, 1), rank=comm.rank)

        def mirror_once() -> int:
            return mirror_from(comm, nodes, storage, base, names, source=comm.coordinator_group_rank, once={names[0]})

        first = mirror_once()
        if comm.is_coordinator:
            storage.replace(f"{base}/_aliases/latest.json", b"U2")
        comm.barrier()
        return [first, mirror_once(), mirror_once()]

    assert _values(run_on_threads(2, mirror, timeout_s=10)) == [[0, 0, 0], [1, 1, 0]]
    assert (folders[1] / "_aliases" / "latest.json").read_bytes() == b"U2"
    assert (folders[1] / "_commits" / "E0_U1_S1.json").read_bytes() == b"kept: write_once never replaces"


def test_host_store_holds_its_port_on_one_rank_and_tells_every_rank():
    """The store DCP's checkpoint processes meet at: hosted on the rank asked, reachable at
    the port every rank was told, and that port stays taken while the store lives."""
    import datetime
    import socket

    from torch.distributed import TCPStore

    results = run_on_threads(3, lambda comm: comm.host_store(1, "127.0.0.1"))
    assert all(ok for ok, _ in results), results
    (store0, port0), (store, port), (store2, port2) = (value for _, value in results)
    assert store0 is None and store2 is None and store is not None
    assert port0 == port == port2 == store.port
    client = TCPStore("127.0.0.1", port, is_master=False, timeout=datetime.timedelta(seconds=10))
    client.set("key", "value")
    assert store.get("key") == b"value"
    with socket.socket() as other, pytest.raises(OSError):
        other.bind(("", port))
