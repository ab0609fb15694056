"""Noether's ``model.initializers`` entries of kind PreviousRunInitializer, read by noether_dist.

Noether's ``model.initializers`` is a closed union (CheckpointInitializer, ResumeInitializer,
PreviousRunInitializer): a foreign ``kind`` is refused when the config is validated. So the
user keeps Noether's own entry, and the adapter's trainer replaces each such initializer
object, before the model initialises, by a bridge that runs
:class:`noether_dist.initializers.PreviousRunInitializer` with the same keys. It reads
noether_dist checkpoints (sharded or consolidated) and files Noether itself wrote. The
entry's ``kwargs`` carries noether_dist-only options (``output_dir`` for runs on S3,
``storage``).
"""

from __future__ import annotations

import logging
from typing import Any

from noether.core.initializers import InitializerBase

from ...initializers import build_initializers
from .models import named_models

__all__ = ["PreviousRunBridge", "install_previous_run_bridges", "NOETHER_PREVIOUS_RUN"]

log = logging.getLogger(__name__)
NOETHER_PREVIOUS_RUN = "noether.core.initializers.PreviousRunInitializer"
_NOETHER_KEYS = ("run_id", "stage_name", "model_name", "checkpoint_tag", "model_info", "keys_to_remove",
                 "patterns_to_remove", "patterns_to_rename", "patterns_to_instantiate")


def _spec(config: Any, model_name: str) -> dict[str, Any]:
    """The noether_dist initializer spec of a Noether PreviousRunInitializerConfig."""
    spec: dict[str, Any] = {"kind": NOETHER_PREVIOUS_RUN}
    for key in _NOETHER_KEYS:
        value = getattr(config, key, None)
        if value not in (None, [], {}):
            spec[key] = value
    spec.setdefault("model_name", model_name)
    spec.update(config.kwargs or {})
    return spec


class PreviousRunBridge(InitializerBase):
    """Stands in for one Noether PreviousRunInitializer: loads weights with noether_dist."""

    def __init__(self, config: Any, *, path_provider: Any, output_dir: str, timeout_s: float) -> None:
        super().__init__(path_provider=path_provider)
        self.config = config
        self.output_dir = output_dir
        self.timeout_s = timeout_s

    def init_weights(self, model: Any) -> None:
        """Load the previous run's weights into ``model`` (collective)."""
        initializer, = build_initializers([_spec(self.config, model.name)])
        initializer.apply(model, output_dir=self.output_dir, timeout_s=self.timeout_s)

    def init_optimizer(self, model: Any) -> None:
        """Weights only: Noether's PreviousRunInitializer never loads an optimizer either."""


def install_previous_run_bridges(model: Any, *, output_dir: str, timeout_s: float) -> int:
    """Replace every Noether PreviousRunInitializer of ``model`` and its submodels by a
    bridge; returns how many were replaced."""
    count = 0
    for _, sub in named_models(model):
        configs = list(getattr(getattr(sub, "model_config", None), "initializers", None) or [])
        objects = getattr(sub, "initializers", None) or []
        if len(configs) != len(objects):
            continue  # not built from its config one by one: leave it to Noether
        for i, config in enumerate(configs):
            if getattr(config, "kind", None) == NOETHER_PREVIOUS_RUN:
                objects[i] = PreviousRunBridge(config, path_provider=objects[i].path_provider,
                                               output_dir=output_dir, timeout_s=timeout_s)
                count += 1
    if count:
        log.info("%d PreviousRunInitializer(s) read through noether_dist", count)
    return count
