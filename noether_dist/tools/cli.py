"""noether-ckpt: look at, check and manage checkpoints on local paths and s3://.

Subcommands: list, inspect, verify, prune, convert. Every subcommand takes --json for
scripts. URL is a local path, file:// or s3://bucket/prefix (endpoint from --endpoint-url
or AWS_ENDPOINT_URL_S3 / the AWS config; credentials from the AWS environment). list,
verify, prune and inspect --record never load torch, so they start at once. Long work
(verify, convert, prune) shows its progress in bytes, with rate and ETA, on stderr.

exit codes:
  0  success (verify: no damage found)
  1  a problem was found (verify: damage; a corrupt commit record; an unreadable file)
  2  bad usage or input (unknown subcommand or option, a path or bucket that does not
     exist, a bad name, a checkpoint that does not exist)
  3  storage error (permission denied, the store unreachable after retries)
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from typing import Any

from ..stage.catalog import StageSummary, summarize_stage
from ..stage.commit import commit_files, read_commit
from ..stage.index import StageIndex
from ..stage.runs import list_runs, list_stages
from ..errors import (AmbiguousCheckpointError, CheckpointNotFoundError, ConfigError, InvalidNameError,
                     NoetherDistError, StorageError)
from ..format.layout import CHECKPOINTS_DIR, COMMITS_DIR, StageLayout, join_url
from ..format.names import ArtifactKind, TrainingIteration
from ..format.records import CorruptRecordError
from .progress import Bar
from ..stage.retention import RetentionPolicy, prune
from ..io.storage import Storage, StorageOptions, open_storage
from ..stage.verify import DEFAULT_JOBS, VerifyReport, parse_checkpoint_arg, verify_stage

# torch (and the modules that need it: consolidated, dcp_io, convert) is imported only by
# the work that reads tensors: inspect's keys and convert.

__all__ = ["main", "build_parser", "EXIT_OK", "EXIT_PROBLEM", "EXIT_USAGE", "EXIT_STORAGE"]

EXIT_OK, EXIT_PROBLEM, EXIT_USAGE, EXIT_STORAGE = 0, 1, 2, 3


class ProblemFound(NoetherDistError):
    """A check found something wrong (exit code 1)."""


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def _stage_of_checkpoints_dir(storage: Storage, url: str) -> StageLayout:
    """The layout whose checkpoints folder is ``<url>/checkpoints``: a stage folder or a run
    without stages. A parsable commit record says which; the paths are the same either way."""
    parent, _, last = url.rpartition("/")
    run = StageLayout(parent or ".", last, None)  # its checkpoints folder is <url>/checkpoints too
    for it in commit_files(storage, run):
        try:
            record = read_commit(storage, run, it)
        except CorruptRecordError:
            continue  # verify reports it; the folder structure still tells where it is
        if record is None:
            continue
        if record.stage_name and record.stage_name == last and record.run_id == parent.rpartition("/")[2]:
            return StageLayout(parent.rpartition("/")[0] or ".", record.run_id, record.stage_name)
        break
    return run


def _stages_under(storage: Storage, url: str) -> list[StageLayout]:
    """Stages under an output dir, a run dir, a stage dir, or a checkpoints dir."""
    url = url.rstrip("/") or "/"
    parent, _, last = url.rpartition("/")
    if last == CHECKPOINTS_DIR and any(e.name == COMMITS_DIR for e in storage.list(url)):
        return [_stage_of_checkpoints_dir(storage, parent)]
    if any(e.name == CHECKPOINTS_DIR and e.is_dir for e in storage.list(url)):
        return [_stage_of_checkpoints_dir(storage, url)]
    stages = list_stages(storage, url)
    if stages:
        return [StageLayout(parent or ".", last, s or None) for s in stages]
    return [StageLayout(url, run, stage or None)
            for run in list_runs(storage, url) for stage in list_stages(storage, join_url(url, run)) or []]


def _one_stage(storage: Storage, url: str, what: str) -> StageLayout:
    stages = _stages_under(storage, url)
    if len(stages) != 1:
        names = [f"{s.run_id}/{s.stage_name or '-'}" for s in stages]
        raise ConfigError(f"{what} needs one stage folder (or a run without stages); {url} holds {len(stages)}"
                          + (f": {names}" if names else " (no checkpoints folder)"))
    return stages[0]


def _name(layout: StageLayout) -> str:
    return f"{layout.run_id}/{layout.stage_name or '(no stage)'}"


# -- list ---------------------------------------------------------------------------------
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


def _tiers(args: argparse.Namespace, storage: Storage) -> list[tuple[str | None, Storage, str]]:
    """(tier name, store, url) to look at: the url alone, or with ``--local-dir`` the
    durable tier (the url) and this node's local tier."""
    if not getattr(args, "local_dir", None):
        return [(None, storage, args.url)]
    local = open_storage(args.local_dir)
    _require_exists(local, args.local_dir)
    return [("durable", storage, args.url), ("local", local, args.local_dir)]


def cmd_list(args: argparse.Namespace, storage: Storage) -> int:
    """List runs, stages and checkpoints with state, size and aliases (with ``--local-dir``:
    of both tiers)."""
    tiers = [(tier, [summarize_stage(store, layout) for layout in _stages_under(store, url)], url)
             for tier, store, url in _tiers(args, storage)]
    if args.json:
        print(json.dumps([{**_summary_json(s), **({"tier": tier} if tier else {})}
                          for tier, summaries, _ in tiers for s in summaries], indent=1))
        return EXIT_OK
    for tier, summaries, url in tiers:
        if tier:
            print(f"== {tier} tier: {url}")
        _print_summaries(summaries, url)
    return EXIT_OK


def _print_summaries(summaries: list[StageSummary], url: str) -> None:
    if not summaries:
        print(f"no runs or checkpoints under {url}")
        return
    for summary in summaries:
        layout = summary.layout
        print(f"{_name(layout)}  [{layout.checkpoints_dir}]")
        if not summary.checkpoints:
            print("  (no checkpoints)")
        for cp in summary.checkpoints:
            state = "committed" if cp.committed else ("CORRUPT" if cp.problem else "uncommitted")
            aliases = ", ".join(cp.aliases)
            ws = f"ws={cp.record.world_size}" if cp.record else ""
            print(f"  {cp.name:<24} {state:<12} {_human(cp.bytes):>10}  {ws:<6} {aliases}")


# -- inspect ------------------------------------------------------------------------------
def _uncommitted_model_name(index: StageIndex) -> str:
    """The model name of Noether's own consolidated files in a stage without commit records."""
    names = {a.parsed.model_name for cp in index.find_all() for a in cp.artifacts}
    if len(names) > 1:
        raise ConfigError(f"the stage holds files of several models {sorted(names)}; choose one with --model-name")
    return names.pop() if names else "model"


def _artifact_json(storage: Storage, layout: StageLayout, art, *, keys: bool = True) -> dict[str, Any]:
    path = layout.artifact_path(art.name)
    if not keys:
        return {"name": art.name, "kind": art.kind, "model_info": art.model_info, "format": art.format.value,
                "files": len(art.files), "bytes": art.total_bytes if art.files else None, "keys": None}
    from ..io.formats import artifact_io

    try:
        keys = [k.to_dict() for k in artifact_io(art.format).keys(storage, path, ArtifactKind(art.kind))]
    except FileNotFoundError as exc:
        raise ProblemFound(f"{path} is missing ({exc}); run noether-ckpt verify") from None
    except ConfigError as exc:  # the file is not what its name says
        raise ProblemFound(str(exc)) from exc
    except (NoetherDistError, OSError):
        raise
    except Exception as exc:  # noqa: BLE001 - an unreadable (or unsafe) file is a finding, not a crash
        raise ProblemFound(f"{path} cannot be read: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                           ) from exc
    nbytes = art.total_bytes if art.files else storage.size(path)
    return {"name": art.name, "kind": art.kind, "model_info": art.model_info, "format": art.format.value,
            "files": len(art.files), "bytes": nbytes, "keys": keys}


def cmd_inspect(args: argparse.Namespace, storage: Storage) -> int:
    """One checkpoint: artifacts, keys, shapes, dtypes, bytes, world size, training point, metrics."""
    layout = _one_stage(storage, args.url, "inspect")
    ref = parse_checkpoint_arg(args.checkpoint or "latest", "--checkpoint")
    index = StageIndex(storage, layout)
    committed = bool(index.committed())
    model_name = args.model_name or ("model" if committed else _uncommitted_model_name(index))
    record = index.resolve_or_uncommitted(ref, model_name)
    aliases = [name for name, alias in index.aliases().items()
               if alias is not None and alias.iteration == record.iteration]
    if args.record and not committed:
        raise ConfigError(f"{layout.checkpoints_dir} has no commit records (Noether's own consolidated files): "
                          "inspect without --record reads the files themselves")
    artifacts = [_artifact_json(storage, layout, art, keys=not args.record) for art in record.artifacts]
    out = {"path": layout.checkpoints_dir, "run_id": record.run_id, "stage_name": record.stage_name,
           "checkpoint": record.checkpoint, "committed": committed, "training_iteration": record.iteration.to_dict(),
           "world_size": record.world_size if committed else None, "model_name": record.model_name,
           "metrics": record.metrics, "created_at": record.created_at or None, "aliases": sorted(aliases),
           "bytes": sum(a["bytes"] or 0 for a in artifacts), "artifacts": artifacts}
    if args.json:
        print(json.dumps(out, indent=1))
        return EXIT_OK
    it = record.iteration
    ws = f"saved on {record.world_size} rank(s)" if committed else "no commit record (Noether's own consolidated files)"
    print(f"{_name(layout)}  {record.checkpoint}  {'committed' if committed else 'uncommitted'}  {ws}  "
          f"{_human(out['bytes'])}  aliases: {', '.join(sorted(aliases)) or '-'}")
    print(f"  training point: epoch {it.epoch}, update {it.update}, sample {it.sample}"
          + (f"   created {record.created_at}" if record.created_at else ""))
    if record.metrics:
        print("  metrics: " + ", ".join(f"{k}={v:g}" for k, v in sorted(record.metrics.items())))
    for art in artifacts:
        info = f", {art['model_info']}" if art["model_info"] else ""
        print(f"  {art['name']}  ({art['kind']}{info}, {art['format']}, {art['files']} file(s), {_human(art['bytes'])})")
        for key in art["keys"] or []:
            shape = "x".join(map(str, key["shape"])) if key["shape"] else ("scalar" if key["shape"] == [] else "-")
            print(f"    {key['key']:<40} {key['dtype']:<9} {shape:<14} {_human(key['bytes']):>10}")
    return EXIT_OK


# -- verify -------------------------------------------------------------------------------
def cmd_verify(args: argparse.Namespace, storage: Storage) -> int:
    """Check every file of every commit record (size and CRC32, read in full); report
    leftovers without a record, corrupt records and bad aliases (with ``--local-dir``: of
    both tiers; this node's local disk holds its own ranks' shards and rank 0's files, so
    other ranks' shards missing there are counted, not damage). Exit 1 on any damage."""
    if args.checkpoint:
        parse_checkpoint_arg(args.checkpoint, "--checkpoint")
    reports = []
    with Bar("verify", enabled=_progress_on(args)) as bar:
        for tier, store, url in _tiers(args, storage):
            layouts = [_one_stage(store, url, "verify --checkpoint")] if args.checkpoint else _stages_under(store, url)
            if not layouts:
                raise ConfigError(f"no checkpoints folder under {url}")
            for layout in layouts:
                bar.describe(f"{tier + ' tier ' if tier else ''}{_name(layout)}")
                reports.append(verify_stage(store, layout, checkpoint=args.checkpoint, progress=bar, jobs=args.jobs,
                                            read_all=args.read_all, node_local=tier == "local"))
    report = VerifyReport(tuple(reports))
    if args.json:
        print(json.dumps(report.to_dict(), indent=1))
    else:
        for stage in report.stages:
            files = sum(c.files for c in stage.checkpoints)
            nbytes = sum(c.bytes for c in stage.checkpoints)
            by_store = sum(c.store_checked for c in stage.checkpoints)
            read = sum(c.bytes_read for c in stage.checkpoints)
            elsewhere = sum(c.elsewhere for c in stage.checkpoints)
            print(f"{_name(stage.layout)}  [{stage.layout.checkpoints_dir}]  {len(stage.checkpoints)} checkpoint(s), "
                  f"{files} file(s), {_human(nbytes)} checked: {by_store} file(s) by the store's CRC32, "
                  f"{_human(read)} read" + (f"; {elsewhere} file(s) of other nodes' ranks not here" if elsewhere else ""))
            for check in stage.checkpoints:
                state = "ok" if check.ok else ("UNCOMMITTED" if not check.committed and all(
                    d.kind.value == "uncommitted" for d in check.damages) else "DAMAGED")
                print(f"  {check.checkpoint:<24} {state}")
                for damage in check.damages:
                    print(f"    {damage}")
            for damage in stage.alias_damages:
                print(f"  alias {damage.checkpoint}: {damage}")
        if report.ok:
            print("verify: no damage found")
        else:
            print(f"verify: {len(report.damages)} problem(s) found", file=sys.stderr)
    return EXIT_OK if report.ok else EXIT_PROBLEM


# -- prune --------------------------------------------------------------------------------
def cmd_prune(args: argparse.Namespace, storage: Storage) -> int:
    """Apply a retention policy: keep the last K (and every N-th update), always the newest
    and every alias target; remove leftovers of saves that never committed."""
    policy = RetentionPolicy(keep_last=args.keep_last, keep_every=args.keep_every)
    layouts = _stages_under(storage, args.url)
    if not layouts:
        raise ConfigError(f"no checkpoints folder under {args.url}")
    results = []
    with Bar("prune", enabled=_progress_on(args) and not args.dry_run) as bar:
        for layout in layouts:
            bar.describe(_name(layout))
            results.append((layout, prune(storage, layout, policy, dry_run=args.dry_run, progress=bar)))
    if args.json:
        print(json.dumps({"dry_run": args.dry_run, "keep_last": args.keep_last, "keep_every": args.keep_every,
                          "stages": [{"run_id": lay.run_id, "stage_name": lay.stage_name, "path": lay.checkpoints_dir,
                                      "deleted": [str(p) for p in plan.delete], "kept": [str(p) for p in plan.keep],
                                      "uncommitted_removed": list(plan.uncommitted)} for lay, plan in results]},
                         indent=1))
        return EXIT_OK
    verb = "would delete" if args.dry_run else "deleted"
    for layout, plan in results:
        print(f"{_name(layout)}  [{layout.checkpoints_dir}]")
        print(f"  {verb}: {', '.join(map(str, plan.delete)) or 'nothing'}")
        print(f"  kept: {', '.join(map(str, plan.keep)) or 'nothing'}")
        if plan.uncommitted:
            print(f"  {verb} leftovers of saves that never committed: {', '.join(plan.uncommitted)}")
    return EXIT_OK


# -- convert ------------------------------------------------------------------------------
def cmd_convert(args: argparse.Namespace, storage: Storage) -> int:
    """Convert a stage's checkpoints to consolidated files or back to sharded DCP."""
    from .convert import convert_stage

    src_layout = _one_stage(storage, args.url, "convert")
    for name in args.checkpoint or []:
        TrainingIteration.parse(name)  # a clear error before anything is written
    dst = open_storage(args.dest, _options(args))
    dst_layout = StageLayout(args.dest, src_layout.run_id, src_layout.stage_name)
    with Bar("convert", enabled=_progress_on(args)) as bar:
        report = convert_stage(storage, src_layout, dst, dst_layout, args.to, args.checkpoint, progress=bar)
    if args.json:
        print(json.dumps({"converted": list(report.checkpoints), "bytes": report.bytes_written,
                          "destination": dst_layout.checkpoints_dir, "format": args.to}))
    else:
        print(f"converted {len(report.checkpoints)} checkpoint(s) to {args.to} in {dst_layout.checkpoints_dir} "
              f"({_human(report.bytes_written)})")
    return EXIT_OK


# -- plumbing -----------------------------------------------------------------------------
def _options(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions(endpoint_url=args.endpoint_url, profile=args.profile, region=args.region)


def _progress_on(args: argparse.Namespace) -> bool:
    return not args.json and not args.no_progress and not args.quiet


def _require_exists(storage: Storage, url: str) -> None:
    """ConfigError (exit 2) when the path, or the S3 bucket, does not exist; other store
    errors (403, unreachable) raise StorageError (exit 3)."""
    if storage.is_s3:
        try:
            storage.check_bucket(url)
        except StorageError as exc:
            if "does not exist" in str(exc):
                raise ConfigError(str(exc)) from None
            raise
    if not storage.exists(url):
        raise ConfigError(f"{url} does not exist")


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options accepted before and after the subcommand (the later one wins)."""
    default = (lambda value: value) if top else (lambda value: argparse.SUPPRESS)
    parser.add_argument("--endpoint-url", default=default(None),
                        help="S3 endpoint (default: AWS_ENDPOINT_URL_S3 / AWS config)")
    parser.add_argument("--profile", default=default(None), help="AWS credentials profile")
    parser.add_argument("--region", default=default(None), help="AWS region")
    parser.add_argument("--json", action="store_true", default=default(False),
                        help="machine-readable output on stdout")
    parser.add_argument("--no-progress", action="store_true", default=default(False),
                        help="no progress display on stderr")
    parser.add_argument("-q", "--quiet", action="store_true", default=default(False),
                        help="no progress display and only errors in the log")
    parser.add_argument("--log-level", type=_log_level, default=default(None), metavar="LEVEL",
                        help="log level: debug, info, warning (default), error")
    parser.add_argument("-v", "--verbose", action="store_true", default=default(False),
                        help="log what is done (--log-level info)")


def _log_level(text: str) -> int:
    level = logging.getLevelName(text.upper())
    if not isinstance(level, int):
        raise argparse.ArgumentTypeError(f"{text!r} is not a log level; use debug, info, warning or error")
    return level


_EPILOG = """exit codes: 0 ok, 1 problem found (verify: damage), 2 usage or bad input (missing path or
bucket, bad name, unknown checkpoint), 3 storage error (permission, store unreachable)."""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of noether-ckpt."""
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(prog="noether-ckpt", description=__doc__, formatter_class=fmt)
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{list,inspect,verify,prune,convert}")

    def add(name: str, help_text: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=f"{help_text}.\n\n{_EPILOG}", formatter_class=fmt)
        _add_common(p, top=False)
        p.set_defaults(func=func)
        return p

    p_list = add("list", "runs, stages and checkpoints: committed or not, size, aliases", cmd_list)
    p_list.add_argument("url", help="output dir, run dir or stage dir (local path, file:// or s3://)")
    p_list.add_argument("--local-dir", metavar="DIR", help="two tiers: also this node's local tier, the folder at "
                        "the same level as url (output, run or stage dir under tiers.local.dir)")

    p_insp = add("inspect", "one checkpoint: artifacts, keys, shapes, dtypes, bytes, world size, training point, "
                 "metrics", cmd_inspect)
    p_insp.add_argument("url", help="stage dir (or run dir of a run without stages)")
    p_insp.add_argument("--checkpoint", help="latest (default), last, best.<metric>, E.._U.._S.., or one of E<n>, "
                        "U<n>, S<n>")
    p_insp.add_argument("--model-name", help="model name of Noether's own consolidated files (default: the only one)")
    p_insp.add_argument("--record", action="store_true", help="only what the commit record says (artifacts, files, "
                        "bytes, training point, metrics), without reading keys and shapes: does not load torch")

    p_ver = add("verify", "check sizes and CRC32s of every committed file (by the store's CRC32 where it keeps "
                "one, else read in full), leftovers without a commit record, corrupt records and bad aliases; "
                "exit 1 on damage", cmd_verify)
    p_ver.add_argument("url", help="output dir, run dir or stage dir")
    p_ver.add_argument("--checkpoint", help="only this checkpoint (latest, best.<metric>, E.._U.._S.., E<n>, ...)")
    p_ver.add_argument("--local-dir", metavar="DIR", help="two tiers: also this node's local tier, the folder at "
                       "the same level as url (output, run or stage dir under tiers.local.dir)")
    p_ver.add_argument("--jobs", type=_positive, default=DEFAULT_JOBS, metavar="N",
                       help=f"files checked at the same time (default {DEFAULT_JOBS})")
    p_ver.add_argument("--read-all", action="store_true",
                       help="read every byte and compute its CRC32, even where the store keeps one")

    p_prune = add("prune", "delete committed checkpoints by retention policy (never the newest or an alias "
                  "target) and leftovers of saves that never committed", cmd_prune)
    p_prune.add_argument("url", help="output dir, run dir or stage dir")
    p_prune.add_argument("--keep-last", type=int, required=True, metavar="K", help="keep the K newest checkpoints")
    p_prune.add_argument("--keep-every", type=int, metavar="N", help="also keep every checkpoint whose update count "
                         "is a multiple of N")
    p_prune.add_argument("--dry-run", action="store_true", help="only say what would be deleted")

    p_conv = add("convert", "sharded (DCP) <-> consolidated (single torch.save files)", cmd_convert)
    p_conv.add_argument("url", help="stage dir (or run dir of a run without stages) to convert")
    p_conv.add_argument("dest", help="output dir to write the converted run/stage under")
    p_conv.add_argument("--to", required=True, choices=["consolidated", "sharded"], help="target format")
    p_conv.add_argument("--checkpoint", action="append", help="E.._U.._S.. to convert (repeatable; default all)")
    return parser


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer >= 1")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``noether-ckpt``; returns the exit code (argparse's 2 for bad usage)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2): return it, do not exit the caller
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    level = args.log_level or (logging.ERROR if args.quiet else logging.INFO if args.verbose else logging.WARNING)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger().setLevel(level)
    try:
        storage = open_storage(args.url, _options(args))
        _require_exists(storage, args.url)
        return args.func(args, storage)
    except (CorruptRecordError, ProblemFound) as exc:
        print(f"noether-ckpt: problem: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except (ConfigError, InvalidNameError, CheckpointNotFoundError, AmbiguousCheckpointError) as exc:
        print(f"noether-ckpt: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (StorageError, OSError) as exc:
        print(f"noether-ckpt: storage error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_STORAGE
    except NoetherDistError as exc:
        print(f"noether-ckpt: problem: {exc}", file=sys.stderr)
        return EXIT_PROBLEM
    except BaseException as exc:
        if not _is_dcp_error(exc):
            raise
        print(f"noether-ckpt: problem: DCP failed: {_dcp_reason(exc)}", file=sys.stderr)
        return EXIT_PROBLEM


def _is_dcp_error(exc: BaseException) -> bool:
    """DCP's CheckpointException (it derives from BaseException); only inspect and convert
    load torch, so without torch loaded it cannot be one."""
    api = sys.modules.get("torch.distributed.checkpoint.api")
    return api is not None and isinstance(exc, api.CheckpointException)


def _dcp_reason(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None) or {}
    reasons = []
    for rank, failure in sorted(failures.items()):
        err = failure[0] if isinstance(failure, tuple) else failure
        reasons.append(f"rank {rank}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")
    return "; ".join(reasons) or str(exc).splitlines()[0]


if __name__ == "__main__":
    sys.exit(main())
