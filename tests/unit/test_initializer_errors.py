"""PreviousRunInitializer's errors, each one clear line, on a checkpoint saved in this process
(loading into another sharding from YAML, on real ranks: tests/dist/test_initializers_consolidated.py)."""

from __future__ import annotations

import pytest
from torch import nn

from noether_dist import Checkpointer, CheckpointerConfig, TrainingIteration
from noether_dist.errors import CheckpointNotFoundError, ConfigError, StateMismatchError
from noether_dist.initializers import build_initializers
from tests.support.models import EMA_INFO, build, make_mlp, train_steps


def _save_source(out: str) -> None:
    """run src, stage train, model mlp: U2 with an EMA (model_info ema_factor=0.9), then U3."""
    model, opt, ema = build(sharded=False)
    ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id="src", stage_name="train", model_name="mlp"))
    train_steps(model, opt, ema, 2, 0)
    ck.save(TrainingIteration(0, 2, 32), model=model, optimizer=opt, ema={EMA_INFO: ema})
    ck.save(TrainingIteration(0, 3, 48), model=model, optimizer=opt, ema={EMA_INFO: ema})


def test_initializer_errors(tmp_path):
    out = str(tmp_path)
    _save_source(out)
    with pytest.raises(ConfigError, match="does not import"):
        build_initializers([{"kind": "noether_dist.nothing.Here", "run_id": "src", "model_name": "mlp"}])
    with pytest.raises(ConfigError, match="did you mean 'model_info'"):
        build_initializers([{"kind": "noether_dist.initializers.PreviousRunInitializer", "run_id": "src",
                             "model_name": "mlp", "modelinfo": "x"}])

    def apply(**kw):
        spec = {"kind": "noether_dist.initializers.PreviousRunInitializer", "run_id": "src", "model_name": "mlp",
                "stage_name": "train", **kw}
        build_initializers([spec])[0].apply(make_mlp(), output_dir=out)

    with pytest.raises(CheckpointNotFoundError, match="no model file with model_info 'ema_factor=0.5'"):
        apply(model_info="ema_factor=0.5")
    with pytest.raises(ConfigError, match="drop_keys pattern 'head.*' matches no key"):
        apply(drop_keys=["head.*"])
    with pytest.raises(StateMismatchError, match="checkpoint keys the model has no place for"):
        build_initializers([{"kind": "noether_dist.initializers.PreviousRunInitializer", "run_id": "src",
                             "model_name": "mlp", "stage_name": "train"}])[0].apply(
            nn.Sequential(nn.Linear(16, 30)), output_dir=out)
