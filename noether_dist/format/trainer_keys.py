"""The trainer artifact's keys: the names of its entries and the keys of the trainer state
that the library writes or reads. Save, resume, convert, the single-file format, the
reference trainer and the Noether adapter all spell them from here.

A trainer artifact (``{model}_cp=<point>_trainer.th``) holds, as DCP entries (each a packed
object):

- ``noether.trainer``, written by the coordinator:
  ``{"training_iteration": {epoch, update, sample}, "state": <the trainer state>}``;
- ``noether.rank.<rank>``, one per rank: that rank's own state (its RNG, for one).

The trainer state is the caller's mapping; the library reads ``callbacks`` and
``grad_scaler`` from it (Noether's single trainer file has them) and ``model_configs`` (the
config of every model and submodel, for Noether's model files).
"""

from __future__ import annotations

from typing import Any

__all__ = ["CALLBACKS_KEY", "DATA_POSITION_KEY", "GRAD_SCALER_KEY", "ITERATION_KEY", "MODEL_CONFIGS_KEY", "RNG_KEY",
           "STATE_KEY", "TRAINER_COMMON_KEY", "common_entry", "rank_of_trainer_key", "state_of_common_entry",
           "trainer_rank_key"]

TRAINER_COMMON_KEY = "noether.trainer"
"""The entry with the training point and the trainer state (the coordinator's)."""
_RANK_PREFIX = "noether.rank."

ITERATION_KEY = "training_iteration"
"""In the common entry: the training point, Noether's ``training_iteration`` dict."""
STATE_KEY = "state"
"""In the common entry: the trainer state."""

CALLBACKS_KEY = "callbacks"
"""In the trainer state: ``{callback name: its state dict}``."""
GRAD_SCALER_KEY = "grad_scaler"
"""In the trainer state: the gradient scaler's state dict."""
MODEL_CONFIGS_KEY = "model_configs"
"""In the trainer state: ``{model name: {model_config, config_kind}}`` for each model and submodel."""
DATA_POSITION_KEY = "data_position"
"""In a trainer's state: where its data stream stands (``DataPosition.to_dict``)."""
RNG_KEY = "rng"
"""In a rank's own state: its RNG states (``state.capture_rng``)."""


def trainer_rank_key(rank: int) -> str:
    """Key of one rank's own trainer state inside the trainer artifact."""
    return f"{_RANK_PREFIX}{rank}"


def rank_of_trainer_key(key: str) -> int | None:
    """The rank whose own state ``key`` holds; None for any other entry."""
    if not key.startswith(_RANK_PREFIX) or not key[len(_RANK_PREFIX):].isdigit():
        return None
    return int(key[len(_RANK_PREFIX):])


def common_entry(iteration: dict[str, int], state: dict[str, Any] | None) -> dict[str, Any]:
    """The common entry's content (before packing) for a training point (its dict form)."""
    return {ITERATION_KEY: iteration, STATE_KEY: state or {}}


def state_of_common_entry(common: dict[str, Any]) -> dict[str, Any]:
    """The trainer state inside an unpacked common entry ({} when it has none)."""
    return dict(common.get(STATE_KEY) or {})
