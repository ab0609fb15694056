"""Stages written by hand for tests of the stage index (records and files, no torch, no
ranks) and a Storage that counts its requests."""

from __future__ import annotations

import zlib

from noether_dist.format.layout import StageLayout
from noether_dist.format.names import TrainingIteration
from noether_dist.format.records import AliasRecord, ArtifactRecord, CommitRecord, FileRecord
from noether_dist.io.storage import Storage
from noether_dist.stage.commit import write_alias, write_commit

__all__ = ["CountingStorage", "mixed_stage", "point", "save_point"]


class CountingStorage(Storage):
    """A real Storage that counts reads and listings (and remembers what it listed)."""

    def __init__(self, base: Storage) -> None:
        super().__init__(base.fs, base.options, base.protocol)
        self.reads = self.lists = 0
        self.listed: list[str] = []

    def read(self, path: str) -> bytes:
        self.reads += 1
        return super().read(path)

    def list(self, path: str):
        self.lists += 1
        self.listed.append(path)
        return super().list(path)


def point(u: int) -> TrainingIteration:
    """E0_U``u``_S``8u``."""
    return TrainingIteration(0, u, 8 * u)


def save_point(st: Storage, layout: StageLayout, u: int, *, commit: bool = True) -> None:
    """A checkpoint of model ``m`` at U``u``: one file in a model folder, then its record."""
    name = f"m_cp={point(u)}_model.th"
    data = b"x" * u
    st.replace(f"{layout.artifact_path(name)}/.metadata", data)
    if commit:
        art = ArtifactRecord(name, "model", None, "dcp", (FileRecord(".metadata", u, zlib.crc32(data)),))
        write_commit(st, layout, CommitRecord(point(u), layout.run_id, layout.stage_name, "m", 1, (art,)))


def mixed_stage(st: Storage, root: str) -> StageLayout:
    """U1, U2, U4 committed (U4's record is garbage), U3 a save that died; latest -> U2,
    best.loss -> U1."""
    layout = StageLayout(root, "r", "s")
    for u in (1, 2, 4):
        save_point(st, layout, u)
    save_point(st, layout, 3, commit=False)
    st.remove(layout.commit_path(point(4)))
    st.replace(layout.commit_path(point(4)), b'{"artifacts": [tru')
    write_alias(st, layout, AliasRecord("latest", point(2)))
    write_alias(st, layout, AliasRecord("best.loss", point(1), 0.5, "min"))
    return layout
