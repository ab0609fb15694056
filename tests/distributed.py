"""Run a test function on N real ranks: see tests/support/ranks.py (the one rank runner of
tests and benchmarks)."""

from tests.support.ranks import RankFailure, run_ranks

__all__ = ["run_ranks", "RankFailure"]
