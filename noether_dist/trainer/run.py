"""The reference trainer: ``python -m noether_dist.trainer --config FILE [key=value ...]``.

A small MLP on synthetic regression data (no download), FSDP2-sharded when there is more
than one rank, AdamW with warm-up and cosine decay, EMA copies, a test metric, periodic
checkpoints, ``best.<metric>``, ``last`` at the end, full resumption (``resume_run_id``...
or ``auto_resume``), preemption by signal, and a JSON summary with digests of the final
model, optimizer and EMA state. Runs as one process or under torchrun / srun; CUDA+NCCL
when a GPU is there, else CPU+gloo.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import hashlib
import logging
import os
import sys
from dataclasses import MISSING, dataclass, field, fields
from typing import Any

import torch
import yaml
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from ..dist.comm import init_distributed
from ..config import CheckpointerConfig, check_known_keys, load_yaml
from ..errors import (AmbiguousCheckpointError, CheckpointNotFoundError, ConfigError, InvalidNameError,
                     NoetherDistError)
from ..logs import setup_logging

__all__ = ["TrainConfig", "main", "run", "state_digest"]

log = logging.getLogger("noether_dist.trainer")
ROOT_KEYS = {"output_dir", "run_id", "stage_name", "resume_run_id", "resume_stage_name", "resume_checkpoint",
             "auto_resume", "model", "trainer", "checkpointer"}
NAME_KEYS = ("output_dir", "run_id", "stage_name", "resume_run_id", "resume_stage_name", "resume_checkpoint",
             "model.name")
"""Keys whose values are names (strings), whatever YAML would make of them: ``run_id=12345``
(an int), ``run_id=2026-11-28`` (a date)."""
_VERBATIM_OVERRIDES = (*NAME_KEYS, "checkpointer.async_mode")


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
    """async_mode, timeout_s, thread_count, storage, node_local, retention."""

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a root mapping; unknown keys raise with the closest valid key."""
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
        check_known_keys(ck, {"async_mode", "timeout_s", "thread_count", "storage", "node_local", "retention"},
                         "checkpointer")
        # Validate the block now, before any process group exists (output_dir and run_id are
        # checked on their own).
        CheckpointerConfig.from_dict({**ck, "output_dir": "config-check", "run_id": "config-check"})
        return cls(model=ModelSettings(**model), trainer=TrainerSettings(**trainer), checkpointer=ck, **data)


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


def build_model(settings: ModelSettings, seed: int) -> nn.Module:
    """The MLP, initialised from ``seed`` (the same on every rank)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(settings.dim_in, settings.hidden), nn.GELU(), nn.Dropout(settings.dropout),
                         nn.Linear(settings.hidden, settings.hidden), nn.GELU(),
                         nn.Linear(settings.hidden, settings.dim_out))


def shard_model(model: nn.Module) -> nn.Module:
    """FSDP2: shard each Linear, then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def synthetic_data(settings: ModelSettings, trainer: TrainerSettings) -> tuple[torch.Tensor, ...]:
    """Train and test sets from a fixed random teacher network: the same on every rank."""
    g = torch.Generator().manual_seed(trainer.seed + 12345)
    teacher = torch.randn(settings.dim_in, settings.dim_out, generator=g)
    x = torch.randn(trainer.dataset_size + trainer.test_size, settings.dim_in, generator=g)
    y = torch.tanh(x @ teacher) + 0.05 * torch.randn(x.shape[0], settings.dim_out, generator=g)
    n = trainer.dataset_size
    return x[:n], y[:n], x[n:], y[n:]


def epoch_order(seed: int, epoch: int, size: int) -> torch.Tensor:
    """The sample order of one epoch: depends only on seed and epoch (resumable mid-epoch)."""
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


def state_digest(model: nn.Module, optimizer: torch.optim.Optimizer, emas: dict[str, nn.Module]) -> dict[str, str]:
    """SHA-256 of the full (unsharded) model, optimizer and EMA states (a collective)."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=False)

    def digest(obj: Any, h: Any, prefix: str = "") -> None:
        if isinstance(obj, dict):
            for key in sorted(obj, key=str):
                digest(obj[key], h, f"{prefix}{key}.")
        elif isinstance(obj, (list, tuple)):
            for i, item in enumerate(obj):
                digest(item, h, f"{prefix}{i}.")
        elif isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous().reshape(-1)
            h.update(f"{prefix}{t.dtype}{list(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        else:
            h.update(f"{prefix}{obj!r}".encode())

    out = {}
    for name, obj in (("model", get_model_state_dict(model, options=opts)),
                      ("optimizer", get_optimizer_state_dict(model, optimizer, options=opts))):
        h = hashlib.sha256()
        digest(obj, h)
        out[name] = h.hexdigest()
    for info, ema in emas.items():
        h = hashlib.sha256()
        digest(get_model_state_dict(ema, options=opts), h)
        out[f"ema:{info}"] = h.hexdigest()
    return out


class LossHistory:
    """A callback that keeps the running training loss and the best test loss."""

    name = "loss_history"

    def __init__(self) -> None:
        self.ema_loss: float | None = None
        self.best_test: float | None = None
        self.evaluations = 0

    def on_update(self, loss: float) -> None:
        self.ema_loss = loss if self.ema_loss is None else 0.9 * self.ema_loss + 0.1 * loss

    def on_eval(self, test_loss: float) -> None:
        self.evaluations += 1
        self.best_test = test_loss if self.best_test is None else min(self.best_test, test_loss)

    def state_dict(self) -> dict[str, Any]:
        return {"ema_loss": self.ema_loss, "best_test": self.best_test, "evaluations": self.evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ema_loss, self.best_test, self.evaluations = state["ema_loss"], state["best_test"], state["evaluations"]


def run(config: TrainConfig) -> dict[str, Any]:
    """Train (resuming when configured) and return the summary (also written as JSON)."""
    from .loop import TrainLoop

    return TrainLoop(config).run()


_USAGE_ERRORS = (ConfigError, InvalidNameError, CheckpointNotFoundError, AmbiguousCheckpointError)


def _reports_errors() -> bool:
    """True on the process that prints a failure: the first on each node (every rank raises
    the same error, so one line per node says it)."""
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    return local.strip() in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point. A failure of the library or the config ends in one line on
    the first process of each node and exit code 2 (bad config or input) or 1 (a failure
    while running); a traceback only with ``--debug`` (or ``--log-level debug``)."""
    parser = argparse.ArgumentParser(prog="python -m noether_dist.trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file with the root config")
    parser.add_argument("--debug", action="store_true", help="on an error, log the traceback on every rank")
    parser.add_argument("--log-level", default=None, type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level (default NOETHER_DIST_LOG_LEVEL or INFO); DEBUG also logs tracebacks")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.epochs=2 run_id=abc")
    args = parser.parse_args(argv)
    level = "DEBUG" if args.debug and not args.log_level else args.log_level
    setup_logging(level=level)
    try:
        config = TrainConfig.from_dict(parse_overrides(load_yaml(args.config), args.overrides))
        env = init_distributed(timeout_s=config.checkpointer.get("timeout_s"))
        setup_logging(env.rank, level=level)
        summary = run(config)
    except NoetherDistError as exc:
        traceback = args.debug or logging.getLogger().isEnabledFor(logging.DEBUG)
        if traceback:
            log.error("%s: %s", type(exc).__name__, exc, exc_info=exc)
        elif _reports_errors():
            log.error("%s: %s", type(exc).__name__, " ".join(part.strip() for part in str(exc).splitlines()))
        return 2 if isinstance(exc, _USAGE_ERRORS) else 1
    return 0 if summary.get("finished") or summary.get("preempted") or summary.get("stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
