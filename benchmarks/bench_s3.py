"""S3 save and load throughput against raw s3fs on the same moto server (rank side).

Each repetition starts from an empty bucket (rank 0 deletes the last one's objects, untimed);
then, in a rotating order:

- ``raw_put``: every rank writes its shard bytes as ``thread_count`` new objects (grouped as
  DCP groups items into files; new names each time, as every save writes new objects), all
  at once (``fs.pipe`` of a dict: s3fs sends them concurrently); ``raw_get``: reads the last
  ones back the same way (``fs.cat`` of a list);
- ``ours_save``: ``Checkpointer.save`` (sync) with ``thread_count`` writer threads per rank;
- ``ours_save_tiny``: ``Checkpointer.save`` of a 64 KiB model: the fixed cost of a save;
- ``ours_load``: ``noether_dist.resume`` of that checkpoint into a fresh model (defaults:
  files up to 256 MiB are read whole and CRC32-checked on the bytes loaded);
- ``ours_load_noverify``: the same with ``verify_max_bytes=0`` (sizes checked only), to
  show what the verification read costs.

- ``raw_put_one``: every rank writes the same bytes as ONE object (``fs.pipe_file``): against
  ``raw_put`` it shows whether parallel objects buy anything, i.e. whether the server is
  the limit.

Besides wall time, each step's CPU seconds are recorded: every rank's process (all its
threads: ``os.times``) and the moto server's (rank 0 reads ``/proc/<pid>/stat``; moto is one
Python process, so about one core at most). Where other work loads the machine, wall time
follows the CPU each side needs; where the server's CPU time is near the step's wall time,
the server is the limit.

``request_census`` (parent side, one process) counts the HTTP requests of one save and one
load through the test suite's ``FaultProxy``, by method and by what they touch.

The s3fs filesystem is the one ``open_storage`` makes from the same options, so both sides
use the same client settings.
"""

from __future__ import annotations

import gc
import logging
import os
from typing import Any

from benchmarks.common import as_bytes_view, barrier, build_model, local_tensors, nbytes, timed

log = logging.getLogger(__name__)


def _groups(tensors: list[Any], bins: int) -> list[list[Any]]:
    """Greedy largest-first split into ``bins`` groups of similar size (as DCP's writer does)."""
    groups: list[list[Any]] = [[] for _ in range(bins)]
    sizes = [0] * bins
    for t in sorted(tensors, key=lambda t: t.numel() * t.element_size(), reverse=True):
        i = sizes.index(min(sizes))
        groups[i].append(t)
        sizes[i] += t.numel() * t.element_size()
    return [g for g in groups if g]


def _process_cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system, all threads) of this process, or of ``pid`` (Linux /proc)."""
    if pid is None:
        t = os.times()
        return t.user + t.system
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def s3_throughput(rank: int, world_size: int, *, endpoint: str, extra: dict[str, Any], bucket: str,
                  total_bytes: int, repeats: int, thread_count: int, server_pid: int | None = None) -> dict[str, Any]:
    """Seconds of raw put/get and of our save/load, per repetition (slowest rank), and the
    CPU seconds of this rank and (rank 0) of the server in each."""
    from noether_dist import Checkpointer, CheckpointerConfig, StorageOptions, TrainingIteration, resume
    from noether_dist.io.statedict import model_state
    from noether_dist.io.storage import open_storage

    opts = StorageOptions(endpoint_url=endpoint, extra=dict(extra))
    root = f"s3://{bucket}"
    storage = open_storage(root, opts)
    fs = storage.fs
    model = build_model(total_bytes)
    tensors = local_tensors(model_state(model))
    blobs = {f"{bucket}/raw/rank{rank}_{j}.bin": b"".join(bytes(as_bytes_view(t)) for t in group)
             for j, group in enumerate(_groups(tensors, thread_count))}
    ck = Checkpointer(CheckpointerConfig(output_dir=f"{root}/ours", run_id="s3", model_name="m", storage=opts,
                                         thread_count=thread_count, timeout_s=600), storage=storage)
    target = build_model(total_bytes, seed=1)
    cfg = {"output_dir": f"{root}/ours", "resume_run_id": "s3"}
    counter = iter(range(1, 1_000_000))

    def ours_save() -> None:
        step = next(counter)
        ck.save(TrainingIteration(0, step, step), model=model)

    tiny = build_model(64 * 1024)
    ck_tiny = Checkpointer(CheckpointerConfig(output_dir=f"{root}/tiny", run_id="s3", model_name="m", storage=opts,
                                              thread_count=thread_count, timeout_s=600), storage=storage)

    def ours_save_tiny() -> None:
        step = next(counter)
        ck_tiny.save(TrainingIteration(0, step, step), model=tiny)

    def ours_load() -> None:
        resume(cfg, model=target, model_name="m", storage=storage, timeout_s=600)

    def ours_load_noverify() -> None:
        resume(cfg, model=target, model_name="m", storage=storage, timeout_s=600, verify_max_bytes=0)

    # Every put writes new objects, as every save does: the server then stores fresh objects
    # on both sides, rather than replacing the same ones on one side only.
    puts = {"raw_put": 0, "raw_put_one": 0}

    def raw_put(name: str, objects: dict[str, bytes]) -> None:
        puts[name] += 1
        fs.pipe({f"{key}.{puts[name]}": data for key, data in objects.items()})

    def raw_get() -> None:
        got = fs.cat([f"{key}.{puts['raw_put']}" for key in blobs])
        assert sum(len(v) for v in got.values()) == sum(len(v) for v in blobs.values())

    one_object = {f"{bucket}/raw/rank{rank}_all.bin": b"".join(blobs.values())}
    steps = {"raw_put": lambda: raw_put("raw_put", blobs), "raw_put_one": lambda: raw_put("raw_put_one", one_object),
             "ours_save": ours_save,
             "ours_save_tiny": ours_save_tiny, "raw_get": raw_get, "ours_load": ours_load,
             "ours_load_noverify": ours_load_noverify}
    times: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    server_cpu: dict[str, list[float]] = {k: [] for k in steps}
    for rep in range(repeats):
        if rep:
            # Each repetition starts from an empty bucket: what the server holds (and the cost
            # of listing it) is then the same for every step, whichever repetition it is in.
            if rank == 0:
                fs.rm([f"{bucket}/{top}" for top in ("raw", "ours", "tiny") if fs.exists(f"{bucket}/{top}")],
                      recursive=True)
            barrier()
            fs.invalidate_cache()
        # writes before reads (a load needs a save); which of raw/ours goes first alternates
        order = ["raw_put", "ours_save", "raw_put_one", "ours_save_tiny", "raw_get", "ours_load", "ours_load_noverify"] \
            if rep % 2 == 0 else ["ours_save_tiny", "raw_put_one", "ours_save", "raw_put", "ours_load_noverify",
                                  "ours_load", "raw_get"]
        for name in order:
            gc.collect()
            mine, server = _process_cpu_s(), _process_cpu_s(server_pid) if rank == 0 and server_pid else None
            seconds, _ = timed(steps[name])
            times[name].append(seconds)
            cpu[name].append(_process_cpu_s() - mine)
            if server is not None:
                server_cpu[name].append(_process_cpu_s(server_pid) - server)
        if rank == 0:
            log.info("s3 rep %d/%d: %s", rep + 1, repeats, ", ".join(f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    ck.close()
    ck_tiny.close()
    barrier()
    return {"times": times, "cpu_s": cpu, "server_cpu_s": server_cpu, "local_bytes": nbytes(tensors),
            "objects_per_rank": len(blobs)}


def request_census(server: Any, *, total_bytes: int, thread_count: int) -> dict[str, Any]:
    """HTTP requests of one sync save and one resume (one process, no process group), counted
    by a proxy: by method, and how many move checkpoint data (``.distcp`` files)."""
    from tests.support.fault_proxy import FaultProxy  # the one helper borrowed from the test suite

    from noether_dist import Checkpointer, CheckpointerConfig, StorageOptions, TrainingIteration, resume
    from noether_dist.io.storage import open_storage

    bucket = "nd-bench-census"
    server.create_bucket(bucket)
    out: dict[str, Any] = {}
    with FaultProxy(server.endpoint_url) as proxy:
        opts = StorageOptions(endpoint_url=proxy.endpoint_url,
                              extra={**server.storage_extra(), "skip_instance_cache": True})
        root = f"s3://{bucket}/o"
        storage = open_storage(root, opts)
        model = build_model(total_bytes)
        ck = Checkpointer(CheckpointerConfig(output_dir=root, run_id="c", model_name="m", storage=opts,
                                             thread_count=thread_count), storage=storage)
        ck.save(TrainingIteration(0, 1, 1), model=model)  # the first save also sets up folders: not counted
        target = build_model(total_bytes, seed=1)
        cfg = {"output_dir": root, "resume_run_id": "c"}
        steps = {"save": lambda: ck.save(TrainingIteration(0, 2, 2), model=model),
                 "load": lambda: resume(cfg, model=target, model_name="m", storage=storage),
                 "load_noverify": lambda: resume(cfg, model=target, model_name="m", storage=storage,
                                                 verify_max_bytes=0)}
        for name, fn in steps.items():
            proxy.reset_stats()
            fn()
            events = proxy.events
            data = [e for e in events if ".distcp" in e[1] and e[0] in ("PUT", "GET")]
            out[name] = {"requests": len(events), "by_method": proxy.stats["by_method"],
                         "data_requests": len(data), "other_requests": len(events) - len(data)}
            log.info("s3 census %-13s %3d requests (%d move .distcp data) %s", name, len(events), len(data),
                     proxy.stats["by_method"])
        ck.close()
    return out
