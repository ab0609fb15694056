"""Requests to the store to select the checkpoint to resume, with many committed ones.

Counted on the wire: the client talks to a moto S3 server through the test suite's
``FaultProxy`` (no faults), whose ``stats`` count every HTTP request it forwards. The stage
holds ``checkpoints`` committed checkpoints (commit records written with ``write_commit``,
naming three artifacts; the model's folder exists and holds a tiny ``.metadata``) and a
``latest`` alias. Measured the same way:

- ``ours``: ``noether_dist.resume.select_checkpoint(storage, layout, latest)``;
- ``ours_resolve_record``: what ``resume`` itself runs on the coordinator
  (``noether_dist.stage.index.StageIndex.resolve_or_uncommitted``: a check for a stage without commit records, the
  selection, then the record);
- ``ours_one_get_read`` / ``ours_resolve_record_one_get_read``: the same with ``Storage.read``
  as one GET (s3fs's ``cat_file`` asks for the size first, HEAD + GET, unless
  ``max_concurrency=1``): what the change proposed in README.md would give;
- ``commit_listing``: list ``_commits/`` and pick the newest (then read its record);
- ``dir_listing``: torchtitan style: list the checkpoint folder, keep the checkpoints whose
  model folder has a ``.metadata`` (one check each), pick the newest.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from benchmarks.s3 import MotoServer

log = logging.getLogger(__name__)

KINDS = ("model", "optim", "trainer")


def _populate(storage: Any, layout: Any, count: int) -> Any:
    """``count`` committed checkpoints with tiny DCP folders and a latest alias; the newest."""
    from noether_dist.format.records import AliasRecord, ArtifactRecord, CommitRecord, FileRecord
    from noether_dist.stage.commit import write_alias, write_commit
    from noether_dist.format.names import ArtifactKind, TrainingIteration, format_artifact

    objects: dict[str, bytes] = {}
    records = []
    for i in range(1, count + 1):
        it = TrainingIteration(i // 10, i * 10, i * 640)
        arts = []
        for kind in KINDS:
            name = format_artifact("m", str(it), ArtifactKind(kind))
            if kind == "model":  # a folder for the listings, a .metadata for torchtitan-style checks
                objects[storage.fs._strip_protocol(layout.artifact_path(name)) + "/.metadata"] = b"m" * 256
            arts.append(ArtifactRecord(name, kind, None, "dcp", (FileRecord(".metadata", 256, 0),)))
        records.append(CommitRecord(it, layout.run_id, layout.stage_name, "m", 1, tuple(arts)))
    storage.fs.pipe(objects)  # concurrent PUTs
    with ThreadPoolExecutor(8) as pool:  # one write_once per record, several at a time
        list(pool.map(lambda record: write_commit(storage, layout, record), records))
    newest = records[-1].iteration
    write_alias(storage, layout, AliasRecord("latest", newest))
    return newest


def _one_get_storage(storage: Any) -> Any:
    """A Storage whose ``read`` is a single GET (benchmark-local, to measure a proposed change)."""
    from noether_dist.io.storage import Storage

    class OneGetRead(Storage):
        def read(self, path: str) -> bytes:
            stripped = self._strip(path)
            return self.retry("read", path, lambda: self.fs.cat_file(stripped, max_concurrency=1))

    return OneGetRead(storage.fs, storage.options, storage.protocol)


def _dir_listing_select(storage: Any, layout: Any) -> Any:
    """Pick the newest checkpoint as torchtitan-style tools do: list, check each folder."""
    from noether_dist.format.names import TrainingIteration

    valid = []
    for entry in storage.list(layout.checkpoints_dir):
        name = entry.name
        if not (entry.is_dir and name.startswith("m_cp=") and name.endswith("_model.th")):
            continue
        if storage.exists(f"{layout.artifact_path(name)}/.metadata"):
            valid.append(TrainingIteration.parse(name[len("m_cp="):-len("_model.th")]))
    return max(valid)


def resume_requests(server: MotoServer, *, checkpoints: int) -> dict[str, Any]:
    """Request counts (and wall ms) of each selection method; all must pick the same point."""
    from tests.support.fault_proxy import FaultProxy  # the one helper borrowed from the test suite

    from noether_dist.stage.commit import list_commits, read_commit
    from noether_dist.format.layout import StageLayout
    from noether_dist.format.names import parse_resume_checkpoint
    from noether_dist.resume import select_checkpoint
    from noether_dist.stage.index import StageIndex
    from noether_dist.io.storage import StorageOptions, open_storage

    bucket = "nd-bench-resume"
    server.create_bucket(bucket)
    root = f"s3://{bucket}/exp"
    layout = StageLayout(root, "run", "train")
    direct = open_storage(root, StorageOptions(endpoint_url=server.endpoint_url,
                                               extra={**server.storage_extra(), "skip_instance_cache": True}))
    start = time.perf_counter()
    newest = _populate(direct, layout, checkpoints)
    log.info("resume: %d committed checkpoints written in %.1fs", checkpoints, time.perf_counter() - start)
    latest = parse_resume_checkpoint("latest")
    methods = {
        "ours": lambda st: select_checkpoint(st, layout, latest),
        "ours_resolve_record": lambda st: StageIndex(st, layout).resolve_or_uncommitted(latest, "m").iteration,
        "ours_one_get_read": lambda st: select_checkpoint(_one_get_storage(st), layout, latest),
        "ours_resolve_record_one_get_read": lambda st: StageIndex(_one_get_storage(st), layout).resolve_or_uncommitted(
            latest, "m").iteration,
        "commit_listing": lambda st: read_commit(st, layout, list_commits(st, layout)[-1]).iteration,
        "commit_listing_select_only": lambda st: list_commits(st, layout)[-1],
        "dir_listing": lambda st: _dir_listing_select(st, layout),
    }
    out: dict[str, Any] = {"checkpoints": checkpoints, "newest": str(newest)}
    with FaultProxy(server.endpoint_url) as proxy:
        counted = open_storage(root, StorageOptions(endpoint_url=proxy.endpoint_url,
                                                    extra={**server.storage_extra(), "skip_instance_cache": True}))
        counted.exists(layout.commit_path(newest))  # connect once; not counted
        for name, fn in methods.items():
            proxy.reset_stats()
            start = time.perf_counter()
            chosen = fn(counted)
            wall = time.perf_counter() - start
            stats = proxy.stats
            if str(chosen) != str(newest):
                raise RuntimeError(f"selection {name} chose {chosen}, expected {newest}")
            out[name] = {"requests": stats["requests"], "by_method": stats["by_method"], "wall_ms": wall * 1000}
            log.info("resume select %-30s %4d requests %s, %.1f ms", name, stats["requests"], stats["by_method"],
                     wall * 1000)
    return out
