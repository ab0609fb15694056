"""The reference trainer run to its end on real ranks of the test rank runner: the oracle
that interrupted runs (killed, preempted, requeued, moved to other hosts) are compared with.

The launcher does not change what a run computes, so the oracle runs on ranks forked from
the forkserver, which imported torch once; a torchrun launch would pay about 10 CPU seconds
for its agent and fresh workers (torch and dynamo imports) to compute the same digest.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.ranks import run_ranks


def _train_rank(rank: int, world_size: int, config: str, overrides: list[str]) -> dict[str, Any]:
    from noether_dist.config import load_yaml
    from noether_dist.trainer.config import TrainConfig, parse_overrides
    from noether_dist.trainer.run import run

    return run(TrainConfig.from_dict(parse_overrides(load_yaml(config), overrides)))


def uninterrupted_run(config: Path, overrides: list[str], world_size: int = 2, timeout_s: float = 180) -> dict:
    """The summary of ``python -m noether_dist.trainer --config <config> <overrides>`` on
    ``world_size`` ranks (its files are written as that command writes them); fails unless
    the run finished on every rank with one digest."""
    summaries = run_ranks(_train_rank, world_size, str(config), list(overrides), timeout_s=timeout_s)
    assert all(s["finished"] and s["world_size"] == world_size for s in summaries), summaries
    assert all(s["digest"] == summaries[0]["digest"] for s in summaries), summaries
    return summaries[0]
