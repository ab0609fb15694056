"""What our S3 filesystem adds to s3fs: CRC32 checksums the store checks and keeps.

Imported only for s3:// URLs (it imports s3fs and botocore). Every object written through
:class:`ChecksummedS3FileSystem` carries a CRC32 the store verifies on upload
(``ChecksumAlgorithm=CRC32``); multipart objects get a full-object CRC32
(``ChecksumType=FULL_OBJECT``), so the value the store keeps is the CRC32 of the whole
object, the same number a commit record holds. :func:`stored_crc32` reads it back with one
HEAD, which lets ``noether-ckpt verify`` check a file without reading its bytes.
"""

from __future__ import annotations

import base64
import re
from typing import Any

import s3fs
from fsspec.asyn import sync_wrapper

__all__ = ["ChecksummedS3FileSystem", "checksum_kwargs", "stored_crc32", "StoredChecksum"]

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
