"""GPU check: async saves of an FSDP2 model with ~8 GiB of bf16 state, on one GPU (NCCL).

    python benchmarks/gpu_check.py --out gpu_check.json        # one H200: well under 8 minutes
    python benchmarks/gpu_check.py --dry-run --out /tmp/x.json  # CPU, tiny: a smoke test anywhere

One process, world size 1, process group ``cpu:gloo,cuda:nccl``. Five asynchronous saves
(``AsyncMode.THREAD``) to local disk; before each, the baseline is timed: one device-to-host
copy of the same tensors into preallocated pinned memory (non-blocking copies, then a
synchronize). Figures (each a ratio measured side by side in this run):

- ``stall_vs_pinned_copy``: the save's stall (``Checkpointer.last_stall_s``) / that copy,
  median over saves 2..5 (goal <= 1.1);
- ``first_stall_vs_pinned_copy``: the same for the first save, whose pinned staging buffers
  ``Checkpointer.prepare`` allocated before it (goal <= 1.5);
- ``write_throughput_vs_raw_disk``: bytes / (time from the save call until it committed),
  median over saves 2..5, against writing the same bytes from pinned host memory to the
  same disk with the same number of threads, each file fsynced (info).

Only the newest checkpoint is kept on disk (older ones are removed after the next commits).
A deadline (``--deadline-s``) stops further saves so that the run always ends in time.
Importing this module imports nothing but the standard library.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `noether_dist` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

log = logging.getLogger("benchmarks.gpu_check")

FIGURE_KEYS = ("stall_vs_pinned_copy", "first_stall_vs_pinned_copy", "write_throughput_vs_raw_disk")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size-gib", type=float, default=8.0, help="bf16 model state in GiB (default 8)")
    p.add_argument("--saves", type=int, default=5, help="async saves (default 5)")
    p.add_argument("--thread-count", type=int, default=4, help="writer threads (ours and the raw baseline)")
    p.add_argument("--dir", default=None, help="local folder for the checkpoints (default: a temp folder, removed)")
    p.add_argument("--out", default="gpu_check.json", help="JSON file of results")
    p.add_argument("--deadline-s", type=float, default=360.0, help="start no further save after this many seconds")
    p.add_argument("--dry-run", action="store_true", help="CPU, gloo, 8 MiB: checks the script without a GPU")
    args = p.parse_args(argv)
    if args.dry_run:
        args.size_gib = min(args.size_gib, 8 / 1024)
    if args.saves < 2:
        p.error("--saves must be >= 2")
    return args


def _init(dry_run: bool, rdzv: str) -> str:
    """Initialise a one-rank process group; the device type used."""
    import torch
    import torch.distributed as dist

    os.environ.update({"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    if dry_run:
        dist.init_process_group("gloo", init_method=f"file://{rdzv}", rank=0, world_size=1)
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --dry-run for the CPU check")
    torch.cuda.set_device(0)
    dist.init_process_group("cpu:gloo,cuda:nccl", init_method=f"file://{rdzv}", rank=0, world_size=1,
                            device_id=torch.device("cuda", 0))
    return "cuda"


class PinnedCopy:
    """Preallocated (pinned on CUDA) host buffers shaped like the model's local tensors."""

    def __init__(self, tensors: list[Any], device: str) -> None:
        import torch

        self.device = device
        self.tensors = tensors
        self.bufs = [torch.empty(t.shape, dtype=t.dtype, device="cpu", pin_memory=device == "cuda") for t in tensors]
        self.copy()  # first touch

    def copy(self) -> float:
        """Seconds of one copy of every tensor into the buffers (complete on return)."""
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for b, t in zip(self.bufs, self.tensors):
            b.copy_(t, non_blocking=self.device == "cuda")
        if self.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def time(self, repeats: int = 3) -> float:
        """Median of ``repeats`` copies."""
        samples = sorted(self.copy() for _ in range(repeats))
        return samples[len(samples) // 2]


def raw_disk_write(folder: str, bufs: list[Any], threads: int) -> float:
    """Seconds to write the buffers' bytes to ``threads`` new files (one per thread, tensors
    split by size as DCP splits them) and fsync each: the disk baseline."""
    from benchmarks.bench_s3 import _groups
    from benchmarks.common import raw_write

    groups = _groups(bufs, threads)
    errors: list[BaseException] = []

    def write(i: int) -> None:
        try:
            raw_write(os.path.join(folder, f"raw_{i}.bin"), groups[i])
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)

    workers = [threading.Thread(target=write, args=(i,)) for i in range(len(groups))]
    start = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join(600)
    seconds = time.perf_counter() - start
    if errors or any(w.is_alive() for w in workers):
        raise RuntimeError(f"raw disk write failed: {errors or 'a writer thread hung'}")
    for i in range(len(groups)):
        os.unlink(os.path.join(folder, f"raw_{i}.bin"))
    return seconds


def check(args: argparse.Namespace, work: str) -> dict[str, Any]:
    """Build the model, time the baseline and the saves; the results as a dict."""
    import torch

    from benchmarks.common import GiB, build_model, local_tensors, nbytes, ratio
    from benchmarks.common import median as _median
    from noether_dist import AsyncMode, Checkpointer, CheckpointerConfig, TrainingIteration
    from noether_dist.io.statedict import model_state

    started = time.perf_counter()
    device = _init(args.dry_run, os.path.join(work, "rdzv"))
    total = int(args.size_gib * GiB)
    free = shutil.disk_usage(work).free
    if free < 2.5 * total:
        raise SystemExit(f"{work} has {free / GiB:.1f} GiB free; the check needs {2.5 * total / GiB:.1f} GiB")
    model = build_model(total, layers=16, dtype=torch.bfloat16, device=device)
    tensors = local_tensors(model_state(model))
    state_bytes = nbytes(tensors)
    log.info("model: %.2f GiB of bf16 state on %s, built in %.1fs", state_bytes / GiB, device,
             time.perf_counter() - started)
    pinned = PinnedCopy(tensors, device)
    ckdir = os.path.join(work, "ck")
    raw_s = raw_disk_write(work, pinned.bufs, args.thread_count)
    log.info("raw disk write of %.2f GiB with %d threads: %.2fs (%.2f GB/s)", state_bytes / GiB, args.thread_count,
             raw_s, state_bytes / raw_s / 1e9)
    ck = Checkpointer(CheckpointerConfig(output_dir=ckdir, run_id="gpu", model_name="m", timeout_s=600,
                                         thread_count=args.thread_count, async_mode=AsyncMode.THREAD))
    t0 = time.perf_counter()
    ck.prepare(model=model)  # pinned staging buffers before the first save
    prepare_s = time.perf_counter() - t0
    log.info("staging prepared in %.2fs", prepare_s)
    saves: list[dict[str, Any]] = []
    previous = None
    for i in range(1, args.saves + 1):
        if time.perf_counter() - started > args.deadline_s:
            log.warning("deadline of %.0fs reached: stopping after %d saves", args.deadline_s, i - 1)
            break
        with torch.no_grad():  # a training step changes the weights between saves
            for p in model.parameters():
                p.to_local().mul_(0.999)
        copy_s = pinned.time()
        t0 = time.perf_counter()
        ck.save(TrainingIteration(0, i, i), model=model)
        returned = time.perf_counter() - t0
        ck.wait()
        completed = time.perf_counter() - t0
        saves.append({"save": i, "stall_s": ck.last_stall_s, "returned_s": returned, "completed_s": completed,
                      "pinned_copy_s": copy_s, "stall_vs_copy": ratio(ck.last_stall_s, copy_s),
                      "write_gb_s": state_bytes / completed / 1e9})
        log.info("save %d: stall %.3fs, pinned copy %.3fs (ratio %.2f), committed after %.2fs (%.2f GB/s)", i,
                 ck.last_stall_s, copy_s, saves[-1]["stall_vs_copy"], completed, saves[-1]["write_gb_s"])
        if previous is not None:  # keep only the newest checkpoint on disk
            for name in os.listdir(os.path.join(ckdir, "gpu", "checkpoints")):
                if f"_cp={previous}_" in name:
                    shutil.rmtree(os.path.join(ckdir, "gpu", "checkpoints", name), ignore_errors=True)
        previous = TrainingIteration(0, i, i)
    ck.close()
    later = saves[1:]
    raw_gbs = state_bytes / raw_s / 1e9
    write_gbs = _median(s["write_gb_s"] for s in later)
    figures = {
        "stall_vs_pinned_copy": {"value": _median(s["stall_vs_copy"] for s in later), "goal": "<= 1.1",
                                 "numerator": f"stall {_median(s['stall_s'] for s in later):.3f}s (saves 2..)",
                                 "denominator": f"pinned D2H copy {_median(s['pinned_copy_s'] for s in later):.3f}s"},
        "first_stall_vs_pinned_copy": {"value": saves[0]["stall_vs_copy"], "goal": "<= 1.5",
                                       "numerator": f"first stall {saves[0]['stall_s']:.3f}s (staging prepared "
                                                    f"before it in {prepare_s:.2f}s)",
                                       "denominator": f"pinned D2H copy {saves[0]['pinned_copy_s']:.3f}s"},
        "write_throughput_vs_raw_disk": {"value": ratio(write_gbs, raw_gbs), "goal": "info",
                                         "numerator": f"save to commit {write_gbs:.2f} GB/s (saves 2..)",
                                         "denominator": f"raw write+fsync {raw_gbs:.2f} GB/s"},
    }
    for f in figures.values():
        goal = f["goal"]
        f["met"] = None if goal == "info" else bool(f["value"] <= float(goal.split()[1]))
    machine: dict[str, Any] = {"torch": torch.__version__, "device": device, "cpus": os.cpu_count()}
    if device == "cuda":
        machine.update(gpu=torch.cuda.get_device_name(0), cuda=torch.version.cuda)
    return {"mode": "dry-run" if args.dry_run else "gpu", "state_bytes": state_bytes, "figures": figures,
            "saves": saves, "raw_write_s": raw_s, "machine": machine, "config": vars(args),
            "duration_s": time.perf_counter() - started}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("noether_dist").setLevel(logging.WARNING)
    work = args.dir or tempfile.mkdtemp(prefix="nd-gpu-check-")
    os.makedirs(work, exist_ok=True)
    try:
        result = check(args, work)
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1, default=str)
    for key in FIGURE_KEYS:
        f = result["figures"][key]
        print(f"{key:30s} {f['value']:8.3f}  goal {f['goal']:7s}  {f['numerator']} / {f['denominator']}")
    log.info("wrote %s (%.0fs)", args.out, result["duration_s"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
