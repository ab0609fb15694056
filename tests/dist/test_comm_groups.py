"""Saves and resumes on a subgroup: two groups of a 4-rank job each save and resume their own
stage at the same time, and a checkpoint saved on the whole job resumes on each subgroup
(resharded 4 -> 2). Real ranks, FSDP2 sharded over each group's own mesh."""

from __future__ import annotations

import os

import pytest

from noether_dist import AsyncMode, Checkpointer, CheckpointerConfig, ConfigError, TrainingIteration, resume
from tests.support.ranks import run_ranks
from tests.support.models import EMA_INFO, assert_states_equal, build, build_on, full_state, train_steps

RUN = "run1"


def _subgroups():
    """Both groups, made on every rank in the same order (new_group is a collective of the job)."""
    import torch.distributed as dist

    return [dist.new_group([0, 1]), dist.new_group([2, 3])]


def _it(update: int) -> TrainingIteration:
    return TrainingIteration(0, update, update * 16)


def _comm_checks(rank: int, groups) -> dict:
    """Comm on a subgroup: ranks, coordinator (group 1 names its second rank), the three ways
    to run a function, and the errors for a coordinator outside the group and a group this
    rank is not in."""
    from noether_dist.dist.comm import Comm

    group = groups[rank // 2]
    comm = Comm(30, process_group=group, coordinator_rank=3 if rank >= 2 else None)
    out = {"rank": comm.rank, "world": comm.world_size, "coordinator": comm.is_coordinator,
           "from_coordinator": comm.broadcast_from_coordinator(lambda: rank),
           "gathered": comm.all_gather_results(lambda: rank * 10),
           "own": comm.run_everywhere(lambda: rank)}
    for bad in ({"coordinator_rank": (rank + 2) % 4}, {"process_group": groups[1 - rank // 2]}):
        try:
            Comm(30, **{"process_group": group, **bad})
            out.setdefault("errors", []).append(None)
        except ConfigError as exc:
            out.setdefault("errors", []).append(str(exc))
    return out


def subgroups_save_and_resume(rank: int, world_size: int, out: str) -> dict:
    groups = _subgroups()
    mine = rank // 2
    group = groups[mine]
    result = {"comm": _comm_checks(rank, groups)}
    model, opt, ema = build_on(group, seed=mine)
    # group 1 saves in the background: its writer thread's own gloo group spans group 1 alone
    ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id=RUN, stage_name=f"stage{mine}", model_name="mlp",
                                         timeout_s=30, async_mode=AsyncMode.THREAD if mine else AsyncMode.OFF),
                      process_group=group)
    if mine == 0:  # group 0 saves twice, group 1 once: no collective may span the groups
        train_steps(model, opt, ema, 2, rank)
        ck.save(_it(2), model=model, optimizer=opt, ema={EMA_INFO: ema}, trainer_state={"group": 0},
                rank_state={"rank": rank})
        train_steps(model, opt, ema, 1, rank, start=2)
        saved_at = _it(3)
    else:
        train_steps(model, opt, ema, 1, rank)
        saved_at = _it(1)
    ck.save(saved_at, model=model, optimizer=opt, ema={EMA_INFO: ema}, trainer_state={"group": mine},
            rank_state={"rank": rank})
    result["saved"] = full_state(model, opt, ema)
    ck.wait()
    if mine == 1:  # a failure on rank 3 alone fails this group's save on both its ranks
        try:  # group 1 saves in the background: the failure surfaces at the next wait
            ck.save(_it(2), model=model, optimizer=opt, rank_state={"bad": (lambda: 0) if rank == 3 else 0})
            ck.wait()
            result["failure"] = None
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result["failure"] = f"{type(exc).__name__}: {exc}"
    ck.close()
    fresh, fresh_opt, fresh_ema = build_on(group, seed=99)
    res = resume({"output_dir": out, "resume_run_id": RUN, "resume_stage_name": f"stage{mine}"},
                 model=fresh, optimizer=fresh_opt, ema={EMA_INFO: fresh_ema}, model_name="mlp", timeout_s=30,
                 process_group=group)
    result.update(cp=res.checkpoint, record_world=res.record.world_size, trainer=res.trainer_state,
                  rank_state=res.rank_state, state=full_state(fresh, fresh_opt, fresh_ema))
    return result


@pytest.mark.slow
def test_two_subgroups_save_and_resume_their_own_stages_at_once(tmp_path):
    results = run_ranks(subgroups_save_and_resume, 4, str(tmp_path), timeout_s=240)
    comm = [r["comm"] for r in results]
    assert [(c["rank"], c["world"], c["coordinator"]) for c in comm] == [(0, 2, True), (1, 2, False),
                                                                          (0, 2, False), (1, 2, True)]
    assert [c["from_coordinator"] for c in comm] == [0, 0, 3, 3]
    assert [c["gathered"] for c in comm] == [[0, 10], [0, 10], [20, 30], [20, 30]]
    assert [c["own"] for c in comm] == [0, 1, 2, 3]
    for rank, c in enumerate(comm):
        bad_coordinator, other_group = c["errors"]
        assert bad_coordinator and f"coordinator_rank {(rank + 2) % 4} is not a rank of the process group" in bad_coordinator
        assert other_group and f"rank {rank} is not a member of the process_group" in other_group
    # the same error on both ranks of group 1, naming the global rank that failed
    assert results[2]["failure"] == results[3]["failure"], (results[2]["failure"], results[3]["failure"])
    assert results[2]["failure"].startswith("RemoteRankError: failed on 1 rank(s): rank 3: "), results[2]["failure"]
    for mine, cp, commits in ((0, "E0_U3_S48", ["E0_U2_S32.json", "E0_U3_S48.json"]), (1, "E0_U1_S16", ["E0_U1_S16.json"])):
        ckdir = tmp_path / RUN / f"stage{mine}" / "checkpoints"
        assert sorted(os.listdir(ckdir / "_commits")) == commits
        model_dir = ckdir / f"mlp_cp={cp}_model.th"
        assert sorted(n for n in os.listdir(model_dir) if n.endswith(".distcp")) == ["__0_0.distcp", "__1_0.distcp"]
        for rank in (2 * mine, 2 * mine + 1):
            r = results[rank]
            assert (r["cp"], r["record_world"], r["trainer"], r["rank_state"]) == (cp, 2, {"group": mine}, {"rank": rank})
            assert_states_equal(r["saved"], r["state"])
    assert not results[0]["saved"]["model"]["0.weight"].equal(results[2]["saved"]["model"]["0.weight"])


def world_save_then_subgroup_resume(rank: int, world_size: int, out: str) -> dict:
    groups = _subgroups()  # made before anything else, on every rank
    model, opt, ema = build()
    train_steps(model, opt, ema, 2, rank)
    with Checkpointer(CheckpointerConfig(output_dir=out, run_id=RUN, stage_name="world", model_name="mlp",
                                         timeout_s=30)) as ck:
        ck.save(_it(2), model=model, optimizer=opt, ema={EMA_INFO: ema}, rank_state={"rank": rank})
    saved = full_state(model, opt, ema)
    group = groups[rank // 2]
    fresh, fresh_opt, fresh_ema = build_on(group, seed=99)
    res = resume({"output_dir": out, "resume_run_id": RUN, "resume_stage_name": "world"}, model=fresh,
                 optimizer=fresh_opt, ema={EMA_INFO: fresh_ema}, model_name="mlp", timeout_s=30, process_group=group)
    return {"saved": saved, "state": full_state(fresh, fresh_opt, fresh_ema), "cp": res.checkpoint,
            "record_world": res.record.world_size, "rank_state": res.rank_state}


@pytest.mark.slow
def test_a_checkpoint_of_the_whole_job_resumes_on_each_subgroup(tmp_path):
    """Saved on 4 ranks, loaded by both 2-rank groups at once (resharded 4 -> 2): exact."""
    results = run_ranks(world_save_then_subgroup_resume, 4, str(tmp_path), timeout_s=240)
    for rank, r in enumerate(results):
        assert (r["cp"], r["record_world"]) == ("E0_U2_S32", 4)
        assert r["rank_state"] == {"rank": rank % 2}  # the rank with the same rank within the group
        assert_states_equal(results[0]["saved"], r["state"])


