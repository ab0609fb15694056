"""A rank's part of DCP metadata (io/dcp_slices.py), one process: the part holds exactly
the stored chunks that overlap the rank's shards, DCP's planner makes the same reads on it
as on the whole metadata, and a mismatch is one clear line."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.default_planner import create_default_local_load_plan
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata, MetadataIndex,
                                                   TensorProperties, TensorStorageMetadata)

from noether_dist.errors import StateMismatchError
from noether_dist.io.dcp_slices import MetadataCutter, Slice, Want

ROWS, COLS = 10, 6


def _metadata(grid: tuple[int, int]) -> Metadata:
    """One [ROWS, COLS] tensor stored in a grid of chunks (rows x cols parts), a replicated
    scalar and a non-tensor value."""
    chunks, storage, offset = [], {}, 0
    row_cuts = [round(i * ROWS / grid[0]) for i in range(grid[0] + 1)]
    col_cuts = [round(j * COLS / grid[1]) for j in range(grid[1] + 1)]
    for j in range(grid[1]):  # column-major: not in order along dim 0
        for i in range(grid[0]):
            c = ChunkStorageMetadata(torch.Size((row_cuts[i], col_cuts[j])),
                                     torch.Size((row_cuts[i + 1] - row_cuts[i], col_cuts[j + 1] - col_cuts[j])))
            chunks.append(c)
            storage[MetadataIndex("w", c.offsets)] = _StorageInfo(f"__{len(chunks) % 3}_0.distcp", offset, 100)
            offset += 100
    props = TensorProperties(dtype=torch.float32)
    sd = {"w": TensorStorageMetadata(props, torch.Size((ROWS, COLS)), chunks),
          "step": TensorStorageMetadata(props, torch.Size(()), [ChunkStorageMetadata(torch.Size(()), torch.Size(()))]),
          "lr": BytesStorageMetadata()}
    storage[MetadataIndex("step", torch.Size(()))] = _StorageInfo("__1_0.distcp", 0, 8)
    storage[MetadataIndex("lr")] = _StorageInfo("__0_0.distcp", 8, 8)
    return Metadata(state_dict_metadata=sd, storage_data=storage)


class _Shard:
    """A rank's part of ``w`` as DCP's planner asks for it (no process group)."""

    def __init__(self, offsets: tuple[int, int], sizes: tuple[int, int]) -> None:
        self.shape, self.dtype, self.part = torch.Size((ROWS, COLS)), torch.float32, (offsets, sizes)

    def size(self) -> torch.Size:
        return self.shape

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(torch.Size(self.part[0]), torch.Size(self.part[1]))]


def _reads(state: dict, metadata: Metadata) -> list[tuple]:
    """DCP's reads that move data (DCP also plans a zero-length read of a stored chunk that
    an empty shard lies inside of: a part leaves such a chunk out, so it is not fetched)."""
    plan = create_default_local_load_plan(state, metadata, True)
    return sorted((i.storage_index.fqn, tuple(i.storage_index.offset or ()), tuple(i.storage_offsets),
                   tuple(i.dest_offsets), tuple(i.lengths)) for i in plan.items if all(i.lengths) or not len(i.lengths))


@pytest.mark.parametrize("grid", [(8, 1), (4, 2), (1, 3)])
@pytest.mark.parametrize("part", [((0, 0), (3, COLS)), ((3, 0), (4, COLS)), ((9, 0), (1, COLS)), ((7, 0), (0, COLS))])
def test_a_part_holds_exactly_the_overlapping_chunks_and_plans_the_same_reads(grid, part):
    metadata = _metadata(grid)
    shard = _Shard(*part)
    wants = [Want("w", (ROWS, COLS), (part,)), Want("step", (), None, True), Want("lr", None, None, True)]
    cutter = MetadataCutter(metadata)
    cutter.check(wants, "model checkpoint x")
    got = Slice.from_bytes(cutter.cut(wants, shared=["step", "lr"], mine=["step"]).to_bytes())
    sliced = got.metadata()
    (row0, col0), (rows, cols) = part
    expected = [c for c in metadata.state_dict_metadata["w"].chunks
                if min(c.offsets[0] + c.sizes[0], row0 + rows) > max(c.offsets[0], row0)
                and min(c.offsets[1] + c.sizes[1], col0 + cols) > max(c.offsets[1], col0)]
    assert sorted(tuple(c.offsets) for c in sliced.state_dict_metadata["w"].chunks) == \
        sorted(tuple(c.offsets) for c in expected)
    assert got.shared == ("step", "lr") and got.mine == ("step",) and got.any_shared
    assert MetadataIndex("lr") not in sliced.storage_data  # shared, read by another rank: no storage entry
    assert got.stored_entries == len(expected) + 1  # its chunks and the step it reads for everyone
    state = {"w": shard, "step": torch.empty(())}
    assert _reads(state, sliced) == _reads(state, metadata)


def test_a_mismatch_is_one_line_naming_missing_unexpected_and_shapes():
    cutter = MetadataCutter(_metadata((2, 1)))
    wants = [Want("w", (ROWS, COLS + 1), None), Want("bias", (3,), None), Want("step", (), None)]
    with pytest.raises(StateMismatchError) as err:
        cutter.check(wants, "model checkpoint m")
    text = str(err.value).strip("'\"")
    assert "\n" not in text
    assert text == ("model checkpoint m does not match the state to load into: missing in checkpoint: bias; "
                    "unexpected in checkpoint: lr; shape mismatch: w (checkpoint [10, 6], model [10, 7])")
