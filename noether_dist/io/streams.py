"""The streams of the storage layer: an object read in pieces, an object written in pieces.

:meth:`noether_dist.io.storage.Storage.open_read` and :meth:`~noether_dist.io.storage.Storage.open_write`
hand these out; nothing else builds them. Promises:

- :class:`ReadStream` reads an object (or a byte range of it) from the front, in pieces of
  the caller's size: memory is bounded by the piece, never the object. A connection cut
  off in the middle is picked up where it stopped (one ranged request more); on S3 the
  read is one GET.
- :class:`WriteStream` counts the size and CRC32 of every byte written (the numbers a
  commit record holds) and hands the bytes to a sink. The object appears, whole, only when
  the sink commits; until then readers see the old object or none.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import Callable
from typing import Any, Protocol

from ..errors import StorageError
from .checksum import crc32

__all__ = ["ReadStream", "WriteStream", "Body", "Sink", "LocalSink", "FileSink"]


class Body(Protocol):
    """What a backend opens for reading: ``read(n)`` up to n bytes (b"" at the end), ``close()``."""

    def read(self, n: int) -> bytes: ...

    def close(self) -> None: ...


class ReadStream:
    """Bytes ``start`` up to ``end`` (exclusive; None: the end of the object) of one object,
    read from the front. ``opener(offset)`` opens a :class:`Body` at ``offset``; a transient
    error while reading re-opens at the current offset, up to ``attempts`` tries in all."""

    def __init__(self, path: str, opener: Callable[[int], Body], *, start: int, end: int | None,
                 attempts: int, is_transient: Callable[[BaseException], bool]) -> None:
        self.path = path
        self.position = start
        """Offset of the next byte in the object."""
        self._end = end
        self._opener = opener
        self._attempts = attempts
        self._is_transient = is_transient
        self._body: Body | None = opener(start)

    def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all that is left for n < 0); b"" at the end."""
        if self._end is not None:
            left = self._end - self.position
            n = left if n < 0 else min(n, left)
            if n <= 0:
                return b""
        failures = 0
        while True:
            try:
                if self._body is None:
                    self._body = self._opener(self.position)
                data = self._body.read(n)
                break
            except FileNotFoundError:
                raise
            except Exception as exc:  # noqa: BLE001 - classified below
                self._drop_body()
                failures += 1
                if failures < self._attempts and self._is_transient(exc):
                    continue
                if isinstance(exc, StorageError):
                    raise
                raise StorageError(f"read {self.path} failed at byte {self.position}: {type(exc).__name__}: {exc}") \
                    from exc
        self.position += len(data)
        return data

    def readable(self) -> bool:
        """Always True."""
        return True

    def close(self) -> None:
        """Release the connection or file (also done when the ``with`` block of
        :meth:`Storage.open_read` ends)."""
        self._drop_body()

    def _drop_body(self) -> None:
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):
                body.close()


class Sink(Protocol):
    """Where a :class:`WriteStream` puts its bytes: ``write``; ``commit(crc)`` makes the
    object appear whole; ``abort()`` leaves no trace of it."""

    def write(self, data: memoryview | bytes) -> None: ...

    def commit(self, crc: int) -> None: ...

    def abort(self) -> None: ...


class WriteStream:
    """A binary stream to one object; ``size`` and ``crc`` count what was written. The
    object appears when the ``with`` block of :meth:`Storage.open_write` ends without an
    exception (``close`` only flushes: DCP and ``torch.save`` close streams they do not own)."""

    def __init__(self, path: str, sink: Sink) -> None:
        self.path = path
        self.size = 0
        self._crc = 0
        self._sink = sink

    @property
    def crc(self) -> int:
        """CRC32 of every byte written so far."""
        return self._crc & 0xFFFFFFFF

    def write(self, data: Any) -> int:
        """Write ``data`` (bytes or any buffer); returns the number of bytes."""
        view = data if isinstance(data, (bytes, bytearray)) else memoryview(data).cast("B")
        self._sink.write(view)
        self._crc = crc32(view, self._crc)
        self.size += len(view)
        return len(view)

    def tell(self) -> int:
        """Bytes written so far (DCP records item offsets with it)."""
        return self.size

    def writable(self) -> bool:
        """Always True."""
        return True

    def seekable(self) -> bool:
        """Always False: written from the front only."""
        return False

    def flush(self) -> None:
        """Hand buffered bytes on (local: to the OS); the object still appears only when
        the stream's ``with`` block ends."""
        flush = getattr(self._sink, "flush", None)
        if flush is not None:
            flush()

    def close(self) -> None:
        """Same as :meth:`flush`."""
        self.flush()


class LocalSink:
    """A local file: written to a temporary file beside it, then fsynced and renamed into
    place (``exclusive``: hard-linked, FileExistsError if the name exists), and the folder
    fsynced: readers see the old file or the new one whole, never a part."""

    def __init__(self, path: str, *, exclusive: bool = False) -> None:
        self.path = path
        self.exclusive = exclusive
        self.folder = os.path.dirname(path) or "."
        os.makedirs(self.folder, exist_ok=True)
        self.tmp = os.path.join(self.folder, f".tmp-{uuid.uuid4().hex}")
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 - closed in commit or abort

    def write(self, data: memoryview | bytes) -> None:
        """Append to the temporary file."""
        self.fh.write(data)

    def flush(self) -> None:
        """Hand Python's buffer to the OS."""
        self.fh.flush()

    def commit(self, crc: int) -> None:
        """fsync, rename (or link) into place, fsync the folder."""
        try:
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            if self.exclusive:
                os.link(self.tmp, self.path)  # fails with FileExistsError: never overwrites
            else:
                os.replace(self.tmp, self.path)
            dir_fd = os.open(self.folder, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            self._remove_tmp()

    def abort(self) -> None:
        """Close and remove the temporary file."""
        self._remove_tmp()

    def _remove_tmp(self) -> None:
        with contextlib.suppress(OSError):
            self.fh.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)


class FileSink:
    """Any other fsspec filesystem: its own file object, which commits on close; an aborted
    write is discarded where the filesystem can, else removed."""

    def __init__(self, fs: Any, path: str) -> None:
        self.fs = fs
        self.path = path
        self.fh = fs.open(path, "wb")

    def write(self, data: memoryview | bytes) -> None:
        """Hand the bytes to fsspec's file."""
        self.fh.write(data)

    def commit(self, crc: int) -> None:
        """Close fsspec's file (it uploads or renames what it holds)."""
        self.fh.close()

    def abort(self) -> None:
        """Discard the file."""
        discard = getattr(self.fh, "discard", None)
        if discard is not None:
            discard()
            return
        with contextlib.suppress(Exception):
            self.fh.close()
        with contextlib.suppress(Exception):
            self.fs.rm(self.path)
