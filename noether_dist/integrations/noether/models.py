"""What the adapter reads from Noether models: optimizers, EMA targets, model configs.

A ``Model`` has one optimizer (Noether's ``OptimizerWrapper`` around a torch optimizer); a
``CompositeModel`` holds submodels, each a Model (with its own optimizer) or a nested
CompositeModel. The adapter saves the whole model as one artifact and the state of all its
optimizers as one optimizer artifact keyed by parameter name (torch's
``get_optimizer_state_dict`` over the list of torch optimizers).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from noether.core.models import CompositeModel, Model, ModelBase
from noether.core.utils.common import select_with_path

from ...io.consolidated import MODEL_CONFIG_KEYS
from ...format.names import NOETHER_EMA_PREFIX, normalize_model_info

__all__ = ["named_models", "torch_optimizers", "model_configs", "variant_model_info", "ema_model_info", "ema_targets",
           "ema_callbacks"]


def named_models(model: ModelBase, name: str | None = None) -> Iterator[tuple[str, ModelBase]]:
    """(Noether file name, model) of the model and every submodel, depth first, the way
    Noether's CheckpointWriter names them (``name``, ``name.sub``, ``name.sub.inner``)."""
    name = model.name if name is None else name
    yield name, model
    if isinstance(model, CompositeModel):
        for key, sub in model.submodels.items():
            if sub is not None:
                yield from named_models(sub, f"{name}.{key}")


def torch_optimizers(model: ModelBase) -> list[torch.optim.Optimizer]:
    """The torch optimizers of every trainable Model in ``model`` (frozen ones have none)."""
    out = []
    for _, sub in named_models(model):
        if isinstance(sub, Model) and not sub.is_frozen and sub.optimizer is not None:
            out.append(sub.optimizer.torch_optim)
    return out


def model_configs(model: ModelBase) -> dict[str, dict[str, Any]]:
    """``{Noether model file name: {"model_config": ..., "config_kind": ...}}`` for the model
    and its submodels: what Noether writes into its model files so its tools can rebuild
    the model (JSON-safe, so that it loads with ``weights_only=True``)."""
    config_key, kind_key = MODEL_CONFIG_KEYS
    out = {}
    for name, sub in named_models(model):
        config = getattr(sub, "model_config", None)
        if config is not None:
            out[name] = {config_key: config.model_dump(mode="json", exclude_computed_fields=True),
                         kind_key: config.config_kind}
    return out


def variant_model_info(model_path: str | None, model_info: str) -> str:
    """Our model_info for a variant (Noether's ``model_info``, e.g. ``ema=0.999``) of the submodel
    at ``model_path`` (None: the whole model): ``ema_factor=0.999`` or ``<path>.ema_factor=0.999``."""
    info = normalize_model_info(model_info)
    return info if not model_path else f"{model_path}.{info}"


def ema_model_info(model_path: str | None, factor: float | str) -> str:
    """Our model_info for the EMA of ``model_path`` (None: the whole model) with ``factor``."""
    return variant_model_info(model_path, f"{NOETHER_EMA_PREFIX}{factor}")


def ema_callbacks(callbacks: list[Any]) -> list[Any]:
    """Noether's EmaCallbacks among ``callbacks``."""
    from noether.core.callbacks.checkpoint.ema import EmaCallback

    return [cb for cb in callbacks if isinstance(cb, EmaCallback)]


def ema_targets(callbacks: list[Any], model: ModelBase) -> dict[str, tuple[Any, str | None, float, dict[str, Any]]]:
    """``{model_info: (callback, model_path, factor, state)}`` for every EMA the callbacks keep,
    ``state`` holding fresh tensors shaped like the EMA (parameters and buffers, as
    EmaCallback saves them) to load into."""
    out = {}
    for cb in ema_callbacks(callbacks):
        for path in cb.model_paths:
            module = select_with_path(obj=model, path=path)
            for factor in cb.target_factors:
                state = {n: p.detach().clone() for n, p in module.named_parameters()}
                state.update({n: b.detach().clone() for n, b in module.named_buffers()})
                out[ema_model_info(path, factor)] = (cb, path, factor, state)
    return out
