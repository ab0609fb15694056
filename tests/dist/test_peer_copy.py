"""replicate: peer on real ranks: "nodes" are groups of ranks, each with a folder of its own.

Each rank sets what torchrun sets on a node (GROUP_RANK, LOCAL_RANK) and saves to its
node's folder (``node_local``); its own files are copied to the next node's folder. Then a
node's folder is deleted (node replaced) or a file damaged, and every rank resumes.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from noether_dist import Checkpointer, CheckpointerConfig, TrainingIteration
from noether_dist.config import Replicate
from tests.support.models import EMA_INFO, assert_states_equal, build, full_state, train_steps
from tests.support.nodes import CK, crc as _crc, place as _place, resume_points, save_points
from tests.support.ranks import run_ranks

pytestmark = pytest.mark.slow

def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): _crc(p) for p in sorted(root.rglob("*")) if p.is_file()}


def test_replaced_node_resumes_from_its_peer_copy(tmp_path):
    """2 nodes x 2 ranks: node 1's folder is deleted; its ranks fetch their files back."""
    dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    saved = run_ranks(save_points, 4, dirs, 2, 1)[0]
    node0, node1 = tmp_path / "node0" / CK, tmp_path / "node1" / CK
    model = "mlp_cp=E0_U2_S32_model.th"
    # node 0 keeps node 1's ranks' files, node 1 keeps node 0's (rank 0's are mirrored anyway)
    assert sorted(os.listdir(node0 / "_peer" / "node1" / model)) == ["__2_0.distcp", "__3_0.distcp"]
    assert sorted(os.listdir(node1 / "_peer" / "node0" / model)) == ["__1_0.distcp"]
    for name in ("__2_0.distcp", "__3_0.distcp"):
        assert _crc(node0 / "_peer" / "node1" / model / name) == _crc(node1 / model / name)
    # retention (keep_last=1) pruned the peer copies of U1 with the point itself
    assert all("E0_U2_S32" in n for n in os.listdir(node0 / "_peer" / "node1"))
    assert not any("E0_U1_S16" in n for n in os.listdir(node1 / "_peer" / "node0"))
    before = _tree(node1)

    shutil.rmtree(tmp_path / "node1")  # node 1 replaced: an empty disk
    results = run_ranks(resume_points, 4, dirs, 2)
    for rank, r in enumerate(results):
        assert r["cp"] == "E0_U2_S32" and not r["fell_back"], r["cp"]
        assert r["trainer"] == {"update": 2} and r["rank_state"] == {"rank": rank}
        assert_states_equal(saved, r["state"])
    after = _tree(node1)
    # the replaced node holds its own files, the mirrored ones and the records again
    restored = {k: v for k, v in before.items() if not k.startswith("_peer") and "U2" in k}
    assert restored and {k: after.get(k) for k in restored} == restored


def test_three_nodes_damage_lost_coordinator_and_a_node_with_its_peer(tmp_path):
    dirs = [str(tmp_path / f"node{i}") for i in range(3)]
    saved = run_ranks(save_points, 3, dirs, 1, None)[0]
    nodes = [tmp_path / f"node{i}" / CK for i in range(3)]
    shard = nodes[1] / "mlp_cp=E0_U2_S32_optim.th" / "__1_0.distcp"
    good = shard.read_bytes()

    # 1. a damaged shard on node 1: fetched again from node 2's copy
    shard.write_bytes(good[:-8] + bytes(8))
    for r in run_ranks(resume_points, 3, dirs, 1):
        assert r["cp"] == "E0_U2_S32" and not r["fell_back"]
        assert_states_equal(saved, r["state"])
    assert shard.read_bytes() == good

    # 2. the coordinator's node replaced: records from the others, its files from the mirrors
    shutil.rmtree(tmp_path / "node0")
    for r in run_ranks(resume_points, 3, dirs, 1):
        assert r["cp"] == "E0_U2_S32" and not r["fell_back"]
        assert_states_equal(saved, r["state"])
    assert sorted(os.listdir(nodes[0] / "_commits")) == ["E0_U1_S16.json", "E0_U2_S32.json"]
    assert (nodes[0] / "_aliases" / "latest.json").exists()

    # 3. node 1 and its peer (node 2) both lost: rank 1's files are on no disk; every point
    #    is unreadable from the local tier and every rank raises the same error
    shutil.rmtree(tmp_path / "node1")
    shutil.rmtree(tmp_path / "node2")
    results = run_ranks(resume_points, 3, dirs, 1, raise_on_error=False)
    assert all(r[0] == "error" and r[1] == "CheckpointNotFoundError" for r in results), results
    assert len({r[2] for r in results}) == 1 and "tried E0_U2_S32, E0_U1_S16" in results[0][2], results[0]


def save_with_blocked_peer(rank: int, world_size: int, dirs: list) -> str:
    _place(rank, 1)
    model, opt, ema = build()
    ck = Checkpointer(CheckpointerConfig(output_dir=dirs[rank], run_id="r", stage_name="s", model_name="mlp",
                                         node_local=True, replicate=Replicate.PEER))
    try:
        ck.save(TrainingIteration(0, 1, 16), model=model, optimizer=opt)
    except Exception as exc:  # noqa: BLE001 - the test compares the error on every rank
        return f"{type(exc).__name__}: {exc}"
    return "saved"


def test_a_failed_peer_copy_commits_nothing(tmp_path):
    dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    (tmp_path / "node0" / CK).mkdir(parents=True)
    (tmp_path / "node0" / CK / "_peer").write_text("not a folder")  # node 0 cannot keep node 1's copy
    results = run_ranks(save_with_blocked_peer, 2, dirs)
    assert all(r.startswith("CommitError") and "peer copy failed on rank 0" in r for r in results), results
    assert not any((tmp_path / f"node{i}" / CK / "_commits").exists() and
                   os.listdir(tmp_path / f"node{i}" / CK / "_commits") for i in (0, 1))


# ------------------------------------------------------------------- asynchronous saves

def save_async(rank: int, world_size: int, dirs: list, per_node: int, mode: str, block: bool) -> dict:
    """Two asynchronous saves with peer copies; the state trained on after each save (the
    saves must hold the state of their moment). ``block``: node 0's ``_peer`` is a file, so
    node 0 cannot keep node 1's copies and the first save fails in the background."""
    from noether_dist.config import AsyncMode

    node = _place(rank, per_node)
    model, opt, ema = build()
    ck = Checkpointer(CheckpointerConfig(
        output_dir=dirs[node], run_id="r", stage_name="s", model_name="mlp", node_local=True, timeout_s=60,
        replicate=Replicate.PEER, async_mode=AsyncMode(mode)))
    out: dict = {}
    try:
        for update in (1, 2):
            train_steps(model, opt, ema, 1, rank, start=update)
            ck.save(TrainingIteration(0, update, 16 * update), model=model, optimizer=opt, ema={EMA_INFO: ema},
                    trainer_state={"update": update}, rank_state={"rank": rank})
            out[update] = full_state(model, opt, ema)
            train_steps(model, opt, ema, 1, rank, start=10 + update)  # after the capture: never saved
        ck.wait()
    except Exception as exc:  # noqa: BLE001 - the test compares the error on every rank
        out["error"] = f"{type(exc).__name__}: {exc}"
    try:
        ck.close()
    except Exception as exc:  # noqa: BLE001
        out.setdefault("error", f"{type(exc).__name__}: {exc}")
    return out


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_async_saves_keep_peer_copies_and_a_replaced_node_resumes(tmp_path, mode):
    """2 nodes x 2 ranks, asynchronous saves: every committed point has its peer copies,
    complete and equal to the originals; node 1's folder deleted, every rank resumes the
    newest point exactly."""
    dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    saved = run_ranks(save_async, 4, dirs, 2, mode, False, timeout_s=240)
    assert all("error" not in s for s in saved), [s.get("error") for s in saved]
    node0, node1 = tmp_path / "node0" / CK, tmp_path / "node1" / CK
    for point in ("E0_U1_S16", "E0_U2_S32"):
        assert (node0 / "_commits" / f"{point}.json").exists() and (node1 / "_commits" / f"{point}.json").exists()
        for art in ("model", "optim"):
            name = f"mlp_cp={point}_{art}.th"
            copies = {p.name: _crc(p) for p in (node0 / "_peer" / "node1" / name).iterdir()}
            assert copies == {n: _crc(node1 / name / n) for n in ("__2_0.distcp", "__3_0.distcp")}
            assert {p.name: _crc(p) for p in (node1 / "_peer" / "node0" / name).iterdir()} == {
                "__1_0.distcp": _crc(node0 / name / "__1_0.distcp")}
    assert not list(tmp_path.rglob(".peer-tmp-*"))

    shutil.rmtree(tmp_path / "node1")
    for rank, r in enumerate(run_ranks(resume_points, 4, dirs, 2)):
        assert r["cp"] == "E0_U2_S32" and not r["fell_back"], r["cp"]
        assert r["trainer"] == {"update": 2} and r["rank_state"] == {"rank": rank}
        assert_states_equal(saved[rank][2], r["state"])


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_a_failed_peer_copy_of_an_async_save_is_raised_on_every_rank(tmp_path, mode):
    dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    (tmp_path / "node0" / CK).mkdir(parents=True)
    (tmp_path / "node0" / CK / "_peer").write_text("not a folder")  # node 0 cannot keep node 1's copies
    results = run_ranks(save_async, 2, dirs, 1, mode, True, timeout_s=240)
    errors = [r.get("error") for r in results]
    assert all(e and e.startswith("CommitError") and "peer copy failed on rank 0" in e for e in errors), errors
    assert 2 not in results[0] and 2 not in results[1]  # raised at the next save, which did not run
    for i in (0, 1):
        commits = tmp_path / f"node{i}" / CK / "_commits"
        assert not commits.exists() or not os.listdir(commits)
