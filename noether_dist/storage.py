"""The storage layer: one small interface over fsspec for local paths, file:// and s3://.

Every method takes a full path or URL (as :mod:`noether_dist.layout` builds them).
Promises:

- ``write_once`` creates an object only if it does not exist yet, in one step (local:
  temp file + hard link; S3: one PUT with ``If-None-Match: *``). Used for commit records.
- ``replace`` swaps an object's whole content in one step (local: temp file + rename;
  S3: one PUT). Used for aliases.
- ``exists`` answers False only for "not found"; any other failure (403, timeout) raises.
- ``list`` never answers from a cache: another process's write is seen at once.
- transient errors (throttling, 5xx, timeouts, resets) are retried with exponential
  backoff; a permanent error raises :class:`StorageError` naming the path and the cause.
- a missing S3 bucket is never created silently (:meth:`Storage.check_root`).
"""

from __future__ import annotations

import logging
import os
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import ConfigError, StorageError

__all__ = ["StorageOptions", "RetryPolicy", "Storage", "Entry", "open_storage", "is_transient"]

log = logging.getLogger(__name__)
T = TypeVar("T")

_TRANSIENT_MARKERS = (
    "SlowDown", "Throttl", "RequestTimeout", "ServiceUnavailable", "InternalError",
    "503", "500 ", "502", "504", "Connection reset", "ConnectionReset", "timed out", "Timeout",
    "Server disconnected", "ServerDisconnected", "Connection aborted",
    # botocore's connection errors are not OSErrors: EndpointConnectionError ("Could not
    # connect", also after a reset), ConnectionClosedError, ReadTimeoutError.
    "EndpointConnectionError", "ConnectionClosedError", "Could not connect", "ReadTimeout", "ConnectTimeout",
)


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How transient storage errors are retried."""

    attempts: int = 4
    """Tries in all, the first included."""
    base_delay_s: float = 0.1
    """Delay after the first failure; doubles each time, with jitter."""
    max_delay_s: float = 5.0
    """Upper bound of one delay."""

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ConfigError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if self.base_delay_s < 0 or self.max_delay_s < 0:
            raise ConfigError("RetryPolicy delays must be >= 0")


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

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> StorageOptions:
        """Build from a config mapping with keys endpoint_url, profile, region, extra."""
        data = dict(data or {})
        allowed = {"endpoint_url", "profile", "region", "extra", "retry"}
        unknown = set(data) - allowed
        if unknown:
            raise ConfigError(f"unknown storage option(s) {sorted(unknown)}; valid: {sorted(allowed)}")
        retry = data.pop("retry", None)
        if isinstance(retry, dict):
            data["retry"] = RetryPolicy(**retry)
        return cls(**data)

    def fsspec_kwargs(self, protocol: str) -> dict[str, Any]:
        """The keyword arguments for ``fsspec.url_to_fs`` for this protocol.

        For S3: no listing cache (another process's writes must be seen at once), and
        bounded botocore retries and timeouts, so that a dead endpoint fails in bounded
        time and our own retry policy stays in charge.
        """
        kwargs = dict(self.extra)
        if protocol in ("s3", "s3a"):
            kwargs.setdefault("use_listings_cache", False)
            config_kwargs = dict(kwargs.pop("config_kwargs", {}) or {})
            config_kwargs.setdefault("retries", {"total_max_attempts": 3, "mode": "standard"})
            config_kwargs.setdefault("connect_timeout", 10)
            config_kwargs.setdefault("read_timeout", 30)
            kwargs["config_kwargs"] = config_kwargs
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


def is_transient(exc: BaseException) -> bool:
    """True for errors that a retry may cure: throttling, 5xx, timeouts, resets."""
    if isinstance(exc, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError, NotADirectoryError)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    text = f"{type(exc).__name__}: {exc}"
    return any(marker in text for marker in _TRANSIENT_MARKERS)


class Storage:
    """A store reached through one fsspec filesystem; see the module docstring for promises."""

    def __init__(self, fs: fsspec.AbstractFileSystem, options: StorageOptions, protocol: str) -> None:
        self.fs = fs
        self.options = options
        self.protocol = protocol

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
        what they mean.
        """
        policy = self.options.retry
        delay = policy.base_delay_s
        for attempt in range(1, policy.attempts + 1):
            try:
                return fn()
            except (FileNotFoundError, FileExistsError):
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                if attempt < policy.attempts and is_transient(exc):
                    log.warning("transient storage error on %s %s (try %d/%d): %s", what, path, attempt, policy.attempts, exc)
                    time.sleep(min(policy.max_delay_s, delay) * (0.5 + random.random()))
                    delay *= 2
                    continue
                if isinstance(exc, StorageError):
                    raise
                raise StorageError(f"{what} {path} failed: {type(exc).__name__}: {exc}") from exc
        raise AssertionError("unreachable")

    # -- the interface ------------------------------------------------------------
    def check_root(self, url: str) -> None:
        """Raise StorageError if the bucket of an S3 URL does not exist (it is never created)."""
        if self.protocol not in ("s3", "s3a"):
            return
        bucket = self._strip(url).split("/", 1)[0]
        try:
            self.retry("check bucket", bucket, lambda: self.fs.ls(bucket, refresh=True))
        except FileNotFoundError:
            raise StorageError(f"bucket {bucket!r} of {url} does not exist; create it first (noether_dist never creates buckets)") from None

    def write_once(self, path: str, data: bytes) -> None:
        """Create ``path`` with ``data`` in one step; FileExistsError if it already exists."""
        stripped = self._strip(path)
        if self.is_local:
            self._local_write(stripped, data, exclusive=True)
            return

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
        folder = os.path.dirname(path)
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}")
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            if exclusive:
                os.link(tmp, path)  # fails with FileExistsError: never overwrites a commit
            else:
                os.replace(tmp, path)
            dir_fd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            if isinstance(exc, FileExistsError):
                raise
            raise StorageError(f"write {path} failed: {exc}") from exc
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def read(self, path: str) -> bytes:
        """The whole content of ``path``; FileNotFoundError if it does not exist. One GET on
        S3 (no HEAD first), which keeps selecting a checkpoint at two requests."""
        stripped = self._strip(path)
        if self.protocol in ("s3", "s3a"):
            return self.retry("read", path, lambda: self.fs.cat_file(stripped, max_concurrency=1))
        return self.retry("read", path, lambda: self.fs.cat_file(stripped))

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
        fs, _ = fsspec.url_to_fs(url, **options.fsspec_kwargs(protocol))
    except (ValueError, ImportError) as exc:
        raise ConfigError(f"cannot open storage {url!r}: {exc}; use a local path, file:// or s3://bucket/prefix") from exc
    if protocol in ("s3", "s3a"):
        # s3fs wraps botocore's retries in its own loop (5 by default), and ours wraps both:
        # against a store that stalls, the product of the three is hours. Keep s3fs's short.
        fs.retries = 2
    return Storage(fs, options, protocol)
