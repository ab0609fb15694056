"""node_local: every node writes to its own disk; each node resumes from its own disk."""

from __future__ import annotations

import os

import pytest

from noether_dist import Checkpointer, CheckpointerConfig, TrainingIteration, resume
from tests.support.ranks import run_ranks
from tests.support.models import EMA_INFO, assert_states_equal, build, full_state, train_steps

pytestmark = pytest.mark.slow


def save_on_own_disk(rank: int, world_size: int, dirs: list) -> dict:
    os.environ.update(LOCAL_RANK="0", GROUP_RANK=str(rank))  # every rank is alone on its "node"
    model, opt, ema = build()
    ck = Checkpointer(CheckpointerConfig(output_dir=dirs[rank], run_id="r", stage_name="s", model_name="mlp",
                                         node_local=True))
    for update in (1, 2):
        train_steps(model, opt, ema, 1, rank, start=update)
        ck.save(TrainingIteration(0, update, 16 * update), model=model, optimizer=opt, ema={EMA_INFO: ema},
                trainer_state={"update": update}, rank_state={"rank": rank})
    return full_state(model, opt, ema)


def resume_from_own_disk(rank: int, world_size: int, dirs: list) -> dict:
    os.environ["LOCAL_RANK"] = "0"
    model, opt, ema = build(seed=5)
    res = resume({"output_dir": dirs[rank], "resume_run_id": "r", "resume_stage_name": "s"}, model=model,
                 optimizer=opt, ema={EMA_INFO: ema}, model_name="mlp")
    return {"cp": res.checkpoint, "state": full_state(model, opt, ema), "trainer": res.trainer_state,
            "rank_state": res.rank_state}


def test_each_node_resumes_from_its_own_disk(tmp_path):
    dirs = [str(tmp_path / "node0"), str(tmp_path / "node1")]
    saved = run_ranks(save_on_own_disk, 2, dirs)[0]
    ck1 = tmp_path / "node1" / "r" / "s" / "checkpoints"
    ck0 = tmp_path / "node0" / "r" / "s" / "checkpoints"
    assert sorted(os.listdir(ck1 / "_commits")) == ["E0_U1_S16.json", "E0_U2_S32.json"]
    assert (ck1 / "_aliases" / "latest.json").read_bytes() == (ck0 / "_aliases" / "latest.json").read_bytes()
    model_dir = "mlp_cp=E0_U2_S32_model.th"
    assert sorted(os.listdir(ck1 / model_dir)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # rank 0's mirrored
    assert sorted(os.listdir(ck0 / model_dir)) == [".metadata", "__0_0.distcp"]  # rank 1's shard stays on node 1
    assert not (ck0 / "mlp_cp=E0_U2_S32_trainer.th" / "__1_0.distcp").exists()  # rank 1's own state
    for rank, r in enumerate(run_ranks(resume_from_own_disk, 2, dirs)):
        assert r["cp"] == "E0_U2_S32" and r["trainer"] == {"update": 2} and r["rank_state"] == {"rank": rank}
        assert_states_equal(saved, r["state"])
