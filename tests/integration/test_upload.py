"""The durable tier's byte work (noether_dist.io.upload): one file checked against its record
while it goes to the S3 test server or a folder, and the child process that does it."""

from __future__ import annotations

import os
import signal
import time
import zlib

import pytest

from noether_dist.errors import UploadError
from noether_dist.io.storage import StorageOptions, open_storage
from noether_dist.io.upload import FileJob, UploadProcess, send_file

pytestmark = pytest.mark.slow  # upload processes and an S3 server


def _file(tmp_path, name: str = "f.distcp", size: int = 300_000) -> tuple[str, bytes]:
    data = os.urandom(size)
    path = tmp_path / name
    path.write_bytes(data)
    return str(path), data


@pytest.fixture
def s3_store(s3_server, s3_bucket):
    url = f"s3://{s3_bucket}/up"
    return url, StorageOptions(endpoint_url=s3_server.endpoint_url), open_storage(
        url, StorageOptions(endpoint_url=s3_server.endpoint_url))


def test_a_file_goes_up_once_with_the_records_crc32(tmp_path, s3_store):
    from noether_dist.io.s3store import stored_crc32

    url, _, store = s3_store
    path, data = _file(tmp_path)
    send_file(store, FileJob(path, f"{url}/a", len(data), zlib.crc32(data)))
    assert store.read(f"{url}/a") == data
    kept = stored_crc32(store.fs, f"{url}/a")
    assert (kept.size, kept.crc32) == (len(data), zlib.crc32(data))  # the store checked and kept the CRC32


@pytest.mark.parametrize("where", ["s3", "folder"])
def test_a_file_that_differs_from_its_record_is_not_uploaded(tmp_path, s3_store, where):
    url, _, store = s3_store
    if where == "folder":
        url, store = str(tmp_path / "durable"), open_storage(str(tmp_path / "durable"))
    path, data = _file(tmp_path)
    changed = bytearray(data)
    changed[1000] ^= 0xFF  # same size, other bytes (bit rot on the local disk)
    with open(path, "wb") as f:
        f.write(changed)
    with pytest.raises(UploadError, match=f"{path} on the local disk does not match its commit record .*CRC32"):
        send_file(store, FileJob(path, f"{url}/b", len(data), zlib.crc32(data)))
    assert not store.exists(f"{url}/b")
    with pytest.raises(UploadError, match="does not match its commit record \\(299999 bytes; the record says 300000"):
        os.truncate(path, len(data) - 1)
        send_file(store, FileJob(path, f"{url}/b", len(data), zlib.crc32(data)))
    os.remove(path)
    with pytest.raises(UploadError, match=f"{path} is missing on the local disk"):
        send_file(store, FileJob(path, f"{url}/b", len(data), zlib.crc32(data)))
    assert not store.exists(f"{url}/b")


def test_the_upload_process_uploads_and_a_killed_or_stuck_one_fails_then_is_replaced(tmp_path, s3_store):
    url, options, store = s3_store
    path, data = _file(tmp_path)
    job = FileJob(path, f"{url}/c", len(data), zlib.crc32(data))
    proc = UploadProcess(url, options, bandwidth_mb_s=None)
    try:
        proc.upload([job], timeout_s=60)
        assert store.read(f"{url}/c") == data
        # a store failure comes back as one line
        bad = FileJob(path, f"{url}/d", len(data), zlib.crc32(data) ^ 1)
        with pytest.raises(UploadError, match="does not match its commit record"):
            proc.upload([bad], timeout_s=60)
        assert not store.exists(f"{url}/d")
        # the process dies between uploads: the next upload starts a new one
        first = proc.pid
        os.kill(first, signal.SIGKILL)
        while proc.running:
            time.sleep(0.01)
        proc.upload([FileJob(path, f"{url}/e", len(data), zlib.crc32(data))], timeout_s=60)
        assert proc.pid != first and store.read(f"{url}/e") == data
        # stuck (stopped): no progress within the timeout fails the upload and replaces it
        stuck = proc.pid
        os.kill(stuck, signal.SIGSTOP)
        with pytest.raises(UploadError, match="made no progress for 2s"):
            proc.upload([FileJob(path, f"{url}/f", len(data), zlib.crc32(data))], timeout_s=2)
        assert not store.exists(f"{url}/f")
        proc.upload([FileJob(path, f"{url}/f", len(data), zlib.crc32(data))], timeout_s=60)
        assert proc.pid != stuck and store.read(f"{url}/f") == data
    finally:
        proc.close()
    assert proc.pid is None
