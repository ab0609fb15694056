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
accepted as the same thing, and so are the keys of Noether's own PreviousRunInitializer::

          checkpoint_tag: best_model.loss     # or {epoch: 3} / {update: 100} / {epoch, update, sample}
          keys_to_remove: [head.weight]       # exact checkpoint keys; each must exist
          patterns_to_remove: [head.]         # drop every checkpoint key containing the text
          patterns_to_rename: [{src: backbone., dst: encoder.}]   # replace the text in every key
          patterns_to_instantiate: [head.]    # model keys containing the text keep their fresh values
          output_path: /runs                  # Noether's name for output_dir
          load_optim: false                   # Noether's fixed value; true is refused

Removals come first, then renames (``rename_keys``, then ``patterns_to_rename`` in order),
as Noether does. Two spellings of one thing (``checkpoint`` and ``checkpoint_tag``,
``output_dir`` and ``output_path``, ``rename_keys`` and ``patterns_to_rename``) are a
ConfigError, not a guess.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from .dist.comm import Comm
from .format.records import ArtifactRecord
from .config import check_known_keys
from .errors import CheckpointNotFoundError, ConfigError, StateMismatchError
from .format.layout import StageLayout
from .format.names import (ArtifactKind, CheckpointRef, normalize_model_info, parse_checkpoint, parse_checkpoint_tag,
                    validate_model_name, validate_name)
from .stage.index import StageIndex
from .io.consolidated import full_shapes
from .io.formats import artifact_io
from .io.storage import StorageOptions, open_storage

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
    consolidated) and the consolidated files that Noether itself wrote (no commit record)."""

    run_id: str
    """The previous run."""
    model_name: str | None = None
    """The ``{model_name}`` of its files; None: the model's ``name`` attribute (Noether's models have one)."""
    stage_name: str | None = None
    """Its stage; None when it had no stage folder."""
    checkpoint: str | None = None
    """latest (default), last, best.<metric> or E10_U100_S200."""
    checkpoint_tag: str | dict[str, int] | None = None
    """Noether's spelling of ``checkpoint``: a name, or a dict with one of epoch/update/sample or all three."""
    model_info: str | None = None
    """e.g. ema_factor=0.9999 (or Noether's ema=0.9999) to start from EMA weights."""
    output_dir: str | None = None
    """Where the previous run lives; defaults to the current run's output_dir."""
    output_path: str | None = None
    """Noether's name for ``output_dir``."""
    drop_keys: tuple[str, ...] = ()
    """fnmatch patterns of checkpoint keys not to load; each must match at least one key."""
    keys_to_remove: tuple[str, ...] = ()
    """Noether's: exact checkpoint keys not to load; each must exist."""
    patterns_to_remove: tuple[str, ...] = ()
    """Noether's: checkpoint keys containing any of these texts are not loaded."""
    rename_keys: dict[str, str] = field(default_factory=dict)
    """checkpoint key prefix -> model key prefix."""
    patterns_to_rename: tuple[dict[str, str], ...] = ()
    """Noether's: ``{src, dst}``; in every checkpoint key containing ``src`` it becomes ``dst`` (default "")."""
    patterns_to_instantiate: tuple[str, ...] = ()
    """Noether's: model keys containing any of these texts keep the fresh model's values."""
    load_optim: bool = False
    """Noether's fixed value: this initializer loads weights only."""
    storage: StorageOptions = field(default_factory=StorageOptions)
    """Store options."""

    def __post_init__(self) -> None:
        validate_name(self.run_id, "run_id")
        if self.model_name is not None:
            validate_model_name(self.model_name)
        if self.stage_name:
            validate_name(self.stage_name, "stage_name")
        for one, other in (("checkpoint", "checkpoint_tag"), ("output_dir", "output_path"),
                           ("rename_keys", "patterns_to_rename")):
            if getattr(self, one) and getattr(self, other):
                raise ConfigError(f"PreviousRunInitializer has both {one} and {other} (two spellings of one "
                                  f"setting); keep one")
        if self.load_optim:
            raise ConfigError("PreviousRunInitializer loads weights only (load_optim must be false); to continue "
                              "training with the optimizer, resume with resume_run_id")
        for name in ("drop_keys", "keys_to_remove", "patterns_to_remove", "patterns_to_instantiate"):
            value = getattr(self, name)
            if isinstance(value, str) or not all(isinstance(v, str) and v for v in value):
                raise ConfigError(f"PreviousRunInitializer.{name} must be a list of non-empty strings, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        rules = self.patterns_to_rename
        if isinstance(rules, (str, dict)) or not all(
                isinstance(r, dict) and isinstance(r.get("src"), str) and r["src"]
                and isinstance(r.get("dst", ""), str) and not set(r) - {"src", "dst"} for r in rules):
            raise ConfigError("PreviousRunInitializer.patterns_to_rename must be a list of {src, dst} mappings "
                              f"with a non-empty src, got {rules!r}")
        object.__setattr__(self, "patterns_to_rename", tuple(dict(r) for r in rules))
        self.checkpoint_ref  # parse now: a bad value fails at creation
        normalize_model_info(self.model_info)

    @property
    def checkpoint_ref(self) -> CheckpointRef:
        """What ``checkpoint`` (or ``checkpoint_tag``) names; latest when neither is set."""
        if self.checkpoint_tag not in (None, ""):
            return parse_checkpoint_tag(self.checkpoint_tag)
        return parse_checkpoint(self.checkpoint or "latest")

    def apply(self, model: nn.Module, *, output_dir: str | None = None, timeout_s: float | None = None,
              process_group: Any = None) -> None:
        """Load the chosen checkpoint's model weights into ``model`` (collective over
        ``process_group``, default: the default group)."""
        out = self.output_dir or self.output_path or output_dir
        if not out:
            raise ConfigError("PreviousRunInitializer needs output_dir (where the previous run lives)")
        model_name = self.model_name or getattr(model, "name", None)
        if not isinstance(model_name, str):
            raise ConfigError("PreviousRunInitializer needs model_name (the model has no name attribute)")
        validate_model_name(model_name)
        comm = Comm(timeout_s, process_group=process_group)
        storage = open_storage(out, self.storage)
        layout = StageLayout(out, self.run_id, self.stage_name)
        info = normalize_model_info(self.model_info)

        def choose() -> ArtifactRecord:
            record = StageIndex(storage, layout).resolve_or_uncommitted(self.checkpoint_ref, model_name)
            art = record.artifact(ArtifactKind.MODEL.value, info)
            if art is None:
                have = [a.model_info or "(none)" for a in record.artifacts if a.kind == "model"]
                raise CheckpointNotFoundError(
                    f"checkpoint {record.iteration} of run {self.run_id!r} has no model file with model_info "
                    f"{info or '(none)'!r}; model files there have model_info: {have}")
            return art

        art = comm.broadcast_from_coordinator(choose)
        path = layout.artifact_path(art.name)
        count = artifact_io(art.format).load_weights(comm, storage, path, model,
                                                     lambda stored: self._plan(model, stored, path), art)
        log.info("initialised %s from %s (%d tensors)", model_name, path, count)

    def _renamed(self, stored: set[str], path: str) -> dict[str, str]:
        """Checkpoint keys after Noether's removals, then renames: new key -> checkpoint key."""
        for pattern in self.drop_keys:
            if not any(fnmatch.fnmatchcase(k, pattern) for k in stored):
                raise ConfigError(f"drop_keys pattern {pattern!r} matches no key of {path}; keys: {sorted(stored)[:20]}")
        absent = [k for k in self.keys_to_remove if k not in stored]
        if absent:
            raise ConfigError(f"keys_to_remove {absent} are not keys of {path}; keys: {sorted(stored)[:20]}")
        for pattern in self.patterns_to_remove:
            if not any(pattern in k for k in stored):
                log.warning("patterns_to_remove %r matches no key of %s", pattern, path)
        # drop_keys entries travel through the renames: the model keys they become keep their own values
        current = {k: k for k in sorted(stored)
                   if k not in self.keys_to_remove and not any(p in k for p in self.patterns_to_remove)}
        for src, dst in self.rename_keys.items():
            current = {(dst + k[len(src):] if k.startswith(src) else k): s for k, s in current.items()}
        for rule in self.patterns_to_rename:
            src, dst = rule["src"], rule.get("dst", "")
            kept = {k: s for k, s in current.items() if src not in k}
            # as in Noether: a renamed key replaces a key that already had the new name
            current = {**kept, **{k.replace(src, dst): s for k, s in current.items() if src in k}}
        return current

    def _plan(self, model: nn.Module, stored: dict[str, Any], path: str) -> dict[str, str]:
        """model key -> checkpoint key for every tensor to load, given each checkpoint key's
        shape; errors name what does not fit (nothing is loaded then)."""
        renamed = self._renamed(set(stored), path)
        dropped = {k for k, src in renamed.items() if any(fnmatch.fnmatchcase(src, p) for p in self.drop_keys)}
        renamed = {k: src for k, src in renamed.items() if k not in dropped}
        fresh = {k for k in model.state_dict() if any(p in k for p in self.patterns_to_instantiate)} | dropped
        wanted = {k: renamed.get(k) for k in model.state_dict() if k not in fresh}
        missing = sorted(k for k, src in wanted.items() if src is None)
        unused = sorted(renamed[k] for k in set(renamed) - set(wanted) - fresh)
        shapes = full_shapes(model)
        wrong = [f"{k} (checkpoint {src} {list(stored[src])}, model {list(shapes[k])})" for k, src in sorted(
            wanted.items()) if src is not None and stored[src] is not None and tuple(stored[src]) != tuple(shapes[k])]
        if missing or unused or wrong:
            raise StateMismatchError(
                f"{path} does not match the model: model keys missing in checkpoint: {missing or 'none'}; "
                f"checkpoint keys the model has no place for: {unused or 'none'} (remove them with drop_keys, "
                "keys_to_remove or patterns_to_remove, or map them with rename_keys or patterns_to_rename); "
                f"shape mismatch: {', '.join(wrong) or 'none'}")
        return {k: src for k, src in wanted.items() if src is not None}


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
