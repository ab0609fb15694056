"""Tests for the S3 test infrastructure (``s3_server``, ``fault_proxy``).

They also pin down behaviour of moto 5.2 / s3fs 2026.9 / botocore 1.43 /
aiohttp 3.14 that the checkpoint storage layer relies on.  Findings are
stated in each test's docstring; numbers in them were measured here.

Retry layers an s3fs call goes through (innermost first):

1. aiohttp: re-sends an idempotent request (GET/PUT/HEAD/DELETE, not POST)
   once when a *reused* keep-alive connection dies (RST or FIN, no response).
2. botocore (retry mode ``legacy`` by default; 5 attempts in total, backoff
   ``random() * 2**(n-1)`` s): retries 500/502/503/504, throttling codes and
   connection errors (EndpointConnectionError, ConnectionClosedError, timeouts).
   Tune with ``config_kwargs={"retries": {"total_max_attempts": N}}``.
3. s3fs ``_error_wrapper`` (``fs.retries``, default 5, backoff
   ``min(1.7**i * 0.1, 15)`` s): retries ``ClientError``s whose text contains
   "SlowDown"/"reduce your request rate", and ``HTTPClientError`` subclasses
   (ConnectionClosedError, ReadTimeoutError), NOT EndpointConnectionError and
   not 500 InternalError.  ``retries`` is not a constructor argument (it ends
   up in ``AioSession(**kwargs)`` -> TypeError); set the attribute
   ``fs.retries = N`` after construction.  ``cat``/``cat_file`` nest two
   wrappers (5 x 5 x botocore attempts).
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import logging
import os
import socket
import time
import uuid

import pytest

from tests.support.fault_proxy import FAULT_KINDS, FaultProxy
from tests.support.s3_server import S3Server, S3ServerError, s3_server_available, storage_options_for

logger = logging.getLogger(__name__)

_AVAILABLE, _REASON = s3_server_available()
pytestmark = [pytest.mark.skipif(not _AVAILABLE, reason=_REASON), pytest.mark.slow]

if _AVAILABLE:  # imported lazily so that collection works without them
    import botocore.exceptions
    import fsspec
    import s3fs

MiB = 2**20


# --------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def s3():
    """One moto server for the module (startup costs ~0.5 s)."""
    with S3Server() as server:
        yield server


@pytest.fixture
def bucket(s3):
    """A fresh, empty bucket on a freshly reset server."""
    s3.reset()
    name = "test-" + uuid.uuid4().hex[:12]
    s3.create_bucket(name)
    return name


@pytest.fixture
def proxy(s3):
    """A fault proxy in front of the module's moto server, faults off."""
    with FaultProxy(s3.endpoint_url, seed=1234) as px:
        yield px


def make_fs(endpoint_url: str, retries: int | None = None, **kwargs):
    """A non-cached ``S3FileSystem`` for ``endpoint_url``; ``retries`` sets ``fs.retries``."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **storage_options_for(endpoint_url), **kwargs)
    if retries is not None:
        fs.retries = retries
    return fs


def fast_fail_fs(endpoint_url: str, attempts: int = 2, retries: int = 2, **kwargs):
    """An fs whose botocore makes ``attempts`` tries and s3fs ``retries`` rounds."""
    return make_fs(
        endpoint_url,
        retries=retries,
        config_kwargs={"retries": {"total_max_attempts": attempts}},
        **kwargs,
    )


# --------------------------------------------------------------- S3Server itself
def test_server_starts_answers_and_stops():
    ok, reason = s3_server_available()
    assert ok, reason
    with S3Server() as server:
        assert server.running
        assert server.endpoint_url.startswith("http://127.0.0.1:")
        env = server.env
        assert env["AWS_ENDPOINT_URL_S3"] == env["AWS_ENDPOINT_URL"] == server.endpoint_url
        assert env["AWS_ACCESS_KEY_ID"] == env["AWS_SECRET_ACCESS_KEY"] == "testing"
        assert env["AWS_DEFAULT_REGION"] == "us-east-1"
        server.create_bucket("probe-bucket")
        server.create_bucket("probe-bucket")  # idempotent
        assert [b["Name"] for b in server.client().list_buckets()["Buckets"]] == ["probe-bucket"]
        server.reset()
        assert server.client().list_buckets()["Buckets"] == []
        port = server.port
    assert not server.running
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


def test_server_start_failure_reports_stderr():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        server = S3Server(port=port, startup_timeout=15, start_attempts=1)
        with pytest.raises(S3ServerError) as info:
            server.start()
    assert "stderr tail" in str(info.value)
    assert not server.running


def test_put_get_ls_and_url_to_fs(s3, bucket):
    fs = make_fs(s3.endpoint_url)
    fs.pipe_file(f"{bucket}/dir/a.bin", b"alpha")
    fs.pipe_file(f"{bucket}/dir/b.bin", b"beta")
    assert fs.cat_file(f"{bucket}/dir/a.bin") == b"alpha"
    assert fs.ls(f"{bucket}/dir") == [f"{bucket}/dir/a.bin", f"{bucket}/dir/b.bin"]
    assert fs.info(f"{bucket}/dir/b.bin")["size"] == 4

    ufs, path = fsspec.url_to_fs(f"s3://{bucket}/dir/a.bin", skip_instance_cache=True, **s3.storage_options)
    assert isinstance(ufs, s3fs.S3FileSystem)
    assert ufs.cat_file(path) == b"alpha"

    with pytest.raises(FileNotFoundError):  # 404 NoSuchKey
        fs.cat_file(f"{bucket}/dir/missing")
    with pytest.raises(FileNotFoundError):  # 404 NoSuchBucket
        fs.pipe_file("no-such-bucket-xyz/k", b"1")


# ------------------------------------------------------------ s3fs semantics
def test_listing_cache_is_per_instance_and_goes_stale(s3, bucket):
    """FINDING: s3fs' listings cache (``dircache``) is per instance and never
    expires by default.  Once instance B has listed a directory, an object
    another writer (A) adds there is invisible to B's ``ls``, ``exists``
    (False), ``info``, ``cat_file``, ``open`` (all FileNotFoundError!) until
    ``ls(..., refresh=True)`` / ``invalidate_cache()``.  Deletions by A stay
    visible in B too.  ``use_listings_cache=False`` makes every call hit S3.
    A writer's own writes invalidate its own cache.
    """
    d = f"{bucket}/ckpt"
    a = make_fs(s3.endpoint_url)
    b = make_fs(s3.endpoint_url)
    nocache = make_fs(s3.endpoint_url, use_listings_cache=False)

    a.pipe_file(f"{d}/one", b"1")
    assert b.ls(d) == [f"{d}/one"]
    assert nocache.ls(d) == [f"{d}/one"]

    a.pipe_file(f"{d}/two", b"2")
    assert b.ls(d) == [f"{d}/one"]  # stale
    assert b.exists(f"{d}/two") is False  # stale
    for op in (b.info, b.cat_file):
        with pytest.raises(FileNotFoundError):
            op(f"{d}/two")
    assert b.info(f"{d}/two", refresh=True)["size"] == 1
    assert b.ls(d, refresh=True) == [f"{d}/one", f"{d}/two"]

    a.rm(f"{d}/one")
    assert b.exists(f"{d}/one") is True  # stale the other way
    b.invalidate_cache()
    assert b.ls(d) == [f"{d}/two"]

    assert nocache.ls(d) == [f"{d}/two"]
    assert nocache.exists(f"{d}/two") and nocache.cat_file(f"{d}/two") == b"2"

    a.ls(d)
    a.pipe_file(f"{d}/three", b"3")
    assert f"{d}/three" in a.ls(d)  # own writes invalidate own cache

    # fsspec's *instance* cache: same kwargs -> same object (hence skip_instance_cache)
    x1 = fsspec.filesystem("s3", **s3.storage_options)
    x2 = fsspec.filesystem("s3", **s3.storage_options)
    assert x1 is x2


def test_makedirs_creates_missing_bucket(s3, bucket):
    """FINDING: ``makedirs("newbucket/a/b")`` creates the bucket (S3 has no
    directories, so nothing else appears; ``exists("newbucket/a/b")`` is
    False).  ``mkdir`` of an existing bucket raises FileExistsError,
    ``makedirs(exist_ok=True)`` does not.  Writing into a missing bucket
    raises FileNotFoundError.  TRAP: with ``client_kwargs={"region_name":
    "us-east-1"}`` s3fs sends LocationConstraint=us-east-1 and bucket creation
    fails with OSError(EINVAL) InvalidLocationConstraint; hence
    ``storage_options`` carries no region.
    """
    fs = make_fs(s3.endpoint_url)
    new = "made-" + uuid.uuid4().hex[:10]
    fs.makedirs(f"{new}/a/b", exist_ok=True)
    assert new in fs.ls("", refresh=True)
    assert fs.ls(new) == []
    assert not fs.exists(f"{new}/a/b")
    with pytest.raises(FileExistsError):
        fs.mkdir(new)
    fs.makedirs(new, exist_ok=True)
    fs.pipe_file(f"{new}/a/b/obj", b"x")
    assert fs.cat_file(f"{new}/a/b/obj") == b"x"

    opts = s3.storage_options
    opts["client_kwargs"]["region_name"] = "us-east-1"
    bad = s3fs.S3FileSystem(skip_instance_cache=True, **opts)
    with pytest.raises(OSError) as info:
        bad.mkdir("region-trap-" + uuid.uuid4().hex[:8])
    assert info.value.errno == errno.EINVAL
    assert "location-constraint" in str(info.value)


def test_conditional_create(s3, bucket):
    """FINDING: moto 5.2 implements ``If-None-Match: *`` on PutObject and on
    CompleteMultipartUpload (412 PreconditionFailed, ``Condition:
    If-None-Match``).  s3fs 2026.9 sends ``IfNoneMatch="*"`` for
    ``pipe_file(path, data, mode="create")``, ``put_file(..., mode="create")``
    and ``open(path, "xb")``, and maps that 412 to FileExistsError.  The
    existing object is left untouched.
    """
    fs = make_fs(s3.endpoint_url)
    key = f"{bucket}/latest"
    fs.pipe_file(key, b"first", mode="create")
    with pytest.raises(FileExistsError):
        fs.pipe_file(key, b"second", mode="create")
    assert fs.cat_file(key) == b"first"
    fs.pipe_file(key, b"overwritten")  # default mode="overwrite"
    assert fs.cat_file(key) == b"overwritten"

    with fs.open(f"{bucket}/x-file", "xb") as f:
        f.write(b"x1")
    with pytest.raises(FileExistsError):
        with fs.open(f"{bucket}/x-file", "xb") as f:
            f.write(b"x2")
    assert fs.cat_file(f"{bucket}/x-file") == b"x1"

    # multipart path: IfNoneMatch goes on CompleteMultipartUpload
    big = os.urandom(10 * MiB)
    fs.pipe_file(f"{bucket}/big", big, mode="create", chunksize=5 * MiB)
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{bucket}/big", b"y" * (10 * MiB), mode="create", chunksize=5 * MiB)
    assert fs.cat_file(f"{bucket}/big") == big

    # raw botocore view of the same thing
    client = s3.client()
    with pytest.raises(botocore.exceptions.ClientError) as info:
        client.put_object(Bucket=bucket, Key="latest", Body=b"z", IfNoneMatch="*")
    err = info.value.response
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert err["Error"]["Code"] == "PreconditionFailed"
    assert err["Error"].get("Condition") == "If-None-Match"


# ------------------------------------------------------------------ FaultProxy
def test_proxy_passes_20mb_multipart_intact(s3, bucket, proxy):
    """Multipart uploads and large GETs pass the proxy byte-exact.

    FINDING: ``open("wb", block_size=5 MiB)`` uploads *one* 20 MiB part for a
    single 20 MiB ``write`` (parts are ``part_max``-sized unless
    ``fixed_upload_size=True``); writing in smaller pieces gives 5 MiB parts.
    """
    fs = make_fs(proxy.endpoint_url)
    data = os.urandom(20 * MiB)
    digest = hashlib.md5(data).hexdigest()

    fs.pipe_file(f"{bucket}/piped", data, chunksize=5 * MiB)
    with fs.open(f"{bucket}/streamed", "wb", block_size=5 * MiB) as f:
        for i in range(0, len(data), MiB):
            f.write(data[i : i + MiB])
    with fs.open(f"{bucket}/one-write", "wb", block_size=5 * MiB) as f:
        f.write(data)

    for name, parts in (("piped", 4), ("streamed", 4), ("one-write", 1)):
        info = fs.info(f"{bucket}/{name}", refresh=True)
        assert info["size"] == len(data)
        assert info["ETag"].strip('"').endswith(f"-{parts}"), (name, info["ETag"])
        assert hashlib.md5(fs.cat_file(f"{bucket}/{name}")).hexdigest() == digest
    part_puts = [t for m, t, _ in proxy.events if m == "PUT" and "partNumber=" in t]
    assert len(part_puts) == 4 + 4 + 1
    stats = proxy.stats
    assert stats["faults"] == 0 and stats["forwarded"] == stats["requests"]


def test_proxy_raw_http_chunked_head_delete(s3, bucket, proxy):
    """Chunked request bodies are de-chunked; HEAD/DELETE/404 relay correctly."""
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)
    try:
        conn.request("PUT", f"/{bucket}/chunked", body=iter([b"hello ", b"chunked ", b"world"]), encode_chunked=True)
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 200
    finally:
        conn.close()
    assert s3.client().get_object(Bucket=bucket, Key="chunked")["Body"].read() == b"hello chunked world"

    fs = make_fs(proxy.endpoint_url)
    assert fs.info(f"{bucket}/chunked")["size"] == 19  # HEAD
    fs.rm(f"{bucket}/chunked")  # POST ?delete
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{bucket}/chunked")


def test_proxy_faults_are_deterministic_and_configurable(s3):
    def decisions(seed: int) -> list:
        with FaultProxy(s3.endpoint_url, seed=seed) as px:
            px.set_faults(rate=0.5, kinds=("slowdown", "error500", "forbidden"), methods=("GET",))
            out = []
            for _ in range(12):
                conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
                conn.request("GET", "/")
                resp = conn.getresponse()
                resp.read()
                conn.close()
                out.append(resp.status)
            assert px.stats["requests"] == 12
            assert px.stats["faults"] == sum(s != 200 for s in out)
            return out

    first = decisions(7)
    assert first == decisions(7)
    assert set(first) - {200} and 200 in first

    with FaultProxy(s3.endpoint_url, seed=0) as px:
        with pytest.raises(ValueError):
            px.set_faults(kinds=("bogus",))
        with pytest.raises(ValueError):
            px.set_faults(rate=1.5)
        px.set_faults(permanent=True, kinds=("slowdown",), path_contains="only-this")
        conn = http.client.HTTPConnection("127.0.0.1", px.port, timeout=10)
        conn.request("GET", "/")
        r = conn.getresponse()
        assert r.status == 200
        r.read()
        conn.request("GET", "/only-this?x=1")
        r = conn.getresponse()
        body = r.read()
        conn.close()
        assert r.status == 503
        assert b"<Code>SlowDown</Code><Message>Please reduce your request rate.</Message>" in body
        assert px.events[-1] == ("GET", "/only-this?x=1", "slowdown")
        px.set_faults(permanent=True, kinds=("forbidden",), count=1)
        assert px.config.count == 1
        port = px.port
    px.close()  # idempotent
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    assert set(FAULT_KINDS) >= {"slowdown", "reset", "stall", "error500", "forbidden"}


def test_slowdown_rate_03_default_retries_succeed(s3, bucket, proxy):
    """FINDING: with 30% SlowDown on PUT, s3fs with default retries always
    succeeds here: botocore itself retries the 503 (legacy mode, up to 5
    attempts; s3fs would add 5 rounds on top).  Every fault costs exactly one
    extra PUT.  A *permanent* SlowDown with defaults takes 25 requests and
    ~35 s before OSError(EBUSY) -- see the next test for the reduced config.
    """
    fs = make_fs(proxy.endpoint_url)
    proxy.set_faults(rate=0.3, kinds=("slowdown",), methods=("PUT", "POST"), seed=3)
    n = 12
    t0 = time.monotonic()
    for i in range(n):
        fs.pipe_file(f"{bucket}/obj-{i}", b"payload-%d" % i)
    elapsed = time.monotonic() - t0
    stats = proxy.stats
    logger.info("slowdown 0.3: %d puts -> %s in %.1fs", n, stats, elapsed)
    assert stats["faults"] > 0
    assert stats["by_method"]["PUT"] == n + stats["faults"]
    proxy.clear_faults()
    assert sorted(fs.ls(bucket, refresh=True)) == sorted(f"{bucket}/obj-{i}" for i in range(n))


def test_permanent_slowdown_and_500_exhaust_retries(s3, bucket, proxy):
    """FINDING: permanent 503 SlowDown -> OSError(errno.EBUSY) after
    botocore attempts x ``fs.retries`` requests (s3fs retries SlowDown).
    Permanent 500 InternalError -> OSError(errno.EREMOTEIO) after botocore's
    attempts only (s3fs does not retry it).  Both have a ClientError cause.
    """
    fs = fast_fail_fs(proxy.endpoint_url, attempts=2, retries=2)
    proxy.set_faults(permanent=True, kinds=("slowdown",), methods=("PUT",))
    with pytest.raises(OSError) as info:
        fs.pipe_file(f"{bucket}/k", b"v")
    assert info.value.errno == errno.EBUSY
    assert isinstance(info.value.__cause__, botocore.exceptions.ClientError)
    assert proxy.stats["requests"] == 2 * 2

    proxy.reset_stats()
    fs.retries = 3
    proxy.set_faults(permanent=True, kinds=("error500",), methods=("PUT",))
    with pytest.raises(OSError) as info:
        fs.pipe_file(f"{bucket}/k", b"v")
    assert info.value.errno == errno.EREMOTEIO
    assert proxy.stats["requests"] == 2  # botocore's attempts only


def test_permanent_forbidden_and_notfound_fail_fast(s3, bucket, proxy):
    """FINDING: 403 AccessDenied -> PermissionError, 404 NoSuchKey ->
    FileNotFoundError, after one request and no sleeping, with default
    retry settings."""
    fs = make_fs(proxy.endpoint_url)
    fs.pipe_file(f"{bucket}/existing", b"data")
    proxy.reset_stats()
    proxy.set_faults(permanent=True, kinds=("forbidden",))
    t0 = time.monotonic()
    with pytest.raises(PermissionError):
        fs.pipe_file(f"{bucket}/k", b"v")
    with pytest.raises(PermissionError):
        fs.cat_file(f"{bucket}/existing")
    assert time.monotonic() - t0 < 3.0
    assert proxy.stats["requests"] == 2

    proxy.set_faults(permanent=True, kinds=("notfound",), methods=("GET",))
    with pytest.raises(FileNotFoundError):
        fs.cat_file(f"{bucket}/existing")


def test_reset_is_retried_by_botocore(s3, bucket, proxy):
    """FINDING: a TCP RST without response is retried transparently (a
    single fault costs one extra request).  When it persists, the error is
    ``botocore.exceptions.EndpointConnectionError`` ("Could not connect to the
    endpoint URL" -- misleading: the request was sent), which is NOT an
    OSError and which s3fs does not retry; the number of requests is
    botocore attempts, doubled by aiohttp for idempotent requests on a reused
    connection.  A FIN without response (``disconnect``) surfaces as
    ``ConnectionClosedError`` (also not an OSError) and s3fs does retry it.
    """
    fs = make_fs(proxy.endpoint_url)
    proxy.set_faults(permanent=True, kinds=("reset",), methods=("PUT",), count=1)
    fs.pipe_file(f"{bucket}/k", b"v")
    assert fs.cat_file(f"{bucket}/k") == b"v"
    assert proxy.stats["by_method"]["PUT"] == 2 and proxy.stats["faults"] == 1

    fast = fast_fail_fs(proxy.endpoint_url, attempts=2, retries=3)
    fast.ls(bucket)  # warm a keep-alive connection
    proxy.reset_stats()
    proxy.set_faults(permanent=True, kinds=("reset",), methods=("PUT",))
    with pytest.raises(botocore.exceptions.EndpointConnectionError) as info:
        fast.pipe_file(f"{bucket}/k2", b"v")
    assert not isinstance(info.value, OSError)
    assert 2 <= proxy.stats["requests"] <= 4  # s3fs did not add rounds

    proxy.reset_stats()
    proxy.set_faults(permanent=True, kinds=("disconnect",), methods=("POST",))
    one_try = fast_fail_fs(proxy.endpoint_url, attempts=1, retries=3)
    with pytest.raises(botocore.exceptions.ConnectionClosedError) as info:
        one_try.rm([f"{bucket}/k", f"{bucket}/missing"])  # DeleteObjects is a POST
    assert not isinstance(info.value, OSError)
    assert proxy.stats["by_method"]["POST"] == 3  # s3fs retried it 3 times


def test_lost_ack_makes_conditional_create_report_file_exists(s3, bucket, proxy):
    """FINDING (important for commit protocols): if the PUT reaches S3 but the
    response is lost (``reset_after``), the automatic retry of
    ``pipe_file(..., mode="create")`` hits our *own* object and raises
    FileExistsError although this writer created it.  Callers must check
    whether the existing object is theirs (content/ETag/metadata token)."""
    fs = make_fs(proxy.endpoint_url)
    proxy.set_faults(permanent=True, kinds=("reset_after",), methods=("PUT",), count=1)
    with pytest.raises(FileExistsError):
        fs.pipe_file(f"{bucket}/marker", b"mine", mode="create")
    assert fs.cat_file(f"{bucket}/marker") == b"mine"
    assert proxy.stats["by_kind"] == {"reset_after": 1}
    assert proxy.stats["by_method"]["PUT"] == 2


def test_stall_triggers_read_timeout_and_retry(s3, bucket, proxy):
    """A stalled response beyond ``read_timeout`` is retried by botocore
    (ReadTimeoutError, which *is* an OSError subclass)."""
    fs = make_fs(
        proxy.endpoint_url,
        config_kwargs={"read_timeout": 1.0, "retries": {"total_max_attempts": 3}},
    )
    proxy.set_faults(permanent=True, kinds=("stall",), methods=("PUT",), count=1, stall_seconds=3.0)
    t0 = time.monotonic()
    fs.pipe_file(f"{bucket}/slow", b"v")
    assert time.monotonic() - t0 >= 1.0
    assert fs.cat_file(f"{bucket}/slow") == b"v"
    assert proxy.stats["by_kind"] == {"stall": 1}
    assert issubclass(botocore.exceptions.ReadTimeoutError, OSError)
