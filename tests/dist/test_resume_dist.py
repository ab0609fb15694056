"""Multi-process resume: killed saves, ranks that see different files, bad input on every rank."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch

from noether_dist import Checkpointer, CheckpointerConfig, CommitError, TrainingIteration, resume
from noether_dist.errors import NoetherDistError
from noether_dist.io.storage import open_storage
from tests.support.ranks import run_ranks
from tests.support.models import EMA_INFO, assert_states_equal, build, full_state, train_steps
from tests.support.storage_faults import FaultyStorage

pytestmark = [pytest.mark.torch_compat, pytest.mark.slow]

RUN = "run1"
STAGE = "train"


def _checkpointer(out: str, storage=None, **kw) -> Checkpointer:
    return Checkpointer(CheckpointerConfig(output_dir=out, run_id=RUN, stage_name=kw.pop("stage", STAGE),
                                           model_name="mlp", **kw), storage=storage)


def _it(update: int, world_size: int) -> TrainingIteration:
    return TrainingIteration(0, update, update * 8 * world_size)


def save_then_die(rank: int, world_size: int, out: str, victim: int) -> dict:
    """Save at U1 (commits), train on, save at U2 while ``victim`` SIGKILLs itself mid-write."""
    model, opt, ema = build()
    storage = FaultyStorage(open_storage(out))
    ck = _checkpointer(out, timeout_s=8.0, storage=storage)
    train_steps(model, opt, ema, 1, rank)
    ck.save(_it(1, world_size), model=model, optimizer=opt, ema={EMA_INFO: ema})
    saved = full_state(model, opt, ema)
    train_steps(model, opt, ema, 1, rank, start=1)
    if rank == victim:
        def die_mid_write(write, stream, data):
            write(data)
            os.kill(os.getpid(), signal.SIGKILL)

        storage.stream_write = die_mid_write
    try:
        ck.save(_it(2, world_size), model=model, optimizer=opt, ema={EMA_INFO: ema})
    except CommitError as exc:
        return {"saved": saved, "error": str(exc)}
    return {"saved": saved, "error": None}


def resume_state(rank: int, world_size: int, out, **cfg) -> dict:
    model, opt, ema = build(seed=7)
    root = {"output_dir": out[rank] if isinstance(out, list) else out, "resume_run_id": RUN,
            "resume_stage_name": STAGE, **cfg}
    res = resume(root, model=model, optimizer=opt, ema={EMA_INFO: ema}, model_name="mlp")
    return {"cp": res.checkpoint, "skipped": res.fell_back_from, "state": full_state(model, opt, ema)}


def test_save_killed_before_commit_is_never_selected(tmp_path):
    out = str(tmp_path)
    results = run_ranks(save_then_die, 2, out, 1, expect_dead={1}, timeout_s=90)
    assert results[1] is None  # the victim died
    assert results[0]["error"] and "nothing was committed" in results[0]["error"]
    ckdir = tmp_path / RUN / STAGE / "checkpoints"
    assert os.listdir(ckdir / "_commits") == ["E0_U1_S16.json"]
    assert json.loads((ckdir / "_aliases" / "latest.json").read_text())["checkpoint"] == "E0_U1_S16"
    assert any("E0_U2_S32" in name for name in os.listdir(ckdir))  # the dead save left files behind
    resumed = run_ranks(resume_state, 2, out)
    for r in resumed:
        assert r["cp"] == "E0_U1_S16"
        assert_states_equal(results[0]["saved"], r["state"])


def save_two(rank: int, world_size: int, out: str) -> list:
    model, opt, ema = build()
    ck = _checkpointer(out)
    states = []
    for update in (1, 2):
        train_steps(model, opt, ema, 1, rank, start=update)
        ck.save(_it(update, world_size), model=model, optimizer=opt, ema={EMA_INFO: ema})
        states.append(full_state(model, opt, ema))
    return states


def resume_expect_error(rank: int, world_size: int, out, checkpoint: str):
    try:
        resume_state(rank, world_size, out, resume_checkpoint=checkpoint)
    except NoetherDistError as exc:
        return type(exc).__name__, str(exc)
    return None


def test_ranks_that_see_different_files_fall_back_together(tmp_path):
    shared = tmp_path / "shared"
    states = run_ranks(save_two, 2, str(shared))[0]
    per_rank = [tmp_path / "node0", tmp_path / "node1"]
    for d in per_rank:
        shutil.copytree(shared, d)
    # node 1's disk lacks the newest checkpoint's model shards (its metadata is there)
    for shard_file in (per_rank[1] / RUN / STAGE / "checkpoints" / "mlp_cp=E0_U2_S32_model.th").glob("__*.distcp"):
        shard_file.unlink()
    outs = [str(d) for d in per_rank]
    results = run_ranks(resume_state, 2, outs)
    for r in results:
        assert r["cp"] == "E0_U1_S16" and r["skipped"] == ("E0_U2_S32",)
        assert_states_equal(states[0], r["state"])
    # asked for by name, the newest is not replaced by an older one: every rank raises the same error
    errors = run_ranks(resume_expect_error, 2, outs, "U2")
    assert errors[0] == errors[1] and errors[0][0] == "CheckpointNotFoundError"
    assert "rank 1" in errors[0][1] and "is missing" in errors[0][1]


def bad_inputs(rank: int, world_size: int, out: str) -> list:
    """Each bad resume in turn; returns (type, message) per case. Ends with a good resume."""
    outcomes = []

    def attempt(fn):
        try:
            fn()
            outcomes.append(None)
        except NoetherDistError as exc:
            outcomes.append((type(exc).__name__, str(exc)))

    base = {"output_dir": out, "resume_run_id": RUN, "resume_stage_name": STAGE}
    model, opt, ema = build(seed=3)
    kw = dict(model=model, optimizer=opt, ema={EMA_INFO: ema}, model_name="mlp")
    attempt(lambda: resume({**base, "resume_checkpoint": "E0_U1_S16"}, **kw))
    attempt(lambda: resume({**base, "resume_checkpoint": "E0"}, **kw))
    attempt(lambda: resume({**base, "resume_checkpoint": "U999"}, **kw))
    attempt(lambda: resume({**base, "resume_stage_name": "nostage"}, **kw))
    attempt(lambda: resume({**base, "resume_run_id": "norun"}, **kw))
    attempt(lambda: resume({**base, "resume_stage_name": "../escape"}, **kw))
    attempt(lambda: resume({**base, "resume_checkpoint": "best.accuracy"}, **kw))
    other = torch.nn.Sequential(torch.nn.Linear(16, 30), torch.nn.ReLU(), torch.nn.Linear(30, 4))
    attempt(lambda: resume(base, model=other, model_name="mlp"))
    attempt(lambda: resume(base, model=model, ema={"ema_factor=0.5": ema}, model_name="mlp"))
    attempt(lambda: resume({**base, "resume_stage_name": "noopt"}, model=model, optimizer=opt, model_name="mlp"))
    res = resume({**base, "resume_checkpoint": "U1"}, **kw)
    outcomes.append(res.checkpoint)
    return outcomes


def save_without_optimizer(rank: int, world_size: int, out: str) -> None:
    model, _, _ = build()
    _checkpointer(out, stage="noopt").save(_it(1, world_size), model=model)


def test_bad_inputs_raise_the_same_clear_error_on_every_rank(tmp_path):
    out = str(tmp_path)
    run_ranks(save_two, 2, out)
    run_ranks(save_without_optimizer, 2, out)
    per_rank = run_ranks(bad_inputs, 2, out, timeout_s=120)
    assert per_rank[0] == per_rank[1]
    got = per_rank[0]
    expected = [
        ("ConfigError", "use one of its parts instead: E0, U1 or S16"),
        ("AmbiguousCheckpointError", "E0 matches 2 committed checkpoints: E0_U1_S16, E0_U2_S32"),
        ("CheckpointNotFoundError", "no committed checkpoint matches U999 in"),
        ("CheckpointNotFoundError", "stage 'nostage' does not exist in run 'run1'; stages: ['noopt', 'train']"),
        ("CheckpointNotFoundError", "run 'norun' does not exist under"),
        ("InvalidNameError", "contains a path separator"),
        ("CheckpointNotFoundError", "alias best.accuracy does not exist"),
        ("StateMismatchError", "missing in checkpoint: none; unexpected in checkpoint: 4.bias, 4.weight; "
         "shape mismatch: 2.bias (checkpoint [7], model [4]), 2.weight (checkpoint [7, 30], model [4, 30])"),
        ("CheckpointNotFoundError", "no model file with model_info 'ema_factor=0.5'; it has: ['ema_factor=0.9']"),
        ("CheckpointNotFoundError", "has no optimizer file, but full resumption needs one"),
    ]
    for (want_type, want_text), outcome in zip(expected, got):
        assert outcome is not None, want_type
        assert outcome[0] == want_type, (outcome, want_type)
        assert want_text in outcome[1], (outcome[1], want_text)
    assert got[-1] == "E0_U1_S16"
    # nothing was harmed: both checkpoints still committed, latest unchanged
    ckdir = tmp_path / RUN / STAGE / "checkpoints"
    assert sorted(os.listdir(ckdir / "_commits")) == ["E0_U1_S16.json", "E0_U2_S32.json"]
    assert json.loads((ckdir / "_aliases" / "latest.json").read_text())["checkpoint"] == "E0_U2_S32"
