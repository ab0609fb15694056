"""The storage layer: one small interface over fsspec for local paths, file:// and s3://.

Every method takes a full path or URL (as :mod:`noether_dist.format.layout` builds them).
Promises:

- ``write_once`` creates an object only if it does not exist yet, in one step (local:
  temp file + hard link; S3: one PUT with ``If-None-Match: *``). Used for commit records.
- ``replace`` swaps an object's whole content in one step (local: temp file + rename;
  S3: one PUT). Used for aliases.
- ``exists`` answers False only for "not found"; any other failure (403, timeout) raises.
- ``list`` never answers from a cache: another process's write is seen at once.
- transient errors (throttling, 5xx, timeouts, resets) are retried with exponential
  backoff by exactly one layer: on S3 botocore retries each request (standard mode);
  :meth:`Storage.retry` retries a whole operation only for what botocore cannot retry (a
  body cut off while streaming, a local-disk timeout). s3fs's own retry loop is off. A
  permanent error raises :class:`StorageError` naming the path and the cause.
- a missing S3 bucket is never created silently (:meth:`Storage.check_bucket`), and a
  store that ignores ``If-None-Match`` is refused before a commit record could be
  overwritten (:meth:`Storage.check_root`, before writing).
- on S3 every object carries a CRC32 the store checks on upload and keeps
  (:meth:`Storage.stored_checksum` reads it back).
- ``open_read`` streams an object (or a byte range) in pieces: one GET on S3, memory
  bounded by the piece; ``open_write`` streams one in, counting its size and CRC32, and
  the object appears whole when the ``with`` block ends (local: temp file + rename; S3:
  one PUT, or a multipart upload completed last). See :mod:`noether_dist.io.streams`.
- nothing outside this module reaches into the fsspec filesystem: callers use these
  methods and :meth:`Storage.local_path` (to memory-map a local file); DCP's reader and
  writer too (:class:`noether_dist.io.dcp_io.StorageFileSystem`).

A test or a tool may wrap the store by subclassing :class:`Storage` (see
``Storage.__init__``) and overriding these methods; every library module that touches the
store goes through them, so such a wrapper sees every read and write.
"""

from __future__ import annotations

import errno
import http.client
import logging
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import ConfigError, StorageError
from .streams import FileSink, LocalSink, ReadStream, Sink, WriteStream

__all__ = ["StorageOptions", "RetryPolicy", "Storage", "Entry", "open_storage", "is_transient", "ReadStream",
           "WriteStream"]

log = logging.getLogger(__name__)
T = TypeVar("T")

# Error codes and HTTP statuses a retry may cure (botocore's standard retry mode uses the
# same families: throttling, transient server errors, request timeouts).
_TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottled",
    "RequestThrottledException", "TooManyRequestsException", "RequestLimitExceeded",
    "BandwidthLimitExceeded", "RequestTimeout", "RequestTimeoutException", "PriorRequestNotComplete",
    "InternalError", "ServiceUnavailable", "EC2ThrottledException",
})
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})
_TRANSIENT_ERRNO = frozenset({errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE,
                              errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH})
_RETRY_MODES = ("standard", "adaptive")


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How transient storage errors are retried."""

    attempts: int = 4
    """Tries in all, the first included."""
    base_delay_s: float = 0.1
    """Delay after the first failure; doubles each time, with jitter."""
    max_delay_s: float = 5.0
    """Upper bound of one delay."""
    mode: str = "standard"
    """botocore's retry mode for S3 requests: standard or adaptive (adds client-side rate
    limiting under throttling)."""

    def __post_init__(self) -> None:
        if isinstance(self.attempts, bool) or not isinstance(self.attempts, int) or self.attempts < 1:
            raise ConfigError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ConfigError("RetryPolicy delays must be >= 0")
        if self.mode not in _RETRY_MODES:
            raise ConfigError(f"RetryPolicy.mode {self.mode!r} is not valid; use standard or adaptive")


@dataclass(frozen=True, kw_only=True)
class StorageOptions:
    """Options for the store. Unset S3 fields fall back to the usual AWS environment
    variables (AWS_ENDPOINT_URL_S3, AWS_PROFILE, AWS_DEFAULT_REGION, credentials)."""

    endpoint_url: str | None = None
    """S3 endpoint, e.g. http://127.0.0.1:9000 for a local server."""
    profile: str | None = None
    """AWS credentials profile name."""
    region: str | None = None
    """AWS region name."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Further keyword arguments for the fsspec filesystem (e.g. key, secret)."""
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    """Retries of transient errors."""
    checksum: str | None = "CRC32"
    """S3: the checksum every upload carries, checked by the store on upload and kept as a
    full-object checksum (multipart included); None sends none (for stores that reject
    checksum headers or full-object multipart checksums). Only CRC32 lets ``verify`` use the
    store's checksum instead of reading the bytes."""
    read_timeout_s: float = 30.0
    """S3: seconds botocore waits for data on a socket before the request fails (and is
    retried)."""

    def __post_init__(self) -> None:
        if self.checksum not in (None, "CRC32", "CRC32C", "SHA1", "SHA256", "CRC64NVME"):
            raise ConfigError(f"storage checksum {self.checksum!r} is not valid; use CRC32 (default), CRC32C, "
                              "SHA1, SHA256, CRC64NVME or null")
        if not isinstance(self.read_timeout_s, (int, float)) or not self.read_timeout_s > 0:
            raise ConfigError(f"storage read_timeout_s must be a number > 0, got {self.read_timeout_s!r}")

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> StorageOptions:
        """Build from a config mapping with keys endpoint_url, profile, region, extra, retry,
        checksum, read_timeout_s."""
        data = dict(data or {})
        allowed = {"endpoint_url", "profile", "region", "extra", "retry", "checksum", "read_timeout_s"}
        unknown = set(data) - allowed
        if unknown:
            raise ConfigError(f"unknown storage option(s) {sorted(unknown)}; valid: {sorted(allowed)}")
        retry = data.pop("retry", None)
        if isinstance(retry, dict):
            known = {"attempts", "base_delay_s", "max_delay_s", "mode"}
            if set(retry) - known:
                raise ConfigError(f"unknown storage retry option(s) {sorted(set(retry) - known)}; valid: {sorted(known)}")
            data["retry"] = RetryPolicy(**retry)
        elif retry is not None:
            data["retry"] = retry
        return cls(**data)

    def fsspec_kwargs(self, protocol: str) -> dict[str, Any]:
        """The keyword arguments for ``fsspec.url_to_fs`` for this protocol.

        For S3: a private instance (never fsspec's cached, shared one: our settings must not
        leak to other users of s3fs in the process), no listing cache (another process's
        writes must be seen at once), botocore's standard (or adaptive) retries with
        ``retry.attempts`` tries per request, bounded timeouts, and the upload checksum.
        """
        kwargs = dict(self.extra)
        if protocol in ("s3", "s3a"):
            kwargs["skip_instance_cache"] = True
            kwargs.setdefault("use_listings_cache", False)
            config_kwargs = dict(kwargs.pop("config_kwargs", {}) or {})
            config_kwargs.setdefault("retries", {"total_max_attempts": self.retry.attempts, "mode": self.retry.mode})
            config_kwargs.setdefault("connect_timeout", 10)
            config_kwargs.setdefault("read_timeout", self.read_timeout_s)
            kwargs["config_kwargs"] = config_kwargs
            if self.checksum:
                from .s3store import checksum_kwargs

                extra_s3 = dict(kwargs.pop("s3_additional_kwargs", {}) or {})
                for key, value in checksum_kwargs(self.checksum).items():
                    extra_s3.setdefault(key, value)
                kwargs["s3_additional_kwargs"] = extra_s3
            client_kwargs = dict(kwargs.pop("client_kwargs", {}) or {})
            if self.endpoint_url:
                client_kwargs["endpoint_url"] = self.endpoint_url
            if self.region:
                client_kwargs["region_name"] = self.region
            if client_kwargs:
                kwargs["client_kwargs"] = client_kwargs
            if self.profile:
                kwargs["profile"] = self.profile
        return kwargs


@dataclass(frozen=True)
class Entry:
    """One listing entry: full path as the filesystem names it, size in bytes, is it a folder."""

    path: str
    size: int
    is_dir: bool

    @property
    def name(self) -> str:
        """The last path component."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the exceptions it was raised from (s3fs keeps botocore's as the cause)."""
    out: list[BaseException] = []
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        out.append(e)
        todo.extend((e.__context__, e.__cause__))
    return out


def _client_error_answer(e: BaseException) -> bool | None:
    """For a botocore ClientError (an answer from the store): is it transient? None if ``e``
    is not one."""
    response = getattr(e, "response", None)
    if not isinstance(response, dict) or "Error" not in response:
        return None
    code = str((response.get("Error") or {}).get("Code") or "")
    status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
    try:
        status = int(status) if status is not None else None
    except (TypeError, ValueError):
        status = None
    return code in _TRANSIENT_CODES or status in _TRANSIENT_STATUS


def _is_client_connection_error(e: BaseException) -> bool:
    """botocore's connection and timeout errors (not OSErrors): retried by botocore itself."""
    exceptions = sys.modules.get("botocore.exceptions")
    return exceptions is not None and isinstance(e, (exceptions.HTTPClientError, exceptions.ConnectionError))


def _is_stream_error(e: BaseException) -> bool:
    """A connection lost or a body cut off while reading or writing (aiohttp, http.client)."""
    if isinstance(e, http.client.IncompleteRead):
        return True
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None:
        if isinstance(e, aiohttp.ClientResponseError):
            return e.status in _TRANSIENT_STATUS
        if isinstance(e, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError)):
            return True
    exceptions = sys.modules.get("botocore.exceptions")
    return exceptions is not None and isinstance(e, exceptions.ResponseStreamingError)


def is_transient(exc: BaseException) -> bool:
    """True for errors that a retry may cure: throttling, 5xx, timeouts, resets.

    Decided by type, error code and HTTP status of the exception or of the botocore/aiohttp
    error it was raised from, never by the message text (a checkpoint named ``..._U1504_...``
    in a 400's message is still a 400). An answer from the store with another code (400,
    403, 404, 412) is permanent.
    """
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    for e in _chain(exc):
        answer = _client_error_answer(e)
        if answer is not None:
            return answer
        if _is_client_connection_error(e) or _is_stream_error(e):
            return True
        if isinstance(e, (TimeoutError, ConnectionError)):
            return True
        if isinstance(e, OSError) and type(e) is OSError and e.errno in _TRANSIENT_ERRNO:
            return True
    return False


def _retried_by_client(exc: BaseException) -> bool:
    """True when botocore's retry handler already retried this request error (a transient
    answer from the store, or a connection/timeout error): retrying it again would nest."""
    for e in _chain(exc):
        answer = _client_error_answer(e)
        if answer is not None:
            return True
        if _is_client_connection_error(e):
            return True
    return False


class Storage:
    """A store reached through one fsspec filesystem; see the module docstring for promises.

    Built by :func:`open_storage`; a subclass that wraps a store passes an opened one's
    ``fs``, ``options`` and ``protocol`` to this constructor."""

    def __init__(self, fs: fsspec.AbstractFileSystem, options: StorageOptions, protocol: str) -> None:
        self.fs = fs
        self.options = options
        self.protocol = protocol
        self._write_once_checked: set[str] = set()

    @property
    def is_s3(self) -> bool:
        """True for an s3:// store."""
        return self.protocol in ("s3", "s3a")

    @property
    def is_local(self) -> bool:
        """True when the store is a local (or node-local) disk."""
        return isinstance(self.fs, LocalFileSystem)

    # -- plumbing -----------------------------------------------------------------
    def _strip(self, path: str) -> str:
        return self.fs._strip_protocol(path)

    def retry(self, what: str, path: str, fn: Callable[[], T]) -> T:
        """Run ``fn`` with the retry policy; translate a final failure into StorageError.

        FileNotFoundError and FileExistsError pass through untouched: callers decide
        what they mean. On S3, errors botocore already retried are not retried again.
        """
        policy = self.options.retry
        delay = policy.base_delay_s
        for attempt in range(1, policy.attempts + 1):
            try:
                return fn()
            except (FileNotFoundError, FileExistsError):
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if attempt < policy.attempts and is_transient(exc) and not (self.is_s3 and _retried_by_client(exc)):
                    log.warning("transient storage error on %s %s (try %d/%d): %s", what, path, attempt, policy.attempts, exc)
                    time.sleep(min(policy.max_delay_s, delay) * (0.5 + random.random()))
                    delay *= 2
                    continue
                if isinstance(exc, StorageError):
                    raise
                raise StorageError(f"{what} {path} failed: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    # -- the interface ------------------------------------------------------------
    def check_bucket(self, url: str) -> None:
        """Raise StorageError if the bucket of an S3 URL does not exist (it is never created),
        ConfigError if the URL names no bucket. Reads only: for tools that look without writing."""
        if not self.is_s3:
            return
        bucket = self._strip(url).split("/", 1)[0]
        if not bucket:
            raise ConfigError(f"{url} names no bucket; use s3://bucket/prefix")
        try:
            self.retry("check bucket", bucket, lambda: self.fs.ls(bucket, refresh=True))
        except FileNotFoundError:
            raise StorageError(f"bucket {bucket!r} of {url} does not exist; create it first (noether_dist never creates buckets)") from None

    def check_root(self, url: str) -> None:
        """Before writing under ``url``: :meth:`check_bucket`, and on S3 prove that the store
        honours ``If-None-Match`` (:meth:`check_write_once`)."""
        self.check_bucket(url)
        self.check_write_once(url)

    def check_write_once(self, folder: str) -> None:
        """S3: prove once per folder that the store refuses to overwrite an object written
        with ``If-None-Match: *``; StorageError if it overwrites.

        A commit record is written once and never replaced; a store that ignores the
        header (older MinIO, some S3-compatible stores) would silently let a second writer
        replace it. The probe writes a small object twice, expects the second write to be
        refused, and removes it: three requests per output dir and process.
        """
        if not self.is_s3:
            return
        key = self._strip(folder).rstrip("/")
        if key in self._write_once_checked:
            return
        probe = f"{key}/.noether-write-once-probe-{uuid.uuid4().hex}"
        try:
            self.retry("write", probe, lambda: self.fs.pipe_file(probe, b"1", mode="create"))
            try:
                self.retry("write", probe, lambda: self.fs.pipe_file(probe, b"2", mode="create"))
            except FileExistsError:
                self._write_once_checked.add(key)
                return
            raise StorageError(
                f"the store of {folder} ignores If-None-Match: a second write-once PUT of {probe} replaced the "
                "object instead of being refused (HTTP 412), so a commit record could be overwritten silently. "
                "noether_dist refuses to save there: use a store that honours conditional writes "
                "(If-None-Match: *, as AWS S3 does) or a shared file system")
        finally:
            try:
                self.fs.rm(probe)
            except FileNotFoundError:
                pass
            except Exception as exc:  # noqa: BLE001 - a leftover probe is harmless; the check decided
                log.warning("could not remove the write-once probe %s: %s", probe, exc)

    def stored_checksum(self, path: str) -> tuple[int, int | None]:
        """(size, CRC32) as the store keeps them for ``path``, with one metadata request and
        no bytes read; the CRC32 is None where the store keeps none for the whole object (a
        local disk, an object written without one). FileNotFoundError if it does not exist."""
        if not self.is_s3:
            stripped = self._strip(path)
            return int(self.retry("stat", path, lambda: self.fs.info(stripped))["size"]), None
        from .s3store import stored_crc32

        found = self.retry("stat", path, lambda: stored_crc32(self.fs, self._strip(path)))
        return found.size, found.crc32

    def write_once(self, path: str, data: bytes) -> None:
        """Create ``path`` with ``data`` in one step; FileExistsError if it already exists.
        On S3 the store's support for ``If-None-Match`` is proved first (once per folder's
        bucket and process) unless :meth:`check_root` already did."""
        stripped = self._strip(path)
        if self.is_local:
            self._local_write(stripped, data, exclusive=True)
            return
        if self.is_s3 and not any(stripped.split("/", 1)[0] == k.split("/", 1)[0] for k in self._write_once_checked):
            self.check_write_once(path.rsplit("/", 1)[0])

        def put() -> None:
            try:
                self.fs.pipe_file(stripped, data, mode="create")
            except FileExistsError:
                raise
            except OSError as exc:
                if "PreconditionFailed" in str(exc) or "412" in str(exc):
                    raise FileExistsError(path) from exc
                raise

        try:
            self.retry("write", path, put)
        except FileExistsError:
            # A retried PUT whose first answer was lost finds our own object: that is success.
            if self.read(path) == data:
                return
            raise

    def replace(self, path: str, data: bytes) -> None:
        """Replace the whole content of ``path`` in one step (create if missing)."""
        stripped = self._strip(path)
        if self.is_local:
            self._local_write(stripped, data, exclusive=False)
            return
        self.retry("write", path, lambda: self.fs.pipe_file(stripped, data))

    def _local_write(self, path: str, data: bytes, *, exclusive: bool) -> None:
        try:
            sink = LocalSink(path, exclusive=exclusive)
            try:
                sink.write(data)
            except BaseException:
                sink.abort()
                raise
            sink.commit(0)
        except OSError as exc:
            if isinstance(exc, FileExistsError):
                raise
            raise StorageError(f"write {path} failed: {exc}") from exc

    def read(self, path: str) -> bytes:
        """The whole content of ``path``; FileNotFoundError if it does not exist. One GET on
        S3 (no HEAD first), which keeps selecting a checkpoint at two requests."""
        stripped = self._strip(path)
        if self.protocol in ("s3", "s3a"):
            return self.retry("read", path, lambda: self.fs.cat_file(stripped, max_concurrency=1))
        return self.retry("read", path, lambda: self.fs.cat_file(stripped))

    def read_range(self, path: str, start: int, end: int) -> bytes:
        """Bytes ``start`` up to ``end`` (exclusive) of ``path``, fewer if it ends earlier;
        FileNotFoundError if it does not exist. One ranged GET on S3 (no HEAD first)."""
        stripped = self._strip(path)
        if self.is_local:
            def local() -> bytes:
                with open(stripped, "rb") as fh:
                    fh.seek(start)
                    return fh.read(end - start)

            return self.retry("read", path, local)
        return self.retry("read", path, lambda: self.fs.cat_file(stripped, start=start, end=end))

    @contextmanager
    def open_read(self, path: str, *, start: int = 0, end: int | None = None) -> Iterator[ReadStream]:
        """Read bytes ``start`` up to ``end`` (exclusive; None: to the end) of ``path`` in
        pieces: ``stream.read(n)``. One GET on S3 (no HEAD), whose body arrives as it is
        read; memory is bounded by the pieces the caller asks for. A connection lost midway
        is picked up at the byte where it stopped. FileNotFoundError if ``path`` does not
        exist (when the ``with`` block is entered)."""
        stripped = self._strip(path)

        def opener(offset: int) -> Any:
            if self.is_local:
                fh = open(stripped, "rb")  # noqa: SIM115 - the stream closes it
                fh.seek(offset)
                return fh
            if self.is_s3:
                from .s3store import S3Body

                return S3Body(self.fs, stripped, offset, end)
            fh = self.fs.open(stripped, "rb")
            fh.seek(offset)
            return fh

        stream = ReadStream(path, lambda offset: self.retry("read", path, lambda: opener(offset)), start=start,
                            end=end, attempts=self.options.retry.attempts, is_transient=self._retry_mid_stream)
        try:
            yield stream
        finally:
            stream.close()

    def _retry_mid_stream(self, exc: BaseException) -> bool:
        return is_transient(exc) and not (self.is_s3 and _retried_by_client(exc))

    @contextmanager
    def open_write(self, path: str) -> Iterator[WriteStream]:
        """Write ``path`` as a stream: ``stream.write(data)``; ``stream.size`` and
        ``stream.crc`` count the bytes (CRC32) as a commit record holds them. The object
        appears, replacing any old one, when the ``with`` block ends without an exception;
        with one, nothing of it remains. Local: a temp file beside it, fsynced and renamed.
        S3: one PUT, or for a big object a multipart upload whose parts go up while writing
        goes on (a few parts in memory at most), each request with its CRC32 and the
        completion with the object's when the store's uploads carry CRC32."""
        stripped = self._strip(path)
        sink = self.retry("open for writing", path, lambda: self._sink(stripped))
        stream = WriteStream(path, sink)
        try:
            yield stream
        except BaseException:
            sink.abort()
            raise
        try:
            sink.commit(stream.crc)  # not retried here: botocore retries each request of it
        except BaseException as exc:
            sink.abort()
            if isinstance(exc, (FileExistsError, StorageError)) or not isinstance(exc, Exception):
                raise
            raise StorageError(f"write {path} failed: {type(exc).__name__}: {exc}") from exc

    def _sink(self, stripped: str) -> Sink:
        if self.is_local:
            return LocalSink(stripped)
        if self.is_s3:
            from .s3store import S3Sink

            return S3Sink(self.fs, stripped, crc32=self.options.checksum == "CRC32")
        return FileSink(self.fs, stripped)

    def local_path(self, path: str) -> str | None:
        """The OS path of ``path`` on a local store (to memory-map a file), else None."""
        return os.path.abspath(self._strip(path)) if self.is_local else None

    def exists(self, path: str) -> bool:
        """True/False for found/not found; any other failure raises StorageError."""
        stripped = self._strip(path)
        try:
            self.retry("stat", path, lambda: self.fs.info(stripped))
            return True
        except FileNotFoundError:
            return False

    def list(self, path: str) -> list[Entry]:
        """Fresh listing of the direct children of ``path``; [] if it does not exist."""
        stripped = self._strip(path)

        def ls() -> list[dict]:
            self.fs.invalidate_cache(stripped)
            return self.fs.ls(stripped, detail=True)

        try:
            raw = self.retry("list", path, ls)
        except FileNotFoundError:
            return []
        out = []
        for item in raw:
            name = item["name"].rstrip("/")
            if name == stripped.rstrip("/"):
                continue
            out.append(Entry(name, int(item.get("size") or 0), item.get("type") == "directory"))
        return sorted(out, key=lambda e: e.path)

    def size(self, path: str) -> int:
        """Total bytes under ``path`` (a file or a folder)."""
        stripped = self._strip(path)
        self.fs.invalidate_cache(stripped)
        return int(self.retry("du", path, lambda: self.fs.du(stripped, total=True)))

    def remove(self, path: str, *, recursive: bool = False) -> None:
        """Remove a file, or a folder with ``recursive=True``; missing is not an error."""
        stripped = self._strip(path)
        try:
            self.retry("remove", path, lambda: self.fs.rm(stripped, recursive=recursive))
        except FileNotFoundError:
            pass
        self.fs.invalidate_cache(stripped)

    def makedirs(self, path: str) -> None:
        """Create a folder (local only: object stores have no folders)."""
        if self.is_local:
            os.makedirs(self._strip(path), exist_ok=True)


def open_storage(url: str, options: StorageOptions | None = None) -> Storage:
    """The Storage for ``url`` (local path, file://, s3://), with options or AWS env defaults."""
    if not isinstance(url, str) or not url:
        raise ConfigError(f"storage URL must be a non-empty string, got {url!r}")
    options = options or StorageOptions()
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        if protocol in ("s3", "s3a"):
            from .s3store import ChecksummedS3FileSystem

            fs = ChecksummedS3FileSystem(**options.fsspec_kwargs(protocol))
        else:
            fs, _ = fsspec.url_to_fs(url, **options.fsspec_kwargs(protocol))
    except (ValueError, ImportError, TypeError) as exc:
        raise ConfigError(f"cannot open storage {url!r}: {exc}; use a local path, file:// or s3://bucket/prefix") from exc
    return Storage(fs, options, protocol)
