"""Run the noether_dist benchmarks; print a table of ratios and write them as JSON.

    python benchmarks/run.py                      # default sizes, a few minutes on 2 cores
    python benchmarks/run.py --tiny               # every benchmark at a tiny size, seconds
    python benchmarks/run.py --world-size 4 --size-mib 1024 --only sync,async

Every figure is a ratio of two things measured side by side in this run on this machine
(see benchmarks/README.md for what each means and its goal). Multi-rank parts run real
processes (gloo on CPU, OMP_NUM_THREADS=1).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here and in every rank

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

if __package__ in (None, ""):  # run as a script: make `benchmarks` and `noether_dist` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import MiB, Figure, median, ratio  # noqa: E402

KiB = 1 << 10

log = logging.getLogger("benchmarks")

BENCHMARKS = ("rss", "sync", "async", "dedup", "s3", "resume", "scaling", "requests", "metadata", "tiers")
"""In the order they run (``rss`` first: its process has not run anything else yet)."""

FIGURE_KEYS = (
    "sync_save_throughput_vs_raw_write",
    "sync_save_time_vs_dcp_save",
    "sync_writer_time_vs_dcp_save",
    "sync_save_throughput_vs_raw_write_without_zip_crc",
    "async_stall_vs_copy",
    "async_stall_cpu_vs_copy_cpu",
    "async_first_stall_vs_copy",
    "async_unprepared_first_stall_vs_copy",
    "async_rss_growth_vs_state",
    "dedup_bytes_vs_unique",
    "s3_save_throughput_vs_raw_put",
    "s3_load_throughput_vs_raw_get",
    "s3_save_throughput_vs_raw_put_small",
    "s3_load_throughput_vs_raw_get_small",
    "resume_select_requests",
    "resume_select_and_read_requests",
    "resume_requests_vs_commit_listing",
    "resume_requests_vs_dir_listing",
    "scaling_save_time_vs_ws1",
    "scaling_load_time_vs_ws1",
    "s3_resume_requests_vs_dcp_load",
    "s3_resume_requests_per_rank_growth",
    "s3_save_requests_per_rank_growth",
    "metadata_rank_bytes_after_vs_before",
    "metadata_rank_time_after_vs_before",
    "metadata_coordinator_time_after_vs_before",
    "tiers_local_stall_vs_copy",
    "tiers_local_stall_cpu_vs_copy_cpu",
    "tiers_resume_time_local_vs_durable",
    "tiers_upload_throughput_vs_raw_put",
    "tiers_train_throughput_during_upload",
    "tiers_train_throughput_during_paced_upload",
    "tiers_train_throughput_during_upload_server_same_priority",
)
"""Every figure a full run reports (one per key; scaling keys are for the largest world size)."""

TINY = {"size_mib": 2, "s3_size_mib": 2, "s3_small_mib": 1, "rss_size_mib": 1, "scaling_size_mib": 2, "repeats": 1,
        "async_saves": 3, "rss_saves": 20, "checkpoints": 200, "request_world_sizes": "1,2",
        "metadata_world_sizes": "64", "metadata_tensors": 100,
        "tiers_size_mib": 2}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world-size", type=int, default=2, help="ranks for the multi-rank benchmarks (default 2)")
    p.add_argument("--size-mib", type=float, default=512,
                   help="total state of the sync, async and dedup benchmarks (default 512)")
    p.add_argument("--rss-size-mib", type=float, default=128, help="total state of the memory benchmark (default 128)")
    p.add_argument("--s3-size-mib", type=float, default=512,
                   help="total state of the S3 benchmark, whose ratios have goals (default 512)")
    p.add_argument("--s3-small-mib", type=float, default=128,
                   help="a second, smaller S3 state whose ratios are shown beside (the fixed cost of a save and "
                        "a resume weighs more there; default 128; 0: skip)")
    p.add_argument("--tiers-size-mib", type=float, default=64, help="state of the two-tier benchmark (default 64)")
    p.add_argument("--scaling-size-mib", type=float, default=256, help="total state of the scaling table (default 256)")
    p.add_argument("--scaling-world-sizes", default="1,2,4", help="world sizes of the scaling table (default 1,2,4)")
    p.add_argument("--request-world-sizes", default="1,2,4,8,16",
                   help="world sizes of the request-count table (default 1,2,4,8,16)")
    p.add_argument("--metadata-world-sizes", default="1024,4096",
                   help="world sizes of the modelled DCP metadata (default 1024,4096; one process)")
    p.add_argument("--metadata-tensors", type=int, default=1000, help="tensors of the modelled model (default 1000)")
    p.add_argument("--repeats", type=int, default=5, help="repetitions of each timed step; medians are reported")
    p.add_argument("--async-saves", type=int, default=16, help="async saves in the stall benchmark (default 16)")
    p.add_argument("--rss-saves", type=int, default=20, help="async saves after warm-up in the memory benchmark")
    p.add_argument("--checkpoints", type=int, default=200, help="committed checkpoints for the resume benchmark")
    p.add_argument("--thread-count", type=int, default=4, help="writer threads per rank and objects per rank on S3")
    p.add_argument("--tiny", action="store_true", help="every benchmark at a tiny size (seconds; for smoke tests)")
    p.add_argument("--only", default=",".join(BENCHMARKS), help=f"comma list out of {','.join(BENCHMARKS)}")
    p.add_argument("--out", default=None, help="JSON file to write (default runs/benchmarks/results-<time>.json)")
    p.add_argument("--dir", default=None, help="where checkpoints are written (default: a temp folder, removed)")
    p.add_argument("--profile", action="store_true", help="also cProfile one sync save per rank (written beside the JSON)")
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed per launch of ranks (default 900, tiny 180)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    args.only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(args.only) - set(BENCHMARKS))
    if unknown:
        p.error(f"unknown benchmark(s) {unknown}; choose from {list(BENCHMARKS)}")
    args.scaling_world_sizes = [int(x) for x in args.scaling_world_sizes.split(",") if x.strip()]
    args.request_world_sizes = [int(x) for x in str(args.request_world_sizes).split(",") if x.strip()]
    args.metadata_world_sizes = [int(x) for x in str(args.metadata_world_sizes).split(",") if x.strip()]
    if args.world_size < 1 or args.repeats < 1 or args.async_saves < 2 or args.rss_saves < 1:
        p.error("need --world-size >= 1, --repeats >= 1, --async-saves >= 2, --rss-saves >= 1")
    if args.timeout is None:
        args.timeout = 180.0 if args.tiny else 900.0
    return args


class Runner:
    """Runs the selected benchmarks in order and turns their raw results into figures."""

    def __init__(self, args: argparse.Namespace, work: str) -> None:
        self.args = args
        self.work = work
        self.figures: dict[str, Figure] = {}
        self.raw: dict[str, Any] = {}
        self.scaling_rows: list[dict[str, Any]] = []
        self.request_rows: list[dict[str, Any]] = []
        self.metadata_rows: list[dict[str, Any]] = []
        self.raw_profile: list[str] = []
        self.loadavg: dict[str, float] = {"before_run": os.getloadavg()[0]}
        """1-minute load average before the run and when each benchmark started (this run's
        own ranks count too): other work on the machine makes figures less reliable."""
        self._step = 0
        self._steps = len(args.only)

    def add(self, fig: Figure) -> None:
        self.figures[fig.key] = fig

    def progress(self, name: str, what: str) -> float:
        self._step += 1
        load = os.getloadavg()[0]
        self.loadavg[name] = load
        busy = f" (load average {load:.1f} on {os.cpu_count()} cores: other work is running)" \
            if load > busy_threshold(self.args) else ""
        log.info("[%d/%d] %s: %s%s", self._step, self._steps, name, what, busy)
        return time.perf_counter()

    def done(self, name: str, started: float, keys: list[str]) -> None:
        shown = ", ".join(f"{k}={self.figures[k].value:.3g}" for k in keys if k in self.figures)
        log.info("[%d/%d] %s: done in %.1fs %s", self._step, self._steps, name, time.perf_counter() - started, shown)

    def run(self) -> None:
        a = self.args
        local_jobs = []
        if "rss" in a.only:
            from benchmarks.bench_async import async_rss
            local_jobs.append(("rss", async_rss, {"out": self.work, "total_bytes": int(a.rss_size_mib * MiB),
                                                  "warmup": 2, "saves": a.rss_saves}))
        if "sync" in a.only:
            from benchmarks.bench_sync import sync_save
            local_jobs.append(("sync", sync_save, {"out": self.work, "total_bytes": int(a.size_mib * MiB),
                                                   "repeats": a.repeats, "profile_top": a.profile,
                                                   "settle": not a.tiny}))
        if "async" in a.only:
            from benchmarks.bench_async import async_stall
            local_jobs.append(("async", async_stall, {"out": self.work, "total_bytes": int(a.size_mib * MiB),
                                                      "saves": a.async_saves, "settle": not a.tiny}))
        if "dedup" in a.only:
            from benchmarks.bench_dedup import dedup
            local_jobs.append(("dedup", dedup, {"out": self.work, "total_bytes": int(a.size_mib * MiB)}))
        if local_jobs:
            self._local(local_jobs)
        if "s3" in a.only or "resume" in a.only or "requests" in a.only or "tiers" in a.only:
            self._s3()
        if "scaling" in a.only:
            self._scaling()
        if "metadata" in a.only:
            self._metadata()

    # -- groups ----------------------------------------------------------------------
    def _local(self, jobs: list[tuple[str, Any, dict[str, Any]]]) -> None:
        from tests.support.ranks import run_jobs

        names = [n for n, _, _ in jobs]
        started = self.progress(",".join(names), f"{len(jobs)} benchmark(s) on {self.args.world_size} ranks "
                                                 f"(one launch; {', '.join(names)} in this order)")
        self._step -= 1
        results = run_jobs([(fn, kw) for _, fn, kw in jobs], self.args.world_size, timeout_s=self.args.timeout)
        for name, per_rank in zip(names, results):
            self._step += 1
            self.raw[name] = per_rank
            getattr(self, f"_figures_{name}")(per_rank)
            self.done(name, started, [k for k in self.figures if k.startswith(name.replace("rss", "async_rss"))])

    def _s3(self) -> None:
        from benchmarks.s3 import MotoServer, moto_available

        ok, why = moto_available()
        if not ok:
            raise RuntimeError(f"the s3 and resume benchmarks need a moto server: {why}")
        with MotoServer() as server:
            if "s3" in self.args.only:
                from benchmarks.bench_s3 import s3_throughput
                from tests.support.ranks import run_jobs

                started = self.progress("s3", f"save/load {self.args.s3_size_mib:g} MiB on {self.args.world_size} "
                                              f"ranks against raw s3fs, moto at {server.endpoint_url}")
                bucket = "nd-bench-s3"
                server.create_bucket(bucket)
                kw = {"endpoint": server.endpoint_url, "extra": server.storage_extra(), "bucket": bucket,
                      "total_bytes": int(self.args.s3_size_mib * MiB), "repeats": self.args.repeats,
                      "thread_count": self.args.thread_count, "server_pid": server.pid}
                small = int(self.args.s3_small_mib * MiB)
                if small:
                    server.create_bucket(f"{bucket}-small")  # its own checkpoints: none already committed
                per_rank, *smaller = run_jobs([(s3_throughput, kw)] + ([(s3_throughput, {**kw, "total_bytes": small, "bucket": f"{bucket}-small"})]
                                                                      if small else []),
                                              self.args.world_size, timeout_s=self.args.timeout)
                self.raw["s3"] = per_rank
                from benchmarks.bench_s3 import request_census

                self.raw["s3_census"] = request_census(server, total_bytes=int(self.args.s3_size_mib * MiB)
                                                       // self.args.world_size, thread_count=self.args.thread_count)
                self._figures_s3(per_rank)
                for per_rank_small in smaller:
                    self.raw["s3_small"] = per_rank_small
                    self._figures_s3(per_rank_small, suffix="_small", goal="info")
                self.done("s3", started, [k for k in self.figures if k.startswith("s3_") and "throughput" in k])
            if "requests" in self.args.only:
                from benchmarks.bench_requests import scale_table

                started = self.progress("requests", f"S3 requests of saves and resumes at world sizes "
                                                    f"{self.args.request_world_sizes}, next to plain DCP (moto's recorder)")
                self.request_rows = scale_table(server, self.args.request_world_sizes, timeout_s=self.args.timeout)
                self.raw["requests"] = self.request_rows
                self._figures_requests(self.request_rows)
                self.done("requests", started, [k for k in self.figures if k.endswith("_requests_vs_dcp_load")
                                                or k.endswith("_per_rank_growth")])
            if "tiers" in self.args.only:
                from benchmarks.bench_tiers import tiers_bench

                started = self.progress("tiers", f"two tiers, {self.args.tiers_size_mib:g} MiB, 1 process, durable "
                                                 f"tier on moto at {server.endpoint_url}")
                server.create_bucket("nd-bench-tiers")
                work = os.path.join(self.work, "tiers")
                res = tiers_bench(work=work, endpoint=server.endpoint_url, extra=server.storage_extra(),
                                  bucket="nd-bench-tiers", total_bytes=int(self.args.tiers_size_mib * MiB),
                                  repeats=max(2, self.args.repeats), server_pid=server.pid,
                                  stall_pairs=max(2, 4 * self.args.repeats))
                self.raw["tiers"] = res
                self._figures_tiers(res)
                self.done("tiers", started, [k for k in self.figures if k.startswith("tiers")])
            if "resume" in self.args.only:
                from benchmarks.bench_resume import resume_requests

                started = self.progress("resume", f"requests to select among {self.args.checkpoints} committed "
                                                  "checkpoints on S3, counted by an HTTP proxy")
                res = resume_requests(server, checkpoints=self.args.checkpoints)
                self.raw["resume"] = res
                self._figures_resume(res)
                self.done("resume", started, [k for k in self.figures if k.startswith("resume")])

    def _scaling(self) -> None:
        from benchmarks.bench_scaling import scaling
        from tests.support.ranks import run_jobs

        started = self.progress("scaling", f"save/load {self.args.scaling_size_mib:g} MiB at world sizes "
                                           f"{self.args.scaling_world_sizes}")
        cores = os.cpu_count() or 1
        for ws in self.args.scaling_world_sizes:
            kw = {"out": self.work, "total_bytes": int(self.args.scaling_size_mib * MiB), "repeats": self.args.repeats,
                  "settle": not self.args.tiny}
            per_rank = run_jobs([(scaling, kw)], ws, timeout_s=self.args.timeout)[0]
            if not all(r["loaded_equal"] for r in per_rank):
                raise RuntimeError(f"scaling ws={ws}: the loaded state differs from the saved one")
            save_s, load_s = median(per_rank[0]["save_s"]), median(per_rank[0]["load_s"])
            total = self.args.scaling_size_mib * MiB
            self.scaling_rows.append({"world_size": ws, "save_s": save_s, "load_s": load_s,
                                      "save_gb_s": total / save_s / 1e9, "load_gb_s": total / load_s / 1e9,
                                      "oversubscribed": ws > cores, "cores": cores})
        base = self.scaling_rows[0]
        last = self.scaling_rows[-1]
        note = f"ws={last['world_size']} vs ws={base['world_size']}" + \
               (f"; ws={last['world_size']} oversubscribes {cores} cores" if last["oversubscribed"] else "")
        self.add(Figure("scaling_save_time_vs_ws1", ratio(last["save_s"], base["save_s"]), "info",
                        f"save {last['save_s']:.3f}s at ws={last['world_size']}",
                        f"save {base['save_s']:.3f}s at ws={base['world_size']}", note))
        self.add(Figure("scaling_load_time_vs_ws1", ratio(last["load_s"], base["load_s"]), "info",
                        f"load {last['load_s']:.3f}s at ws={last['world_size']}",
                        f"load {base['load_s']:.3f}s at ws={base['world_size']}", note))
        self.done("scaling", started, ["scaling_save_time_vs_ws1", "scaling_load_time_vs_ws1"])

    def _metadata(self) -> None:
        from benchmarks.bench_metadata import measure

        started = self.progress("metadata", f"DCP metadata of a {self.args.metadata_tensors}-tensor model and its "
                                            f"AdamW state at {self.args.metadata_world_sizes} ranks (modelled in "
                                            "one process)")
        for ws in self.args.metadata_world_sizes:
            for optimizer in (False, True):
                row = measure(ws, self.args.metadata_tensors, optimizer=optimizer, with_gc=False,
                              full_plan=ws <= 1024)  # (DCP's own plan on the whole: minutes above)
                log.info("metadata ws=%d %s: %s", ws, "optim" if optimizer else "model", row)
                self.metadata_rows.append(row)
        self.raw["metadata"] = self.metadata_rows
        last = [r for r in self.metadata_rows if r["world_size"] == self.args.metadata_world_sizes[-1]]
        ws = last[0]["world_size"]

        def total(key: str) -> float:
            return sum(r[key] for r in last)

        same = f"the same reads: {all(r['same_plan'] for r in last)}"
        self.add(Figure("metadata_rank_bytes_after_vs_before", ratio(total("rank_bytes_after"),
                                                                     total("rank_bytes_before")), "info",
                        f"its part {total('rank_bytes_after') / KiB:.0f} KiB",
                        f"the whole .metadata {total('rank_bytes_before') / MiB:.1f} MiB",
                        f"one non-coordinator rank, model + optimizer artifact at {ws} ranks; it sends "
                        f"{total('description_bytes') / KiB:.0f} KiB (what it loads)"))
        self.add(Figure("metadata_rank_time_after_vs_before", ratio(total("rank_after_s"), total("rank_before_s")),
                        "info", f"describe + unpickle its part + plan {total('rank_after_s'):.3f}s",
                        f"unpickle the whole + cut + plan {total('rank_before_s'):.2f}s",
                        f"one non-coordinator rank at {ws} ranks; {same}"
                        + (f"; DCP's own planner on the whole metadata {total('plan_full_s'):.2f}s"
                           if all(r["plan_full_s"] is not None for r in last) else "")))
        self.add(Figure("metadata_coordinator_time_after_vs_before", ratio(total("coordinator_total_s"),
                                                                           total("pickle_whole_s")), "info",
                        f"index, cut and pickle {ws} parts {total('coordinator_total_s'):.1f}s",
                        f"pickle the whole for the broadcast {total('pickle_whole_s'):.1f}s",
                        f"the coordinator's work besides reading .metadata (unpickling it, "
                        f"{total('unpickle_s'):.1f}s, is the same before and after); it receives "
                        f"{total('descriptions_bytes') / MiB:.0f} MiB of descriptions, less than DCP's "
                        f"gather of load plans ({total('dcp_plan_gather_bytes') / MiB:.0f} MiB) that resume no longer runs"))
        self.done("metadata", started, ["metadata_rank_bytes_after_vs_before", "metadata_rank_time_after_vs_before",
                                        "metadata_coordinator_time_after_vs_before"])

    # -- figures ---------------------------------------------------------------------
    def _figures_requests(self, rows: list[dict[str, Any]]) -> None:
        last = rows[-1]
        self.add(Figure("s3_resume_requests_vs_dcp_load", ratio(last["resume"], last["dcp_load"]), "<= 0.5",
                        f"resume {last['resume']} requests", f"plain dcp.load {last['dcp_load']} requests",
                        f"at {last['world_size']} ranks; model + AdamW + trainer state (8 Linear(64, 64), FSDP2)"))
        for what, key in (("resume", "s3_resume_requests_per_rank_growth"), ("save2", "s3_save_requests_per_rank_growth")):
            # the busiest rank other than the coordinator, and the coordinator, at each world size
            others = [max(r["by_rank"][what][1:]) for r in rows if r["world_size"] > 1]
            coord = [r["by_rank"][what][0] for r in rows]
            worst = max(max(others) / min(others) if others else 1.0, max(coord) / min(coord))
            self.add(Figure(key, worst, "<= 1.2", f"most requests of one rank: coordinator {max(coord)}, other "
                            f"{max(others) if others else '-'}", f"fewest: coordinator {min(coord)}, other "
                            f"{min(others) if others else '-'}",
                            f"{'two saves' if what == 'save2' else 'one resume'} at world sizes "
                            f"{[r['world_size'] for r in rows]}"))

    def _figures_sync(self, per_rank: list[dict[str, Any]]) -> None:
        samples = per_rank[0]["times"]  # timed() gives the slowest rank's time on every rank
        times = {k: median(v) for k, v in samples.items()}
        total = sum(r["local_bytes"] for r in per_rank)
        gbs = {k: total / v / 1e9 for k, v in times.items()}

        def paired(a: str, b: str) -> tuple[float, str]:
            """Median over repetitions of a/b within each repetition, and its range."""
            rs = [x / y for x, y in zip(samples[a], samples[b])]
            return median(rs), f"per repetition {min(rs):.2f}..{max(rs):.2f}"

        v, spread = paired("raw", "ours")
        self.add(Figure("sync_save_throughput_vs_raw_write", v, ">= 0.85",
                        f"Checkpointer.save {gbs['ours']:.2f} GB/s ({times['ours']:.3f}s)",
                        f"raw write+fsync {gbs['raw']:.2f} GB/s ({times['raw']:.3f}s)",
                        f"{total / MiB:.0f} MiB over {len(per_rank)} ranks, median of {self.args.repeats}; {spread}; "
                        f"torch.save+fsync alone {times['torch_save']:.3f}s"))
        v, spread = paired("ours", "dcp")
        self.add(Figure("sync_save_time_vs_dcp_save", v, "<= 1.10",
                        f"Checkpointer.save {times['ours']:.3f}s", f"dcp.save {times['dcp']:.3f}s",
                        f"{spread}; fixed cost of one save (64 KiB state): {times['ours_tiny'] * 1000:.0f} ms"))
        v, spread = paired("writer", "dcp")
        self.add(Figure("sync_writer_time_vs_dcp_save", v, "info",
                        f"dcp_io.save_state {times['writer']:.3f}s", f"dcp.save {times['dcp']:.3f}s",
                        f"our DCP writer (fsspec + CRC32) without the commit protocol; {spread}"))
        v, spread = paired("raw", "ours_no_zip_crc")
        self.add(Figure("sync_save_throughput_vs_raw_write_without_zip_crc", v, "info",
                        f"Checkpointer.save, torch's zip CRC32 off {gbs['ours_no_zip_crc']:.2f} GB/s",
                        f"raw write+fsync {gbs['raw']:.2f} GB/s",
                        f"what-if of a proposed change (our CRC32 in the commit record stays); {spread}"))
        self.raw_profile = [r.get("profile") for r in per_rank if r.get("profile")]

    def _figures_async(self, per_rank: list[dict[str, Any]]) -> None:
        n = len(per_rank[0]["stalls"])
        stalls = [max(r["stalls"][i] for r in per_rank) for i in range(n)]
        copies = [max(r["copy_s"][i] for r in per_rank) for i in range(n)]
        ratios = [s / c for s, c in zip(stalls, copies)]
        local = max(r["local_bytes"] for r in per_rank)
        parts = per_rank[0]["parts"]
        self.add(Figure("async_stall_vs_copy", median(ratios[1:]), "<= 1.2",
                        f"stall {median(stalls[1:]) * 1000:.1f} ms (saves 2..{n})",
                        f"copy {median(copies[1:]) * 1000:.1f} ms of {local / MiB:.0f} MiB/rank",
                        "median of per-save ratios (each stall / the copy timed just before it); stalls "
                        + ", ".join(f"{s * 1000:.1f}" for s in stalls) + " ms; copies "
                        + ", ".join(f"{c * 1000:.1f}" for c in copies) + " ms; parts alone: capture "
                        f"{parts['capture_s'] * 1000:.2f} ms, copy of the trainer state's objects "
                        f"{parts['snapshot_s'] * 1000:.2f} ms, staging copy {parts['stage_s'] * 1000:.1f} ms "
                        "(no collective: the ranks agree on the writer thread)"))
        cpu_stalls = [max(r["stalls_cpu"][i] for r in per_rank) for i in range(n)]
        cpu_copies = [max(r["copy_cpu_s"][i] for r in per_rank) for i in range(n)]
        self.add(Figure("async_stall_cpu_vs_copy_cpu", median(s / c for s, c in zip(cpu_stalls[1:], cpu_copies[1:])),
                        "info", f"stall {median(cpu_stalls[1:]) * 1000:.1f} ms of CPU (saves 2..{n})",
                        f"copy {median(cpu_copies[1:]) * 1000:.1f} ms of CPU",
                        "the same pairs in the caller thread's CPU time (time.thread_time): what the stall's own "
                        "work costs, without the time other processes held the cores"))
        r0 = per_rank[0]
        self.add(Figure("async_first_stall_vs_copy", ratios[0], "<= 1.5",
                        f"first stall {stalls[0] * 1000:.1f} ms", f"copy {copies[0] * 1000:.1f} ms",
                        f"staging prepared before the first save (Checkpointer.prepare, {r0['prepare_s'] * 1000:.0f} ms "
                        "on rank 0); measured in the same run as the later saves"))
        cold = [r["unprepared_first_stall_s"] / r["unprepared_first_copy_s"] for r in per_rank]
        worst = max(range(len(per_rank)), key=lambda i: cold[i])
        self.add(Figure("async_unprepared_first_stall_vs_copy", cold[worst], "info",
                        f"first stall {per_rank[worst]['unprepared_first_stall_s'] * 1000:.1f} ms",
                        f"copy {per_rank[worst]['unprepared_first_copy_s'] * 1000:.1f} ms",
                        "a Checkpointer not prepared: its first save allocates the staging buffers"))

    def _figures_rss(self, per_rank: list[dict[str, Any]]) -> None:
        growth = [ratio(r["rss_end"] - r["rss_warm"], r["local_bytes"]) for r in per_rank]
        worst = max(range(len(per_rank)), key=lambda i: growth[i])
        r = per_rank[worst]
        self.add(Figure("async_rss_growth_vs_state", growth[worst], "<= 0.05",
                        f"RSS growth {(r['rss_end'] - r['rss_warm']) / MiB:.1f} MiB over {self.args.rss_saves} saves",
                        f"state {r['local_bytes'] / MiB:.1f} MiB/rank",
                        f"rank {worst}; RSS after warm-up {r['rss_warm'] / MiB:.0f} MiB"))

    def _figures_dedup(self, per_rank: list[dict[str, Any]]) -> None:
        r = per_rank[0]
        self.add(Figure("dedup_bytes_vs_unique", ratio(r["data_bytes"], r["unique_bytes"]), "== 1.0",
                        f"data files {r['data_bytes'] / MiB:.2f} MiB", f"unique {r['unique_bytes'] / MiB:.2f} MiB",
                        f"{len(per_rank)} ranks; without dedup {r['naive_bytes'] / MiB:.2f} MiB; "
                        f".metadata {r['metadata_bytes']} B"))

    def _figures_s3(self, per_rank: list[dict[str, Any]], suffix: str = "", goal: str = ">= 0.9") -> None:
        samples = per_rank[0]["times"]
        times = {k: median(v) for k, v in samples.items()}
        total = sum(r["local_bytes"] for r in per_rank)
        mbs = {k: total / v / 1e6 for k, v in times.items()}
        census = self.raw.get("s3_census", {})

        def paired(a: str, b: str) -> tuple[float, str]:
            rs = [x / y for x, y in zip(samples[a], samples[b])]
            return median(rs), f"per repetition {min(rs):.2f}..{max(rs):.2f}"

        def reqs(name: str) -> str:
            c = census.get(name)
            return f"{c['requests']} requests, {c['data_requests']} of them data" if c else "not counted"

        def cpu(name: str) -> str:
            """CPU seconds of a step: all ranks together, and the server (medians)."""
            ranks = median(sum(r["cpu_s"][name][i] for r in per_rank) for i in range(len(samples[name])))
            server = median(per_rank[0]["server_cpu_s"].get(name) or [float("nan")])
            return f"{name} {times[name]:.3f} s wall, CPU {ranks:.2f} s ranks + {server:.2f} s server"

        common = f"{total / MiB:.0f} MiB over {len(per_rank)} ranks, {self.args.thread_count} objects/threads per rank"
        v, spread = paired("raw_put", "ours_save")
        one, _ = paired("raw_put_one", "raw_put")
        self.add(Figure(f"s3_save_throughput_vs_raw_put{suffix}", v, goal,
                        f"Checkpointer.save {mbs['ours_save']:.0f} MB/s", f"s3fs put {mbs['raw_put']:.0f} MB/s",
                        f"{common}; {spread}; fixed cost of one save (64 KiB state): "
                        f"{times['ours_save_tiny'] * 1000:.0f} ms; one save at 1 rank ({self.args.s3_size_mib:g} MiB): "
                        f"{reqs('save')}; "
                        f"raw put of one object per rank instead of {self.args.thread_count}: {one:.2f}x the time; "
                        + "; ".join(cpu(k) for k in ("raw_put", "raw_put_one", "ours_save", "ours_save_tiny"))))
        v, spread = paired("raw_get", "ours_load")
        nv, _ = paired("raw_get", "ours_load_noverify")
        self.add(Figure(f"s3_load_throughput_vs_raw_get{suffix}", v, goal,
                        f"resume {mbs['ours_load']:.0f} MB/s", f"s3fs get {mbs['raw_get']:.0f} MB/s",
                        f"{common}; {spread}; without the CRC32 read (verify_max_bytes=0): {nv:.2f} "
                        f"({mbs['ours_load_noverify']:.0f} MB/s); one load at 1 rank ({self.args.s3_size_mib:g} MiB): "
                        f"{reqs('load')}, "
                        f"without verification {reqs('load_noverify')}; "
                        + "; ".join(cpu(k) for k in ("raw_get", "ours_load", "ours_load_noverify"))))

    def _figures_tiers(self, res: dict[str, Any]) -> None:
        def paired(a: str, b: str) -> tuple[float, str]:
            rs = [x / y for x, y in zip(res[a], res[b])]
            return median(rs), f"{len(rs)} pairs, {min(rs):.2f}..{max(rs):.2f}" if rs else "no pairs"

        size = f"{res['state_bytes'] / MiB:.0f} MiB state, 1 process"
        v, spread = paired("stall", "copy")
        self.add(Figure("tiers_local_stall_vs_copy", v, "<= 1.2", f"tiered save stall {median(res['stall']) * 1e3:.1f} ms",
                        f"plain copy {median(res['copy']) * 1e3:.1f} ms", f"{size}; async thread; {spread}"))
        v, spread = paired("stall_cpu", "copy_cpu")
        self.add(Figure("tiers_local_stall_cpu_vs_copy_cpu", v, "info",
                        f"stall {median(res['stall_cpu']) * 1e3:.1f} ms of CPU", f"copy {median(res['copy_cpu']) * 1e3:.1f} ms of CPU",
                        f"the same pairs in the caller thread's CPU time (time.thread_time); {spread}"))
        v, spread = paired("resume_local", "resume_durable")
        self.add(Figure("tiers_resume_time_local_vs_durable", v, "info",
                        f"resume from the local tier {median(res['resume_local']):.2f} s",
                        f"from the durable tier (moto S3) {median(res['resume_durable']):.2f} s", f"{size}; {spread}"))
        v, spread = paired("put", "upload")
        self.add(Figure("tiers_upload_throughput_vs_raw_put", v, ">= 0.9",
                        f"upload {median(res['upload']):.2f} s (read, check, send, agree, commit)",
                        f"s3fs put_file of the same files {median(res['put']):.2f} s", f"{size}; {spread}"))
        for tag, what, goal, server in (
                ("", "at full speed", ">= 0.95", "S3 server (moto, same cores, nice 19 as a remote store)"),
                ("_paced", f"paced to {res['paced_mb_s']:g} MB/s", ">= 0.95", "S3 server (moto, same cores, nice 19)"),
                ("_server_nice0", "at full speed", "info", "S3 server (moto, same cores, at the training's priority)")):
            v, spread = paired(f"train_upload{tag}", f"train_idle{tag}")
            self.add(Figure(f"tiers_train_throughput_during{tag.replace('_server_nice0', '')}_upload"
                            + ("_server_same_priority" if tag == "_server_nice0" else ""), v, goal,
                            f"{median(res[f'train_upload{tag}']):.0f} steps/s while an upload runs ({what})",
                            f"{median(res[f'train_idle{tag}']):.0f} steps/s with none",
                            f"{size}; CPU MLP 256x256, 1 thread, {os.cpu_count()} cores; meanwhile the {server} "
                            f"kept {median(res[f'server_cores{tag}']):.2f} cores busy, the upload "
                            f"process {median(res[f'uploader_cores{tag}']):.2f}, training {median(res[f'trainer_cores{tag}']):.2f} "
                            f"(without an upload {median(res[f'trainer_idle_cores{tag}']):.2f}); {spread}"))

    def _figures_resume(self, res: dict[str, Any]) -> None:
        n = res["checkpoints"]
        req = {k: v["requests"] for k, v in res.items() if isinstance(v, dict)}
        ours, resolve = req["ours"], req["ours_resolve_record"]
        self.add(Figure("resume_select_requests", float(ours), "<= 3", f"{ours} requests (select_checkpoint)",
                        "1 (a count, not a ratio)",
                        f"{n} committed checkpoints; {res['ours']['by_method']}; with Storage.read as one GET: "
                        f"{req['ours_one_get_read']}"))
        self.add(Figure("resume_select_and_read_requests", float(resolve), "<= 3",
                        f"{resolve} requests (resolve_record, as resume runs it)", "1 (a count)",
                        f"{res['ours_resolve_record']['by_method']}; with Storage.read as one GET: "
                        f"{req['ours_resolve_record_one_get_read']}"))
        self.add(Figure("resume_requests_vs_commit_listing", ratio(ours, req["commit_listing"]), "info",
                        f"{ours} requests", f"{req['commit_listing']} requests: list _commits/ + read newest",
                        f"select only from the listing: {req['commit_listing_select_only']} request(s), "
                        f"returning {n} keys"))
        self.add(Figure("resume_requests_vs_dir_listing", ratio(ours, req["dir_listing"]), "info", f"{ours} requests",
                        f"{req['dir_listing']} requests: list folders + .metadata check each (torchtitan style)"))


def busy_threshold(args: argparse.Namespace) -> float:
    """A 1-min load average above this means work other than this run's own ranks."""
    return (os.cpu_count() or 1) + max(args.world_size, *args.scaling_world_sizes, *args.request_world_sizes) / 2


def machine_info() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "platform": platform.platform(), "cuda": torch.cuda.is_available()}


def print_requests(rows: list[dict[str, Any]], metadata_rows: list[dict[str, Any]], out: Any = None) -> None:
    """The request-count table (measured) and the model of it up to 4,096 ranks."""
    out = out or sys.stdout
    if rows:
        print("\nS3 requests (moto's recorder; 8 Linear(64,64), FSDP2, AdamW, trainer state):", file=out)
        print("  ranks  2 saves  /rank  dcp.save  resume  /rank  coord  other  dcp.load  resume/dcp", file=out)
        for r in rows:
            ws, res = r["world_size"], r["by_rank"]["resume"]
            print(f"  {ws:>5}  {r['save2']:>7}  {r['save2'] / ws:5.1f}  {r['dcp_save'] or '-':>8}  {r['resume']:>6}  "
                  f"{r['resume'] / ws:5.1f}  {res[0]:>5}  {max(res[1:]) if ws > 1 else '-':>5}  "
                  f"{r['dcp_load'] or '-':>8}  {ratio(r['resume'], r['dcp_load'] or 0):10.2f}", file=out)
    model = model_rows(rows, metadata_rows)
    if model:
        print("\nmodelled (requests from the per-rank counts above; bytes from the metadata model):", file=out)
        print("  ranks  requests/save  requests/resume  metadata MiB  shard MiB read/rank", file=out)
        for m in model:
            meta = f"{m['metadata_mib']:12.1f}" if m["metadata_mib"] is not None else f"{'-':>12}"
            shard = f"{m['shard_mib']:19.2f}" if m["shard_mib"] is not None else f"{'-':>19}"
            print(f"  {m['world_size']:>5}  {m['save']:>13.1f}  {m['resume']:>15}  {meta}  {shard}", file=out)


def print_metadata(rows: list[dict[str, Any]], out: Any = None) -> None:
    """One non-coordinator rank's part of resume's metadata work, before (the whole
    .metadata broadcast) and after (its part alone), and the coordinator's extra work."""
    if not rows:
        return
    out = out or sys.stdout
    print("\nDCP metadata per artifact, modelled (one non-coordinator rank; before: the whole .metadata "
          "broadcast, after: its part):", file=out)
    print("  ranks  artifact  .metadata MiB  rank receives before -> after (ratio)  rank s before -> after "
          "(ratio)  same plan  coordinator: pickle whole s -> cut+pickle all s, descriptions MiB", file=out)
    for r in rows:
        print(f"  {r['world_size']:>5}  {'optim' if r['optimizer'] else 'model':>8}  {r['metadata_bytes'] / MiB:13.1f}  "
              f"{r['rank_bytes_before'] / MiB:9.1f} MiB -> {r['rank_bytes_after'] / KiB:7.1f} KiB "
              f"({r['rank_bytes_ratio']:.5f})  {r['rank_before_s']:8.2f} -> {r['rank_after_s']:6.3f} "
              f"({r['rank_time_ratio']:.4f})  {str(r['same_plan']):>9}  {r['pickle_whole_s']:8.1f} -> "
              f"{r['coordinator_total_s']:6.1f}, {r['descriptions_bytes'] / MiB:6.1f}", file=out)


def model_rows(rows: list[dict[str, Any]], metadata_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Requests per save and resume at 1..4096 ranks from the measured per-rank counts
    (coordinator + (ws - 1) x the busiest other rank), with the modelled metadata bytes."""
    multi = [r for r in rows if r["world_size"] > 1]
    if not multi:
        return []
    ref = multi[-1]
    out = []
    sizes = sorted({1, 8, 64, 1024, 4096} | {r["world_size"] for r in metadata_rows})
    for ws in sizes:
        counts = {w: ref["by_rank"][w][0] + (ws - 1) * max(ref["by_rank"][w][1:]) for w in ("save2", "resume")}
        meta = [m for m in metadata_rows if m["world_size"] == ws]
        out.append({"world_size": ws, "save": counts["save2"] / 2,
                    "resume": counts["resume"],
                    "metadata_mib": sum(m["metadata_bytes"] for m in meta) / MiB if meta else None,
                    "shard_mib": sum(m["rank_bytes_read"] for m in meta) / MiB if meta else None})
    return out


def print_table(figures: dict[str, Figure], scaling_rows: list[dict[str, Any]], out: Any = None) -> None:
    out = out or sys.stdout
    rows = [("figure", "value", "goal", "met", "numerator / denominator")]
    for f in figures.values():
        met = {True: "yes", False: "NO", None: "-"}[f.met]
        rows.append((f.key, f"{f.value:.3f}" if math.isfinite(f.value) else "nan", f.goal, met,
                     f"{f.numerator} / {f.denominator}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for i, r in enumerate(rows):
        print("  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4], file=out)
        if i == 0:
            print("  ".join("-" * w for w in widths) + "  " + "-" * 23, file=out)
    for f in figures.values():
        if f.note:
            print(f"  {f.key}: {f.note}", file=out)
    if scaling_rows:
        print("\nscaling (one fixed total state):", file=out)
        print("  world size  save s   load s   save GB/s  load GB/s", file=out)
        for r in scaling_rows:
            over = f"  (oversubscribed: {r['world_size']} ranks on {r['cores']} cores)" if r["oversubscribed"] else ""
            print(f"  {r['world_size']:>10}  {r['save_s']:7.3f}  {r['load_s']:7.3f}  {r['save_gb_s']:9.3f}  "
                  f"{r['load_gb_s']:9.3f}{over}", file=out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("noether_dist").setLevel(logging.WARNING)
    out = args.out or os.path.join("runs", "benchmarks", f"results-{time.strftime('%Y%m%d-%H%M%S')}.json")
    work = args.dir or tempfile.mkdtemp(prefix="nd-bench-")
    os.makedirs(work, exist_ok=True)
    started = time.perf_counter()
    runner = Runner(args, work)
    try:
        runner.run()
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)
    duration = time.perf_counter() - started
    print_table(runner.figures, runner.scaling_rows)
    print_requests(runner.request_rows, runner.metadata_rows)
    print_metadata(runner.metadata_rows)
    busy = {k: v for k, v in runner.loadavg.items()
            if v > (busy_threshold(args) if k != "before_run" else (os.cpu_count() or 1) / 2)}
    if busy:
        print(f"\nnote: other work was running ({os.cpu_count()} cores; 1-min load average: "
              + ", ".join(f"{k} {v:.1f}" for k, v in busy.items()) + "); those figures are less reliable")
    result = {
        "command": [sys.executable, *sys.argv] if argv is None else ["benchmarks/run.py", *argv],
        "config": {k: v for k, v in vars(args).items()},
        "machine": machine_info(),
        "duration_s": duration,
        "loadavg": runner.loadavg,
        "figures": {k: f.to_dict() for k, f in runner.figures.items()},
        "scaling": runner.scaling_rows,
        "requests": runner.request_rows,
        "requests_model": model_rows(runner.request_rows, runner.metadata_rows),
        "metadata": runner.metadata_rows,
        "raw": runner.raw,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1, default=str)
    if runner.raw_profile:
        prof_path = os.path.splitext(out)[0] + "-profile.txt"
        with open(prof_path, "w", encoding="utf-8") as fh:
            fh.write("\n\n".join(runner.raw_profile))
        log.info("profile of one sync save per rank: %s", prof_path)
    log.info("wrote %s (%.1fs in all)", out, duration)
    return 0


if __name__ == "__main__":
    sys.exit(main())
