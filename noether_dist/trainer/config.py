"""The reference trainer's config: the root keys, the ``model:``, ``trainer:`` and
``checkpointer:`` blocks, and ``key=value`` overrides from the command line."""

from __future__ import annotations

import copy
import datetime as _dt
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import yaml

from ..config import CheckpointerConfig, check_known_keys
from ..errors import ConfigError

__all__ = ["ModelSettings", "TrainConfig", "TrainerSettings", "parse_overrides"]

ROOT_KEYS = {"output_dir", "run_id", "stage_name", "resume_run_id", "resume_stage_name", "resume_checkpoint",
             "auto_resume", "model", "trainer", "checkpointer"}
NAME_KEYS = ("output_dir", "run_id", "stage_name", "resume_run_id", "resume_stage_name", "resume_checkpoint",
             "model.name")
"""Keys whose values are names (strings), whatever YAML would make of them: ``run_id=12345``
(an int), ``run_id=2026-11-28`` (a date)."""
_VERBATIM_OVERRIDES = (*NAME_KEYS, "checkpointer.async_mode")
_UNNAMED_RUN = "config-check"
"""Stands for a run id that is drawn at start-up, where the checkpointer block is checked
before any process group exists."""


def _check_numbers(obj: Any, where: str) -> None:
    """ConfigError for a field with a numeric default whose value is not a number."""
    for f in fields(obj):
        default = f.default if f.default is not MISSING else None
        value = getattr(obj, f.name)
        if isinstance(default, (int, float)) and not isinstance(default, bool):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{where}.{f.name} must be a number, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class TrainerSettings:
    """The training loop's knobs (the ``trainer:`` block)."""

    epochs: int = 4
    """Full passes over the data set."""
    batch_size: int = 32
    """Global batch size (divisible by the world size)."""
    dataset_size: int = 512
    """Synthetic training samples."""
    test_size: int = 128
    """Synthetic test samples."""
    lr: float = 3e-3
    """Peak learning rate."""
    warmup_updates: int = 5
    """Linear warm-up length."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    ema_factors: list[float] = field(default_factory=lambda: [0.99])
    """One EMA copy per factor, saved as ``ema_factor=<f>``."""
    eval_every: int = 8
    """Updates between test evaluations (``loss.test``)."""
    checkpoint_every: int = 8
    """Updates between periodic checkpoints."""
    log_every: int = 8
    """Updates between progress lines."""
    seed: int = 0
    """Seed of data, init and dropout."""
    best_metrics: dict[str, str] = field(default_factory=lambda: {"loss.test": "min"})
    """Metrics that make ``best.<metric>`` checkpoints."""
    stop_after_updates: int | None = None
    """Stop early (without ``last``) after this many updates: to test interruptions."""
    step_delay_s: float = 0.0
    """Sleep per update: gives signals time to arrive in tests."""
    requeue_on_preempt: bool = True
    """After a preemption save, ``scontrol requeue`` the job when under SLURM."""

    def __post_init__(self) -> None:
        _check_numbers(self, "trainer")
        for name in ("epochs", "batch_size", "dataset_size", "test_size", "eval_every", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"trainer.{name} must be an int >= 1, got {value!r}")


@dataclass(frozen=True, kw_only=True)
class ModelSettings:
    """The ``model:`` block."""

    name: str = "mlp"
    """The ``{model_name}`` of the checkpoint files."""
    dim_in: int = 16
    hidden: int = 64
    dim_out: int = 4
    dropout: float = 0.1
    initializers: list[dict[str, Any]] = field(default_factory=list)
    """Initializers applied to a fresh model, e.g. PreviousRunInitializer."""

    def __post_init__(self) -> None:
        _check_numbers(self, "model")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """The root config, with the user's keys."""

    output_dir: str = "runs"
    run_id: str | None = None
    stage_name: str | None = None
    """Stage folder of this run; defaults to resume_stage_name."""
    resume_run_id: str | None = None
    resume_stage_name: str | None = None
    resume_checkpoint: str | None = None
    auto_resume: bool = False
    """Resume this run's own latest checkpoint when it has one (array jobs, requeue)."""
    model: ModelSettings = field(default_factory=ModelSettings)
    trainer: TrainerSettings = field(default_factory=TrainerSettings)
    checkpointer: dict[str, Any] = field(default_factory=dict)
    """The ``checkpointer:`` block: any CheckpointerConfig field except those the trainer
    decides (see :meth:`checkpointer_config`), e.g. async_mode, timeout_s, storage, retention."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a root mapping; unknown keys raise with the closest valid key. The
        checkpointer block is checked here too, before any process group exists."""
        check_known_keys(data, ROOT_KEYS, "the root config")
        data = {key: _as_name(key, value) if key in NAME_KEYS else value for key, value in data.items()}
        model = dict(data.pop("model", None) or {})
        if "name" in model:
            model["name"] = _as_name("model.name", model["name"])
        trainer = dict(data.pop("trainer", None) or {})
        check_known_keys(model, {f.name for f in fields(ModelSettings)} | {"kind"}, "model")
        model.pop("kind", None)
        check_known_keys(trainer, {f.name for f in fields(TrainerSettings)}, "trainer")
        ck = dict(data.pop("checkpointer", None) or {})
        config = cls(model=ModelSettings(**model), trainer=TrainerSettings(**trainer), checkpointer=ck, **data)
        config.checkpointer_config(config.run_id or _UNNAMED_RUN)
        return config

    @property
    def save_stage_name(self) -> str | None:
        """The stage this run saves into: ``stage_name``, by default ``resume_stage_name``."""
        return self.stage_name or self.resume_stage_name

    def checkpointer_config(self, run_id: str) -> CheckpointerConfig:
        """The CheckpointerConfig of this run (``run_id``: the one it runs under): the
        ``checkpointer:`` block plus what the trainer decides itself: ``output_dir``,
        ``stage_name`` (:attr:`save_stage_name`), ``model_name`` (``model.name``) and
        ``best_metrics`` (``trainer.best_metrics``)."""
        return CheckpointerConfig.from_block(self.checkpointer, where="checkpointer", decided={
            "output_dir": (self.output_dir, "the root output_dir"), "run_id": (run_id, "the root run_id"),
            "stage_name": (self.save_stage_name, "the root stage_name"), "model_name": (self.model.name, "model.name"),
            "best_metrics": (self.trainer.best_metrics, "trainer.best_metrics")})

    @property
    def timeout_s(self) -> float:
        """Upper bound of every collective wait: ``checkpointer.timeout_s``, by default
        CheckpointerConfig's (``NOETHER_DIST_TIMEOUT_S`` or 600 s)."""
        return self.checkpointer_config(self.run_id or _UNNAMED_RUN).timeout_s


def _as_name(key: str, value: Any) -> Any:
    """A name from a config value: YAML's ints and dates back to the text the user wrote."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ConfigError(f"{key} {value!r} was read as a {type(value).__name__}; names are strings: quote it "
                          f"({key}: \"...\")")
    if isinstance(value, (int, _dt.date)):
        return str(value)
    return value


def parse_overrides(config: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``a.b=value`` overrides (values parsed as YAML) to a nested config dict. Names
    (``run_id=12345``) and ``checkpointer.async_mode=off`` are taken verbatim, as text."""
    out = copy.deepcopy(config)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. trainer.epochs=2)")
        key, raw = item.split("=", 1)
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part} is not a mapping")
        if key in _VERBATIM_OVERRIDES:
            node[parts[-1]] = None if raw in ("", "null", "~") else raw
        else:
            try:
                node[parts[-1]] = yaml.safe_load(raw)
            except yaml.YAMLError as exc:
                where = getattr(exc, "problem_mark", None)
                raise ConfigError(f"override {item!r}: the value is not valid YAML ({getattr(exc, 'problem', None) or exc}"
                                  + (f" at column {where.column + 1}" if where is not None else "") + ")") from None
    return out
