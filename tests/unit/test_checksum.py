"""The one CRC32 of stored files (io/checksum.py) against zlib's, whichever implementation it uses."""

from __future__ import annotations

import os
import zlib

from noether_dist.io.checksum import IMPLEMENTATION, crc32


def test_crc32_equals_zlib_whole_and_continued_over_any_buffer():
    data = os.urandom(3 * 1024 * 1024 + 17)
    assert crc32(data) == zlib.crc32(data)
    assert crc32(b"") == 0
    view = memoryview(data)
    crc = 0
    for start in range(0, len(data), 1 << 20):  # continued piece by piece, as streams and readers do
        crc = crc32(view[start:start + (1 << 20)], crc)
    assert crc == zlib.crc32(data)
    assert crc32(bytearray(data[:1000]), 12345) == zlib.crc32(data[:1000], 12345)


def test_isal_is_used_where_installed():
    try:
        import isal.isal_zlib  # noqa: F401
    except ImportError:
        assert IMPLEMENTATION == "zlib"
    else:
        assert IMPLEMENTATION == "isal.isal_zlib"
