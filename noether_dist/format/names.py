"""Noether checkpoint names: parse, format and validate them. No I/O.

The convention (the user's contract)::

    {model_name}_cp={checkpoint}_model.th
    {model_name}_{model_info}_cp={checkpoint}_model.th
    {model_name}_cp={checkpoint}_optim.th
    {model_name}_cp={checkpoint}_trainer.th

``checkpoint`` is ``latest``, ``last``, ``best.{metric}`` or a training point
``E{epoch}_U{update}_S{sample}``. Noether itself has been seen writing
``best_model.{metric}`` and ``ema=0.9999``; reading accepts those spellings, writing
uses the ones above.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from ..errors import ConfigError, InvalidNameError

__all__ = [
    "ArtifactFormat",
    "ArtifactKind",
    "ArtifactName",
    "CheckpointRef",
    "PartialIteration",
    "TrainingIteration",
    "format_artifact",
    "parse_artifact",
    "parse_checkpoint",
    "parse_resume_checkpoint",
    "validate_name",
    "normalize_model_info",
    "ema_factor_of",
    "noether_model_info",
    "noether_tag",
    "is_tag",
    "parse_checkpoint_tag",
    "NOETHER_BEST_PREFIX",
    "NOETHER_EMA_PREFIX",
    "NOETHER_RUN_CONFIG",
]

# Names become path components on local disks and S3 keys: keep them to a portable set.
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=+\-]*$")
_MODEL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]*(?:_[A-Za-z0-9.\-]+)*$")
_ITER_RE = re.compile(r"^E(\d+)_U(\d+)_S(\d+)$")
_PARTIAL_RE = re.compile(r"^([EUS])(\d+)$")
_ARTIFACT_RE = re.compile(r"^(?P<prefix>.+?)_cp=(?P<cp>.+)_(?P<kind>model|optim|trainer)\.th$")
_MAX_NAME = 200


def validate_name(value: object, what: str, *, allow_underscore: bool = True) -> str:
    """Return ``value`` if it is a safe single path component, else raise InvalidNameError.

    Safe means: a non-empty string of letters, digits and ``. _ = + -``, not starting
    with a dot or dash, no ``..``, no path separators, at most 200 characters.
    """
    if not isinstance(value, str) or not value:
        raise InvalidNameError(f"{what} must be a non-empty string, got {value!r}")
    if "/" in value or "\\" in value:
        raise InvalidNameError(f"{what} {value!r} contains a path separator; use letters, digits and . _ = + -")
    if ".." in value:
        raise InvalidNameError(f"{what} {value!r} contains '..', which could escape the output directory")
    if len(value) > _MAX_NAME:
        raise InvalidNameError(f"{what} {value!r} is longer than {_MAX_NAME} characters")
    if not _NAME_RE.match(value):
        raise InvalidNameError(
            f"{what} {value!r} is not allowed: use letters, digits and . _ = + - "
            "and start with a letter or digit"
        )
    if not allow_underscore and "_" in value:
        raise InvalidNameError(f"{what} {value!r} must not contain '_'")
    return value


@dataclass(frozen=True, order=True)
class TrainingIteration:
    """A training point: epoch, update and sample counters; formats as ``E10_U100_S200``.

    Ordering compares (epoch, update, sample) so that later points sort after earlier ones.
    """

    epoch: int
    update: int
    sample: int

    def __post_init__(self) -> None:
        for field_name in ("epoch", "update", "sample"):
            value = getattr(self, field_name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"TrainingIteration.{field_name} must be an int >= 0, got {value!r}")

    def __str__(self) -> str:
        return f"E{self.epoch}_U{self.update}_S{self.sample}"

    @property
    def name(self) -> str:
        """The checkpoint name of this point, ``E{epoch}_U{update}_S{sample}``."""
        return str(self)

    @classmethod
    def parse(cls, text: str) -> TrainingIteration:
        """Parse ``E10_U100_S200``; raise InvalidNameError for anything else."""
        match = _ITER_RE.match(text) if isinstance(text, str) else None
        if not match:
            raise InvalidNameError(f"{text!r} is not a training point; expected E<epoch>_U<update>_S<sample>, e.g. E10_U100_S200")
        return cls(int(match.group(1)), int(match.group(2)), int(match.group(3)))

    def to_dict(self) -> dict[str, int]:
        """Noether's ``training_iteration`` dict: ``{epoch, update, sample}``."""
        return {"epoch": self.epoch, "update": self.update, "sample": self.sample}

    @classmethod
    def from_dict(cls, data: dict) -> TrainingIteration:
        """Inverse of :meth:`to_dict`; raises ConfigError when a counter is missing."""
        try:
            return cls(int(data["epoch"]), int(data["update"]), int(data["sample"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"training_iteration must have int epoch, update and sample, got {data!r}") from exc


@dataclass(frozen=True)
class PartialIteration:
    """One counter of a training point, as ``resume_checkpoint`` accepts it: E10, U100 or S200."""

    unit: str  # "E", "U" or "S"
    value: int

    def matches(self, it: TrainingIteration) -> bool:
        """True when ``it`` has this counter at this value."""
        return {"E": it.epoch, "U": it.update, "S": it.sample}[self.unit] == self.value

    def __str__(self) -> str:
        return f"{self.unit}{self.value}"


class _RefKind(enum.Enum):
    LATEST = "latest"
    LAST = "last"
    BEST = "best"
    ITERATION = "iteration"
    PARTIAL = "partial"


@dataclass(frozen=True)
class CheckpointRef:
    """What a ``checkpoint`` value names: an alias (latest, last, best.{metric}), a training
    point, or (only in ``resume_checkpoint``) one counter of a training point."""

    kind: _RefKind
    metric: str | None = None
    iteration: TrainingIteration | None = None
    partial: PartialIteration | None = None

    Kind = _RefKind

    @property
    def is_alias(self) -> bool:
        """True for latest, last and best.{metric}."""
        return self.kind in (_RefKind.LATEST, _RefKind.LAST, _RefKind.BEST)

    @property
    def alias_name(self) -> str:
        """The alias spelling as written: ``latest``, ``last`` or ``best.{metric}``."""
        if self.kind is _RefKind.BEST:
            return f"best.{self.metric}"
        if self.kind in (_RefKind.LATEST, _RefKind.LAST):
            return self.kind.value
        raise ValueError(f"{self} is not an alias")

    def __str__(self) -> str:
        if self.is_alias:
            return self.alias_name
        if self.kind is _RefKind.ITERATION:
            return str(self.iteration)
        return str(self.partial)

    @classmethod
    def latest(cls) -> CheckpointRef:
        """The ``latest`` alias."""
        return cls(_RefKind.LATEST)

    @classmethod
    def last(cls) -> CheckpointRef:
        """The ``last`` alias (end of training)."""
        return cls(_RefKind.LAST)

    @classmethod
    def best(cls, metric: str) -> CheckpointRef:
        """The ``best.{metric}`` alias."""
        return cls(_RefKind.BEST, metric=validate_name(metric, "metric name"))

    @classmethod
    def at(cls, iteration: TrainingIteration) -> CheckpointRef:
        """A concrete training point."""
        return cls(_RefKind.ITERATION, iteration=iteration)


def parse_checkpoint(text: object, what: str = "checkpoint") -> CheckpointRef:
    """Parse a full checkpoint name: latest, last, best.{metric} (or Noether's
    best_model.{metric}) or E{e}_U{u}_S{s}. Raises InvalidNameError otherwise."""
    if not isinstance(text, str) or not text:
        raise InvalidNameError(f"{what} must be a non-empty string such as latest, best.loss or E10_U100_S200, got {text!r}")
    if text == "latest":
        return CheckpointRef.latest()
    if text == "last":
        return CheckpointRef.last()
    for prefix in ("best.", NOETHER_BEST_PREFIX):
        if text.startswith(prefix):
            metric = text[len(prefix):]
            try:
                return CheckpointRef.best(metric)
            except InvalidNameError as exc:
                raise InvalidNameError(f"{what} {text!r}: {exc}") from None
    if _ITER_RE.match(text):
        return CheckpointRef.at(TrainingIteration.parse(text))
    raise InvalidNameError(
        f"{what} {text!r} is not valid: use latest, last, best.<metric> (e.g. best.accuracy) "
        "or a training point E<epoch>_U<update>_S<sample>"
    )


def parse_resume_checkpoint(text: object) -> CheckpointRef:
    """Parse ``resume_checkpoint``: latest, last, best.{metric}, or ONE of E10, U100, S200.

    The fully specified ``E10_U100_S200`` is refused with an error that names its parts.
    ``None`` or an empty value means ``latest``.
    """
    if text is None or text == "":
        return CheckpointRef.latest()
    if isinstance(text, str):
        full = _ITER_RE.match(text)
        if full:
            e, u, s = full.groups()
            raise ConfigError(
                f"resume_checkpoint {text!r} is a fully specified checkpoint name; "
                f"use one of its parts instead: E{e}, U{u} or S{s}"
            )
        partial = _PARTIAL_RE.match(text)
        if partial:
            return CheckpointRef(_RefKind.PARTIAL, partial=PartialIteration(partial.group(1), int(partial.group(2))))
    try:
        return parse_checkpoint(text, what="resume_checkpoint")
    except InvalidNameError as exc:
        raise ConfigError(
            f"resume_checkpoint {text!r} is not valid: use latest, last, best.<metric>, "
            "or one of E<epoch>, U<update>, S<sample> (e.g. E10)"
        ) from exc


# Noether's own spellings, read everywhere and written where Noether's tools must read them.
NOETHER_BEST_PREFIX = "best_model."
"""Noether's tag of a best checkpoint: ``best_model.{metric}`` (ours: ``best.{metric}``)."""
NOETHER_EMA_PREFIX = "ema="
"""Noether's model_info of EMA weights: ``ema={factor}`` (ours: ``ema_factor={factor}``)."""
EMA_PREFIX = "ema_factor="
NOETHER_RUN_CONFIG = "hp_resolved.yaml"
"""The resolved config Noether writes into a stage folder; ``noether-eval`` rebuilds the run from it."""


def normalize_model_info(model_info: str | None) -> str | None:
    """Validate ``model_info`` and map Noether's ``ema=X`` spelling to ``ema_factor=X``."""
    if model_info is None or model_info == "":
        return None
    validate_name(model_info, "model_info")
    if model_info.startswith(NOETHER_EMA_PREFIX):
        return EMA_PREFIX + model_info[len(NOETHER_EMA_PREFIX):]
    return model_info


def ema_factor_of(model_info: str | None) -> float | None:
    """The EMA factor a model_info names (``ema_factor=X`` or ``ema=X``), else None."""
    info = normalize_model_info(model_info)
    if info and info.startswith(EMA_PREFIX):
        try:
            return float(info[len(EMA_PREFIX):])
        except ValueError:
            return None
    return None


def noether_model_info(model_info: str | None) -> str | None:
    """The model_info as Noether spells it in file names (``ema_factor=X`` -> ``ema=X``)."""
    info = normalize_model_info(model_info)
    if info and info.startswith(EMA_PREFIX):
        return NOETHER_EMA_PREFIX + info[len(EMA_PREFIX):]
    return info


def noether_tag(ref: CheckpointRef) -> str:
    """The checkpoint tag Noether writes for an alias: ``latest``, ``last``, ``best_model.{metric}``."""
    if ref.kind is _RefKind.BEST:
        return f"{NOETHER_BEST_PREFIX}{ref.metric}"
    return ref.alias_name


def is_tag(checkpoint: str) -> bool:
    """True for a checkpoint part that names an alias (latest, last, best.x, best_model.x),
    as in Noether's tag files, rather than a training point."""
    try:
        return parse_checkpoint(checkpoint).is_alias
    except InvalidNameError:
        return False


def parse_checkpoint_tag(value: object, what: str = "checkpoint_tag") -> CheckpointRef:
    """Noether's ``checkpoint_tag``: a checkpoint name (latest, last, best_model.{metric},
    E10_U100_S200) or a dict with exactly one of epoch/update/sample (that counter, like
    ``resume_checkpoint: E10``) or all three (that training point)."""
    if isinstance(value, str):
        return parse_checkpoint(value, what)
    if not isinstance(value, dict) or not value or set(value) - {"epoch", "update", "sample"}:
        raise ConfigError(f"{what} must be a checkpoint name such as latest or best_model.loss, or a dict with "
                          f"epoch, update and/or sample; got {value!r}")
    try:
        counters = {k: int(v) for k, v in value.items() if v is not None}
    except (TypeError, ValueError):
        raise ConfigError(f"{what} {value!r}: epoch, update and sample must be integers") from None
    if len(counters) == 3:
        return CheckpointRef.at(TrainingIteration(counters["epoch"], counters["update"], counters["sample"]))
    if len(counters) != 1:
        raise ConfigError(f"{what} {value!r} must set exactly one of epoch, update, sample, or all three")
    (key, number), = counters.items()
    return CheckpointRef(_RefKind.PARTIAL, partial=PartialIteration(key[0].upper(), number))


class ArtifactKind(enum.Enum):
    """The three files of a Noether checkpoint."""

    MODEL = "model"
    OPTIM = "optim"
    TRAINER = "trainer"


class ArtifactFormat(enum.Enum):
    """How one artifact lies on storage; the value is what commit records store (kept as
    written since the first release: records already on disk name these)."""

    DCP = "dcp"
    """Sharded: a DCP directory with the artifact's name (``.metadata`` and shard files)."""
    CONSOLIDATED = "consolidated"
    """One ``torch.save`` file with the artifact's name, laid out as Noether writes it;
    also what Noether's own trainer writes (those have no commit record)."""

    @classmethod
    def parse(cls, value: object) -> ArtifactFormat:
        """The format named ``value`` (a member or its stored value); ConfigError otherwise."""
        if isinstance(value, cls):
            return value
        for member in cls:
            if member.value == value:
                return member
        raise ConfigError(f"artifact format {value!r} is not valid; use one of {', '.join(m.value for m in cls)}")


@dataclass(frozen=True)
class ArtifactName:
    """One artifact of a checkpoint: ``{model_name}[_{model_info}]_cp={checkpoint}_{kind}.th``."""

    model_name: str
    checkpoint: str
    kind: ArtifactKind
    model_info: str | None = None

    def __post_init__(self) -> None:
        validate_model_name(self.model_name)
        if self.model_info is not None:
            validate_name(self.model_info, "model_info")
            if self.kind is not ArtifactKind.MODEL:
                raise InvalidNameError(f"model_info is only allowed on model files, not on {self.kind.value} files")
        parse_checkpoint(self.checkpoint)

    def __str__(self) -> str:
        return format_artifact(self.model_name, self.checkpoint, self.kind, self.model_info)


def validate_model_name(model_name: object) -> str:
    """Validate a model name: a safe path component that does not contain ``_cp=``."""
    validate_name(model_name, "model_name")
    assert isinstance(model_name, str)
    if "_cp=" in model_name or model_name.startswith("cp="):
        raise InvalidNameError(f"model_name {model_name!r} must not contain 'cp=' (it separates the checkpoint part)")
    return model_name


def format_artifact(model_name: str, checkpoint: str, kind: ArtifactKind | str, model_info: str | None = None) -> str:
    """Format an artifact file name; ``model_info`` only for model files."""
    kind = ArtifactKind(kind)
    info = f"_{model_info}" if model_info else ""
    return f"{model_name}{info}_cp={checkpoint}_{kind.value}.th"


def parse_artifact(filename: str, model_name: str | None = None) -> ArtifactName:
    """Parse an artifact file name.

    Without ``model_name`` the split between model name and model info is ambiguous when
    names contain ``_``: the model info is taken to start at the first ``_``-separated
    part that contains ``=`` (``ema_factor=0.9999`` -> the part before ``ema``); pass the
    model name to avoid guessing. Noether's ``ema=X`` is read as ``ema_factor=X``.
    """
    match = _ARTIFACT_RE.match(filename)
    if not match:
        raise InvalidNameError(f"{filename!r} is not a Noether checkpoint file name ({{model_name}}[_{{model_info}}]_cp={{checkpoint}}_{{model|optim|trainer}}.th)")
    prefix, cp, kind = match.group("prefix"), match.group("cp"), ArtifactKind(match.group("kind"))
    if model_name is not None:
        if prefix == model_name:
            info = None
        elif prefix.startswith(model_name + "_"):
            info = prefix[len(model_name) + 1:]
        else:
            raise InvalidNameError(f"{filename!r} does not belong to model {model_name!r}")
        name = model_name
    else:
        parts = prefix.split("_")
        idx = next((i for i, p in enumerate(parts) if "=" in p), None)
        if idx is None or idx == 0:
            name, info = prefix, None
        else:
            # ema_factor=... : the '=' part may have been split off from its key ("ema", "factor=")
            start = idx - 1 if idx >= 2 and parts[idx].split("=")[0] == "factor" else idx
            name, info = "_".join(parts[:start]), "_".join(parts[start:])
    return ArtifactName(name, cp, kind, normalize_model_info(info))
