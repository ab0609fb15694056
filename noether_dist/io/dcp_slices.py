"""Each rank's part of a DCP artifact's metadata, cut by the coordinator.

DCP's ``.metadata`` names every stored chunk of every tensor: at thousands of ranks it
holds ranks x tensors entries (hundreds of MiB), of which one rank needs the chunks that
overlap its own shards. The coordinator reads it once; the other ranks never hold it whole.

Protocol (one :meth:`noether_dist.dist.comm.Comm.gather_scatter` per artifact), in order:

1. every rank describes what it will load (:func:`describe`): a :class:`Want` per key of
   its flattened state, with the global shape and the chunks of its own shards:
   O(its keys) bytes to the coordinator;
2. the coordinator (:class:`MetadataCutter` over the metadata it read) checks every rank's
   keys and shapes (:meth:`MetadataCutter.check`: the first rank that does not match makes
   every rank raise the same one-line error), then cuts for each rank its
   :class:`Slice`: its keys, of each tensor only the stored chunks that overlap its chunks,
   and their storage entries; replicated entries only where this rank reads them for
   everyone. O(its keys x overlapping chunks) bytes back to each rank;
3. each rank rebuilds a DCP ``Metadata`` of its slice (:meth:`Slice.metadata`), on which
   DCP's own planner runs (resharding, as on the whole metadata: the same reads).
"""

from __future__ import annotations

import bisect
import math
import pickle
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.distributed.checkpoint.metadata import (BytesStorageMetadata, ChunkStorageMetadata, Metadata,
                                                   MetadataIndex, TensorStorageMetadata)

from ..errors import StateMismatchError

__all__ = ["Want", "describe", "wants_whole", "MetadataCutter", "Slice", "check_message"]

Chunk = tuple[tuple[int, ...], tuple[int, ...]]
"""(offsets, sizes) of one part of a tensor."""


class Want(NamedTuple):
    """One key a rank loads: what it holds there, as DCP's planner would ask for it."""

    key: str
    shape: tuple[int, ...] | None
    """The tensor's global shape; None for a value that is not a tensor (or not known)."""
    chunks: tuple[Chunk, ...] | None
    """The parts this rank holds (a DTensor's shards); None: the whole entry."""
    shared: bool = False
    """A replicated entry that one rank reads for everyone (the coordinator's view decides)."""


def describe(flat: Mapping[str, Any], shared: Callable[[str, Any], bool]) -> list[Want]:
    """What loading the flat state ``flat`` needs (O(its keys)); ``shared(key, value)``
    marks replicated entries."""
    out = []
    for key, value in flat.items():
        shape = tuple(value.shape) if hasattr(value, "shape") and hasattr(value, "dtype") else None
        chunks = None
        if shape is not None and hasattr(value, "__create_chunk_list__"):  # DTensor: its own shards
            chunks = tuple((tuple(c.offsets), tuple(c.sizes)) for c in value.__create_chunk_list__())
        out.append(Want(key, shape, chunks, bool(shared(key, value))))
    return out


def wants_whole(keys: Iterable[str], shared: Iterable[str] = ()) -> list[Want]:
    """Whole entries of ``keys``, whatever their shape (those that exist; unchecked)."""
    shared = set(shared)
    return [Want(key, None, None, key in shared) for key in keys]


def check_message(what: str, missing: list[str], unexpected: list[str], shapes: list[str]) -> str:
    """The one line that names what does not match."""
    def show(keys: list[str]) -> str:
        return ", ".join(keys[:10]) + (f" ... ({len(keys)} in all)" if len(keys) > 10 else "") if keys else "none"
    return (f"{what} does not match the state to load into: missing in checkpoint: {show(missing)}; "
            f"unexpected in checkpoint: {show(unexpected)}; shape mismatch: {show(shapes)}")


@dataclass(frozen=True)
class Slice:
    """One rank's part of the metadata, compact: per key its size, properties and the
    stored chunks it reads with their storage entries (DCP's own objects)."""

    entries: tuple[tuple[Any, ...], ...]
    """(key, size or None for a non-tensor, properties, ((offsets, sizes, storage entry's fields), ...))."""
    shared: tuple[str, ...] = ()
    """This rank's keys that are replicated: one rank reads each and shares it."""
    mine: tuple[str, ...] = ()
    """The replicated keys this rank reads for everyone (in ``entries``, whole)."""
    any_shared: bool = False
    """True (on every rank alike) when some rank reads replicated entries for everyone."""
    planner_data: Any = None
    storage_meta: Any = None
    version: Any = None
    reason: str | None = None
    """Why the metadata cannot be used (the same on every rank); then nothing else is set."""
    info_type: Any = None
    """The class of the storage entries (DCP's), which travel as dicts of their fields."""

    @property
    def stored_entries(self) -> int:
        """Storage entries (stored chunks and non-tensor values) in this slice."""
        return sum(len(e[3]) for e in self.entries)

    def to_bytes(self) -> bytes:
        """What travels to the rank."""
        return pickle.dumps(self, protocol=pickle.HIGHEST_PROTOCOL)

    @staticmethod
    def from_bytes(data: bytes) -> Slice:
        """The slice sent by :meth:`to_bytes` (between the ranks of one job: trusted)."""
        return pickle.loads(data)

    def metadata(self) -> Metadata:
        """DCP metadata holding this slice alone (O(its entries))."""
        sd: dict[str, Any] = {}
        storage: dict[MetadataIndex, Any] = {}
        def info(state: Any) -> Any:
            return self.info_type(**state) if isinstance(state, dict) else state

        for key, size, props, parts in self.entries:
            if size is None:
                sd[key] = BytesStorageMetadata()
                for _, _, state in parts:
                    storage[MetadataIndex(key)] = info(state)
                continue
            chunks = []
            for offsets, sizes, state in parts:
                chunks.append(ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)))
                if state is not None:
                    storage[MetadataIndex(key, offsets)] = info(state)
            sd[key] = TensorStorageMetadata(props, torch.Size(size), chunks)
        return Metadata(state_dict_metadata=sd, planner_data=self.planner_data, storage_data=storage,
                        storage_meta=self.storage_meta, version=self.version)


class _Layout:
    """One tensor's stored chunks as plain tuples (pickled fast), indexed along dim 0."""

    __slots__ = ("size", "props", "parts", "starts", "ends")

    def __init__(self, md: TensorStorageMetadata, props: Any, infos: list[Any]) -> None:
        self.size, self.props = tuple(md.size), props
        self.parts = [(tuple(c.offsets), tuple(c.sizes), _info_state(info)) for c, info in zip(md.chunks, infos)]
        self.starts = [p[0][0] if p[0] else 0 for p in self.parts]
        self.ends = [p[0][0] + p[1][0] if p[0] else 0 for p in self.parts]

    def overlapping(self, want: tuple[Chunk, ...] | None) -> list[int]:
        """Positions of the stored chunks that overlap any part of ``want`` (None: all).
        Stored chunks in order along dim 0 are found by binary search (log chunks per part);
        a part they do not cover exactly (another layout) is compared with every chunk."""
        parts = self.parts
        if want is None:
            return list(range(len(parts)))
        found: list[int] = []
        for offsets, sizes in want:
            if not offsets:
                return list(range(len(parts)))
            start, end = offsets[0], offsets[0] + sizes[0]
            i = bisect.bisect_right(self.ends, start)
            if i < len(parts) and parts[i][0] == offsets and parts[i][1] == sizes:  # saved as loaded
                found.append(i)
                continue
            covered = 0
            while i < len(parts) and self.starts[i] < end:
                shared = _overlap(parts[i], offsets, sizes)
                if shared:
                    found.append(i)
                    covered += shared
                i += 1
            if covered != math.prod(sizes):
                return [j for j, p in enumerate(parts) if any(_overlap(p, o, s) for o, s in want)]
        return sorted(set(found)) if len(want) > 1 else found


def _info_state(info: Any) -> Any:
    """A storage entry as a plain dict of its fields (rebuilt by :meth:`Slice.metadata`)."""
    state = info.__getstate__() if info is not None else None
    return state if isinstance(state, dict) else info


def _overlap(part: tuple[Any, ...], offsets: tuple[int, ...], sizes: tuple[int, ...]) -> int:
    """Elements a stored chunk (offsets, sizes, ...) shares with the part (offsets, sizes)."""
    volume = 1
    for ao, asz, bo, bsz in zip(part[0], part[1], offsets, sizes):
        volume *= max(0, min(ao + asz, bo + bsz) - max(ao, bo))
    return volume


class MetadataCutter:
    """The coordinator's view of one artifact's metadata, cutting per-rank :class:`Slice` s.

    Each tensor's chunks are indexed once (on first use), whatever the number of ranks
    cut for; the storage entries are grouped by key in one pass over them."""

    def __init__(self, metadata: Metadata) -> None:
        self.metadata = metadata
        self._sd = metadata.state_dict_metadata
        self._layouts: dict[str, _Layout] = {}
        self._by_key: dict[str, dict[Any, Any]] | None = None
        self._props: dict[Any, Any] = {}
        self._info_type: Any = None

    def check(self, wants: list[Want], what: str, *, subset: bool = False) -> None:
        """StateMismatchError (one line) when the keys or shapes of ``wants`` do not match;
        ``subset``: the checkpoint may hold keys nobody wants (a partial load)."""
        sd = self._sd
        missing, shapes, found = [], [], 0
        for want in wants:
            md = sd.get(want.key)
            if md is None:
                missing.append(want.key)
                continue
            found += 1
            if want.shape is not None and isinstance(md, TensorStorageMetadata) and want.shape != tuple(md.size):
                shapes.append(f"{want.key} (checkpoint {list(md.size)}, model {list(want.shape)})")
        unexpected = []
        if found < len(sd) and not subset:
            keys = {w.key for w in wants}
            unexpected = sorted(k for k in sd if k not in keys)
        if missing or unexpected or shapes:
            raise StateMismatchError(check_message(what, sorted(missing), unexpected, sorted(shapes)))

    def cut(self, wants: Iterable[Want], shared: Iterable[str] = (), mine: Iterable[str] = ()) -> Slice:
        """The slice a rank with ``wants`` needs: every wanted key that exists, cut to its
        chunks; the keys of ``shared`` (read by one rank each) without chunks (size and
        properties only), except the keys of ``mine``, whole."""
        shared, mine = set(shared), tuple(mine)
        entries = []
        my_shared = []
        layouts, bisect_right = self._layouts, bisect.bisect_right
        for key, _, chunks, _ in wants:
            layout = layouts.get(key)
            if layout is not None and chunks is not None and len(chunks) == 1 and key not in shared:
                # the common case, inlined (ranks x keys of them): one part that is a stored chunk
                offsets, sizes = chunks[0]
                if offsets:
                    i = bisect_right(layout.ends, offsets[0])
                    parts = layout.parts
                    if i < len(parts) and parts[i][0] == offsets and parts[i][1] == sizes:
                        entries.append((key, layout.size, layout.props, (parts[i],)))
                        continue
            bare = key in shared
            if bare:
                my_shared.append(key)
                if key in mine:
                    continue
            entry = self._entry(key, chunks, bare)
            if entry is not None:
                entries.append(entry)
        for key in mine:
            entry = self._entry(key, None)
            if entry is not None:
                entries.append(entry)
        planner_data = self.metadata.planner_data
        if isinstance(planner_data, dict):
            planner_data = {e[0]: planner_data[e[0]] for e in entries if e[0] in planner_data}
        return Slice(tuple(entries), tuple(my_shared), mine, bool(shared), planner_data,
                     self.metadata.storage_meta, self.metadata.version, info_type=self._info_type)

    def _entry(self, key: str, chunks: tuple[Chunk, ...] | None, bare: bool = False) -> tuple[Any, ...] | None:
        md = self._sd.get(key)
        if md is None:
            return None
        if not isinstance(md, TensorStorageMetadata):
            return (key, None, None, () if bare else ((None, None, _info_state(self._info(key, None))),))
        layout = self._layouts.get(key)
        if layout is None:
            props = md.properties  # one object per distinct value: pickled once per slice
            try:
                props = self._props.setdefault(props.__getstate__(), props)
            except TypeError:  # an unhashable state: keep its own
                pass
            infos = self._infos(key)  # (each tensor's entries are taken once: memory at thousands of ranks)
            layout = self._layouts[key] = _Layout(md, props, [infos.get(c.offsets) for c in md.chunks])
        if bare:
            return (key, layout.size, layout.props, ())
        return (key, layout.size, layout.props, tuple(layout.parts[i] for i in layout.overlapping(chunks)))

    def _info(self, key: str, offsets: Any) -> Any:
        return self._grouped().get(key, {}).get(offsets)

    def _infos(self, key: str) -> dict[Any, Any]:
        return self._grouped().pop(key, {})

    def _grouped(self) -> dict[str, dict[Any, Any]]:
        """The storage entries by key, then offsets (one pass over them, on first use)."""
        if self._by_key is None:
            by_key: dict[str, dict[Any, Any]] = {}
            for index, info in (self.metadata.storage_data or {}).items():
                by_key.setdefault(index.fqn, {})[index.offset] = info
                self._info_type = type(info)
            self._by_key = by_key
        return self._by_key
