"""Retention: keep last k / every N-th / alias targets, prune after commit (on S3: tests/integration/test_s3.py)."""

from __future__ import annotations

import pytest

from noether_dist import Checkpointer, CheckpointerConfig, ConfigError, TrainingIteration
from noether_dist.stage.commit import list_commits
from noether_dist.stage.retention import RetentionPolicy, prune
from tests.support.models import build, train_steps


def _run(out: str, policy: RetentionPolicy | None, updates=range(1, 9), best_at: int = 3) -> Checkpointer:
    model, opt, ema = build(sharded=False)
    ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id="r", stage_name="s", model_name="m",
                                         best_metrics={"loss": "min"}, retention=policy))
    for u in updates:
        train_steps(model, opt, ema, 1, 0, start=u)
        ck.save(TrainingIteration(0, u, 8 * u), model=model, optimizer=opt,
                metrics={"loss": 0.1 if u == best_at else 1.0 + u})
    return ck


@pytest.mark.slow
def test_keep_last_every_nth_and_alias_targets(tmp_path):
    ck = _run(str(tmp_path), RetentionPolicy(keep_last=2, keep_every=4))
    kept = [p.update for p in list_commits(ck.storage, ck.layout)]
    assert kept == [3, 4, 7, 8]  # best.loss -> U3, every 4th, the last two
    names = {p.name for p in (tmp_path / "r" / "s" / "checkpoints").iterdir()}
    assert not any("_U5_" in n or "_U1_" in n for n in names)  # files went with the records


def test_prune_removes_leftovers_and_dry_run_deletes_nothing(tmp_path):
    ck = _run(str(tmp_path), None, updates=range(1, 5))
    leftover = tmp_path / "r" / "s" / "checkpoints" / "m_cp=E0_U2_S17_model.th"
    leftover.mkdir()
    (leftover / "__0_0.distcp").write_bytes(b"half")
    plan = prune(ck.storage, ck.layout, RetentionPolicy(keep_last=1), dry_run=True)
    assert [p.update for p in plan.delete] == [1, 2] and plan.uncommitted == ("m_cp=E0_U2_S17_model.th",)
    assert len(list_commits(ck.storage, ck.layout)) == 4 and leftover.exists()
    prune(ck.storage, ck.layout, RetentionPolicy(keep_last=1))
    assert [p.update for p in list_commits(ck.storage, ck.layout)] == [3, 4] and not leftover.exists()


def test_bad_policy():
    with pytest.raises(ConfigError, match="keep_last must be an int >= 1"):
        RetentionPolicy(keep_last=0)
    with pytest.raises(ConfigError, match="unknown retention key"):
        RetentionPolicy.from_dict({"keep": 3})
