"""Selection costs O(1) store requests through aliases; listings only as a fallback."""

from __future__ import annotations

import pytest

from noether_dist.stage.commit import AliasRecord, CommitRecord, write_alias, write_commit
from noether_dist.format.layout import StageLayout
from noether_dist.format.names import CheckpointRef, TrainingIteration, parse_resume_checkpoint
from noether_dist.stage.select import select_record
from noether_dist.io.storage import Storage, open_storage

pytestmark = pytest.mark.torch_compat


class CountingStorage(Storage):
    """A real local Storage that counts reads and listings."""

    def __init__(self, base: Storage) -> None:
        super().__init__(base.fs, base.options, base.protocol)
        self.reads = self.lists = 0

    def read(self, path: str) -> bytes:
        self.reads += 1
        return super().read(path)

    def list(self, path: str):
        self.lists += 1
        return super().list(path)


def _stage(tmp_path, n: int) -> tuple[CountingStorage, StageLayout]:
    st = CountingStorage(open_storage(str(tmp_path)))
    layout = StageLayout(str(tmp_path), "r", "s")
    for u in range(1, n + 1):
        write_commit(st, layout, CommitRecord(TrainingIteration(0, u, 8 * u), "r", "s", "m", 1, ()))
    write_alias(st, layout, AliasRecord("latest", TrainingIteration(0, n, 8 * n)))
    st.reads = st.lists = 0
    return st, layout


def test_latest_costs_two_reads_and_no_listing(tmp_path):
    st, layout = _stage(tmp_path, 200)
    assert select_record(st, layout, CheckpointRef.latest()).iteration.update == 200
    assert (st.reads, st.lists) == (2, 0)


def test_broken_alias_falls_back_to_one_listing(tmp_path):
    st, layout = _stage(tmp_path, 20)
    st.replace(layout.alias_path("latest"), b"not json")
    st.reads = st.lists = 0
    assert select_record(st, layout, CheckpointRef.latest()).iteration.update == 20
    assert st.lists == 1 and st.reads == 2


def test_partial_spec_lists_once(tmp_path):
    st, layout = _stage(tmp_path, 20)
    assert select_record(st, layout, parse_resume_checkpoint("U7")).iteration.update == 7
    assert (st.reads, st.lists) == (1, 1)
