"""noether-ckpt: look at and manage checkpoints on local paths and s3://.

Exit codes: 0 success, 1 a check found a problem, 2 bad usage or input, 3 store error.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from .catalog import StageSummary, list_runs, list_stages, summarize_stage
from .errors import ConfigError, InvalidNameError, NoetherDistError, StorageError
from .commit import CommitRecord, list_commits, read_commit
from .convert import convert_stage
from .layout import CHECKPOINTS_DIR, COMMITS_DIR, StageLayout, join_url
from .names import TrainingIteration
from .storage import Storage, StorageOptions, open_storage

__all__ = ["main", "build_parser"]

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_STORAGE = 0, 1, 2, 3


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _stages_under(storage: Storage, url: str) -> list[StageLayout]:
    """Stages under an output dir, a run dir, or a stage dir."""
    url = url.rstrip("/")
    parent, _, last = url.rpartition("/")
    if any(e.name == CHECKPOINTS_DIR and e.is_dir for e in storage.list(url)):
        # A stage folder or a run without stages: a commit record says which.
        commits = storage.list(join_url(url, CHECKPOINTS_DIR, COMMITS_DIR))
        record = CommitRecord.from_json(storage.read(commits[0].path)) if commits else None
        if record is not None and record.stage_name:
            return [StageLayout(parent.rpartition("/")[0] or ".", record.run_id, record.stage_name)]
        return [StageLayout(parent or ".", last, None)]
    stages = list_stages(storage, url)
    if stages:
        return [StageLayout(parent or ".", last, s or None) for s in stages]
    return [StageLayout(url, run, stage or None)
            for run in list_runs(storage, url) for stage in list_stages(storage, join_url(url, run)) or []]


def _summary_json(summary: StageSummary) -> dict[str, Any]:
    layout = summary.layout
    return {
        "run_id": layout.run_id, "stage_name": layout.stage_name, "path": layout.checkpoints_dir,
        "aliases": {k: (str(v.iteration) if v else None) for k, v in summary.aliases.items()},
        "checkpoints": [{"checkpoint": c.name, "committed": c.committed, "bytes": c.bytes, "aliases": list(c.aliases),
                         "artifacts": list(c.artifacts), "world_size": c.record.world_size if c.record else None,
                         "metrics": c.record.metrics if c.record else {}, "problem": c.problem}
                        for c in summary.checkpoints],
    }


def cmd_list(args: argparse.Namespace, storage: Storage) -> int:
    """List runs, stages and checkpoints with state, size and aliases."""
    summaries = [summarize_stage(storage, layout) for layout in _stages_under(storage, args.url)]
    if args.json:
        print(json.dumps([_summary_json(s) for s in summaries], indent=1))
        return EXIT_OK
    if not summaries:
        print(f"no runs or checkpoints under {args.url}")
        return EXIT_OK
    for summary in summaries:
        layout = summary.layout
        print(f"{layout.run_id}/{layout.stage_name or '(no stage)'}  [{layout.checkpoints_dir}]")
        if not summary.checkpoints:
            print("  (no checkpoints)")
        for cp in summary.checkpoints:
            state = "committed" if cp.committed else ("CORRUPT" if cp.problem else "uncommitted")
            aliases = ", ".join(cp.aliases)
            ws = f"ws={cp.record.world_size}" if cp.record else ""
            print(f"  {cp.name:<24} {state:<12} {_human(cp.bytes):>10}  {ws:<6} {aliases}")
    return EXIT_OK


class Progress:
    """A one-line progress display on stderr: ``[3/8] E1_U10_S80 model``; quiet when not a TTY
    unless forced."""

    def __init__(self, total: int, enabled: bool = True) -> None:
        self.total, self.done, self.enabled = total, 0, enabled

    def __call__(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if sys.stderr.isatty():
            end = "\n" if self.done >= self.total else "\r"
            print(f"[{self.done}/{self.total}] {label}".ljust(70), end=end, file=sys.stderr, flush=True)
        elif self.done == self.total or self.done % max(1, self.total // 10) == 0:
            print(f"[{self.done}/{self.total}] {label}", file=sys.stderr, flush=True)


def cmd_convert(args: argparse.Namespace, storage: Storage) -> int:
    """Convert a stage's checkpoints to consolidated files or back to sharded DCP."""
    stages = _stages_under(storage, args.url)
    if len(stages) != 1:
        names = [f"{s.run_id}/{s.stage_name or '-'}" for s in stages]
        raise ConfigError(f"convert needs one stage folder; {args.url} holds {len(stages)}: {names}")
    src_layout = stages[0]
    dst = open_storage(args.dest, _options(args))
    dst_layout = StageLayout(args.dest, src_layout.run_id, src_layout.stage_name)
    points = args.checkpoint or [str(p) for p in list_commits(storage, src_layout)]
    record0 = read_commit(storage, src_layout, TrainingIteration.parse(points[0])) if points else None
    per_point = len(record0.artifacts) if record0 else 1
    report = convert_stage(storage, src_layout, dst, dst_layout, args.to, args.checkpoint,
                           progress=Progress(len(points) * per_point, enabled=not args.json))
    if args.json:
        print(json.dumps({"converted": list(report.checkpoints), "bytes": report.bytes_written,
                          "destination": dst_layout.checkpoints_dir}))
    else:
        print(f"converted {len(report.checkpoints)} checkpoint(s) to {args.to} in {dst_layout.checkpoints_dir} "
              f"({_human(report.bytes_written)})")
    return EXIT_OK


def _options(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions(endpoint_url=args.endpoint_url, profile=args.profile, region=args.region)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of noether-ckpt."""
    parser = argparse.ArgumentParser(prog="noether-ckpt", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--endpoint-url", help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS config)")
    parser.add_argument("--profile", help="AWS credentials profile")
    parser.add_argument("--region", help="AWS region")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    sub = parser.add_subparsers(dest="command", required=True)
    p_list = sub.add_parser("list", help="runs, stages and checkpoints: committed or not, size, aliases")
    p_list.add_argument("url", help="output dir, run dir or stage dir (local path, file:// or s3://)")
    p_list.add_argument("--json", action="store_true", help="machine-readable output")
    p_list.set_defaults(func=cmd_list)
    p_conv = sub.add_parser("convert", help="sharded (DCP) <-> consolidated (single torch.save files)")
    p_conv.add_argument("url", help="stage dir (or run dir of a run without stages) to convert")
    p_conv.add_argument("dest", help="output dir to write the converted run/stage under")
    p_conv.add_argument("--to", required=True, choices=["consolidated", "sharded"], help="target format")
    p_conv.add_argument("--checkpoint", action="append", help="E.._U.._S.. to convert (repeatable; default all)")
    p_conv.add_argument("--json", action="store_true", help="machine-readable output")
    p_conv.set_defaults(func=cmd_convert)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``noether-ckpt``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s")
    try:
        storage = open_storage(args.url, _options(args))
        storage.check_root(args.url)
        return args.func(args, storage)
    except (ConfigError, InvalidNameError) as exc:
        print(f"noether-ckpt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StorageError, OSError) as exc:
        print(f"noether-ckpt: storage error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    except NoetherDistError as exc:
        print(f"noether-ckpt: error: {exc}", file=sys.stderr)
        return EXIT_PROBLEM


if __name__ == "__main__":
    sys.exit(main())
