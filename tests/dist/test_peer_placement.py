"""Peer copies beyond the plain case, on real ranks ("nodes" are groups of ranks, each with a
folder of its own: tests/support/nodes.py): a coordinator that is not the group's rank 0,
on subgroups whose ranks include no local rank 0; and resumes where the nodes changed
(another node order, fewer nodes) while every shard is still on a surviving disk.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from noether_dist import AsyncMode, Checkpointer, CheckpointerConfig, TrainingIteration, resume
from noether_dist.config import Replicate, TiersConfig
from tests.support.models import EMA_INFO, assert_states_equal, build, build_on, full_state, train_steps
from tests.support.nodes import CK, place, resume_points, save_points
from tests.support.ranks import run_ranks

pytestmark = pytest.mark.slow


def _groups():
    """Two subgroups, each spanning both nodes (made on every rank in the same order):
    A = ranks 0, 2 (local rank 0 on each node), B = ranks 1, 3 (local rank 1 on each node)."""
    import torch.distributed as dist

    return [dist.new_group([0, 2]), dist.new_group([1, 3])]


COORDINATOR = {0: 2, 1: 3}
"""Each group's coordinator: its second rank (on node 1), not its rank 0."""


def save_on_subgroups(rank: int, world_size: int, dirs: list) -> dict:
    node, mine = place(rank, 2), rank % 2
    group = _groups()[mine]
    model, opt, ema = build_on(group, seed=mine)
    ck = Checkpointer(CheckpointerConfig(
        output_dir=dirs[node], run_id="r", stage_name=f"g{mine}", model_name="mlp", node_local=True, timeout_s=60,
        replicate=Replicate.PEER, async_mode=AsyncMode.THREAD if mine else AsyncMode.OFF),
        process_group=group, coordinator_rank=COORDINATOR[mine])
    saved = {}
    for update in (1, 2):
        train_steps(model, opt, ema, 1, rank, start=update)
        ck.save(TrainingIteration(0, update, 16 * update), model=model, optimizer=opt, ema={EMA_INFO: ema},
                trainer_state={"group": mine, "update": update}, rank_state={"rank": rank})
        saved[update] = full_state(model, opt, ema)
    ck.close()
    return {"coordinator": ck.comm.is_coordinator, "leaders": ck.topology.leaders, "state": saved[2]}


def resume_on_subgroups(rank: int, world_size: int, dirs: list) -> dict:
    node, mine = place(rank, 2), rank % 2
    group = _groups()[mine]
    model, opt, ema = build_on(group, seed=9)
    res = resume({"output_dir": dirs[node], "resume_run_id": "r", "resume_stage_name": f"g{mine}"}, model=model,
                 optimizer=opt, ema={EMA_INFO: ema}, model_name="mlp", timeout_s=60, replicate=Replicate.PEER,
                 process_group=group, coordinator_rank=COORDINATOR[mine])
    return {"cp": res.checkpoint, "trainer": res.trainer_state, "rank_state": res.rank_state,
            "fell_back": res.fell_back_from, "state": full_state(model, opt, ema)}


def test_subgroups_with_a_coordinator_that_is_not_their_rank_0(tmp_path):
    """Two subgroups save their own stage at once (one synchronously, one in the background),
    each coordinated by its rank on node 1; group B has no rank with local rank 0. Node 1's
    folder (where both coordinators wrote the records) is deleted; both groups resume exactly."""
    dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    saved = run_ranks(save_on_subgroups, 4, dirs, timeout_s=240)
    assert [s["coordinator"] for s in saved] == [False, False, True, True]
    assert all(s["leaders"] == (0, 1) for s in saved)  # group ranks: one leader per node in each group
    for stage in ("g0", "g1"):
        ck0 = tmp_path / "node0" / "r" / stage / "checkpoints"
        ck1 = tmp_path / "node1" / "r" / stage / "checkpoints"
        # records written on node 1 by the coordinator, mirrored to node 0
        assert sorted(os.listdir(ck0 / "_commits")) == sorted(os.listdir(ck1 / "_commits")) == [
            "E0_U1_S16.json", "E0_U2_S32.json"]
        model = "mlp_cp=E0_U2_S32_model.th"
        # DCP's coordinator (group rank 0, on node 0) wrote the metadata: mirrored to node 1
        assert sorted(os.listdir(ck1 / model)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]
        assert sorted(os.listdir(ck0 / model)) == [".metadata", "__0_0.distcp"]
        # group rank 1 (on node 1) keeps its copy on node 0; group rank 0's files need none
        assert os.listdir(ck0 / "_peer" / "node1" / model) == ["__1_0.distcp"]
        assert (ck0 / "_peer" / "node1" / model / "__1_0.distcp").read_bytes() == (ck1 / model / "__1_0.distcp").read_bytes()
        assert not (ck1 / "_peer").exists()

    shutil.rmtree(tmp_path / "node1")
    for rank, r in enumerate(run_ranks(resume_on_subgroups, 4, dirs, timeout_s=240)):
        assert (r["cp"], r["fell_back"]) == ("E0_U2_S32", ()), r["cp"]
        assert r["trainer"] == {"group": rank % 2, "update": 2} and r["rank_state"] == {"rank": rank}
        assert_states_equal(saved[rank]["state"], r["state"])


def test_another_node_order_resumes_from_the_copies_on_each_disk(tmp_path):
    """2 nodes x 2 ranks; the next run gets the nodes the other way round (ranks 0, 1 on the
    disk that held ranks 2, 3): each rank finds its files among the copies its new disk
    keeps for the other node, or fetches them from the other node."""
    dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    saved = run_ranks(save_points, 4, dirs, 2, None)[0]
    for rank, r in enumerate(run_ranks(resume_points, 4, dirs[::-1], 2)):
        assert (r["cp"], r["fell_back"]) == ("E0_U2_S32", ()), r["cp"]
        assert r["trainer"] == {"update": 2} and r["rank_state"] == {"rank": rank}
        assert_states_equal(saved, r["state"])
    model = Path("mlp_cp=E0_U2_S32_model.th")
    assert sorted(os.listdir(tmp_path / "node1" / CK / model)) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "__2_0.distcp", "__3_0.distcp"]


def test_two_nodes_become_one_whose_disk_holds_every_shard(tmp_path):
    """2 nodes x 2 ranks; node 1 is lost and the 4 ranks run on node 0 alone (same world
    size): node 0's disk keeps node 1's copies, so every rank reads its files there."""
    dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    saved = run_ranks(save_points, 4, dirs, 2, 1)[0]
    shutil.rmtree(tmp_path / "node1")
    for rank, r in enumerate(run_ranks(resume_points, 4, dirs, 4)):
        assert (r["cp"], r["fell_back"]) == ("E0_U2_S32", ()), r["cp"]
        assert r["trainer"] == {"update": 2} and r["rank_state"] == {"rank": rank}
        assert_states_equal(saved, r["state"])
    assert not (tmp_path / "node1").exists()


def save_two_tiers(rank: int, world_size: int, shared: str, dirs: list, per_node: int) -> dict:
    """Local tier every update (with peer copies), durable tier (a shared folder) every 2nd."""
    node = place(rank, per_node)
    model, opt, ema = build()
    tiers = TiersConfig.from_dict({"local": {"dir": dirs[node], "every_updates": 1, "replicate": "peer"},
                                   "durable": {"every_updates": 2, "timeout_s": 60}})
    saved = {}
    with Checkpointer(CheckpointerConfig(output_dir=shared, run_id="r", stage_name="s", model_name="mlp",
                                         timeout_s=60, tiers=tiers)) as ck:
        for update in (1, 2, 3):
            train_steps(model, opt, ema, 1, rank, start=update)
            ck.save(TrainingIteration(0, update, 16 * update), model=model, optimizer=opt, ema={EMA_INFO: ema},
                    trainer_state={"update": update})
            saved[update] = full_state(model, opt, ema)
    return saved


def resume_two_tiers(rank: int, world_size: int, shared: str, dirs: list, per_node: int) -> dict:
    node = place(rank, per_node)
    model, opt, ema = build(seed=5)
    res = resume({"output_dir": shared, "resume_run_id": "r", "resume_stage_name": "s"}, model=model,
                 optimizer=opt, ema={EMA_INFO: ema}, model_name="mlp", timeout_s=60, local_dir=dirs[node],
                 replicate=Replicate.PEER)
    return {"cp": res.checkpoint, "tier": res.tier, "state": full_state(model, opt, ema)}


def test_another_world_size_on_two_nodes_resumes_from_the_local_tier(tmp_path):
    """Saved on 4 ranks (2 nodes x 2), resumed on 2 ranks (one per node, the other way round):
    with two nodes each disk keeps every file (its own, the other node's peer copies, the
    mirrored ones), which each node's leader puts into place, so the local tier's newest
    point (U3, newer than the durable tier's U2) loads, resharded, exactly."""
    shared, dirs = str(tmp_path / "shared"), [str(tmp_path / "node0"), str(tmp_path / "node1")]
    saved = run_ranks(save_two_tiers, 4, shared, dirs, 2, timeout_s=240)[0]
    for r in run_ranks(resume_two_tiers, 2, shared, dirs[::-1], 1, timeout_s=240):
        assert (r["cp"], r["tier"]) == ("E0_U3_S48", "local"), (r["cp"], r["tier"])
        assert_states_equal(saved[3], r["state"])


def test_another_world_size_needing_a_third_nodes_file_resumes_from_the_durable_tier(tmp_path):
    """Saved on 3 ranks (3 nodes), resumed on 2 ranks on nodes 0 and 1: rank 0's half of each
    tensor lies partly in rank 1's file, which node 0's disk does not keep (node 1's copies
    are on node 2); files are fetched over the network only for the same rank number, so
    the ranks agree that the local tier cannot serve the point and resume the durable
    tier's newest (U2), resharded, exactly."""
    shared, dirs = str(tmp_path / "shared"), [str(tmp_path / f"node{i}") for i in range(3)]
    saved = run_ranks(save_two_tiers, 3, shared, dirs, 1, timeout_s=240)[0]
    for r in run_ranks(resume_two_tiers, 2, shared, dirs, 1, timeout_s=240):
        assert (r["cp"], r["tier"]) == ("E0_U2_S32", "durable"), (r["cp"], r["tier"])
        assert_states_equal(saved[2], r["state"])


def topology_of(rank: int, world_size: int, local_ranks: list) -> str:
    from noether_dist.dist.comm import Comm
    from noether_dist.dist.topology import NodeTopology
    from noether_dist.errors import ConfigError

    os.environ.update(GROUP_RANK="0", LOCAL_RANK=str(local_ranks[rank]))
    try:
        topo = NodeTopology.gather(Comm(30))
    except ConfigError as exc:
        return f"ConfigError: {exc}"
    return f"leaders {topo.leaders}"


def test_one_node_with_two_ranks_of_the_same_local_rank_is_refused_on_every_rank():
    assert run_ranks(topology_of, 3, [2, 1, 5]) == ["leaders (1,)"] * 3  # the lowest local rank leads
    out = run_ranks(topology_of, 2, [0, 0])
    assert out[0] == out[1] and out[0].startswith("ConfigError: node GROUP_RANK=0 has several ranks with the same "
                                                  "local rank ([0, 0], ranks [0, 1])"), out
