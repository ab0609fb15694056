"""Asynchronous saves: values of the moment of the call, failures surface on every rank."""

from __future__ import annotations

import json
import os
import time

import pytest

from noether_dist import AsyncMode, Checkpointer, CheckpointerConfig, CommitError, TrainingIteration
from noether_dist.io.storage import open_storage
from tests.support.ranks import run_ranks
from tests.support.models import EMA_INFO, assert_states_equal, build, full_state, train_steps
from tests.support.storage_faults import FaultyStorage
from tests.dist.test_resume_dist import resume_state

pytestmark = [pytest.mark.torch_compat, pytest.mark.slow]


def _slow_first_writes(delay_s: float):
    """A stream-write hook that makes the first write of every file slow, so that training
    overlaps the background write."""
    def slow(write, stream, data):
        if stream.size == 0:
            time.sleep(delay_s)
        return write(data)

    return slow


def async_save_while_training(rank: int, world_size: int, out: str) -> dict:
    model, opt, ema = build()
    storage = FaultyStorage(open_storage(out))
    ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id="run1", stage_name="train", model_name="mlp",
                                         async_mode=AsyncMode.THREAD, timeout_s=60), storage=storage)
    train_steps(model, opt, ema, 2, rank)
    storage.stream_write = _slow_first_writes(0.3)
    future = ck.save(TrainingIteration(0, 2, 32), model=model, optimizer=opt, ema={EMA_INFO: ema},
                     trainer_state={"at": 2})
    at_call = full_state(model, opt, ema)
    train_steps(model, opt, ema, 3, rank, start=2)  # the optimizer steps while the write runs
    running = not future.done()
    result = ck.wait()
    ck.close()
    return {"at_call": at_call, "overlapped": running, "committed": str(result.iteration), "stall": ck.last_stall_s}


def test_async_save_writes_the_values_of_the_moment_of_the_call(tmp_path):
    out = str(tmp_path)
    results = run_ranks(async_save_while_training, 2, out)
    assert all(r["overlapped"] for r in results), "the write finished before training went on: no overlap tested"
    assert {r["committed"] for r in results} == {"E0_U2_S32"}
    for r in run_ranks(resume_state, 2, out):
        assert r["cp"] == "E0_U2_S32"
        assert_states_equal(results[0]["at_call"], r["state"])


def async_failure(rank: int, world_size: int, out: str) -> dict:
    model, opt, ema = build()
    storage = FaultyStorage(open_storage(out))
    ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id="run1", stage_name="train", model_name="mlp",
                                         async_mode=AsyncMode.THREAD, timeout_s=30), storage=storage)
    train_steps(model, opt, ema, 1, rank)
    ck.save(TrainingIteration(0, 1, 16), model=model, optimizer=opt)
    ck.wait()
    if rank == 1:
        def broken(write, stream, data):
            raise OSError(28, "No space left on device (injected)")

        storage.stream_write = broken
    train_steps(model, opt, ema, 1, rank, start=1)
    ck.save(TrainingIteration(0, 2, 32), model=model, optimizer=opt)  # returns: the failure is in the background
    train_steps(model, opt, ema, 1, rank, start=2)
    try:
        ck.save(TrainingIteration(0, 3, 48), model=model, optimizer=opt)
    except CommitError as exc:
        return {"error": str(exc)}
    finally:
        try:
            ck.close()
        except CommitError:
            pass
    return {"error": None}


def test_background_failure_raises_on_every_rank_and_commits_nothing(tmp_path):
    results = run_ranks(async_failure, 2, str(tmp_path), timeout_s=90)
    for r in results:
        assert r["error"] and "E0_U2_S32" in r["error"] and "No space left on device (injected)" in r["error"]
    ckdir = tmp_path / "run1" / "train" / "checkpoints"
    assert os.listdir(ckdir / "_commits") == ["E0_U1_S16.json"]
    assert json.loads((ckdir / "_aliases" / "latest.json").read_text())["checkpoint"] == "E0_U1_S16"


def async_process_mode(rank: int, world_size: int, out: str) -> dict:
    import socket

    from torch.distributed.checkpoint import _async_process_executor as executor

    # The port DCP would pick for its checkpoint processes is taken before they bind it
    # (what another job's sockets do in the seconds the spawn takes): the save must not care.
    taken = socket.socket()
    taken.bind(("", 0))
    taken.listen()
    executor.get_free_port = lambda: taken.getsockname()[1]
    model, opt, ema = build()
    states = []
    for update in (1, 2):  # a checkpointer each: a second checkpoint process in this process
        ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id="run1", stage_name="train", model_name="mlp",
                                             async_mode=AsyncMode.PROCESS, timeout_s=60))
        train_steps(model, opt, ema, 1, rank, start=update)
        ck.save(TrainingIteration(0, update, 16 * update), model=model, optimizer=opt, ema={EMA_INFO: ema})
        states.append(full_state(model, opt, ema))
        train_steps(model, opt, ema, 1, rank, start=10 + update)  # changes after the call are not saved
        result = ck.wait()
        ck.close()
    taken.close()
    files = sorted(f.name for a in result.record.artifacts for f in a.files)
    return {"states": states, "files": files}


def test_async_process_mode_commits_exact_state_with_checksums(tmp_path):
    """Two checkpointers one after the other, each with its checkpoint processes, while the
    port DCP would choose for them is taken."""
    out = str(tmp_path)
    results = run_ranks(async_process_mode, 2, out, timeout_s=150)
    assert ".metadata" in results[0]["files"] and "__1_0.distcp" in results[0]["files"]
    ckdir = tmp_path / "run1" / "train" / "checkpoints"
    assert not list(ckdir.glob("*/.noether-files-*"))  # sidecars were collected
    for r in run_ranks(resume_state, 2, out):
        assert r["cp"] == "E0_U2_S32"
        assert_states_equal(results[0]["states"][1], r["state"])


def consecutive_async_saves(rank: int, world_size: int, out: str, mode: str) -> dict:
    model, opt, ema = build()
    ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id="run1", stage_name="train", model_name="mlp",
                                         async_mode=AsyncMode(mode), timeout_s=90))
    ck.prepare(model=model, optimizer=opt, ema={EMA_INFO: ema})  # before the first step
    prepared = ck._background.staging.storage_ptrs()
    # prepare initialised the optimizer to learn its shapes: training must not notice
    ref_model, ref_opt, ref_ema = build()
    train_steps(ref_model, ref_opt, ref_ema, 1, rank, start=1)
    states, buffers = [], []
    for update in (1, 2, 3, 4):
        train_steps(model, opt, ema, 1, rank, start=update)
        if update == 1:
            untouched = full_state(model, opt, ema)
        ck.save(TrainingIteration(0, update, 16 * update), model=model, optimizer=opt, ema={EMA_INFO: ema},
                trainer_state={"update": update})
        states.append(full_state(model, opt, ema))
        buffers.append(ck._background.staging.storage_ptrs())
        train_steps(model, opt, ema, 1, rank, start=10 + update)  # changes after the call are not saved
    ck.wait()
    ck.close()
    return {"states": states, "buffers": buffers, "prepared": prepared, "untouched": untouched,
            "reference": full_state(ref_model, ref_opt, ref_ema)}


def resume_each(rank: int, world_size: int, out: str, checkpoints: list[str]) -> list[dict]:
    return [resume_state(rank, world_size, out, resume_checkpoint=cp) for cp in checkpoints]


@pytest.mark.parametrize("mode", ["thread", "process"])
def test_consecutive_async_saves_reuse_staging_and_resume_exactly(tmp_path, mode):
    out = str(tmp_path)
    results = run_ranks(consecutive_async_saves, 2, out, mode, timeout_s=240)
    for r in results:
        assert_states_equal(r["reference"], r["untouched"])  # prepare left training as it was
        assert r["prepared"], "prepare allocated no staging buffers"
        # every save copied into the buffers prepare allocated (process mode stages the small
        # trainer state too, from the first save on): none reallocated, none added
        assert r["prepared"] <= r["buffers"][0], (r["prepared"], r["buffers"][0])
        assert all(ptrs == r["buffers"][0] for ptrs in r["buffers"]), r["buffers"]
    checkpoints = [f"U{u}" for u in (1, 2, 3, 4)]
    for r in run_ranks(resume_each, 2, out, checkpoints, timeout_s=240):
        for i, resumed in enumerate(r):
            assert resumed["cp"] == f"E0_U{i + 1}_S{16 * (i + 1)}"
            assert_states_equal(results[0]["states"][i], resumed["state"])


def mutate_right_after_save(rank: int, world_size: int, out: str) -> dict:
    import threading

    import torch

    model, opt, ema = build()
    storage = FaultyStorage(open_storage(out))
    ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id="run1", stage_name="train", model_name="mlp",
                                         async_mode=AsyncMode.THREAD, timeout_s=60), storage=storage)
    ck.prepare(model=model, optimizer=opt, ema={EMA_INFO: ema})
    train_steps(model, opt, ema, 1, rank)
    ck.save(TrainingIteration(0, 1, 16), model=model, optimizer=opt, ema={EMA_INFO: ema})  # fills the fast paths
    ck.wait()
    train_steps(model, opt, ema, 1, rank, start=1)
    storage.stream_write = _slow_first_writes(0.3)
    # The writer thread packs the trainer state: let it start late, so that the changes
    # below happen before it (the caller must have taken its own copy).
    from noether_dist import save as save_module

    pack = save_module.pack_object
    save_module.pack_object = lambda obj: (time.sleep(0.3), pack(obj))[1]
    trainer_state = {"history": [1, 2]}
    rank_state = {"position": torch.tensor([rank, 7])}
    future = ck.save(TrainingIteration(0, 2, 32), model=model, optimizer=opt, ema={EMA_INFO: ema},
                     trainer_state=trainer_state, rank_state=rank_state)
    at_call = full_state(model, opt, ema)
    # Right after the call returns, while the write runs: every kind of change a loop makes.
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().add_(100.0)  # in place
        for p in ema.parameters():
            p.data = torch.zeros_like(p.data)  # new storage under the same parameter
    for state in opt.state.values():
        state["exp_avg"].mul_(-1.0)
    trainer_state["history"].append(3)
    rank_state["position"].add_(1000)
    running = not future.done()
    ck.wait()
    # A rank whose state cannot be captured (an object that cannot be copied): the save call
    # returns on every rank, and the failure is raised on every rank alike at the next wait.
    bad = {"lock": threading.Lock()} if rank == 1 else {}
    ck.save(TrainingIteration(0, 3, 48), model=model, rank_state=bad)
    try:
        ck.wait()
        error = None
    except Exception as exc:  # noqa: BLE001 - the test compares the ranks' errors
        error = f"{type(exc).__name__}: {exc}"
    ck.close()
    return {"at_call": at_call, "overlapped": running, "error": error}


def resume_with_trainer_state(rank: int, world_size: int, out: str) -> dict:
    from noether_dist import resume

    model, opt, ema = build(seed=7)
    res = resume({"output_dir": out, "resume_run_id": "run1", "resume_stage_name": "train"}, model=model,
                 optimizer=opt, ema={EMA_INFO: ema}, model_name="mlp")
    return {"cp": res.checkpoint, "state": full_state(model, opt, ema), "trainer": res.trainer_state,
            "position": res.rank_state["position"].tolist()}


def test_changes_right_after_an_async_save_returns_are_not_saved_and_capture_failures_surface_everywhere(tmp_path):
    out = str(tmp_path)
    results = run_ranks(mutate_right_after_save, 2, out, timeout_s=120)
    assert all(r["overlapped"] for r in results), "the write finished before the changes: nothing tested"
    errors = [r["error"] for r in results]
    assert all(e and "lock" in e for e in errors), errors  # on both ranks, rank 1's cause
    assert errors[0] == errors[1]
    ckdir = tmp_path / "run1" / "train" / "checkpoints"
    assert sorted(os.listdir(ckdir / "_commits")) == ["E0_U1_S16.json", "E0_U2_S32.json"]
    for rank, r in enumerate(run_ranks(resume_with_trainer_state, 2, out)):
        assert r["cp"] == "E0_U2_S32"
        assert_states_equal(results[0]["at_call"], r["state"])
        assert r["trainer"] == {"history": [1, 2]}
        assert r["position"] == [rank, 7]
