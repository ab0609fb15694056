"""Retention: which committed checkpoints to keep, and pruning the rest.

Rules that always hold: the newest committed checkpoint is kept, and so is every
checkpoint an alias (latest, last, best.<metric>) points to. A checkpoint is deleted
commit record first, so it stops being selectable before any of its files go; files of
saves that never committed and are older than the newest commit (left by killed saves)
are removed too. Works the same on local disks and S3.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .index import StageIndex
from ..errors import ConfigError
from ..format.layout import StageLayout
from ..format.names import TrainingIteration
from ..io.storage import Storage

__all__ = ["RetentionPolicy", "PrunePlan", "plan_prune", "prune"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class RetentionPolicy:
    """What to keep besides the newest checkpoint and every alias target."""

    keep_last: int | None = None
    """Keep the k newest committed checkpoints (None: all)."""
    keep_every: int | None = None
    """Also keep every checkpoint whose update count is a multiple of this."""

    def __post_init__(self) -> None:
        for name in ("keep_last", "keep_every"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"retention {name} must be an int >= 1 or null, got {value!r}")

    @property
    def keeps_everything(self) -> bool:
        """True when the policy deletes nothing."""
        return self.keep_last is None

    @classmethod
    def from_dict(cls, data: dict | None) -> RetentionPolicy | None:
        """From a config mapping (keep_last, keep_every); None for no mapping."""
        if not data:
            return None
        unknown = set(data) - {"keep_last", "keep_every"}
        if unknown:
            raise ConfigError(f"unknown retention key(s) {sorted(unknown)}; valid: keep_last, keep_every")
        return cls(**data)


@dataclass(frozen=True)
class PrunePlan:
    """What a prune deletes and keeps."""

    delete: tuple[TrainingIteration, ...]
    keep: tuple[TrainingIteration, ...]
    uncommitted: tuple[str, ...]
    """Artifact names of saves that never committed and are older than the newest commit."""


def plan_prune(storage: Storage, layout: StageLayout, policy: RetentionPolicy, *,
               keep: Iterable[TrainingIteration] = ()) -> PrunePlan:
    """Decide (no deletion) what ``policy`` removes from one stage; points in ``keep`` (e.g.
    one whose upload to the durable tier is running) are kept whatever the policy says."""
    return _plan(StageIndex(storage, layout), policy, keep)


def _plan(index: StageIndex, policy: RetentionPolicy, keep: Iterable[TrainingIteration] = ()) -> PrunePlan:
    points = index.committed()
    if not points:
        return PrunePlan((), (), ())
    protected = {points[-1], *keep} | {alias.iteration for alias in index.aliases().values() if alias is not None}
    keep = set(protected)
    if policy.keep_last is None:
        keep.update(points)
    else:
        keep.update(points[-policy.keep_last:])
    if policy.keep_every:
        keep.update(p for p in points if p.update % policy.keep_every == 0)
    newest = points[-1]
    leftovers = [a.name for cp in index.find_all() if not cp.committed and cp.iteration is not None
                 and cp.iteration < newest for a in cp.artifacts]
    return PrunePlan(tuple(p for p in points if p not in keep), tuple(p for p in points if p in keep),
                     tuple(sorted(leftovers)))


def prune(storage: Storage, layout: StageLayout, policy: RetentionPolicy, *, dry_run: bool = False,
          progress: Any = None, keep: Iterable[TrainingIteration] = ()) -> PrunePlan:
    """Apply ``policy`` to one stage: delete each dropped checkpoint (commit record first,
    then its files) and leftovers of saves that never committed. Logs every deletion.
    ``progress`` (``add_total(n)``/``update(n)``, e.g. :class:`noether_dist.tools.progress.Bar`)
    counts the bytes of the deleted checkpoints, as their commit records give them; ``keep``
    as in :func:`plan_prune`."""
    index = StageIndex(storage, layout)
    plan = _plan(index, policy, keep)
    if dry_run:
        return plan
    sizes: dict[TrainingIteration, int] = {}
    if progress is not None:
        for point in plan.delete:
            record = index.record(point)
            sizes[point] = sum(a.total_bytes for a in record.artifacts) if record is not None else 0
        progress.add_total(sum(sizes.values()))
    for point in plan.delete:
        storage.remove(layout.commit_path(point))
        found = index.find(str(point))
        for art in found.artifacts if found is not None else ():
            storage.remove(layout.artifact_path(art.name), recursive=True)
        log.info("retention: deleted checkpoint %s of %s", point, layout.checkpoints_dir)
        if progress is not None:
            progress.update(sizes.get(point, 0))
    for name in plan.uncommitted:
        storage.remove(layout.artifact_path(name), recursive=True)
        log.info("retention: deleted %s, left by a save that never committed", name)
    return plan
