"""The reference trainer's loop: build, resume or initialise, train, checkpoint, summarise."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import time
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from ..config import ResumeConfig
from ..dist.comm import Comm
from ..dist.preemption import PreemptionWatcher, requeue_slurm_job
from ..errors import ConfigError, UploadError
from ..format.layout import StageLayout, default_run_id, join_url
from ..format.names import TrainingIteration
from ..format.trainer_keys import CALLBACKS_KEY, DATA_POSITION_KEY, GRAD_SCALER_KEY, RNG_KEY
from ..initializers import build_initializers
from ..io.storage import open_storage
from ..resume import resume
from ..stage import peer
from ..save import Checkpointer
from ..stage.commit import list_commits
from ..state import DataPosition, callback_states, capture_rng, load_callback_states, restore_rng
from .config import TrainConfig
from .model import build_model, epoch_order, shard_model, synthetic_data

__all__ = ["LossHistory", "TrainLoop", "state_digest"]

log = logging.getLogger("noether_dist.trainer")
_SCHEDULER_KEY, _WORLD_SIZE_KEY = "scheduler", "world_size"
"""The reference trainer's own keys of the trainer state (the library never reads them)."""


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


class TrainLoop:
    """One training run of the reference trainer (every method is collective)."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        t, m = config.trainer, config.model
        self.comm = Comm(config.timeout_s)
        self.rank, self.world = self.comm.rank, self.comm.world_size
        if t.batch_size % self.world:
            raise ConfigError(f"trainer.batch_size {t.batch_size} must be divisible by the world size {self.world}")
        self.device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
        self.run_id = config.run_id or self.comm.broadcast(default_run_id() if self.comm.is_coordinator else None)
        ck_config = config.checkpointer_config(self.run_id)
        self.stage_name, self.timeout_s = ck_config.stage_name, ck_config.timeout_s
        self.storage_options = ck_config.storage
        self.model = build_model(m, t.seed).to(self.device)
        self.emas = {f"ema_factor={f}": copy.deepcopy(self.model) for f in t.ema_factors}
        if self.world > 1:
            shard_model(self.model)
            for ema in self.emas.values():
                shard_model(ema)
        for ema in self.emas.values():
            ema.requires_grad_(False)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
        self.updates_per_epoch = t.dataset_size // t.batch_size
        self.total_updates = t.epochs * self.updates_per_epoch
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=False)
        self.x, self.y, self.x_test, self.y_test = synthetic_data(m, t)
        self.callbacks = [LossHistory()]
        self.update, self.sample, self.position = 0, 0, DataPosition(0, 0)
        self.checkpointer = Checkpointer(ck_config)
        self.tiers = self.checkpointer.tiers
        self.resumed: dict[str, Any] | None = None
        self.upload_errors: list[str] = []

    def _lr_factor(self, update: int) -> float:
        warm = self.config.trainer.warmup_updates
        if update < warm:
            return (update + 1) / warm
        progress = (update - warm) / max(1, self.total_updates - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    @property
    def iteration(self) -> TrainingIteration:
        """The current training point (epoch = completed epochs)."""
        return TrainingIteration(self.update // self.updates_per_epoch, self.update, self.sample)

    # -- resume ----------------------------------------------------------------------
    def _resume_config(self) -> ResumeConfig | None:
        cfg = self.config
        if cfg.auto_resume:
            own = StageLayout(cfg.output_dir, self.run_id, self.stage_name)
            storage = open_storage(cfg.output_dir, self.storage_options)
            topology = self.checkpointer.topology
            if topology is not None:  # a replaced coordinator node gets its (local) records back first
                peer.restore_records(self.comm, topology, self.checkpointer.storage, self.checkpointer.layout)
            has_own = self.comm.broadcast_from_coordinator(lambda: bool(list_commits(storage, own)))
            if self.tiers is not None:  # any rank's local tier counts too
                local = StageLayout(self.tiers.local.dir, self.run_id, self.stage_name)
                has_own = any(self.comm.all_gather(has_own or bool(list_commits(open_storage(local.output_dir), local))))
            if has_own:
                return ResumeConfig(output_dir=cfg.output_dir, resume_run_id=self.run_id,
                                    resume_stage_name=self.stage_name, storage=self.storage_options)
        root = {"output_dir": cfg.output_dir, "resume_run_id": cfg.resume_run_id,
                "resume_stage_name": cfg.resume_stage_name, "stage_name": cfg.stage_name,
                "resume_checkpoint": cfg.resume_checkpoint}
        return ResumeConfig.from_root_config(root, storage=self.storage_options)

    def _restore(self, source: ResumeConfig) -> None:
        result = resume(source, model=self.model, optimizer=self.optimizer, ema=self.emas,
                        model_name=self.config.model.name, timeout_s=self.timeout_s,
                        local_dir=self.tiers.local.dir if self.tiers is not None else None,
                        replicate=self.checkpointer.config.replicate)
        state = result.trainer_state
        self.update, self.sample = result.iteration.update, result.iteration.sample
        self.position = DataPosition.from_dict(state[DATA_POSITION_KEY])
        self.scheduler.load_state_dict(state[_SCHEDULER_KEY])
        self.scaler.load_state_dict(state[GRAD_SCALER_KEY])
        missing = load_callback_states(self.callbacks, state.get(CALLBACKS_KEY, {}))
        if missing:
            log.warning("no saved state for callbacks %s: they start fresh", missing)
        if result.rank_state is not None and state.get(_WORLD_SIZE_KEY) == self.world:
            restore_rng(result.rank_state[RNG_KEY])
        else:  # another world size: a fresh, reproducible stream per rank
            torch.manual_seed(self.config.trainer.seed * 7919 + self.rank * 104729 + self.update)
        self.resumed = {"checkpoint": result.checkpoint, "tier": result.tier}
        log.info("resumed from %s/%s at %s%s", source.resume_run_id, source.resume_stage_name or "-", result.checkpoint,
                 f" ({result.tier} tier)" if result.tier else "")

    # -- steps ------------------------------------------------------------------------
    def _batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.config.trainer
        order = epoch_order(t.seed, self.position.epoch, t.dataset_size)
        start = self.position.batch_in_epoch * t.batch_size
        per_rank = t.batch_size // self.world
        idx = order[start + self.rank * per_rank: start + (self.rank + 1) * per_rank]
        return self.x[idx].to(self.device), self.y[idx].to(self.device)

    def _step(self) -> float:
        self.model.train()
        x, y = self._batch()
        loss = nn.functional.mse_loss(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        with torch.no_grad():
            for info, ema in self.emas.items():
                factor = float(info.split("=", 1)[1])
                for pe, pm in zip(ema.parameters(), self.model.parameters()):
                    pe.mul_(factor).add_(pm.detach(), alpha=1 - factor)
        self.update += 1
        self.sample += self.config.trainer.batch_size
        nxt = self.position.batch_in_epoch + 1
        self.position = DataPosition(self.position.epoch + 1, 0) if nxt == self.updates_per_epoch else \
            DataPosition(self.position.epoch, nxt)
        return float(loss.detach())

    @torch.no_grad()
    def _evaluate(self) -> float:
        self.model.eval()
        xs, ys = self.x_test.tensor_split(self.world)[self.rank], self.y_test.tensor_split(self.world)[self.rank]
        err = nn.functional.mse_loss(self.model(xs.to(self.device)), ys.to(self.device), reduction="sum")
        parts = self.comm.all_gather((float(err), ys.numel()))
        return sum(p[0] for p in parts) / sum(p[1] for p in parts)

    def _save(self, metrics: dict[str, float], last: bool = False, durable: bool | None = None) -> None:
        common = {DATA_POSITION_KEY: self.position.to_dict(), _SCHEDULER_KEY: self.scheduler.state_dict(),
                  GRAD_SCALER_KEY: self.scaler.state_dict(), CALLBACKS_KEY: callback_states(self.callbacks),
                  _WORLD_SIZE_KEY: self.world}
        try:
            self.checkpointer.save(self.iteration, model=self.model, optimizer=self.optimizer, ema=self.emas,
                                   trainer_state=common, rank_state={RNG_KEY: capture_rng()}, metrics=metrics,
                                   last=last, durable=durable)
        except UploadError as exc:
            # this point is saved on the local tier; the next durable point uploads again
            self.upload_errors.append(str(exc))
            log.error("%s; training goes on", exc)

    def _due(self) -> bool:
        """A periodic save now: every trainer.checkpoint_every updates, or with tiers on the
        local tier's schedule (tiers.local.every_updates)."""
        if self.tiers is not None:
            return self.checkpointer.due(self.iteration)
        return self.update % self.config.trainer.checkpoint_every == 0

    def _wait(self) -> None:
        try:
            self.checkpointer.wait()
        except UploadError as exc:
            self.upload_errors.append(str(exc))
            log.error("%s", exc)

    # -- the run ----------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train to the end (or to a preemption / stop_after_updates); return the summary."""
        t = self.config.trainer
        watcher = PreemptionWatcher(self.comm)  # first: a signal during resume must not be lost
        source = self._resume_config()
        if source is not None:
            self._restore(source)
        else:
            for init in build_initializers(self.config.model.initializers):
                init.apply(self.model, output_dir=self.config.output_dir, timeout_s=self.timeout_s)
            torch.manual_seed(t.seed * 7919 + self.rank * 104729)
        preempted = stopped = False
        last_saved = None
        started, start_update = time.monotonic(), self.update
        try:
            while self.update < self.total_updates:
                loss = self._step()
                for cb in self.callbacks:
                    cb.on_update(loss)
                metrics: dict[str, float] = {}
                if self.update % t.eval_every == 0:
                    metrics["loss.test"] = self._evaluate()
                    for cb in self.callbacks:
                        cb.on_eval(metrics["loss.test"])
                if self.update % t.log_every == 0 and self.rank == 0:
                    rate = (self.update - start_update) / max(1e-9, time.monotonic() - started)
                    log.info("%s loss %.5f%s lr %.2e (%.1f updates/s)", self.iteration, loss,
                             f" test {metrics['loss.test']:.5f}" if metrics else "", self.scheduler.get_last_lr()[0], rate)
                if self._due():
                    self._save(metrics)
                    last_saved = self.update
                if t.step_delay_s:
                    time.sleep(t.step_delay_s)
                if watcher.agreed():
                    preempted = True
                    break
                if t.stop_after_updates is not None and self.update >= t.stop_after_updates:
                    stopped = True
                    break
            if preempted:
                log.warning("preemption signal: saving %s and stopping", self.iteration)
                if last_saved != self.update:
                    self._save({}, durable=True)  # a requeued job may land on other nodes
                self._wait()
                if t.requeue_on_preempt and self.comm.is_coordinator:
                    requeue_slurm_job()
            elif not stopped:
                self._save({"loss.test": self._evaluate()}, last=True)
            self._wait()
            self.checkpointer.close()
        finally:
            watcher.restore()
        finished = not preempted and not stopped
        digest = state_digest(self.model, self.optimizer, self.emas)
        summary = {"run_id": self.run_id, "stage_name": self.stage_name, "checkpoint": str(self.iteration),
                   "finished": finished, "preempted": preempted, "stopped": stopped, "world_size": self.world, "digest": digest,
                   "callbacks": callback_states(self.callbacks), "resumed": self.resumed}
        if self.tiers is not None:
            summary["upload_errors"] = self.upload_errors
        if self.comm.is_coordinator:
            storage = open_storage(self.config.output_dir, self.storage_options)
            path = join_url(StageLayout(self.config.output_dir, self.run_id, self.stage_name).stage_dir, "summary.json")
            storage.replace(path, json.dumps(summary, indent=1, sort_keys=True).encode())
            log.info("%s at %s; summary in %s", "finished" if finished else "stopped", self.iteration, path)
        return summary
