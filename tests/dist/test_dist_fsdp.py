"""Multi-process FSDP2 save on 4 ranks, resume on 2 and 3 ranks: exact state."""

from __future__ import annotations

import os

import pytest

from noether_dist import Checkpointer, CheckpointerConfig, TrainingIteration, resume
from tests.support.ranks import run_ranks
from tests.support.models import EMA_INFO, assert_states_equal, build, full_state, train_steps

pytestmark = [pytest.mark.torch_compat, pytest.mark.slow]


def save_job(rank: int, world_size: int, out: str, steps: int) -> dict:
    model, opt, ema = build()
    train_steps(model, opt, ema, steps, rank)
    ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id="run1", stage_name="train", model_name="mlp"))
    it = TrainingIteration(0, steps, steps * 8 * world_size)
    ck.save(it, model=model, optimizer=opt, ema={EMA_INFO: ema}, trainer_state={"progress": steps},
            rank_state={"rank": rank})
    return full_state(model, opt, ema)


def resume_job(rank: int, world_size: int, out: str) -> dict:
    model, opt, ema = build(seed=123)  # different init: everything must come from the checkpoint
    res = resume({"output_dir": out, "resume_run_id": "run1", "resume_stage_name": "train"},
                 model=model, optimizer=opt, ema={EMA_INFO: ema}, model_name="mlp")
    state = full_state(model, opt, ema)
    state["meta"] = {"cp": res.checkpoint, "trainer": res.trainer_state, "rank_state": res.rank_state,
                     "stage": res.stage_name}
    # the resumed optimizer keeps training without error
    train_steps(model, opt, ema, 1, rank, start=100)
    return state


def test_fsdp_save_on_4_resume_on_2_and_3(tmp_path):
    out = str(tmp_path)
    saved = run_ranks(save_job, 4, out, 3)[0]
    layout = sorted(os.listdir(tmp_path / "run1" / "train" / "checkpoints"))
    assert layout == sorted(["_aliases", "_commits", f"mlp_{EMA_INFO}_cp=E0_U3_S96_model.th",
                             "mlp_cp=E0_U3_S96_model.th", "mlp_cp=E0_U3_S96_optim.th", "mlp_cp=E0_U3_S96_trainer.th"])
    for world_size in (2, 3):
        results = run_ranks(resume_job, world_size, out)
        for rank, state in enumerate(results):
            meta = state.pop("meta")
            assert meta["cp"] == "E0_U3_S96"
            assert meta["trainer"] == {"progress": 3}
            assert meta["rank_state"] == {"rank": rank}
            assert meta["stage"] == "train"
            assert_states_equal(saved, state)
