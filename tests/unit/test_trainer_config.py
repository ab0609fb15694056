"""The reference trainer's config: unknown keys suggest the closest, overrides parse (the
trainer end to end: tests/integration/test_train.py)."""

from __future__ import annotations

import pytest

from noether_dist.errors import ConfigError
from noether_dist.trainer.config import TrainConfig, parse_overrides


def test_unknown_config_keys_suggest_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'resume_checkpoint'"):
        TrainConfig.from_dict({"resume_checkpint": "latest"})
    with pytest.raises(ConfigError, match="did you mean 'checkpoint_every'"):
        TrainConfig.from_dict({"trainer": {"checkpoint_evry": 3}})
    assert parse_overrides({"trainer": {"epochs": 1}}, ["trainer.epochs=3", "run_id=x"]) == {
        "trainer": {"epochs": 3}, "run_id": "x"}
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides({}, ["trainer.epochs"])
