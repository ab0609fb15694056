"""Aliases moved on request: the caller (e.g. Noether's BestCheckpointCallback) has decided."""

from __future__ import annotations

import pytest
import torch

from noether_dist import Checkpointer, CheckpointerConfig, ConfigError, InvalidNameError, TrainingIteration
from noether_dist.stage.commit import read_alias
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
