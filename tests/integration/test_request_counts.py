"""S3 requests of a save and a resume stay flat per rank as the world size grows.

Real ranks (2, 4, 8; gloo), a real moto server on 127.0.0.1, and moto's own recorder,
which sees every request from every process; each rank's requests are told apart by a tag
in its User-Agent. The state is tiny (8 Linear(64, 64) layers, FSDP2, AdamW, trainer
state): counts, never times.
"""

from __future__ import annotations

import pytest

from benchmarks.bench_requests import scale_table
from benchmarks.s3 import MotoServer, moto_available

pytestmark = pytest.mark.slow

WORLD_SIZES = (2, 4, 8)


@pytest.fixture(scope="module")
def rows():
    ok, why = moto_available()
    if not ok:
        pytest.fail(f"the request counts need a moto server: {why}")
    with MotoServer() as server:
        return {r["world_size"]: r for r in scale_table(server, list(WORLD_SIZES), timeout_s=300)}


def _flat(values: list[float]) -> bool:
    return max(values) <= 1.2 * min(values)


@pytest.mark.parametrize("what", ["resume", "save2"])
def test_requests_per_rank_stay_flat_from_2_to_8_ranks(rows, what):
    per_rank = {ws: rows[ws]["by_rank"][what] for ws in WORLD_SIZES}
    for ws, counts in per_rank.items():
        assert sum(counts) == rows[ws][what], (what, ws, counts, rows[ws][what])  # every request is attributed
    # the coordinator's own requests and every other rank's do not grow with the world size
    assert _flat([c[0] for c in per_rank.values()]), (what, per_rank)
    assert _flat([max(c[1:]) for c in per_rank.values()]), (what, per_rank)
    # so the total per rank does not grow either (it shrinks: the coordinator's part is shared)
    totals = [rows[ws][what] / ws for ws in WORLD_SIZES]
    assert all(b <= a for a, b in zip(totals, totals[1:])), (what, totals)


def test_resume_reads_metadata_once_lists_nothing_and_beats_plain_dcp(rows):
    for ws in WORLD_SIZES:
        kinds = rows[ws]["by_kind"]["resume"]
        assert kinds.get("GET metadata") == 3, (ws, kinds)  # model, optimizer, trainer: once each
        assert "GET list" not in kinds and not any(k.startswith("HEAD") for k in kinds), (ws, kinds)
    assert rows[8]["resume"] <= 0.5 * rows[8]["dcp_load"], (rows[8]["resume"], rows[8]["dcp_load"])
