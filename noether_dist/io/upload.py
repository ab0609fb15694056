"""Uploading node-local files to a store, in a child process: the durable tier's byte work.

The durable tier (:mod:`noether_dist.tiers`) keeps the agreement and the commit in the
training process and hands the bytes to an :class:`UploadProcess`: a child Python process
(``python -m noether_dist.io.upload``) that imports no torch, opens the store from its URL
and options, and sends one batch of files at a time (:func:`send_file`), paced to
``bandwidth_mb_s``, at a lower CPU priority (nice 10). Reading, checksumming and the HTTP
client's work then take neither the training process's GIL nor, on busy cores, much of its
CPU time.

Each file is read once, and its CRC32 is computed from the bytes as they go out, then
compared with the commit record's before the file counts as uploaded:

- on S3 with CRC32 checksums (the default) a file below the multipart size goes up in one
  PUT streamed from the disk, carrying the record's CRC32, so the store itself refuses bytes
  that do not match the record (and the reader's own CRC32 must match too);
- elsewhere (bigger files, other stores) the file streams through
  :meth:`~noether_dist.io.storage.Storage.open_write`, whose CRC32 is checked before the
  write completes: a mismatch aborts it and nothing appears.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from ..errors import UploadError
from .checksum import crc32
from .storage import Storage, StorageOptions, open_storage

__all__ = ["FileJob", "Pacer", "send_file", "send_files", "UploadProcess"]

log = logging.getLogger(__name__)

_STREAM_CHUNK = 8 << 20
"""Bytes read per write when a file streams through ``Storage.open_write``."""
_NICE = 10
"""The upload process's CPU priority below the training's: on busy cores it yields to training
(on idle ones it runs at full speed); a nice-0 process weighs about 10x more."""
_PROGRESS_EVERY_S = 0.5
"""The child tells the parent about progress at most this often."""


@dataclass(frozen=True)
class FileJob:
    """One file to upload: the OS path of the local file, where it goes in the store, and
    the size and CRC32 its commit record holds (the upload fails when the file differs)."""

    source: str
    dest: str
    size: int
    crc32: int


class Pacer:
    """Keeps an upload's average rate at or below ``mb_s`` MB/s (10**6 bytes): :meth:`sent`
    sleeps as long as the bytes so far are ahead of that rate. ``None``: no limit."""

    def __init__(self, mb_s: float | None) -> None:
        self.rate = None if mb_s is None else float(mb_s) * 1e6
        self.started = time.monotonic()
        self.bytes = 0

    def chunk(self, wanted: int) -> int:
        """How many bytes to send next: ``wanted``, or about a second's worth when paced
        (so progress is seen at least that often)."""
        return wanted if self.rate is None else max(1, min(wanted, int(self.rate)))

    def sent(self, nbytes: int) -> None:
        """``nbytes`` more went out; wait until the average rate is back under the limit."""
        self.bytes += nbytes
        if self.rate is not None:
            ahead = self.bytes / self.rate - (time.monotonic() - self.started)
            if ahead > 0:
                time.sleep(ahead)


class _Reader(io.FileIO):
    """The local file as the HTTP client reads it: counts the bytes and their CRC32 as they
    go out (from the start again when the client rewinds to retry), and paces them."""

    def __init__(self, path: str, pacer: Pacer, progress: Callable[[int], None] | None, *, crc: bool) -> None:
        super().__init__(path, "rb")
        self.pacer, self.progress, self.with_crc = pacer, progress, crc
        self.crc = self.count = 0
        self.in_order = True

    def read(self, size: int = -1) -> bytes:  # noqa: D102 - io.FileIO.read
        data = super().read(self.pacer.chunk(size) if size is not None and size > 0 else size)
        if self.with_crc:
            self.crc = crc32(data, self.crc)
        self.count += len(data)
        if data:
            self.pacer.sent(len(data))
            if self.progress is not None:
                self.progress(len(data))
        return data

    def readinto(self, buffer: Any) -> int:  # noqa: D102 - only read() keeps the count
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = 0) -> int:  # noqa: D102 - io.FileIO.seek
        pos = super().seek(offset, whence)
        if pos == 0:
            self.crc = self.count = 0
        elif pos != self.count:
            self.in_order = False  # the bytes counted are no longer the file's bytes in order
        return pos


def _crc_header(crc: int) -> str:
    return base64.b64encode((crc & 0xFFFFFFFF).to_bytes(4, "big")).decode()


def _mismatch(job: FileJob, size: int, crc: int | None) -> UploadError:
    got = f"{size} bytes" + ("" if crc is None else f", CRC32 {crc:08x}")
    return UploadError(f"{job.source} on the local disk does not match its commit record ({got}; the record says "
                       f"{job.size}, {job.crc32:08x}); it is not uploaded")


def send_file(storage: Storage, job: FileJob, pacer: Pacer | None = None,
              progress: Callable[[int], None] | None = None) -> None:
    """Upload ``job.source`` to ``job.dest`` on ``storage``, reading it once; UploadError
    (one line) when it is missing, differs from its record (size, CRC32) or the store
    fails. ``progress`` is called with each piece's size as it is read."""
    pacer = pacer or Pacer(None)
    try:
        size = os.stat(job.source).st_size
    except FileNotFoundError:
        raise UploadError(f"{job.source} is missing on the local disk; it cannot be uploaded") from None
    if size != job.size:
        raise _mismatch(job, size, None)
    from .s3store import MULTIPART_MIN_BYTES

    one_put = storage.is_s3 and storage.options.checksum == "CRC32" and size < MULTIPART_MIN_BYTES
    try:
        with _Reader(job.source, pacer, progress, crc=one_put) as reader:
            if one_put:
                _put(storage, job, reader)
            else:
                _stream(storage, job, reader, pacer)
    except UploadError:
        raise
    except Exception as exc:  # noqa: BLE001 - the store's errors, one line each
        raise UploadError(f"uploading {job.source} to {job.dest} failed: {type(exc).__name__}: {exc}") from exc


def _put(storage: Storage, job: FileJob, reader: _Reader) -> None:
    """One PUT streamed from the file, with the record's CRC32: the store checks the bytes."""
    bucket, key, _ = storage.fs.split_path(job.dest)
    try:
        storage.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=reader, ContentLength=job.size,
                           ChecksumCRC32=_crc_header(job.crc32))
    except Exception:
        if reader.in_order and reader.count == job.size and reader.crc != job.crc32:
            raise _mismatch(job, reader.count, reader.crc) from None  # the store refused the bytes
        raise
    if not reader.in_order or reader.count != job.size or reader.crc != job.crc32:
        # the store took bytes it was told had another CRC32 (a store that does not check)
        storage.remove(job.dest)
        raise _mismatch(job, reader.count, reader.crc if reader.in_order else None)


def _stream(storage: Storage, job: FileJob, reader: _Reader, pacer: Pacer) -> None:
    """Through ``open_write``: its CRC32 is checked before the write completes."""
    with storage.open_write(job.dest) as stream:
        while data := reader.read(pacer.chunk(_STREAM_CHUNK)):
            stream.write(data)
        if stream.size != job.size or stream.crc != job.crc32:
            raise _mismatch(job, stream.size, stream.crc)  # inside the block: nothing is written


def send_files(storage: Storage, jobs: Sequence[FileJob], bandwidth_mb_s: float | None,
               progress: Callable[[int], None] | None = None) -> None:
    """Every file of ``jobs`` in turn (:func:`send_file`), together paced to ``bandwidth_mb_s``."""
    pacer = Pacer(bandwidth_mb_s)
    for job in jobs:
        send_file(storage, job, pacer, progress)


class UploadProcess:
    """A child process that uploads batches of files to one store (see the module docstring).

    :meth:`upload` runs one batch and waits for it; a child that died (killed, out of memory)
    fails that batch with :class:`UploadError` and is started again for the next one. The
    child dies with its parent (Linux: the parent-death signal; elsewhere at the next message)."""

    def __init__(self, url: str, options: StorageOptions | None, bandwidth_mb_s: float | None) -> None:
        self.url, self.options, self.bandwidth_mb_s = url, options, bandwidth_mb_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._conn: _Channel | None = None
        self.start()

    @property
    def pid(self) -> int | None:
        """The child's process id (None once closed)."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the child runs (False once it exited, was killed or closed)."""
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the child (it imports its modules and opens the store while the caller goes on)."""
        to_child, from_parent = os.pipe()
        to_parent, from_child = os.pipe()
        package_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (package_root, os.environ.get("PYTHONPATH")) if p))
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "noether_dist.io.upload", str(to_child), str(from_child)],
                pass_fds=(to_child, from_child), stdin=subprocess.DEVNULL, stdout=sys.stderr.fileno()
                if _has_fileno(sys.stderr) else None, env=env)
        finally:
            os.close(to_child)
            os.close(from_child)
        self._conn = _Channel(to_parent, from_parent)
        self._conn.send(("open", self.url, self.options))

    def upload(self, jobs: Sequence[FileJob], timeout_s: float) -> None:
        """Upload ``jobs`` in the child; UploadError when a file or the store fails, the
        child dies, or it makes no progress for ``timeout_s`` seconds (then it is killed)."""
        if not self.running:
            if self._proc is not None:
                log.warning("the upload process (pid %s) had exited (code %s); starting a new one",
                            self._proc.pid, self._proc.returncode)
                self._discard()
            self.start()
        conn, proc = self._conn, self._proc
        try:
            conn.send(("upload", list(jobs), self.bandwidth_mb_s))
            last = time.monotonic()
            while True:
                if conn.poll(min(1.0, timeout_s)):
                    kind, value = conn.recv()
                    if kind == "done":
                        return
                    if kind == "error":
                        raise UploadError(value)
                    last = time.monotonic()  # progress
                elif proc.poll() is not None:
                    raise EOFError
                elif time.monotonic() - last > timeout_s:
                    self._discard()
                    raise UploadError(f"the upload process made no progress for {timeout_s:g}s "
                                      f"(tiers.durable.timeout_s); it was stopped and nothing was committed")
        except (EOFError, OSError):
            code = proc.wait(timeout=10) if proc.poll() is None else proc.returncode
            self._discard()
            raise UploadError(f"the upload process (pid {proc.pid}) died during the upload (exit code {code}); "
                              "nothing was committed") from None

    def _discard(self) -> None:
        proc, conn, self._proc, self._conn = self._proc, self._conn, None, None
        if conn is not None:
            conn.close()
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait(timeout=10)

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop the child (after the last :meth:`upload` returned)."""
        if self._proc is None:
            return
        try:
            self._conn.send(("exit",))
            self._proc.wait(timeout=timeout_s)
        except (OSError, subprocess.TimeoutExpired):
            pass
        self._discard()


def _has_fileno(stream: Any) -> bool:
    try:
        stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False
    return True


class _Channel:
    """Messages both ways over two one-way pipes (what the parent and the child share)."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        self._in, self._out = Connection(read_fd, writable=False), Connection(write_fd, readable=False)
        self._lock = threading.Lock()

    def send(self, message: Any) -> None:
        with self._lock:  # the child's progress comes from the HTTP client's reader thread
            self._out.send(message)

    def poll(self, timeout_s: float) -> bool:
        return self._in.poll(timeout_s)

    def recv(self) -> Any:
        return self._in.recv()

    def close(self) -> None:
        self._in.close()
        self._out.close()


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _serve(read_fd: int, write_fd: int) -> None:
    """The child: open the store, then run batches until told to exit or the parent is gone."""
    _die_with_parent()
    os.nice(_NICE)
    parent = os.getppid()
    conn = _Channel(read_fd, write_fd)
    sent, told = 0, time.monotonic()

    def progress(nbytes: int) -> None:
        nonlocal sent, told
        sent += nbytes
        if time.monotonic() - told >= _PROGRESS_EVERY_S:
            told = time.monotonic()
            conn.send(("progress", sent))

    storage = None
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message[0] == "exit" or os.getppid() != parent:
            return
        if message[0] == "open":
            try:
                storage = open_storage(message[1], message[2])
            except Exception as exc:  # noqa: BLE001 - reported with the first batch
                storage = exc
            continue
        _, jobs, bandwidth = message
        try:
            if isinstance(storage, Exception):
                raise UploadError(f"the upload process could not open the store: {storage}")
            send_files(storage, jobs, bandwidth, progress)
            reply: tuple[str, Any] = ("done", None)
        except Exception as exc:  # noqa: BLE001 - sent to the parent as one line
            reply = ("error", str(exc) if isinstance(exc, UploadError) else f"{type(exc).__name__}: {exc}")
        conn.send(reply)


if __name__ == "__main__":
    sys.stdout = sys.stderr  # the pipes carry the messages; stray prints go to stderr
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(name)s upload process: %(message)s")
    from noether_dist.io.upload import _serve as serve  # one copy of the module's classes (pickled jobs)

    serve(int(sys.argv[1]), int(sys.argv[2]))
