"""Consolidated checkpoints (one ``torch.save`` file per artifact, as Noether writes them):
write, read, and load into any model.

The files, as Noether writes them with ``torch.save`` on rank 0:

- model file: ``{"state_dict", "checkpoint_tag", "training_iteration": {epoch, update,
  sample}, "run_id"}``, plus ``"ema"`` (the factor) for EMA files and ``model_config`` /
  ``config_kind`` where known;
- optim file: the optimizer state dict. Noether's own are keyed by parameter index, with
  ``param_idx_to_name`` and named param groups; ours are keyed by parameter name
  (resharding-safe). Both load by name (:mod:`noether_dist.io.optim_file`);
- trainer file: ``{"callback_state_dicts", "training_iteration", "grad_scaler"}``; ours add
  ``"state"`` (the whole trainer state) and ``"rank_states"`` so a round trip is exact.

Files are read with ``weights_only=True`` and, on a local disk, memory-mapped, so that a
rank touches only the pages of the tensors it keeps.
"""

from __future__ import annotations

import io
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from ..errors import ConfigError, StateMismatchError
from ..format.names import TrainingIteration
from ..format.trainer_keys import CALLBACKS_KEY, GRAD_SCALER_KEY
from .optim_file import match_optimizer_file
from .storage import Storage

__all__ = ["model_file", "trainer_file", "submodel_names", "submodel_of_variant", "submodel_state", "submodel_optimizer", "read_file", "load_bytes", "state_dict_of", "load_model_file", "load_optimizer_file",
           "check_optimizer_file", "apply_optimizer_file", "full_shapes", "trainer_state_of", "save_file"]

_FULL = StateDictOptions(full_state_dict=True, strict=True)


MODEL_CONFIG_KEYS = ("model_config", "config_kind")
"""What Noether's model files carry so its tools can rebuild the model."""


def model_file(state_dict: dict[str, Any], iteration: TrainingIteration, run_id: str, checkpoint_tag: str,
               ema: float | None = None, model_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """The dict Noether stores in a model file; ``model_config`` holds ``model_config`` and
    ``config_kind`` when they are known."""
    out = {"state_dict": state_dict, "checkpoint_tag": checkpoint_tag, "training_iteration": iteration.to_dict(),
           "run_id": run_id}
    if ema is not None:
        out["ema"] = ema
    out.update({k: model_config[k] for k in MODEL_CONFIG_KEYS if model_config and k in model_config})
    return out


def submodel_names(model_name: str, model_configs: Mapping[str, Any]) -> list[str]:
    """The file names Noether gives the submodels of a CompositeModel ``model_name``
    (``comp.encoder``, ...), as the trainer state's ``model_configs`` lists them: the submodels
    without submodels of their own, the ones Noether's CheckpointWriter writes files for.
    Empty for a plain Model."""
    below = [n for n in model_configs if n.startswith(model_name + ".")]
    return sorted(n for n in below if not any(o.startswith(n + ".") for o in below))


def submodel_of_variant(model_name: str, model_info: str, model_configs: Mapping[str, Any]) -> tuple[str, str] | None:
    """(Noether file name of the submodel, its own model_info) for the model_info of a
    submodel's variant (``encoder.ema_factor=0.9`` -> ``comp.encoder``, ``ema_factor=0.9``);
    None when ``model_info`` names no submodel of ``model_name``."""
    subs = [n for n in model_configs if n.startswith(model_name + ".")
            and model_info.startswith(n[len(model_name) + 1:] + ".")]
    if not subs:
        return None
    sub = max(subs, key=len)
    return sub, model_info[len(sub) - len(model_name):]


def _prefix(model_name: str, submodel: str) -> str:
    return submodel[len(model_name) + 1:] + "."


def submodel_state(state_dict: Mapping[str, Any], model_name: str, submodel: str) -> dict[str, Any]:
    """The part of the whole model's state dict that belongs to ``submodel`` (a Noether file
    name below ``model_name``), keyed as the submodel's own state dict."""
    prefix = _prefix(model_name, submodel)
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def submodel_optimizer(osd: Mapping[str, Any], model_name: str, submodel: str) -> dict[str, Any] | None:
    """The state of ``submodel``'s own optimizer within a name-keyed optimizer state dict of
    the whole model (one group list for all optimizers: each group holds one submodel's
    parameters), keyed by the submodel's parameter names; None when it has no parameters there."""
    prefix = _prefix(model_name, submodel)
    groups = []
    for group in osd["param_groups"]:
        params = [p[len(prefix):] for p in group["params"] if p.startswith(prefix)]
        if params:
            groups.append({**group, "params": params})
    if not groups:
        return None
    return {"state": submodel_state(osd.get("state") or {}, model_name, submodel), "param_groups": groups}


def trainer_file(trainer_state: dict[str, Any], rank_states: dict[int, Any], iteration: TrainingIteration) -> dict:
    """The dict stored in a trainer file (Noether's keys plus ours for an exact round trip)."""
    return {"callback_state_dicts": trainer_state.get(CALLBACKS_KEY, {}), "training_iteration": iteration.to_dict(),
            "grad_scaler": trainer_state.get(GRAD_SCALER_KEY), "state": trainer_state, "rank_states": rank_states}


def save_file(storage: Storage, path: str, obj: Any) -> int:
    """``torch.save`` one object to ``path`` in one write; returns the bytes written."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    storage.replace(path, data)
    return len(data)


def read_file(storage: Storage, path: str) -> Any:
    """Load a consolidated file with ``weights_only=True`` (memory-mapped on local disks)."""
    local = storage.local_path(path)
    if local is not None:
        return torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    return load_bytes(storage.read(path))


def load_bytes(data: bytes) -> Any:
    """Load a consolidated file's bytes (already read) with ``weights_only=True``."""
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def state_dict_of(obj: Any, what: str) -> dict[str, torch.Tensor]:
    """The model state dict inside a model file (or the file itself if it is one)."""
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        return obj["state_dict"]
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    raise ConfigError(f"{what} is not a Noether model file: expected a dict with 'state_dict'")


def iteration_of(obj: Any) -> TrainingIteration | None:
    """The training point recorded in a Noether file, if any."""
    if isinstance(obj, dict) and isinstance(obj.get("training_iteration"), dict):
        return TrainingIteration.from_dict(obj["training_iteration"])
    return None


def check_model_keys(model: nn.Module, state_dict: dict[str, Any], what: str) -> None:
    """StateMismatchError naming missing / unexpected keys and shape mismatches."""
    wanted = {k: tuple(shape) for k, shape in full_shapes(model).items()}
    missing = sorted(set(wanted) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(wanted))
    shapes = [f"{k} (checkpoint {list(state_dict[k].shape)}, model {list(wanted[k])})"
              for k in sorted(set(wanted) & set(state_dict)) if tuple(state_dict[k].shape) != wanted[k]]
    if missing or unexpected or shapes:
        raise StateMismatchError(f"{what} does not match the state to load into: missing in checkpoint: "
                                 f"{', '.join(missing) or 'none'}; unexpected in checkpoint: {', '.join(unexpected) or 'none'}; "
                                 f"shape mismatch: {', '.join(shapes) or 'none'}")


def full_shapes(model: nn.Module) -> dict[str, torch.Size]:
    """Every state dict key's global shape (DTensor reports the global shape)."""
    out = {}
    for key, value in model.state_dict().items():
        out[key] = value.shape  # DTensor reports the global shape
    return out


def load_model_file(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> None:
    """Put a full (unsharded) state dict into a model that may be FSDP2-sharded: each rank
    keeps its own shard."""
    set_model_state_dict(model, state_dict, options=_FULL)


def load_optimizer_file(model: nn.Module, optimizer: torch.optim.Optimizer, osd: dict[str, Any],
                        what: str = "optimizer file") -> None:
    """Put a full optimizer state dict from a file into an optimizer (sharded or not),
    matched by parameter name (see :mod:`noether_dist.io.optim_file`); everything is checked
    first, and a file that does not fit raises StateMismatchError with nothing applied."""
    apply_optimizer_file(model, optimizer, check_optimizer_file(model, optimizer, osd, what))


def apply_optimizer_file(model: nn.Module, optimizer: torch.optim.Optimizer, matched: dict[str, Any]) -> None:
    """Apply what :func:`check_optimizer_file` returned: each rank keeps its own shard."""
    set_optimizer_state_dict(model, optimizer, matched, options=StateDictOptions(full_state_dict=True))
    # torch's full-state path flattens group settings (tuples come back as lists): set them as stored
    for group, settings in zip(optimizer.param_groups, matched["param_groups"]):
        group.update({k: v for k, v in settings.items() if k != "params"})


def check_optimizer_file(model: nn.Module, optimizer: torch.optim.Optimizer, osd: Any,
                         what: str = "optimizer file", target: dict[str, Any] | None = None) -> dict[str, Any]:
    """The file's optimizer state matched to ``optimizer`` by name (nothing applied);
    StateMismatchError when it does not fit. ``target`` is the optimizer's own name-keyed
    state dict if the caller has it already."""
    if not isinstance(osd, dict):
        raise StateMismatchError(f"{what} is not an optimizer state dict")
    if target is None:
        target = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=False))
    return match_optimizer_file(osd, target, full_shapes(model), what)


def trainer_state_of(obj: Any) -> tuple[dict[str, Any], dict[int, Any]]:
    """(trainer state, per-rank states) of a trainer file, ours or Noether's."""
    if not isinstance(obj, dict):
        raise ConfigError("trainer file is not a dict")
    if isinstance(obj.get("state"), dict):
        return obj["state"], dict(obj.get("rank_states") or {})
    return {CALLBACKS_KEY: obj.get("callback_state_dicts") or {}, GRAD_SCALER_KEY: obj.get("grad_scaler")}, {}


def local_path(storage: Storage, path: str) -> str | None:
    """The OS path of ``path`` on a local store, else None."""
    return storage.local_path(path)
