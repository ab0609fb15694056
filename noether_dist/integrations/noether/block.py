"""The ``checkpointer:`` block of a Noether trainer config, turned into a CheckpointerConfig."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...config import CheckpointerConfig

__all__ = ["checkpointer_config", "DERIVED_KEYS"]

DERIVED_KEYS = {"run_id": "the run's run_id", "stage_name": "the run's stage_name", "model_name": "model.name",
                "best_metrics": "BestCheckpointCallback's decisions"}
"""Keys Noether already decides: the adapter takes them from the run, never from the block."""


def checkpointer_config(block: Mapping[str, Any] | None, *, output_dir: str, run_id: str, stage_name: str | None,
                        model_name: str) -> CheckpointerConfig:
    """The CheckpointerConfig of a Noether run: the block's keys (``output_dir``, ``storage``,
    ``timeout_s``, ``thread_count``, ``async_mode``, ``retention``, ``node_local``, and any
    field CheckpointerConfig gains) plus what Noether names. ``output_dir`` defaults to
    Noether's ``output_path``. Unknown keys, and keys Noether decides, are a ConfigError
    naming them."""
    data = dict(block or {})
    data["output_dir"] = str(data.get("output_dir") or output_dir)
    values = {"run_id": run_id, "stage_name": stage_name, "model_name": model_name, "best_metrics": {}}
    return CheckpointerConfig.from_block(data, where="trainer.checkpointer",
                                         decided={key: (values[key], source) for key, source in DERIVED_KEYS.items()})
