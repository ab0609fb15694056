"""Store faults between s3fs and a real S3 server (``tests/support/fault_proxy.py`` in front of moto).

Transient faults (503 SlowDown, 500, TCP resets, short stalls) at a set rate are retried and
the save commits; resume through the same faults loads it exactly. A permanent fault (403 on
PUT) fails the save on every rank within the timeout, commits nothing and keeps the previous
checkpoint as ``latest``. All ranks are real processes; s3fs talks HTTP to the proxy.
"""

from __future__ import annotations

import json
import time

import pytest

from noether_dist import Checkpointer, CheckpointerConfig, TrainingIteration, resume
from noether_dist.errors import NoetherDistError
from noether_dist.format.layout import StageLayout
from noether_dist.io.storage import open_storage
from noether_dist.stage.verify import verify_stage
from tests.support.ranks import run_ranks
from tests.support.fault_proxy import FaultProxy
from tests.support.models import EMA_INFO, assert_states_equal, build, full_state, train_steps

pytestmark = pytest.mark.slow

RUN, STAGE, MODEL = "run1", "train", "mlp"
TIMEOUT_S = 20.0


@pytest.fixture
def proxy(s3_server):
    """A fault proxy in front of the session's S3 server; faults off until set."""
    with FaultProxy(s3_server.endpoint_url, seed=1234) as p:
        yield p


@pytest.fixture
def proxy_env(s3_env, proxy):
    """The AWS environment for child processes, pointing s3fs at the proxy."""
    return {**s3_env, "AWS_ENDPOINT_URL_S3": proxy.endpoint_url, "AWS_ENDPOINT_URL": proxy.endpoint_url}


def _it(update: int) -> TrainingIteration:
    return TrainingIteration(0, update, 16 * update)


def _checkpointer(out: str) -> Checkpointer:
    return Checkpointer(CheckpointerConfig(output_dir=out, run_id=RUN, stage_name=STAGE, model_name=MODEL,
                                           timeout_s=TIMEOUT_S, best_metrics={"loss": "min"}))


def save_points(rank: int, world_size: int, out: str, updates: list[int]) -> dict:
    """Save each point; return the state at each point and how the saves went."""
    model, opt, ema = build()
    ck = _checkpointer(out)
    states, outcomes = {}, {}
    for update in updates:
        train_steps(model, opt, ema, 1, rank, start=update)
        states[str(_it(update))] = full_state(model, opt, ema)
        started = time.perf_counter()
        try:
            ck.save(_it(update), model=model, optimizer=opt, ema={EMA_INFO: ema}, trainer_state={"u": update},
                    rank_state={"rank": rank}, metrics={"loss": 1.0 / update})
            outcomes[update] = ("ok", "", time.perf_counter() - started)
        except NoetherDistError as exc:
            outcomes[update] = (type(exc).__name__, str(exc), time.perf_counter() - started)
    return {"states": states, "outcomes": outcomes}


def resume_latest(rank: int) -> dict:
    model, opt, ema = build(seed=5)
    res = resume({"output_dir": _OUT[0], "resume_run_id": RUN, "resume_stage_name": STAGE}, model=model,
                 optimizer=opt, ema={EMA_INFO: ema}, model_name=MODEL, timeout_s=TIMEOUT_S)
    return {"cp": res.checkpoint, "state": full_state(model, opt, ema), "trainer": res.trainer_state,
            "rank_state": res.rank_state}


_OUT: list[str] = []


def save_then_resume(rank: int, world_size: int, out: str, updates: list[int]) -> dict:
    """Save each point (failures recorded), then resume ``latest`` into a fresh model, in the
    same processes (the ranks stay healthy: a failed save raises on every rank alike)."""
    _OUT[:] = [out]
    saved = save_points(rank, world_size, out, updates)
    saved["resumed"] = resume_latest(rank)
    return saved


def _faults(proxy: FaultProxy) -> str:
    stats = proxy.stats
    return f"{stats['faults']} faults in {stats['requests']} requests {dict(sorted(stats['by_kind'].items()))}"


def test_transient_faults_are_retried_and_the_save_commits(s3_bucket, proxy, proxy_env, report):
    out = f"s3://{s3_bucket}/exp"
    proxy.set_faults(rate=0.12, kinds=("slowdown", "error500", "reset", "stall"), stall_seconds=0.3, seed=7)
    results = run_ranks(save_then_resume, 2, out, [1, 2], env=proxy_env, timeout_s=150)
    stats = proxy.stats
    for rank, r in enumerate(results):
        assert all(o[0] == "ok" for o in r["outcomes"].values()), r["outcomes"]
        got = r["resumed"]
        assert got["cp"] == "E0_U2_S32" and got["trainer"] == {"u": 2} and got["rank_state"] == {"rank": rank}
        assert_states_equal(results[0]["states"]["E0_U2_S32"], got["state"])
    assert stats["faults"] >= 10 and len(stats["by_kind"]) >= 3, stats
    proxy.clear_faults()
    verdict = verify_stage(open_storage(out), StageLayout(out, RUN, STAGE))
    assert verdict.ok and len(verdict.checkpoints) == 2, [str(d) for d in verdict.damages]
    report(f"\n[storage] 2 saves + resume on 2 ranks through {_faults(proxy)}: committed, resumed "
                          "exactly, verify clean")


@pytest.mark.parametrize("scope,target", [("every PUT of the save", "E0_U2_S32"),
                                          ("rank 1's model shard", "E0_U2_S32_model.th/__1_")],
                         ids=["all-puts", "rank1-shard"])
def test_permanent_403_on_put_fails_every_rank_and_keeps_latest(s3_bucket, proxy, proxy_env, scope, target,
                                                                report):
    out = f"s3://{s3_bucket}/exp"
    # U1 saves normally; every PUT under U2's names (or only rank 1's model shard) is refused
    proxy.set_faults(kinds=("forbidden",), methods=("PUT",), path_contains=target, permanent=True)
    results = run_ranks(save_then_resume, 2, out, [1, 2], env=proxy_env, timeout_s=120)
    assert proxy.stats["by_kind"].get("forbidden", 0) >= 1
    messages = []
    for rank, r in enumerate(results):
        assert r["outcomes"][1][0] == "ok", r["outcomes"][1]
        kind, message, elapsed = r["outcomes"][2]
        assert kind == "CommitError" and "saving E0_U2_S32 failed, nothing was committed" in message, (kind, message)
        assert "PermissionError: Access Denied" in message, message
        assert elapsed < TIMEOUT_S, elapsed
        messages.append(message)
        assert r["resumed"]["cp"] == "E0_U1_S16" and r["resumed"]["trainer"] == {"u": 1}
        assert_states_equal(results[0]["states"]["E0_U1_S16"], r["resumed"]["state"])
    assert messages[0] == messages[1]  # the same error on every rank
    proxy.clear_faults()
    st = open_storage(out)
    layout = StageLayout(out, RUN, STAGE)
    assert [e.name for e in st.list(layout.commits_dir)] == ["E0_U1_S16.json"]
    assert json.loads(st.read(layout.alias_path("latest")))["checkpoint"] == "E0_U1_S16"
    assert json.loads(st.read(layout.alias_path("best.loss")))["checkpoint"] == "E0_U1_S16"
    report(f"[storage] permanent 403 on {scope}: CommitError on both ranks after "
                          f"{max(r['outcomes'][2][2] for r in results):.1f}s, nothing committed, latest kept, "
                          "resume exact")
