"""What our S3 filesystem adds to s3fs: CRC32 checksums the store checks and keeps.

Imported only for s3:// URLs (it imports s3fs and botocore). Every object written through
:class:`ChecksummedS3FileSystem` carries a CRC32 the store verifies on upload
(``ChecksumAlgorithm=CRC32``); multipart objects get a full-object CRC32
(``ChecksumType=FULL_OBJECT``), so the value the store keeps is the CRC32 of the whole
object, the same number a commit record holds. :func:`stored_crc32` reads it back with one
HEAD, which lets ``noether-ckpt verify`` check a file without reading its bytes.

It also holds the S3 side of the storage streams: :class:`S3Sink` (an upload that keeps
at most a few parts in memory and goes up as one PUT or a multipart upload) and
:class:`S3Body` (one GET whose body is read in pieces).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import http.client
import io
import re
from typing import Any

import s3fs
from fsspec.asyn import sync as fsspec_sync
from fsspec.asyn import sync_wrapper

from .checksum import crc32

__all__ = ["ChecksummedS3FileSystem", "checksum_kwargs", "stored_crc32", "StoredChecksum", "S3Sink", "S3Body",
           "MULTIPART_MIN_BYTES"]

MULTIPART_MIN_BYTES = 100 << 20
"""Objects from this size on go up as a multipart upload (parts in parallel), smaller ones in one
PUT: s3fs's own bound for one PUT (twice its 50 MiB block). A rank already sends
``thread_count`` files at once, and a multipart upload costs the store more work per byte
(measured on moto: 2.1x the server CPU of single PUTs of the same 64 MiB objects)."""
_PART_BYTES = 16 << 20
"""Size of a part; it doubles every ``_PARTS_PER_SIZE`` parts (S3 allows 10,000 parts)."""
_PARTS_PER_SIZE = 1000
_PARTS_IN_FLIGHT = 8

_PARTS_SUFFIX = re.compile(r"-\d+$")


def checksum_kwargs(algorithm: str | None) -> dict[str, str]:
    """The ``s3_additional_kwargs`` that make every upload carry ``algorithm`` (s3fs passes
    each to the API calls that accept it: PutObject, UploadPart, CreateMultipartUpload...)."""
    if not algorithm:
        return {}
    return {"ChecksumAlgorithm": algorithm, "ChecksumType": "FULL_OBJECT"}


class ChecksummedS3FileSystem(s3fs.S3FileSystem):
    """s3fs with the part checksums a checksummed multipart upload needs at completion.

    s3fs completes a multipart upload with each part's number and ETag only (its issue
    #672); a store then refuses an upload created with a checksum algorithm ("the complete
    request must include the checksum for each part"). This class remembers the checksum
    the store returned for every part and adds it to the completion request.

    botocore owns request retries (standard mode, ``retry.attempts`` tries): s3fs's own loop
    around it is off, as a class attribute so that it also holds in DCP's checkpoint process.
    """

    retries = 1

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._part_checksums: dict[str, dict[int, dict[str, str]]] = {}

    async def _call_s3(self, method: str, *akwarglist: Any, **kwargs: Any) -> Any:
        # Runs on fsspec's event loop thread only: the dict needs no lock.
        if method == "complete_multipart_upload":
            sums = self._part_checksums.pop(kwargs.get("UploadId"), {})
            for part in (kwargs.get("MultipartUpload") or {}).get("Parts", []):
                for key, value in sums.get(part.get("PartNumber"), {}).items():
                    part.setdefault(key, value)
        elif method == "abort_multipart_upload":
            self._part_checksums.pop(kwargs.get("UploadId"), None)
        out = await super()._call_s3(method, *akwarglist, **kwargs)
        if method == "upload_part":
            sums = {k: v for k, v in out.items() if k.startswith("Checksum") and k != "ChecksumType" and v}
            if sums:
                self._part_checksums.setdefault(kwargs["UploadId"], {})[kwargs["PartNumber"]] = sums
        return out

    # s3fs's sync call_s3 (used by its file objects) wraps the base class's coroutine
    # function itself; wrap ours.
    call_s3 = sync_wrapper(_call_s3)


class StoredChecksum:
    """An object's size and, where the store keeps one for the whole object, its CRC32."""

    __slots__ = ("size", "crc32")

    def __init__(self, size: int, crc32: int | None) -> None:
        self.size = size
        self.crc32 = crc32


def stored_crc32(fs: s3fs.S3FileSystem, path: str) -> StoredChecksum:
    """One HEAD (``ChecksumMode=ENABLED``): the size and the store's full-object CRC32 of
    ``path``, or crc32=None when the store keeps none for the whole object (no checksum,
    another algorithm, or a composite "checksum of part checksums" of a multipart upload).
    FileNotFoundError when the object does not exist."""
    bucket, key, version = fs.split_path(path)
    head = fs.call_s3("head_object", Bucket=bucket, Key=key, ChecksumMode="ENABLED",
                      **({"VersionId": version} if version else {}))
    size = int(head.get("ContentLength", 0))
    value = head.get("ChecksumCRC32")
    kind = head.get("ChecksumType")
    multipart = bool(_PARTS_SUFFIX.search(str(head.get("ETag", "")).strip('"')))
    whole = bool(value) and not _PARTS_SUFFIX.search(value) and (
        kind == "FULL_OBJECT" or (kind is None and not multipart))
    if not whole:
        return StoredChecksum(size, None)
    try:
        raw = base64.b64decode(value, validate=True)
    except (ValueError, TypeError):
        return StoredChecksum(size, None)
    return StoredChecksum(size, int.from_bytes(raw, "big") if len(raw) == 4 else None)


def _crc_header(crc: int) -> str:
    return base64.b64encode((crc & 0xFFFFFFFF).to_bytes(4, "big")).decode()


class S3Sink:
    """Where an object written through a storage stream gathers and how it goes up.

    Up to :data:`MULTIPART_MIN_BYTES` the bytes stay in memory and go up on commit in one
    PUT. From that size on a multipart upload starts: parts of ``_PART_BYTES`` go up in the
    background while writing goes on (at most ``_PARTS_IN_FLIGHT`` at once, so memory stays
    bounded), and commit sends the rest and completes the upload; abort aborts it. With
    ``crc32`` (the store's uploads carry CRC32) every request carries the CRC32 of what it
    sends and the completion the CRC32 of the whole object (the stream's), which the store
    checks; botocore then computes none of its own.

    Each byte is copied once, into the buffer of the part (or object) it belongs to; that
    buffer is the request's body as it is (an ``io.BytesIO``, which botocore and aiohttp
    read in pieces): no further copy of the whole object on its way to the socket.
    """

    def __init__(self, fs: Any, path: str, *, crc32: bool) -> None:
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)
        self.crc32 = crc32
        self.buffer = io.BytesIO()
        self.upload_id: str | None = None
        self.parts: list[concurrent.futures.Future] = []

    def write(self, data: memoryview | bytes) -> None:
        """Gather ``data``; send full parts once the object is big enough for a multipart upload."""
        view = memoryview(data)
        while view.nbytes:
            if self.upload_id is None:
                self.buffer.write(view)
                if self.buffer.tell() >= MULTIPART_MIN_BYTES:
                    self.upload_id = self.fs.call_s3("create_multipart_upload", Bucket=self.bucket,
                                                     Key=self.key)["UploadId"]
                    self._split_buffer()
                return
            room = self._part_size() - self.buffer.tell()
            self.buffer.write(view[:room])
            view = view[room:]
            if self.buffer.tell() >= self._part_size():
                self._send_part()

    def _split_buffer(self) -> None:
        """Once the multipart upload starts: what was gathered goes up as whole parts."""
        whole = self.buffer.getbuffer()
        self.buffer = io.BytesIO()
        try:
            start = 0
            while whole.nbytes - start >= self._part_size():
                size = self._part_size()
                self.buffer.write(whole[start:start + size])
                start += size
                self._send_part()
            self.buffer.write(whole[start:])
        finally:
            whole.release()

    def _part_size(self) -> int:
        return _PART_BYTES << (len(self.parts) // _PARTS_PER_SIZE)

    def _send_part(self) -> None:
        body, self.buffer = self.buffer, io.BytesIO()
        extra = {"ChecksumCRC32": _crc_header(_crc_of(body))} if self.crc32 else {}
        body.seek(0)
        in_flight = [f for f in self.parts if not f.done()]
        if len(in_flight) >= _PARTS_IN_FLIGHT:
            concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
        for done in (f for f in self.parts if f.done()):
            done.result()  # a failed part fails the write now
        number = len(self.parts) + 1
        self.parts.append(asyncio.run_coroutine_threadsafe(self._upload_part(number, body, extra), self.fs.loop))

    async def _upload_part(self, number: int, body: io.BytesIO, extra: dict[str, str]) -> dict[str, Any]:
        out = await self.fs._call_s3("upload_part", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                                     PartNumber=number, Body=body, **extra)
        return {"PartNumber": number, "ETag": out["ETag"], **extra}

    def commit(self, crc: int) -> None:
        """Send what is left: one PUT, or the last part and the completion of the upload."""
        if self.upload_id is None:
            body, self.buffer = self.buffer, io.BytesIO()
            body.seek(0)
            checksum = {"ChecksumCRC32": _crc_header(crc)} if self.crc32 else {}
            self.fs.call_s3("put_object", Bucket=self.bucket, Key=self.key, Body=body, **checksum)
            return
        try:
            if self.buffer.tell():
                self._send_part()
            parts = [f.result() for f in self.parts]
            whole = {"ChecksumCRC32": _crc_header(crc)} if self.crc32 else {}
            self.fs.call_s3("complete_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=self.upload_id,
                            MultipartUpload={"Parts": parts}, **whole)
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Drop what is held; abort a multipart upload (the store then keeps nothing of it)."""
        self.buffer = io.BytesIO()
        if self.upload_id is None:
            return
        concurrent.futures.wait(self.parts)
        upload_id, self.upload_id = self.upload_id, None
        try:
            self.fs.call_s3("abort_multipart_upload", Bucket=self.bucket, Key=self.key, UploadId=upload_id)
        except Exception:  # noqa: BLE001 - the first error is the one to report
            pass


def _crc_of(body: io.BytesIO) -> int:
    with body.getbuffer() as view:
        return crc32(view)


class S3Body:
    """One GET of ``path`` from byte ``start`` (to ``end``, exclusive, or the end), its
    body read in pieces. FileNotFoundError if the object does not exist.

    The body is read from the HTTP response itself (aiohttp's stream; botocore's wrapper
    only where there is none): botocore's wrapper computes a CRC32 of every byte on the
    event loop thread, and checks it only when a read runs past the end, which a read of a
    known length never does. The callers count their own CRC32 (a commit record's), so
    that pass was paid for nothing. A piece is exactly the size asked for unless the
    object ends first (one copy out of the socket's buffers)."""

    def __init__(self, fs: Any, path: str, start: int, end: int | None) -> None:
        self.fs = fs
        bucket, key, version = fs.split_path(path)
        extra: dict[str, Any] = {"VersionId": version} if version else {}
        if start or end is not None:
            extra["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        self.left = 0 if end is not None and end <= start else None
        if self.left == 0:
            self.body = None
            return
        response = fs.call_s3("get_object", Bucket=bucket, Key=key, **extra)
        self.body = response["Body"]
        self.left = int(response.get("ContentLength") or 0)
        self._content = getattr(getattr(self.body, "raw_stream", None), "content", None)
        if not callable(getattr(self._content, "readexactly", None)):
            self._content = None

    def read(self, n: int) -> bytes:
        """``n`` bytes (n < 0: the rest), fewer only at the end; b"" at the end, without a request."""
        if self.body is None or not self.left:
            return b""
        n = self.left if n < 0 else min(n, self.left)
        data = fsspec_sync(self.fs.loop, self._read, n)
        if not data:
            raise http.client.IncompleteRead(b"", self.left)  # cut off: the reader picks up from here
        self.left -= len(data)
        return data

    async def _read(self, n: int) -> bytes:
        if self._content is None:
            return await self.body.read(n)
        try:
            return await self._content.readexactly(n)
        except asyncio.IncompleteReadError as exc:  # the connection ended early: what came
            return exc.partial

    def close(self) -> None:
        """Release the connection."""
        if self.body is not None:
            self.body.close()
