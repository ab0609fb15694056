"""Two tiers (issue 13), one process, the durable tier on the moto S3 server; each pair
measured side by side, alternating, ``repeats`` times:

- ``stall``: the caller's stall of a tiered save (async thread mode: capture + staging copy;
  the local write and the upload run in the background) next to one plain copy of the
  state into preallocated memory (the least any staging can cost);
- ``resume``: the same point resumed from the local tier (``resume(local_dir=...)``) and
  from the durable tier (``resume`` of output_dir), each into a fresh model: the part of
  "kill to training resumed" that depends on the tier (process start-up is the same);
- ``upload``: one upload of a point's local files to the durable tier
  (``DurableUploader.last_upload_s``: read, check, send, agree, commit) next to s3fs
  ``put_file`` of the same files;
- ``train``: training steps per second (a CPU MLP, one thread) while an upload runs, next to
  the same steps with nothing in flight; once at full speed and once with the upload paced
  to ``paced_mb_s`` (``tiers.durable.bandwidth_mb_s``). The upload's bytes are read and sent
  by the upload process, but the S3 server that receives them (moto, a Python process) runs
  on the same cores, where a real object store takes no CPU of the training node. So in
  these two pairs the server runs at the lowest CPU priority (nice 19: it gets the cores the
  training and the upload leave idle, as a remote store would), and a third pair
  (``_server_nice0``) repeats the full-speed one with the server at the training's priority,
  to show what a store on the same cores costs. The CPU the server and the upload process
  used while the upload ran is recorded beside each pair (``server_cores``,
  ``uploader_cores``: cores busy on average), and the training process's own cores in both
  windows (``trainer_cores``, ``trainer_idle_cores``).
"""

from __future__ import annotations

import gc
import logging
import os
import time
from typing import Any

from benchmarks.common import build_model, local_tensors

log = logging.getLogger(__name__)

TRAIN_VARIANTS: dict[str, tuple[bool, bool]] = {"_server_nice0": (False, False), "": (False, True),
                                                 "_paced": (True, True)}
"""The training pairs in the order run: suffix -> (upload paced to ``paced_mb_s``, S3 server at
nice 19). The server's own priority comes first: lowering a nice value needs privileges."""


def _config(work: str, endpoint: str, extra: dict[str, Any], bucket: str, run_id: str, *, async_mode: str,
            durable_every: int, bandwidth_mb_s: float | None = None) -> Any:
    from noether_dist import CheckpointerConfig

    return CheckpointerConfig.from_dict({
        "output_dir": f"s3://{bucket}/tiers", "run_id": run_id, "model_name": "m", "timeout_s": 600,
        "async_mode": async_mode, "storage": {"endpoint_url": endpoint, "extra": extra},
        "tiers": {"local": {"dir": os.path.join(work, "local"), "every_updates": 1, "keep_last": 2},
                  "durable": {"every_updates": durable_every, "bandwidth_mb_s": bandwidth_mb_s}}})


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system, all threads) process ``pid`` used so far (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _train_rate(model: Any, opt: Any, seconds: float) -> float:
    """Steps per second of a small CPU training loop over ``seconds``."""
    import torch

    x = torch.randn(64, model[0].in_features)
    steps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        steps += 1
    return steps / (time.perf_counter() - started)


def tiers_bench(*, work: str, endpoint: str, extra: dict[str, Any], bucket: str, total_bytes: int,
                repeats: int, server_pid: int, paced_mb_s: float = 20.0, stall_pairs: int | None = None) -> dict[str, Any]:
    """Raw samples of the pairs (see the module docstring): ``repeats`` of each, and
    ``stall_pairs`` (default ``repeats``) of the stall, whose saves are each uploaded too;
    ``server_pid``: the S3 server's."""
    import torch

    from benchmarks.bench_async import CopyBaseline
    from noether_dist import Checkpointer, TrainingIteration, resume
    from noether_dist.io.storage import StorageOptions, open_storage

    torch.set_num_threads(1)
    out: dict[str, Any] = {"stall": [], "copy": [], "stall_cpu": [], "copy_cpu": [], "upload": [], "put": [],
                           "resume_local": [], "resume_durable": [],
                           "paced_mb_s": paced_mb_s}
    for tag in TRAIN_VARIANTS:
        for key in ("train_upload", "train_idle", "server_cores", "uploader_cores", "trainer_cores",
                    "trainer_idle_cores"):
            out[f"{key}{tag}"] = []
    model = build_model(total_bytes)
    baseline = CopyBaseline(local_tensors(model.state_dict()))
    out["state_bytes"] = sum(t.numel() * t.element_size() for t in baseline.tensors)
    store = open_storage(f"s3://{bucket}", StorageOptions(endpoint_url=endpoint, extra=extra))

    # stall, upload vs put: every save is uploaded (durable every update)
    stall_pairs = stall_pairs or repeats
    ck = Checkpointer(_config(work, endpoint, extra, bucket, "stall", async_mode="thread", durable_every=1))
    ck.prepare(model=model)
    for update in range(1, max(repeats, stall_pairs) + 2):
        gc.collect()  # as the async benchmark: no collection left over from the upload's objects
        out["copy"].append(baseline.time())
        copy_cpu = baseline.last_cpu
        ck.save(TrainingIteration(0, update, update), model=model)
        stall, stall_cpu = ck.last_stall_s, getattr(ck, "last_stall_cpu_s", float("nan"))
        record = ck.wait().record  # the local save, then the upload
        if update == 1:
            out["copy"].pop()
            continue  # the first save also makes the writer's groups and the folders
        if len(out["stall"]) < stall_pairs:
            out["stall"].append(stall)
            out["stall_cpu"].append(stall_cpu)
            out["copy_cpu"].append(copy_cpu)
        else:
            out["copy"].pop()
        if len(out["upload"]) == repeats:
            continue
        out["upload"].append(ck.durable.last_upload_s)
        files = [(f"{ck.layout.artifact_path(a.name)}/{f.name}", f"{bucket}/raw/{update}/{a.name}/{f.name}")
                 for a in record.artifacts for f in a.files]
        started = time.perf_counter()
        for local, remote in files:
            store.fs.put_file(local, remote)
        out["put"].append(time.perf_counter() - started)
    last = TrainingIteration(0, update, update)
    ck.close()

    # resume the same point from each tier into a fresh model
    root = {"output_dir": f"s3://{bucket}/tiers", "resume_run_id": "stall", "resume_checkpoint": f"U{last.update}"}
    durable = open_storage(root["output_dir"], StorageOptions(endpoint_url=endpoint, extra=extra))
    for _ in range(repeats):
        for tier in ("local", "durable"):
            fresh = build_model(total_bytes, seed=1)
            started = time.perf_counter()
            res = resume(root, model=fresh, model_name="m", storage=durable,
                         local_dir=os.path.join(work, "local") if tier == "local" else None)
            out[f"resume_{tier}"].append(time.perf_counter() - started)
            if res.tier != (tier if tier == "local" else None):
                raise RuntimeError(f"resumed from the {res.tier} tier, not the {tier} tier")

    # training throughput while an upload runs, next to the same time with none in flight,
    # with the CPU time the S3 server and the upload process used meanwhile
    small = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))
    opt = torch.optim.SGD(small.parameters(), lr=1e-3)
    x = torch.randn(64, 256)
    for tag, (paced, server_niced) in TRAIN_VARIANTS.items():
        pace = paced_mb_s if paced else None
        if server_niced:
            os.setpriority(os.PRIO_PROCESS, server_pid, 19)
        ck = Checkpointer(_config(work, endpoint, extra, bucket, f"train{tag}", async_mode="off", durable_every=1,
                                  bandwidth_mb_s=pace))
        for update in range(1, repeats + 1):
            ck.save(TrainingIteration(0, update, update), model=model)  # returns once local; the upload runs on
            cpu0 = {k: _cpu_s(pid) for k, pid in (("server", server_pid), ("uploader", ck.durable.process.pid))}
            steps, started, own = 0, time.perf_counter(), time.process_time()
            while ck.durable.busy:
                loss = small(x).square().mean()
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                steps += 1
            took = time.perf_counter() - started
            own = time.process_time() - own
            used = {k: _cpu_s(pid) - cpu0[k] for k, pid in (("server", server_pid), ("uploader", ck.durable.process.pid))}
            ck.wait()
            if steps:
                out[f"train_upload{tag}"].append(steps / took)
                idle_own = time.process_time()
                out[f"train_idle{tag}"].append(_train_rate(small, opt, took))
                out[f"trainer_cores{tag}"].append(own / took)  # this process's cores, both windows
                out[f"trainer_idle_cores{tag}"].append((time.process_time() - idle_own) / took)
                for k, v in used.items():  # cores busy on average while the upload ran
                    out[f"{k}_cores{tag}"].append(v / took)
        ck.close()
    return out


__all__ = ["tiers_bench"]
