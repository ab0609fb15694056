"""replicate: peer's protocol on thread-ranks (tests/support/local_comm.py): 2 nodes x 2
ranks, each node a folder of its own, the files written by hand (no DCP, no process). The
same with real ranks, DCP and gloo: tests/dist/test_peer_copy.py."""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import pytest

from noether_dist.dist.topology import NodeTopology
from noether_dist.format.layout import StageLayout
from noether_dist.format.names import TrainingIteration
from noether_dist.format.records import AliasRecord, ArtifactRecord, CommitRecord, FileRecord
from noether_dist.io.storage import open_storage
from noether_dist.stage import peer
from noether_dist.stage.commit import write_alias, write_commit
from tests.support.local_comm import LocalComm, run_on_threads

pytestmark = pytest.mark.torch_compat

NODES = ((0, 1), (2, 3))
POINT = TrainingIteration(0, 2, 32)
ART = f"mlp_cp={POINT}_model.th"
WORLD = 4


def _topology(rank: int) -> NodeTopology:
    return NodeTopology(NODES, (0, 2), rank)


def _data(name: str) -> bytes:
    return (name.encode() * 7)[: 11 + len(name)]  # a few chunks of CHUNK_BYTES below


def _files(rank: int) -> list[str]:
    return ["__0_0.distcp", ".metadata"] if rank == 0 else [f"__{rank}_0.distcp"]


def _record(name: str) -> FileRecord:
    data = _data(name)
    return FileRecord(name, len(data), zlib.crc32(data))


def _results(results: list) -> list:
    bad = [(r, v) for r, (ok, v) in enumerate(results) if not ok]
    assert not bad, bad
    return [v for _, v in results]


@pytest.fixture
def nodes(tmp_path, monkeypatch):
    """(storage, one layout per node, the commit record) after a save with peer copies: each
    rank wrote its files on its node, rank 0's were mirrored to node 1, then every rank ran
    :func:`peer.replicate` in chunks of 5 bytes, then the record and ``latest`` went to both."""
    monkeypatch.setattr(peer, "CHUNK_BYTES", 5)
    storage = open_storage(str(tmp_path))
    layouts = [StageLayout(str(tmp_path / f"node{n}"), "r", "s") for n in range(len(NODES))]
    for rank in range(WORLD):
        for name in _files(rank):
            for node in ({rank // 2} | ({0, 1} if rank == 0 else set())):  # rank 0's files: mirrored
                storage.replace(f"{layouts[node].artifact_path(ART)}/{name}", _data(name))
    record = CommitRecord(POINT, "r", "s", "mlp", WORLD, (ArtifactRecord(ART, "model", None, "dcp", tuple(
        _record(name) for rank in range(WORLD) for name in _files(rank))),))

    def save(comm: LocalComm) -> int:
        return peer.replicate(comm, _topology(comm.rank), storage, layouts[comm.rank // 2],
                              [(ART, _record(name)) for name in _files(comm.rank)])

    received = _results(run_on_threads(WORLD, save, timeout_s=20))
    assert received == [1, 1, 0, 1]  # the coordinator sends nothing: its files are mirrored anyway
    for layout in layouts:
        write_commit(storage, layout, record)
        write_alias(storage, layout, AliasRecord("latest", POINT))
    return storage, layouts, record


def _tree(root: str) -> dict[str, bytes]:
    base = Path(root)
    return {str(p.relative_to(base)): p.read_bytes() for p in sorted(base.rglob("*")) if p.is_file()}


def test_replicate_keeps_each_rank_s_files_on_the_next_node(nodes):
    storage, layouts, _ = nodes
    node0, node1 = (Path(layout.checkpoints_dir) for layout in layouts)
    assert sorted(os.listdir(node0 / "_peer" / "node1" / ART)) == ["__2_0.distcp", "__3_0.distcp"]
    assert sorted(os.listdir(node1 / "_peer" / "node0" / ART)) == ["__1_0.distcp"]
    for where, name in ((node0 / "_peer" / "node1", "__3_0.distcp"), (node1 / "_peer" / "node0", "__1_0.distcp")):
        assert (where / ART / name).read_bytes() == _data(name)
    assert not any(n.startswith(".peer-tmp") for n in os.listdir(node0 / "_peer" / "node1" / ART))


def test_a_replaced_node_gets_its_records_and_files_back_from_the_other(nodes):
    storage, layouts, record = nodes
    before = _tree(layouts[1].checkpoints_dir)
    shutil.rmtree(Path(layouts[1].checkpoints_dir).parents[1])  # node 1 replaced: an empty disk

    def resume(comm: LocalComm) -> tuple[int, int]:
        topology, layout = _topology(comm.rank), layouts[comm.rank // 2]
        records = peer.restore_records(comm, topology, storage, layout)
        return records, peer.restore(comm, topology, storage, layout, record)

    # node 1's leader (rank 2) writes the record and the alias; it fetches rank 0's two
    # mirrored files and its own shard, rank 3 its shard
    assert _results(run_on_threads(WORLD, resume, timeout_s=20)) == [(0, 0), (0, 0), (2, 3), (0, 1)]
    after = _tree(layouts[1].checkpoints_dir)
    assert {k: v for k, v in before.items() if not k.startswith("_peer/")} == after


def test_a_damaged_shard_is_fetched_from_the_peer_copy(nodes):
    storage, layouts, record = nodes
    shard = Path(layouts[0].artifact_path(ART)) / "__1_0.distcp"
    shard.write_bytes(b"X" + shard.read_bytes()[1:])  # same size, wrong CRC32

    def resume(comm: LocalComm) -> int:
        return peer.restore(comm, _topology(comm.rank), storage, layouts[comm.rank // 2], record)

    assert _results(run_on_threads(WORLD, resume, timeout_s=20)) == [0, 1, 0, 0]
    assert shard.read_bytes() == _data("__1_0.distcp")


def test_a_file_no_node_holds_stays_missing_on_every_rank_alike(nodes):
    storage, layouts, record = nodes
    for path in (Path(layouts[0].artifact_path(ART)) / "__1_0.distcp",
                 Path(layouts[1].peer_dir(0)) / ART / "__1_0.distcp"):
        path.unlink()  # rank 1's shard and its only copy

    def resume(comm: LocalComm) -> int:
        return peer.restore(comm, _topology(comm.rank), storage, layouts[comm.rank // 2], record)

    assert _results(run_on_threads(WORLD, resume, timeout_s=20)) == [0, 0, 0, 0]
    assert not (Path(layouts[0].artifact_path(ART)) / "__1_0.distcp").exists()
