"""Aliases moved on request: the caller (e.g. Noether's BestCheckpointCallback) has decided."""

from __future__ import annotations

import pytest
import torch

from noether_dist import (AliasUpdateError, Checkpointer, CheckpointerConfig, CommitError, ConfigError,
                          InvalidNameError, NoetherDistError, StorageError, TrainingIteration, resume)
from noether_dist.stage.commit import read_alias, read_commit
from noether_dist.format.layout import StageLayout
from noether_dist.io.storage import open_storage


def test_named_aliases_move_exactly_when_asked_even_at_a_committed_point(tmp_path):
    model = torch.nn.Linear(3, 2)
    ckpt = Checkpointer(CheckpointerConfig(output_dir=str(tmp_path), run_id="r", stage_name="s",
                                           best_metrics={"loss": "min"}))
    storage, layout = open_storage(str(tmp_path)), StageLayout(str(tmp_path), "r", "s")

    def alias(name: str) -> str | None:
        rec = read_alias(storage, layout, name)
        return None if rec is None else str(rec.iteration)

    first = ckpt.save(TrainingIteration(0, 1, 4), model=model, metrics={"loss": 1.0},
                      aliases=("best_model.acc",))
    assert sorted(first.aliases) == ["best.acc", "best.loss", "latest"]
    # A worse loss: best.loss stays (our rule); best.acc moves because it was asked for.
    second = ckpt.save(TrainingIteration(0, 2, 8), model=model, metrics={"loss": 2.0}, aliases=("best.acc", "last"))
    assert sorted(second.aliases) == ["best.acc", "last", "latest"]
    assert (alias("best.loss"), alias("best.acc"), alias("last")) == ("E0_U1_S4", "E0_U2_S8", "E0_U2_S8")
    again = ckpt.save(TrainingIteration(0, 1, 4), model=model, aliases=("best.acc.tolerance=2",))
    assert again.reused_existing and "best.acc.tolerance=2" in again.aliases
    assert alias("best.acc.tolerance=2") == "E0_U1_S4" and alias("latest") == "E0_U2_S8"
    for bad in ("latest", "E0_U1_S4", "best.a/b"):
        with pytest.raises((ConfigError, InvalidNameError)):
            ckpt.save(TrainingIteration(0, 3, 12), model=model, aliases=(bad,))
    assert alias("latest") == "E0_U2_S8"


class _BestAliasFails:
    """A store whose writes of ``best.*`` aliases fail permanently; everything else passes."""

    def __init__(self, inner) -> None:
        self._inner = inner

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def replace(self, path: str, data: bytes) -> None:
        if "/_aliases/best." in path:
            raise StorageError(f"writing {path} failed: permission denied (injected)")
        self._inner.replace(path, data)


def test_an_alias_failure_after_the_commit_is_not_a_commit_error(tmp_path):
    """The record is written before `best.<metric>` moves: a failure there raises
    AliasUpdateError, which says the checkpoint committed (not CommitError's 'nothing was
    committed'), and resume selects that checkpoint."""
    model = torch.nn.Linear(3, 2)
    storage, layout = open_storage(str(tmp_path)), StageLayout(str(tmp_path), "r", "s")
    ckpt = Checkpointer(CheckpointerConfig(output_dir=str(tmp_path), run_id="r", stage_name="s",
                                           best_metrics={"loss": "min"}), storage=_BestAliasFails(storage))
    with pytest.raises(AliasUpdateError, match="E0_U1_S4 is committed") as info:
        ckpt.save(TrainingIteration(0, 1, 4), model=model, metrics={"loss": 1.0})
    assert not isinstance(info.value, CommitError) and isinstance(info.value, NoetherDistError)
    assert read_commit(storage, layout, TrainingIteration(0, 1, 4)) is not None
    assert str(read_alias(storage, layout, "latest").iteration) == "E0_U1_S4"
    assert read_alias(storage, layout, "best.loss") is None
    with torch.no_grad():
        model.weight.zero_()
    result = resume({"output_dir": str(tmp_path), "resume_run_id": "r", "resume_stage_name": "s",
                     "stage_name": "s2"}, model=model)
    assert str(result.iteration) == "E0_U1_S4" and model.weight.abs().sum() > 0
