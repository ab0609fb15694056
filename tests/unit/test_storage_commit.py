"""Storage primitives and commit records on a local disk (S3 runs in tests/integration/test_s3.py)."""

from __future__ import annotations

import os

import pytest

from noether_dist.format.records import AliasRecord, CommitRecord, CorruptRecordError
from noether_dist.stage.commit import list_commits, read_alias, read_commit, write_alias, write_commit
from noether_dist.errors import ConfigError, StorageError
from noether_dist.format.layout import StageLayout
from noether_dist.format.names import TrainingIteration
from noether_dist.io.storage import RetryPolicy, StorageOptions, is_transient, open_storage

pytestmark = pytest.mark.torch_compat


def test_write_once_never_overwrites(tmp_path):
    st = open_storage(str(tmp_path))
    path = str(tmp_path / "a" / "rec.json")
    st.write_once(path, b"one")
    with pytest.raises(FileExistsError):
        st.write_once(path, b"two")
    assert st.read(path) == b"one"
    st.replace(path, b"three")
    assert st.read(path) == b"three"
    assert [e.name for e in st.list(str(tmp_path / "a"))] == ["rec.json"]  # no temp files left


def test_exists_list_remove(tmp_path):
    st = open_storage(f"file://{tmp_path}")
    assert not st.exists(f"file://{tmp_path}/nope")
    assert st.list(f"file://{tmp_path}/nope") == []
    st.replace(f"file://{tmp_path}/d/x", b"12345")
    assert st.exists(f"file://{tmp_path}/d/x")
    assert st.size(f"file://{tmp_path}/d") == 5
    st.remove(f"file://{tmp_path}/d", recursive=True)
    assert not st.exists(f"file://{tmp_path}/d/x")
    with pytest.raises(FileNotFoundError):
        st.read(f"file://{tmp_path}/d/x")


def _s3_error(code: str, status: int, message: str) -> OSError:
    """What s3fs raises for an S3 error answer: botocore's ClientError translated to an
    OSError, with the ClientError as its cause."""
    from botocore.exceptions import ClientError
    from s3fs.errors import translate_boto_error

    error = ClientError({"Error": {"Code": code, "Message": message},
                         "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject")
    return translate_boto_error(error)


def test_transient_is_decided_by_code_and_status_not_by_digits_in_names():
    name = "s3://b/run/checkpoints/mlp_cp=E3_U1504_S48128_model.th/__0_0.distcp"
    assert not is_transient(OSError(f"Bad Request: {name}"))
    assert not is_transient(OSError(f"Server disconnected while writing {name} (timed out)"))  # text only
    assert not is_transient(_s3_error("InvalidArgument", 400, f"Bad Request: {name}"))
    assert not is_transient(_s3_error("AccessDenied", 403, f"Access Denied: {name} (503 SlowDown)"))
    assert is_transient(_s3_error("SlowDown", 503, "Please reduce your request rate"))
    assert is_transient(_s3_error("InternalError", 500, "We encountered an internal error"))
    assert is_transient(_s3_error("", 504, "Gateway Timeout"))
    assert is_transient(ConnectionResetError()) and is_transient(TimeoutError())
    import aiohttp
    from botocore.exceptions import EndpointConnectionError

    assert is_transient(EndpointConnectionError(endpoint_url="http://127.0.0.1:9"))
    assert is_transient(aiohttp.ClientPayloadError("Response payload is not completed"))


def test_retry_retries_transient_then_reports_permanent(tmp_path):
    st = open_storage(str(tmp_path), StorageOptions(retry=RetryPolicy(attempts=3, base_delay_s=0.0)))
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("Connection reset by peer")
        return "ok"

    assert st.retry("put", "x", flaky) == "ok" and len(calls) == 3

    def denied():
        raise PermissionError("AccessDenied")

    with pytest.raises(StorageError, match="put s3://b/k failed: PermissionError: AccessDenied"):
        st.retry("put", "s3://b/k", denied)
    assert is_transient(TimeoutError()) and not is_transient(FileNotFoundError())


def test_bad_storage_options():
    with pytest.raises(ConfigError, match="unknown storage option"):
        StorageOptions.from_dict({"endpoint": "x"})
    with pytest.raises(ConfigError, match="local path, file:// or s3://"):
        open_storage("nosuchproto://x")


def test_commit_and_alias_records(tmp_path):
    st = open_storage(str(tmp_path))
    layout = StageLayout(str(tmp_path), "run", "stage")
    it1, it2 = TrainingIteration(0, 5, 40), TrainingIteration(1, 10, 80)
    for it in (it2, it1):
        write_commit(st, layout, CommitRecord(it, "run", "stage", "m", 2, (), {"loss": 1.0}))
    assert list_commits(st, layout) == [it1, it2]
    with pytest.raises(FileExistsError):
        write_commit(st, layout, CommitRecord(it1, "run", "stage", "m", 2, ()))
    assert read_commit(st, layout, it1).metrics == {"loss": 1.0}
    assert read_commit(st, layout, TrainingIteration(9, 9, 9)) is None
    write_alias(st, layout, AliasRecord("latest", it2))
    assert read_alias(st, layout, "latest").iteration == it2
    assert read_alias(st, layout, "best.loss") is None
    st.replace(layout.alias_path("latest"), b"garbage{")
    assert read_alias(st, layout, "latest") is None  # broken alias reads as missing: caller lists
    st.replace(layout.commit_path(it1), b"{}")
    with pytest.raises(CorruptRecordError, match="corrupt"):
        read_commit(st, layout, it1)


def test_open_write_appears_whole_on_commit_and_leaves_nothing_on_error(tmp_path):
    import zlib

    st = open_storage(str(tmp_path))
    path = str(tmp_path / "d" / "f.bin")
    with st.open_write(path) as stream:
        stream.write(b"a" * 1000)
        stream.write(memoryview(bytearray(b"b" * 24)))
        assert not os.path.exists(path)  # nothing visible before the block ends
    assert open(path, "rb").read() == b"a" * 1000 + b"b" * 24
    assert (stream.size, stream.crc) == (1024, zlib.crc32(b"a" * 1000 + b"b" * 24))
    with pytest.raises(RuntimeError, match="boom"):
        with st.open_write(path) as stream:
            stream.write(b"new content")
            raise RuntimeError("boom")
    assert open(path, "rb").read() == b"a" * 1000 + b"b" * 24  # the old content, whole
    assert os.listdir(tmp_path / "d") == ["f.bin"]  # no temporary file left


def test_open_read_streams_pieces_and_ranges(tmp_path):
    st = open_storage(str(tmp_path))
    data = bytes(range(256)) * 40
    st.replace(str(tmp_path / "f"), data)
    with st.open_read(str(tmp_path / "f")) as stream:
        pieces = list(iter(lambda: stream.read(1000), b""))
    assert [len(p) for p in pieces] == [1000] * 10 + [240] and b"".join(pieces) == data
    with st.open_read(str(tmp_path / "f"), start=100, end=300) as stream:
        assert stream.read() == data[100:300] and stream.read(5) == b""
    with pytest.raises(FileNotFoundError):
        with st.open_read(str(tmp_path / "missing")):
            pass


def test_a_read_cut_off_midway_resumes_where_it_stopped(tmp_path):
    """A connection lost in the middle of a body is picked up at the byte where it stopped
    (a ranged request), not restarted and not cut short."""
    from noether_dist.io.streams import ReadStream

    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    opened = []

    class CutOnce:
        def __init__(self, offset):
            self.fh = open(tmp_path / "f", "rb")
            self.fh.seek(offset)
            self.cut = not opened  # the first connection breaks after 3000 bytes
            self.sent = 0
            opened.append(offset)

        def read(self, n):
            if self.cut and self.sent >= 3000:
                raise ConnectionResetError(104, "Connection reset by peer")
            out = self.fh.read(n if not self.cut else min(n, 3000 - self.sent))
            self.sent += len(out)
            return out

        def close(self):
            self.fh.close()

    stream = ReadStream("f", CutOnce, start=0, end=None, attempts=3, is_transient=is_transient)
    got = b"".join(iter(lambda: stream.read(1024), b""))
    stream.close()
    assert got == data and opened == [0, 3000]
