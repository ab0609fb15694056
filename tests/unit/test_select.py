"""The stage index: selection costs O(1) store requests through aliases, listings only as a
fallback, and every question about a stage lists each of its folders at most once (the same
on S3: tests/integration/test_s3_ops.py)."""

from __future__ import annotations

from collections import Counter

import pytest

from noether_dist.errors import AmbiguousCheckpointError, CheckpointNotFoundError
from noether_dist.format.records import AliasRecord, CommitRecord, CorruptRecordError
from noether_dist.stage.catalog import summarize_stage
from noether_dist.stage.commit import write_alias, write_commit
from noether_dist.format.layout import StageLayout
from noether_dist.format.names import CheckpointRef, TrainingIteration, parse_resume_checkpoint
from noether_dist.stage.index import StageIndex
from noether_dist.stage.retention import RetentionPolicy, prune
from noether_dist.stage.verify import verify_stage
from noether_dist.io.storage import open_storage
from tests.support.stages import CountingStorage, mixed_stage, point

pytestmark = pytest.mark.torch_compat


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
    assert StageIndex(st, layout).resolve(CheckpointRef.latest()).iteration.update == 200
    assert (st.reads, st.lists) == (2, 0)


def test_broken_alias_falls_back_to_one_listing(tmp_path):
    st, layout = _stage(tmp_path, 20)
    st.replace(layout.alias_path("latest"), b"not json")
    st.reads = st.lists = 0
    assert StageIndex(st, layout).resolve(CheckpointRef.latest()).iteration.update == 20
    assert st.lists == 1 and st.reads == 2


def test_partial_spec_lists_once(tmp_path):
    st, layout = _stage(tmp_path, 20)
    assert StageIndex(st, layout).resolve(parse_resume_checkpoint("U7")).iteration.update == 7
    assert (st.reads, st.lists) == (1, 1)


def test_find_all_lists_each_folder_once_and_parses_what_it_finds(tmp_path):
    st = CountingStorage(open_storage(str(tmp_path)))
    layout = mixed_stage(st, str(tmp_path))
    st.reads = st.lists = 0
    index = StageIndex(st, layout)
    found = index.find_all()
    assert [(c.name, c.committed, [a.name for a in c.artifacts]) for c in found] == [
        ("E0_U1_S8", True, ["m_cp=E0_U1_S8_model.th"]), ("E0_U2_S16", True, ["m_cp=E0_U2_S16_model.th"]),
        ("E0_U3_S24", False, ["m_cp=E0_U3_S24_model.th"]), ("E0_U4_S32", True, ["m_cp=E0_U4_S32_model.th"])]
    assert [c.iteration for c in found] == [point(1), point(2), point(3), point(4)]
    assert found[2].artifacts[0].parsed.model_name == "m"
    assert sorted(st.listed) == sorted([layout.checkpoints_dir, layout.commits_dir]) and st.reads == 0
    # every further question is answered from the same listings
    assert index.find("E0_U3_S24").committed is False and index.find("E9_U9_S9") is None
    assert index.committed() == [point(1), point(2), point(4)]
    assert index.match(parse_resume_checkpoint("U2").partial) == point(2)
    assert index.newest().iteration == point(2)  # U4's record is corrupt: skipped
    assert index.newest(before=point(2)).iteration == point(1)
    with pytest.raises(CorruptRecordError, match="E0_U4_S32.json is corrupt"):
        index.record(point(4))
    assert {k: str(v.iteration) for k, v in index.aliases().items()} == {"best.loss": "E0_U1_S8", "latest": "E0_U2_S16"}
    assert Counter(st.listed) == Counter({layout.checkpoints_dir: 1, layout.commits_dir: 1, layout.aliases_dir: 1})
    assert st.reads == 5  # U4, U2, U1 records (each once: U4 raised twice from one read), two aliases


def test_resolve_names_what_exists_when_it_cannot_pick(tmp_path):
    st = CountingStorage(open_storage(str(tmp_path)))
    layout = mixed_stage(st, str(tmp_path))
    st.reads = st.lists = 0
    index = StageIndex(st, layout)
    with pytest.raises(AmbiguousCheckpointError, match="resume_checkpoint E0 matches 3 committed checkpoints: "
                                                       "E0_U1_S8, E0_U2_S16, E0_U4_S32; use a part"):
        index.resolve(parse_resume_checkpoint("E0"))
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint matches U3 in .*; committed "
                                                      "checkpoints: E0_U1_S8, E0_U2_S16, E0_U4_S32"):
        index.resolve(parse_resume_checkpoint("U3"))
    with pytest.raises(CheckpointNotFoundError, match="alias last does not exist"):
        index.resolve(CheckpointRef.last())
    assert index.resolve(CheckpointRef.best("loss")).iteration == point(1)
    assert st.lists == 1  # the three errors share one listing of _commits/


def test_catalog_verify_and_prune_list_each_folder_once(tmp_path):
    st = CountingStorage(open_storage(str(tmp_path)))
    layout = mixed_stage(st, str(tmp_path))
    once = Counter({layout.checkpoints_dir: 1, layout.commits_dir: 1, layout.aliases_dir: 1})
    st.listed.clear()
    summary = summarize_stage(st, layout)
    assert [(c.name, c.committed, c.aliases) for c in summary.checkpoints] == [
        ("E0_U1_S8", True, ("best.loss",)), ("E0_U2_S16", True, ("latest",)), ("E0_U3_S24", False, ()),
        ("E0_U4_S32", False, ())]
    assert "is corrupt" in summary.checkpoints[3].problem
    assert Counter(st.listed) == once
    st.listed.clear()
    report = verify_stage(st, layout)
    assert sorted((d.checkpoint, d.kind.value) for d in report.damages) == [("E0_U3_S24", "uncommitted"),
                                                                           ("E0_U4_S32", "corrupt_record")]
    assert Counter(st.listed) == once
    st.listed.clear()
    assert [c.checkpoint for c in verify_stage(st, layout, checkpoint="latest").checkpoints] == ["E0_U2_S16"]
    assert max(Counter(st.listed).values()) == 1
    write_alias(st, layout, AliasRecord("latest", point(4)))
    st.listed.clear()
    plan = prune(st, layout, RetentionPolicy(keep_last=1))
    assert plan.delete == (point(2),) and plan.keep == (point(1), point(4)) and plan.uncommitted == ("m_cp=E0_U3_S24_model.th",)
    assert Counter(st.listed) == once  # the plan's listing also names the files to delete
    assert [c.name for c in StageIndex(st, layout).find_all()] == ["E0_U1_S8", "E0_U4_S32"]


