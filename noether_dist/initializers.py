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

from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

from . import consolidated, dcp_io
from .comm import Comm
from .commit import ArtifactRecord
from .config import check_known_keys
from .errors import CheckpointNotFoundError, ConfigError, StateMismatchError
from .layout import StageLayout
from .names import ArtifactKind, normalize_model_info, parse_checkpoint, validate_model_name, validate_name
from .select import resolve_record
from .statedict import model_state
from .storage import StorageOptions, open_storage

__all__ = ["PreviousRunInitializer", "build_initializers", "Initializer"]

log = logging.getLogger(__name__)
_ALIASES = {"noether.core.initializers.PreviousRunInitializer": "noether_dist.initializers.PreviousRunInitializer"}


class Initializer:
    """Base of initializers: :meth:`apply` changes a fresh model's weights (collective)."""

    def apply(self, model: nn.Module, *, output_dir: str | None = None, timeout_s: float | None = None) -> None:
        """Change ``model``'s weights; every rank calls it."""
        raise NotImplementedError


@dataclass(frozen=True, kw_only=True)
class PreviousRunInitializer(Initializer):
    """Load model weights (only) of another run's checkpoint into a fresh model, which may be
    sharded differently (any world size). Reads our committed checkpoints (sharded or
    consolidated) and single files that Noether itself wrote."""

    run_id: str
    """The previous run."""
    model_name: str
    """The ``{model_name}`` of its files."""
    stage_name: str | None = None
    """Its stage; None when it had no stage folder."""
    checkpoint: str = "latest"
    """latest, last, best.<metric> or E10_U100_S200."""
    model_info: str | None = None
    """e.g. ema_factor=0.9999 (or Noether's ema=0.9999) to start from EMA weights."""
    output_dir: str | None = None
    """Where the previous run lives; defaults to the current run's output_dir."""
    drop_keys: tuple[str, ...] = ()
    """fnmatch patterns of checkpoint keys not to load; each must match at least one key."""
    rename_keys: dict[str, str] = field(default_factory=dict)
    """checkpoint key prefix -> model key prefix."""
    storage: StorageOptions = field(default_factory=StorageOptions)
    """Store options."""

    def __post_init__(self) -> None:
        validate_name(self.run_id, "run_id")
        validate_model_name(self.model_name)
        if self.stage_name:
            validate_name(self.stage_name, "stage_name")
        if self.checkpoint in (None, ""):
            object.__setattr__(self, "checkpoint", "latest")
        parse_checkpoint(self.checkpoint)
        normalize_model_info(self.model_info)
        object.__setattr__(self, "drop_keys", tuple(self.drop_keys))

    def _source_key(self, model_key: str) -> str:
        for src, dst in self.rename_keys.items():
            if model_key.startswith(dst):
                return src + model_key[len(dst):]
        return model_key

    def apply(self, model: nn.Module, *, output_dir: str | None = None, timeout_s: float | None = None) -> None:
        """Load the chosen checkpoint's model weights into ``model`` (collective)."""
        out = self.output_dir or output_dir
        if not out:
            raise ConfigError("PreviousRunInitializer needs output_dir (where the previous run lives)")
        comm = Comm(timeout_s)
        storage = open_storage(out, self.storage)
        layout = StageLayout(out, self.run_id, self.stage_name)
        info = normalize_model_info(self.model_info)

        def choose() -> ArtifactRecord:
            record = resolve_record(storage, layout, parse_checkpoint(self.checkpoint), self.model_name)
            art = record.artifact(ArtifactKind.MODEL.value, info)
            if art is None:
                have = [a.model_info or "(none)" for a in record.artifacts if a.kind == "model"]
                raise CheckpointNotFoundError(
                    f"checkpoint {record.iteration} of run {self.run_id!r} has no model file with model_info "
                    f"{info or '(none)'!r}; model files there have model_info: {have}")
            return art

        art = comm.on_coordinator(choose)
        path = layout.artifact_path(art.name)
        if art.format == "consolidated":
            def load_file() -> int:
                stored = consolidated.state_dict_of(consolidated.read_file(storage, path), path)
                wanted = self._plan(model, set(stored), path)
                full = {model_key: stored[src] for model_key, src in wanted.items()}
                set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=False))
                return len(full)

            count = comm.each(load_file)
        else:
            def target() -> dict[str, Any]:
                stored = set(dcp_io.read_metadata(path, storage).state_dict_metadata)
                wanted = self._plan(model, stored, path)
                current = model_state(model)
                return {src: current[model_key] for model_key, src in wanted.items()}

            loaded = comm.each(target)
            comm.each(lambda: dcp_io.load_state(loaded, path, storage, process_group=comm.group))
            current = model_state(model)
            for model_key in list(current):
                src = self._source_key(model_key)
                if src in loaded:
                    current[model_key] = loaded[src]
            comm.each(lambda: set_model_state_dict(model, current, options=StateDictOptions(strict=False)))
            count = len(loaded)
        log.info("initialised %s from %s (%d tensors)", self.model_name, path, count)

    def _plan(self, model: nn.Module, stored: set[str], path: str) -> dict[str, str]:
        """model key -> checkpoint key for every tensor to load; errors name what does not fit."""
        for pattern in self.drop_keys:
            if not any(fnmatch.fnmatchcase(k, pattern) for k in stored):
                raise ConfigError(f"drop_keys pattern {pattern!r} matches no key of {path}; keys: {sorted(stored)[:20]}")
        dropped = {k for k in stored if any(fnmatch.fnmatchcase(k, p) for p in self.drop_keys)}
        wanted = {k: self._source_key(k) for k in model.state_dict()}
        wanted = {k: src for k, src in wanted.items() if src not in dropped}
        missing = sorted(src for src in wanted.values() if src not in stored)
        unused = sorted(stored - dropped - set(wanted.values()))
        if missing or unused:
            raise StateMismatchError(
                f"{path} does not match the model: model keys missing in checkpoint: {missing or 'none'}; "
                f"checkpoint keys the model has no place for: {unused or 'none'} (drop them with drop_keys "
                "or map them with rename_keys)")
        return wanted


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
        if not (isinstance(cls, type) and issubclass(cls, Initializer)):
            raise ConfigError(f"initializer kind {kind!r} is not an Initializer "
                              "(e.g. noether_dist.initializers.PreviousRunInitializer)")
        if issubclass(cls, PreviousRunInitializer):
            check_known_keys(spec, {f.name for f in fields(cls)}, kind)
            if "storage" in spec and not isinstance(spec["storage"], StorageOptions):
                spec["storage"] = StorageOptions.from_dict(spec["storage"])
        out.append(cls(**spec))
    return out
