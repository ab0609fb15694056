"""The reference trainer: ``python -m noether_dist.trainer --config FILE [key=value ...]``.

A small MLP on synthetic regression data (no download), FSDP2-sharded when there is more
than one rank, AdamW with warm-up and cosine decay, EMA copies, a test metric, periodic
checkpoints, ``best.<metric>``, ``last`` at the end, full resumption (``resume_run_id``...
or ``auto_resume``), preemption by signal, and a JSON summary with digests of the final
model, optimizer and EMA state. Runs as one process or under torchrun / srun; CUDA+NCCL
when a GPU is there, else CPU+gloo.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from ..config import load_yaml
from ..dist.comm import init_distributed
from ..errors import (AmbiguousCheckpointError, CheckpointNotFoundError, ConfigError, InvalidNameError,
                      NoetherDistError)
from ..logs import setup_logging
from .config import TrainConfig, parse_overrides
from .loop import TrainLoop

__all__ = ["main", "run"]

log = logging.getLogger("noether_dist.trainer")


def run(config: TrainConfig) -> dict[str, Any]:
    """Train (resuming when configured) and return the summary (also written as JSON)."""
    return TrainLoop(config).run()


_USAGE_ERRORS = (ConfigError, InvalidNameError, CheckpointNotFoundError, AmbiguousCheckpointError)


def _reports_errors() -> bool:
    """True on the process that prints a failure: the first on each node (every rank raises
    the same error, so one line per node says it)."""
    local = os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", "0"))
    return local.strip() in ("", "0")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point. A failure of the library or the config ends in one line on
    the first process of each node and exit code 2 (bad config or input) or 1 (a failure
    while running); a traceback only with ``--debug`` (or ``--log-level debug``)."""
    parser = argparse.ArgumentParser(prog="python -m noether_dist.trainer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML file with the root config")
    parser.add_argument("--debug", action="store_true", help="on an error, log the traceback on every rank")
    parser.add_argument("--log-level", default=None, type=str.upper,
                        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                        help="log level (default NOETHER_DIST_LOG_LEVEL or INFO); DEBUG also logs tracebacks")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.epochs=2 run_id=abc")
    args = parser.parse_args(argv)
    level = "DEBUG" if args.debug and not args.log_level else args.log_level
    setup_logging(level=level)
    try:
        config = TrainConfig.from_dict(parse_overrides(load_yaml(args.config), args.overrides))
        env = init_distributed(timeout_s=config.timeout_s)
        setup_logging(env.rank, level=level)
        summary = run(config)
    except NoetherDistError as exc:
        traceback = args.debug or logging.getLogger().isEnabledFor(logging.DEBUG)
        if traceback:
            log.error("%s: %s", type(exc).__name__, exc, exc_info=exc)
        elif _reports_errors():
            log.error("%s: %s", type(exc).__name__, " ".join(part.strip() for part in str(exc).splitlines()))
        return 2 if isinstance(exc, _USAGE_ERRORS) else 1
    return 0 if summary.get("finished") or summary.get("preempted") or summary.get("stopped") else 1


if __name__ == "__main__":
    sys.exit(main())
