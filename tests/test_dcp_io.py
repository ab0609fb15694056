"""DCP I/O: file records while writing, and metadata that cannot run code."""

from __future__ import annotations

import os
import pickle
import zlib

import pytest
import torch

from noether_dist.io import dcp_io
from noether_dist.io.storage import open_storage

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
