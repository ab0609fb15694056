"""Initializers: start a fresh model from a previous run's weights (no optimizer, no progress).

Configured from YAML as in the user's document::

    model:
      initializers:
        - kind: noether_dist.initializers.PreviousRunInitializer
          run_id: <previous run_id>
          model_name: <model_name>
          stage_name: <stage_name>   # optional
          checkpoint: latest         # latest, last, best.<metric>, E10_U100_S200
          model_info: ema_factor=0.9999   # optional: EMA weights
          drop_keys: ["head.*"]      # optional: checkpoint keys not to load (fnmatch patterns)
          rename_keys: {"backbone.": "encoder."}   # optional: checkpoint prefix -> model prefix

``kind: noether.core.initializers.PreviousRunInitializer`` (Noether's own spelling) is
accepted as the same thing.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from . import dcp_io
from .comm import Comm
from .commit import read_commit
from .config import check_known_keys
from .errors import CheckpointNotFoundError, ConfigError, StateMismatchError
from .layout import StageLayout
from .names import ArtifactKind, normalize_model_info, parse_checkpoint, validate_model_name, validate_name
from .statedict import apply_model_state, model_state
from .storage import StorageOptions, open_storage

__all__ = ["PreviousRunInitializer", "build_initializers", "Initializer"]

log = logging.getLogger(__name__)
_ALIASES = {"noether.core.initializers.PreviousRunInitializer": "noether_dist.initializers.PreviousRunInitializer"}


class Initializer:
    """Base of initializers: :meth:`apply` changes a fresh model's weights (collective)."""

    def apply(self, model: nn.Module, *, output_dir: str | None = None, timeout_s: float | None = None) -> None:
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class PreviousRunInitializer(Initializer):
    """Load model weights (only) of another run's checkpoint into a fresh model, which may be
    sharded differently (any world size)."""

    run_id: str
    model_name: str
    stage_name: str | None = None
    checkpoint: str = "latest"
    model_info: str | None = None
    output_dir: str | None = None
    """Where the previous run lives; defaults to the current run's output_dir."""
    drop_keys: tuple[str, ...] = ()
    """fnmatch patterns of checkpoint keys not to load; each must match at least one key."""
    rename_keys: dict[str, str] = field(default_factory=dict)
    """checkpoint key prefix -> model key prefix."""
    storage: StorageOptions = field(default_factory=StorageOptions)

    def __post_init__(self) -> None:
        validate_name(self.run_id, "run_id")
        validate_model_name(self.model_name)
        if self.stage_name:
            validate_name(self.stage_name, "stage_name")
        parse_checkpoint(self.checkpoint)
        normalize_model_info(self.model_info)
        object.__setattr__(self, "drop_keys", tuple(self.drop_keys))

    def _source_key(self, model_key: str) -> str:
        for src, dst in self.rename_keys.items():
            if model_key.startswith(dst):
                return src + model_key[len(dst):]
        return model_key

    def apply(self, model: nn.Module, *, output_dir: str | None = None, timeout_s: float | None = None) -> None:
        from .resume import select_checkpoint

        out = self.output_dir or output_dir
        if not out:
            raise ConfigError("PreviousRunInitializer needs output_dir (where the previous run lives)")
        comm = Comm(timeout_s)
        storage = open_storage(out, self.storage)
        layout = StageLayout(out, self.run_id, self.stage_name)
        info = normalize_model_info(self.model_info)
        ref = parse_checkpoint(self.checkpoint)

        def choose() -> str:
            it = select_checkpoint(storage, layout, ref)
            record = read_commit(storage, layout, it)
            art = record.artifact(ArtifactKind.MODEL.value, info) if record else None
            if art is None:
                have = [a.model_info or "(none)" for a in (record.artifacts if record else ()) if a.kind == "model"]
                raise CheckpointNotFoundError(
                    f"checkpoint {it} of run {self.run_id!r} has no model file with model_info {info or '(none)'!r}; "
                    f"model files there have model_info: {have}")
            if record.model_name != self.model_name:
                raise CheckpointNotFoundError(f"checkpoint {it} holds model {record.model_name!r}, not {self.model_name!r}")
            return art.name

        name = comm.on_coordinator(choose)
        path = layout.artifact_path(name)
        target = comm.each(lambda: self._target(model, path, storage))
        comm.each(lambda: dcp_io.load_state(target, path, storage, process_group=comm.group))
        full = model_state(model)
        for model_key in full:
            src = self._source_key(model_key)
            if src in target:
                full[model_key] = target[src]
        comm.each(lambda: apply_model_state(model, full))
        log.info("initialised %s from %s (%d tensors)", self.model_name, path, len(target))

    def _target(self, model: nn.Module, path: str, storage: Any) -> dict[str, Any]:
        stored = set(dcp_io.read_metadata(path, storage).state_dict_metadata)
        for pattern in self.drop_keys:
            if not any(fnmatch.fnmatchcase(k, pattern) for k in stored):
                raise ConfigError(f"drop_keys pattern {pattern!r} matches no key of {path}; keys: {sorted(stored)[:20]}")
        dropped = {k for k in stored if any(fnmatch.fnmatchcase(k, p) for p in self.drop_keys)}
        wanted = {self._source_key(k): v for k, v in model_state(model).items()}
        missing = sorted(k for k in wanted if k not in stored and k not in dropped)
        unused = sorted(stored - dropped - set(wanted))
        if missing or unused:
            raise StateMismatchError(
                f"{path} does not match the model: model keys missing in checkpoint: {missing or 'none'}; "
                f"checkpoint keys the model has no place for: {unused or 'none'} (drop them with drop_keys "
                "or map them with rename_keys)")
        return {k: v for k, v in wanted.items() if k not in dropped}


def build_initializers(specs: list[dict[str, Any]] | None) -> list[Initializer]:
    """Instantiate initializers from config mappings with a ``kind`` import path."""
    out = []
    for spec in specs or []:
        spec = dict(spec)
        kind = spec.pop("kind", None)
        if not kind:
            raise ConfigError("an initializer needs 'kind', e.g. noether_dist.initializers.PreviousRunInitializer")
        kind = _ALIASES.get(kind, kind)
        module_name, _, cls_name = kind.rpartition(".")
        try:
            cls = getattr(importlib.import_module(module_name), cls_name)
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"initializer kind {kind!r} does not import: {exc}") from None
        if isinstance(cls, type) and issubclass(cls, PreviousRunInitializer):
            check_known_keys(spec, {f.name for f in fields(cls)}, kind)
            if "storage" in spec and not isinstance(spec["storage"], StorageOptions):
                spec["storage"] = StorageOptions.from_dict(spec["storage"])
        out.append(cls(**spec))
    return out
