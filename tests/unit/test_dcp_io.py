"""DCP I/O: file records while writing, and metadata that cannot run code."""

from __future__ import annotations

import contextlib
import os
import pickle
import zlib

import pytest
import torch

from noether_dist.io import dcp_io
from noether_dist.io.storage import Storage, open_storage

pytestmark = pytest.mark.torch_compat


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_records_match_the_files_and_metadata_is_allow_listed(tmp_path, monkeypatch):
    st = open_storage(str(tmp_path))
    path = str(tmp_path / "m_cp=E0_U1_S8_model.th")
    records = dcp_io.save_state({"w": torch.arange(10.0), "b": torch.ones(3)}, path, st)
    for rec in records:
        data = (tmp_path / "m_cp=E0_U1_S8_model.th" / rec.name).read_bytes()
        assert (len(data), zlib.crc32(data)) == (rec.size, rec.crc32)
    assert {r.name for r in records} == {".metadata", "__0_0.distcp"}
    assert set(dcp_io.read_metadata(path, st).state_dict_metadata) == {"w", "b"}
    monkeypatch.chdir(tmp_path)
    (tmp_path / "m_cp=E0_U1_S8_model.th" / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(pickle.UnpicklingError, match="may not reference posix.system"):
        dcp_io.read_metadata(path, st)
    assert not (tmp_path / "PWNED").exists()


class _PieceCounting(Storage):
    """The same local store, noting the size of every piece a stream hands out."""

    def __init__(self, base: Storage) -> None:
        super().__init__(base.fs, base.options, base.protocol)
        self.pieces: list[int] = []

    @contextlib.contextmanager
    def open_read(self, path, **kw):
        with super().open_read(path, **kw) as stream:
            read = stream.read

            def counted(n=-1):
                data = read(n)
                self.pieces.append(len(data))
                return data

            stream.read = counted
            yield stream


def test_a_file_read_whole_streams_loads_items_as_they_arrive_and_checks_its_crc(tmp_path, monkeypatch):
    """The CRC32 check of resume's load runs on the bytes streamed (never the whole file in
    memory: each item is read in one piece, what lies between and after in bounded pieces),
    the items load exactly, and a damaged byte is reported as a corrupt file (not raised)
    even where it breaks an item's bytes."""
    monkeypatch.setattr(dcp_io, "READ_CHUNK_BYTES", 4096)
    st = open_storage(str(tmp_path))
    path = str(tmp_path / "m_cp=E0_U1_S8_model.th")
    state = {f"t{i}": torch.randn(1000 + 37 * i) for i in range(6)}  # ~4-5 KiB each: items span pieces
    records = dcp_io.save_state(state, path, st)
    data_file = next(r for r in records if r.name.endswith(".distcp"))
    assert data_file.size > 6 * 4096
    counting = _PieceCounting(st)
    metadata = dcp_io.read_metadata(path, st)
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    report = dcp_io.load_checked(target, path, counting, metadata=metadata, files=tuple(records), verify=True,
                                 whole_max_bytes=1 << 30, collective=False)
    assert report.problems == [] and report.bytes_read == data_file.size
    assert all(torch.equal(target[k], state[k]) for k in state)
    item_sizes = sorted(info.length for info in metadata.storage_data.values())
    assert sorted(p for p in counting.pieces if p > 4096) == item_sizes  # one piece per item, no join
    assert sum(counting.pieces) == data_file.size
    where = tmp_path / "m_cp=E0_U1_S8_model.th" / data_file.name
    raw = bytearray(where.read_bytes())
    for offset in range(0, len(raw), 512):  # damage every item's bytes
        raw[offset] ^= 0xFF
    where.write_bytes(bytes(raw))
    report = dcp_io.load_checked({k: torch.zeros_like(v) for k, v in state.items()}, path, st, metadata=metadata,
                                 files=tuple(records), verify=True, whole_max_bytes=1 << 30, collective=False)
    assert len(report.problems) == 1 and f"{data_file.name} is corrupt: CRC32" in report.problems[0]


def test_load_into_staging_adopts_whole_items_and_copies_the_rest(tmp_path):
    """With ``adopt``, an item that fills a staged tensor whole (same dtype and layout) comes
    back as the tensor deserialised, not copied into the staging; one of another dtype is
    copied into it as before. (Items that fill part of a shard, when the world size changed,
    are copied too: tests/dist/test_metadata_parts.py resumes 2 -> 4 and 4 -> 2 exactly.)"""
    st = open_storage(str(tmp_path))
    path = str(tmp_path / "m_cp=E0_U1_S8_model.th")
    state = {"whole": torch.randn(64, 8), "flat": torch.randn(32), "ints": torch.arange(10)}
    records = dcp_io.save_state(state, path, st)
    metadata = dcp_io.read_metadata(path, st)
    staged = {"whole": torch.empty(64, 8), "flat": torch.empty(32), "ints": torch.empty(10, dtype=torch.float64)}
    report = dcp_io.load_checked(staged, path, st, metadata=metadata, files=tuple(records), verify=True,
                                 whole_max_bytes=1 << 30, adopt=True)
    assert report.problems == [] and sorted(report.adopted) == ["flat", "whole"]
    assert all(report.adopted[k] is not staged[k] and torch.equal(report.adopted[k], state[k]) for k in report.adopted)
    assert torch.equal(staged["ints"], state["ints"].double())  # dtype differs: copied (and converted)


def test_adoption_never_keeps_a_bigger_stored_chunk_alive(tmp_path):
    """An item that fills a staged tensor whole but comes out of a bigger stored chunk (a
    checkpoint saved on fewer ranks: the loaded tensor is a view into it) is copied, not
    adopted: adopting the view would keep the whole chunk in memory, up to the ratio of the
    world sizes times the shard."""
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    staged = {"w": torch.empty(4)}
    reader = dcp_io._Reader(str(tmp_path), open_storage(str(tmp_path)), adopt_from=staged)
    item = ReadItem(LoadItemType.TENSOR, MetadataIndex("w", torch.Size([0])), torch.Size([0]),
                    MetadataIndex("w", torch.Size([0])), torch.Size([4]), torch.Size([4]))
    chunk = torch.arange(16.0)
    assert not reader._adopt(item, chunk[4:8]) and reader.adopted == {}
    whole = chunk[4:8].clone()
    assert reader._adopt(item, whole) and reader.adopted["w"] is whole
