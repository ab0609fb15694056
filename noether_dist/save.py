"""Checkpointer: rank-aware sharded save under Noether names, committed atomically."""

from __future__ import annotations

import copy
import logging
import math
import time
from concurrent.futures import Future, ThreadPoolExecutor
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from .io import dcp_io
from .dist.comm import Comm
from .format.records import AliasRecord, ArtifactRecord, CommitRecord
from .stage.commit import move_aliases, publish, read_alias, read_commit
from .config import AsyncMode, CheckpointerConfig, Replicate
from .errors import AliasUpdateError, CommitError, ConfigError, NoetherDistError
from .format.layout import StageLayout
from .io.dcp_io import DCP_COORDINATOR
from .io.mirror import mirror_from
from .stage.retention import prune
from .stage import peer
from .dist.topology import NodeTopology
from .dist.spawn_check import check_process_mode
from .tiers import DurableUploader, local_tier_config
from .format.names import (ArtifactFormat, ArtifactKind, TrainingIteration, format_artifact, normalize_model_info,
                           parse_checkpoint)
from .format.trainer_keys import TRAINER_COMMON_KEY, common_entry, trainer_rank_key
from .io.statedict import SaveStaging, model_state, optimizer_state, pack_object
from .io.storage import Storage, open_storage

__all__ = ["Checkpointer", "SaveResult", "AliasUpdateError"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SaveResult:
    """What a save committed: the record and the aliases moved to it."""

    iteration: TrainingIteration
    record: CommitRecord
    aliases: tuple[str, ...] = ()
    reused_existing: bool = False
    """True when this training point had already committed (e.g. after resuming from an
    older checkpoint): the existing checkpoint was kept and nothing was rewritten."""


@dataclass
class _Artifact:
    name: str
    kind: ArtifactKind
    model_info: str | None
    state: dict[str, Any]
    packed: bool = True
    """False for a trainer state captured as a snapshot of its objects, packed into tensors
    later (by the writer thread) with :meth:`_Plan.packed`."""

    @property
    def slot(self) -> str:
        """What stays the same from save to save (the name holds the training point)."""
        return f"{self.kind.value}:{self.model_info or ''}"


@dataclass
class _Plan:
    iteration: TrainingIteration
    artifacts: list[_Artifact]
    metrics: dict[str, float] = field(default_factory=dict)
    aliases: tuple[str, ...] = ("latest",)

    def packed(self) -> _Plan:
        """This plan with every artifact's objects packed into tensors (``pack_object``)."""
        arts = [art if art.packed else _Artifact(art.name, art.kind, art.model_info,
                                                 {key: pack_object(obj) for key, obj in art.state.items()})
                for art in self.artifacts]
        return _Plan(self.iteration, arts, self.metrics, self.aliases)


class Checkpointer:
    """Saves model, optimizer, EMA models and trainer state at a training point.

    Every save is a collective: all ranks call :meth:`save` with the same training point.
    The protocol, in order:

    1. every rank captures its state dicts; the ranks agree that all succeeded (for an
       asynchronous save, on the writer thread, after the caller's copy);
    2. the coordinator (rank 0, or ``coordinator_rank``) checks that the point has not
       committed yet and removes what an earlier, uncommitted save of the same point left;
    3. every rank writes its shards of each artifact with DCP (a DCP directory per Noether
       name; replicated tensors once), recording size and CRC32 of each file it writes;
    4. the ranks exchange their reports; if any rank failed, every rank raises
       :class:`CommitError` and nothing is committed;
    5. the coordinator points ``latest`` at the new point, writes the commit record (once,
       never overwritten), then moves ``last`` and ``best.<metric>`` when they apply. A
       ``latest`` that names an uncommitted point is skipped by selection, so a crash at
       any moment leaves ``latest`` resolving to the newest committed checkpoint. If
       moving ``last`` or ``best.<metric>`` fails after the record is written, every rank
       raises :class:`AliasUpdateError`: the checkpoint has committed.

    A failure at any step leaves earlier committed checkpoints and aliases untouched.

    ``process_group``: save on a subgroup (a pipeline stage, a replica group of HSDP)
    instead of the default group; then "every rank" above means every rank of that group,
    the coordinator is its first rank, DCP writes on the same ranks, and the record's world
    size is the group's. Ranks outside it take no part: two subgroups can save to their own
    stages at the same time. ``coordinator_rank`` (a global rank of the group) names another
    coordinator. Two tiers and the process async mode need the default group.
    """

    def __init__(self, config: CheckpointerConfig, *, storage: Storage | None = None,
                 process_group: Any = None, coordinator_rank: int | None = None) -> None:
        tiered = config if config.tiers is not None else None
        if tiered is not None:  # saves go to the local tier; DurableUploader uploads to output_dir
            config = local_tier_config(tiered)
        self.config = config
        self.layout = StageLayout(config.output_dir, config.run_id, config.stage_name)
        self.storage = open_storage(config.output_dir, config.storage) if tiered or storage is None else storage
        self.comm = Comm(config.timeout_s, process_group=process_group, coordinator_rank=coordinator_rank)
        if not self.comm.is_default_group:
            # DCP's checkpoint process and the durable tier's uploads form their groups over
            # the whole job: neither follows a subgroup.
            if tiered is not None:
                raise ConfigError("tiers need the default process group; a Checkpointer on a process_group "
                                  "subgroup saves to one tier (node_local with replicate: peer, or shared storage)")
            if config.async_mode is AsyncMode.PROCESS:
                raise ConfigError("async_mode 'process' needs the default process group; use 'thread' "
                                  "with a process_group subgroup")
        self.comm.broadcast_from_coordinator(lambda: self.storage.check_root(config.output_dir))
        self.tiers = tiered.tiers if tiered is not None else None
        """The two tiers' settings, None for one tier."""
        self.durable: DurableUploader | None = None
        """The durable tier (``tiers``), else None. ``storage`` is its store then."""
        if tiered is not None:
            self.durable = DurableUploader(tiered, self.storage, self.layout, self.comm, storage=storage)
        self._pending: Future[SaveResult] | None = None
        self.last_stall_cpu_s: float | None = None
        """CPU seconds the caller's thread spent in that stall (``time.thread_time``): the
        work itself, without the time the thread was waiting or not scheduled."""
        self.last_stall_s: float | None = None
        """Seconds the last asynchronous save blocked the caller after the previous save had
        finished: capturing the state dicts and copying them into staging memory (no collective)."""
        self.topology: NodeTopology | None = None
        """With ``node_local``: which ranks share a node (their leader writes the mirrored
        files) and, with ``replicate: peer``, which node keeps whose copies."""
        if config.node_local:
            self.topology = NodeTopology.gather(self.comm)
        if config.replicate is Replicate.PEER:
            if self.topology.peer_node() is None and self.comm.is_coordinator:
                log.warning("replicate: peer has no effect: the job runs on one node, which has no peer; "
                            "losing this node's disk loses its local checkpoints")
        if config.async_mode is AsyncMode.PROCESS:
            self.comm.run_everywhere(check_process_mode)
        if config.async_mode is not AsyncMode.OFF:
            self._background = _Background(config, process_group, coordinator_rank)

    # -- public --------------------------------------------------------------------
    def save(
        self,
        iteration: TrainingIteration,
        *,
        model: nn.Module | dict[str, Any],
        optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
        ema: Mapping[str, nn.Module | dict[str, Any]] | None = None,
        trainer_state: dict[str, Any] | None = None,
        rank_state: dict[str, Any] | None = None,
        metrics: Mapping[str, float] | None = None,
        last: bool = False,
        aliases: Sequence[str] = (),
        durable: bool | None = None,
    ) -> SaveResult | Future[SaveResult]:
        """Save and commit one checkpoint at ``iteration`` (collective).

        Synchronous mode returns the SaveResult. Asynchronous modes return once the state
        is copied into staging memory (the values written are those of this moment) and
        hand back a Future; writing, commit and aliases run in the background, at most one
        save at a time (a new save first waits for the previous one). The call itself takes
        part in no collective (the ranks agree that each one staged its state on the writer
        thread), so a failure to capture or stage the state, like a background failure, is
        raised on every rank at the next ``save``, ``wait`` or ``close``; arguments that are
        wrong in themselves (the iteration, an alias, a model type) raise ConfigError at once.

        ``ema`` maps model_info (e.g. ``ema_factor=0.9999``) to an EMA model;
        ``trainer_state`` is the same on every rank (the coordinator's is kept);
        ``rank_state`` is this rank's own (RNG, data position); ``metrics`` (the coordinator's) decide the
        ``best.<metric>`` aliases configured in ``best_metrics``; ``last=True`` also moves
        the ``last`` alias (end of training). ``aliases`` names further aliases (``last``,
        ``best.<metric>``) to point at this checkpoint unconditionally: the caller has already
        decided (e.g. Noether's BestCheckpointCallback). Raises on every rank alike on failure.

        With ``tiers`` the point is saved to the local tier as above, and uploaded to the
        durable tier in the background when ``durable`` is True, or, with ``durable=None``,
        when it is due (``tiers.durable.every_updates``) or ``last``; such a save first waits
        for the upload in flight. A failed upload is raised (:class:`UploadError`) on every
        rank at the next ``save`` (after that save's local part), ``wait`` or ``close``.
        """
        upload = self.durable is not None and (
            durable if durable is not None else (last or self.durable.due(iteration)))
        if self.durable is not None and upload and self.durable.busy:
            log.info("save %s waits for the upload in flight (at most one upload at a time)", iteration)
        upload_error = self.durable.collect(self.comm, block=upload) if self.durable is not None else None
        result, plan = self._save_here(iteration, model, optimizer, ema, trainer_state, rank_state, metrics, last,
                                       aliases)
        if upload:
            self.durable.start(result, plan.iteration, plan.aliases, plan.metrics)
        if upload_error is not None:
            raise upload_error
        return result

    def _save_here(self, iteration, model, optimizer, ema, trainer_state, rank_state, metrics, last, aliases
                   ) -> tuple[SaveResult | Future[SaveResult], _Plan]:
        if self.config.async_mode is AsyncMode.OFF:
            plan = self.comm.run_everywhere(lambda: self._capture(iteration, model, optimizer, ema, trainer_state,
                                                        rank_state, metrics, last, aliases))
            return self._write_and_commit(plan, self.comm), plan
        if self._pending is not None and not self._pending.done():
            log.info("save %s waits for the previous save to finish (at most one save in flight)", iteration)
        self._wait_here()
        started, started_cpu = time.perf_counter(), time.thread_time()
        background = self._background
        # What depends on the arguments alone is checked here, the same on every rank. The
        # rest (capture, staging copy) may fail on some ranks only: the ranks agree on it on
        # the writer thread, not here, so the caller waits for no other rank and no
        # collective; such a failure is raised on every rank at the next save, wait or close.
        _check_request(iteration, model, optimizer, ema, aliases)
        try:
            plan, failure = background.stage(self._capture(
                iteration, model, optimizer, ema, trainer_state, rank_state, metrics, last, aliases,
                pack=background.process_mode)), None  # thread mode packs the trainer state on the writer thread
        except Exception as exc:  # noqa: BLE001 - agreed on and raised on every rank by the writer
            plan, failure = _Plan(iteration, []), exc
        if not background.process_mode:  # groups are made on this thread, not the writer's; the count is the arguments'
            background.comm.parallel_groups(2 + len(ema or {}) + (optimizer is not None))
        self.last_stall_s = time.perf_counter() - started
        self.last_stall_cpu_s = time.thread_time() - started_cpu

        def write() -> SaveResult:
            # packing inside the agreement: an object that cannot be packed fails every rank alike
            staged = background.comm.run_everywhere(lambda: _staged(plan, failure).packed())
            return self._write_and_commit(staged, background.comm)

        self._pending = background.submit(write)
        return self._pending, plan

    def due(self, iteration: TrainingIteration) -> bool:
        """With ``tiers``: True when the local tier's schedule saves at ``iteration``
        (``tiers.local.every_updates``). Without tiers every point is due: the caller decides."""
        return self.tiers is None or iteration.update % self.tiers.local.every_updates == 0

    def prepare(
        self,
        *,
        model: nn.Module | dict[str, Any],
        optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
        ema: Mapping[str, nn.Module | dict[str, Any]] | None = None,
    ) -> None:
        """Allocate the staging memory of asynchronous saves now, once the model, optimizer
        and EMA models exist (collective): every later save copies into these buffers
        (pinned on CUDA), so that even the first one blocks only for that copy. Call it
        again after the state changed shape; a no-op for synchronous saves.

        An optimizer that never stepped has no state yet: it is initialised (a step with
        zero gradients and learning rate, as DCP does when saving it) to learn the shapes,
        and then emptied again, so that training goes on exactly as without this call.
        """
        if self.config.async_mode is AsyncMode.OFF:
            return
        self._wait_here()  # the buffers may still be read by a save in flight

        def reserve() -> int:
            fresh = isinstance(optimizer, torch.optim.Optimizer) and not optimizer.state
            try:
                states = _states(model, optimizer, ema)
                self._background.reserve(states)
                return len(states)
            finally:
                if fresh:
                    optimizer.state.clear()  # back to never stepped: the first step initialises it

        started = time.perf_counter()
        states = self.comm.run_everywhere(reserve)
        if not self._background.process_mode:  # a writer group per artifact, the trainer state's included
            self._background.comm.parallel_groups(states + 1)
        log.info("staging memory prepared: %.1f MiB in %.3fs", self._background.staging.nbytes / 2**20,
                 time.perf_counter() - started)

    def wait(self) -> SaveResult | None:
        """Block until no save is in flight; return its result, or raise its failure on every
        rank alike (a collective). With ``tiers`` also until no upload is in flight, raising
        its failure (:class:`UploadError`). A no-op for synchronous saves without tiers."""
        result = self._wait_here()
        if self.durable is not None:
            error = self.durable.collect(self.comm, block=True)
            if error is not None:
                raise error
        return result

    def _wait_here(self) -> SaveResult | None:
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        return self.comm.run_everywhere(pending.result)

    def close(self) -> None:
        """Finish pending work and free staging memory; the Checkpointer must not be used
        afterwards. Raises a pending save's (or upload's) failure."""
        try:
            self.wait()
        finally:
            if self.config.async_mode is not AsyncMode.OFF:
                self._background.close()
            if self.durable is not None:
                self.durable.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- steps ---------------------------------------------------------------------
    def _capture(self, iteration, model, optimizer, ema, trainer_state, rank_state, metrics, last,
                 extra_aliases=(), *, pack: bool = True) -> _Plan:
        """The plan of a save: the state dicts of this moment (``pack=False``: the trainer
        state as a deep copy of its objects, to be packed by :meth:`_Plan.packed`)."""
        aliases = _check_request(iteration, model, optimizer, ema, extra_aliases, last)
        cp = str(iteration)
        name = self.config.model_name
        arts = [_Artifact(format_artifact(name, cp, kind, info), kind, info, state)
                for kind, info, state in _states(model, optimizer, ema)]
        snapshot = pack_object if pack else copy.deepcopy
        trainer = {trainer_rank_key(self.comm.rank): snapshot(rank_state or {})}
        if self.comm.is_coordinator:
            trainer[TRAINER_COMMON_KEY] = snapshot(common_entry(iteration.to_dict(), trainer_state))
        arts.append(_Artifact(format_artifact(name, cp, ArtifactKind.TRAINER), ArtifactKind.TRAINER, None, trainer,
                              packed=pack))
        clean_metrics = {}
        for key, value in (metrics or {}).items():
            value = float(value)
            if not math.isfinite(value):
                log.warning("metric %s=%s is not finite; it cannot make a best checkpoint", key, value)
            clean_metrics[str(key)] = value
        return _Plan(iteration, arts, clean_metrics, aliases)

    def _prepare(self, plan: _Plan) -> tuple[bool, AliasRecord | None]:
        """Coordinator: (False, _) if the point already committed; otherwise clear what an
        uncommitted save of it left and return (True, the current ``latest`` alias). The
        three reads (commit record, one listing, alias) go out together: one round trip."""
        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="noether-ckpt-prepare") as pool:
            existing = pool.submit(read_commit, self.storage, self.layout, plan.iteration)
            listing = pool.submit(self.storage.list, self.layout.checkpoints_dir)
            latest = pool.submit(read_alias, self.storage, self.layout, "latest")
            if existing.result() is not None:
                return False, None
            present = {e.name for e in listing.result()}
            previous = latest.result()
        for art in plan.artifacts:
            if art.name in present:
                path = self.layout.artifact_path(art.name)
                log.warning("removing %s left by an earlier save that never committed", path)
                self.storage.remove(path, recursive=True)
        return True, previous

    def _write_and_commit(self, plan: _Plan, comm: Comm) -> SaveResult:
        fresh, previous = comm.broadcast_from_coordinator(lambda: self._prepare(plan))
        if not fresh:
            log.info("checkpoint %s is already committed: keeping it, moving aliases only", plan.iteration)

            def keep() -> tuple[CommitRecord, tuple[str, ...]]:
                record = self._existing(plan)
                return record, self._move_aliases(plan, record)

            record, aliases = comm.broadcast_from_coordinator(keep)
            if self.config.node_local:
                self._mirror_records(comm, plan.iteration, aliases)
            return SaveResult(plan.iteration, record, aliases, reused_existing=True)

        def write_all() -> list[list[dcp_io.FileRecord]]:
            if self.config.async_mode is AsyncMode.PROCESS:
                return [dcp_io.save_state_in_process(
                    art.state, self.layout.artifact_path(art.name), self.storage, comm=comm,
                    thread_count=self.config.thread_count,
                    replicated_on_rank0=self.config.node_local, timeout_s=self.config.timeout_s)
                    for art in plan.artifacts]
            # Every artifact at once, each on a group of its own: the small ones (trainer
            # state) no longer wait for the big ones, nor their round trips for each other.
            groups = comm.parallel_groups(len(plan.artifacts))

            def one(idx: int) -> list[dcp_io.FileRecord]:
                art = plan.artifacts[idx]
                return dcp_io.save_state(art.state, self.layout.artifact_path(art.name), self.storage,
                                         process_group=groups[idx], thread_count=self.config.thread_count,
                                         replicated_on_rank0=self.config.node_local,
                                         blocking=self.config.async_mode is AsyncMode.OFF)

            with ThreadPoolExecutor(max_workers=len(plan.artifacts), thread_name_prefix="noether-ckpt-artifact") as pool:
                futures = [pool.submit(one, idx) for idx in range(len(plan.artifacts))]
                return [f.result() for f in futures]

        try:
            reports = comm.all_gather_results(write_all)
            if self.config.node_local:
                names = [f"{art.name}/{f.name}" for idx, art in enumerate(plan.artifacts)
                         for f in reports[DCP_COORDINATOR][idx]]
                mirror_from(comm, self.topology, self.storage, self.layout.checkpoints_dir, names,
                            source=DCP_COORDINATOR)
            if self.config.replicate is Replicate.PEER:
                peer.replicate(comm, self.topology, self.storage, self.layout,
                               [(art.name, f) for idx, art in enumerate(plan.artifacts) for f in reports[comm.rank][idx]])
        except NoetherDistError as exc:
            raise CommitError(f"saving {plan.iteration} failed, nothing was committed: {exc}") from exc

        def commit() -> tuple[CommitRecord, tuple[str, ...]]:
            arts = []
            for idx, art in enumerate(plan.artifacts):
                files = sorted((f for rank_report in reports for f in rank_report[idx]), key=lambda f: f.name)
                arts.append(ArtifactRecord(art.name, art.kind.value, art.model_info, ArtifactFormat.DCP, tuple(files)))
            record = CommitRecord(plan.iteration, self.config.run_id, self.config.stage_name or None,
                                  self.config.model_name, comm.world_size, tuple(arts), plan.metrics)
            # `previous`: the alias as _prepare read it; only this coordinator moves it
            return record, publish(self.storage, self.layout, record, plan.aliases, self.config.best_metrics, previous)

        try:
            record, aliases = comm.broadcast_from_coordinator(commit)
        except AliasUpdateError:
            raise
        except NoetherDistError as exc:
            raise CommitError(f"committing {plan.iteration} failed, nothing was committed: {exc}") from exc
        if self.config.node_local:
            self._mirror_records(comm, plan.iteration, aliases)
        if self.durable is not None:
            self.durable.after_local_commit(comm, record)
        self._apply_retention(comm)
        return SaveResult(plan.iteration, record, aliases)

    def _apply_retention(self, comm: Comm) -> None:
        """After a commit: prune by the retention policy (the coordinator; with node_local
        every node leader prunes its own disk by the same rule)."""
        policy = self.config.retention
        if policy is None or policy.keeps_everything:
            return
        leader = comm.is_coordinator or (self.topology is not None and self.topology.is_leader)
        keep = self.durable.protected() if self.durable is not None else set()  # a point being uploaded

        def prune_here() -> None:
            if leader:
                prune(self.storage, self.layout, policy, keep=keep)
                if self.config.replicate is Replicate.PEER:
                    peer.prune_peer_copies(self.storage, self.layout)

        try:
            comm.all_gather_results(prune_here)
        except NoetherDistError as exc:
            # The new checkpoint is committed; a failed prune only leaves extra files behind.
            log.error("retention after %s failed (nothing committed was lost): %s", self.layout.checkpoints_dir, exc)

    def _mirror_records(self, comm: Comm, iteration: TrainingIteration, aliases: tuple[str, ...]) -> None:
        base = self.layout.checkpoints_dir
        commit = self.layout.commit_path(iteration)[len(base) + 1:]
        names = [commit] + [self.layout.alias_path(a)[len(base) + 1:] for a in aliases]
        mirror_from(comm, self.topology, self.storage, base, names, source=comm.coordinator_group_rank, once={commit})

    def _existing(self, plan: _Plan) -> CommitRecord:
        record = read_commit(self.storage, self.layout, plan.iteration)
        if record is None:
            raise CommitError(f"commit record of {plan.iteration} vanished")
        return record

    def _move_aliases(self, plan: _Plan, record: CommitRecord) -> tuple[str, ...]:
        return move_aliases(self.storage, self.layout, plan.iteration, plan.aliases, record.metrics or plan.metrics,
                            self.config.best_metrics)


def _check_request(iteration, model, optimizer, ema, extra_aliases=(), last=False) -> tuple[str, ...]:
    """Check what a save's arguments alone decide (ConfigError); return the aliases to move."""
    if not isinstance(iteration, TrainingIteration):
        raise ConfigError(f"iteration must be a TrainingIteration, got {type(iteration).__name__}")
    _check_states(model, optimizer, ema)
    aliases = ("latest", "last") if last else ("latest",)
    for alias in extra_aliases:
        ref = parse_checkpoint(alias, what="alias")
        if not ref.is_alias or ref.alias_name == "latest":
            raise ConfigError(f"alias {alias!r} cannot be moved on request; use last or best.<metric>")
        if ref.alias_name not in aliases:
            aliases += (ref.alias_name,)
    return aliases


def _staged(plan: _Plan, failure: BaseException | None) -> _Plan:
    """``plan``, or ``failure`` raised: what this rank's capture and staging copy gave."""
    if failure is not None:
        raise failure
    return plan


def _check_states(model, optimizer, ema) -> None:
    """ConfigError when the model, EMA models or optimizer cannot be saved as given."""
    if not isinstance(model, (nn.Module, dict)):
        raise ConfigError(f"expected an nn.Module or a state dict, got {type(model).__name__}")
    for info in ema or {}:
        if normalize_model_info(info) is None:
            raise ConfigError("an EMA model needs a model_info such as 'ema_factor=0.9999'")
    if optimizer is not None and not isinstance(optimizer, dict) and not isinstance(model, nn.Module):
        raise ConfigError("saving an optimizer object needs the model as an nn.Module")


def _states(model, optimizer, ema) -> list[tuple[ArtifactKind, str | None, dict[str, Any]]]:
    """(kind, model_info, state dict) of the model, each EMA model and the optimizer."""
    _check_states(model, optimizer, ema)
    out = [(ArtifactKind.MODEL, None, model_state(model))]
    for info, ema_model in (ema or {}).items():
        out.append((ArtifactKind.MODEL, normalize_model_info(info), model_state(ema_model)))
    if optimizer is not None:
        optim_sd = optimizer if isinstance(optimizer, dict) else optimizer_state(model, optimizer)
        out.append((ArtifactKind.OPTIM, None, optim_sd))
    return out


class _Background:
    """The background side of asynchronous saves: staging memory reused by every save, and
    one writer thread with a gloo group of its own (the training loop's groups are never
    used from it). In
    process mode the thread hands each artifact to DCP's checkpoint process (staging in
    shared memory) and runs the commit protocol when it reports back."""

    def __init__(self, config: CheckpointerConfig, process_group: Any = None, coordinator_rank: int | None = None
                 ) -> None:
        self.comm = Comm(config.timeout_s, process_group=process_group, coordinator_rank=coordinator_rank,
                         private=True)
        self.process_mode = config.async_mode is AsyncMode.PROCESS
        self.staging = SaveStaging(shared=self.process_mode)
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="noether-ckpt-writer")

    def stage(self, plan: _Plan) -> _Plan:
        arts = []
        for art in plan.artifacts:
            if art.kind is ArtifactKind.TRAINER and not self.process_mode:
                arts.append(art)  # a deep copy of this moment's objects, packed by the writer thread
            else:
                arts.append(_Artifact(art.name, art.kind, art.model_info, self.staging.stage(art.slot, art.state)))
        self.staging.synchronize()
        return _Plan(plan.iteration, arts, plan.metrics, plan.aliases)

    def reserve(self, states: list[tuple[ArtifactKind, str | None, dict[str, Any]]]) -> None:
        for kind, info, state in states:
            self.staging.stage(_Artifact("", kind, info, state).slot, state)
        self.staging.synchronize()

    def submit(self, fn: Callable[[], SaveResult]) -> Future[SaveResult]:
        return self.executor.submit(fn)

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.staging.close()
        if self.process_mode:
            dcp_io.shutdown_checkpoint_process()
