"""A storage that fails where a test says: faults injected through ``storage=``.

:class:`FaultyStorage` is a real :class:`~noether_dist.io.storage.Storage` on the same
store (same filesystem, options and protocol); a test passes it to ``Checkpointer(...,
storage=...)`` or ``resume(..., storage=...)``, and the library's own code runs unchanged
on top of it. Hooks wrap the writes the library makes through the storage interface:

- ``stream_write(write, stream, data)``: each write to a stream from
  :meth:`Storage.open_write` (every DCP file, every single file); ``write`` is the real
  write, ``stream`` the real stream (``size``, ``crc``, ``flush``).
- ``write_once(original, path, data)`` and ``replace(original, path, data)``: commit
  records and aliases; ``original`` is the real method, bound.

Each hook may be set, replaced or cleared at any time (also after the Checkpointer was
built): a hook that raises, stalls or kills the process is the fault.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from noether_dist.io.storage import Storage, WriteStream

StreamWriteHook = Callable[[Callable[[Any], int], WriteStream, Any], int]
PutHook = Callable[[Callable[[str, bytes], None], str, bytes], None]


class FaultyStorage(Storage):
    """A real Storage whose writes pass through the hooks above (none: plain behaviour)."""

    def __init__(self, base: Storage, *, stream_write: StreamWriteHook | None = None,
                 write_once: PutHook | None = None, replace: PutHook | None = None) -> None:
        super().__init__(base.fs, base.options, base.protocol)
        self.stream_write = stream_write
        self.write_once_hook = write_once
        self.replace_hook = replace

    @contextmanager
    def open_write(self, path: str) -> Iterator[WriteStream]:
        with super().open_write(path) as stream:
            yield _HookedStream(stream, self)  # type: ignore[misc]

    def write_once(self, path: str, data: bytes) -> None:
        if self.write_once_hook is None:
            return super().write_once(path, data)
        return self.write_once_hook(super().write_once, path, data)

    def replace(self, path: str, data: bytes) -> None:
        if self.replace_hook is None:
            return super().replace(path, data)
        return self.replace_hook(super().replace, path, data)


class _HookedStream:
    """The real stream, each write passed through the storage's current ``stream_write`` hook."""

    def __init__(self, stream: WriteStream, storage: FaultyStorage) -> None:
        self._stream = stream
        self._storage = storage

    def write(self, data: Any) -> int:
        hook = self._storage.stream_write
        if hook is None:
            return self._stream.write(data)
        return hook(self._stream.write, self._stream, data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)
