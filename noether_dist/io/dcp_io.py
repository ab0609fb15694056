"""DCP on our storage: sharded save that records what each rank wrote, and load.

This is the only module that imports DCP's private parts (the planner internals of a full
load, the allocation of staging memory). DCP does the planning, resharding and dedup of
replicated tensors; this module adds what DCP does not do: every read and write goes
through :class:`noether_dist.io.storage.Storage`'s public methods (:class:`StorageFileSystem`),
every file written is recorded with its size and CRC32, computed while writing, and a file
read whole is streamed, its items loaded as their bytes arrive and its CRC32 checked on
the bytes loaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import re
import threading
import warnings
import zlib
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint._nested_dict import flatten_state_dict, unflatten_state_dict
from torch.distributed.checkpoint.filesystem import CURRENT_DCP_VERSION as _DCP_VERSION
from torch.distributed.checkpoint.filesystem import FileSystemBase, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType
from torch.futures import Future

from ..dist.comm import Comm, is_distributed as _dist_ready
from ..format.records import FileRecord
from ..errors import StateMismatchError, StorageError
from .checksum import crc32
from .storage import Storage

__all__ = ["FileRecord", "save_state", "load_state", "load_checked", "LoadReport", "Staging", "staging", "is_sharded", "reader_of", "placeholder", "paused_gc", "load_full", "StorageFileSystem", "save_state_in_process", "collect_sidecar", "shutdown_checkpoint_process", "read_metadata", "cpu_buffers_like", "METADATA_FILE", "DCP_COORDINATOR", "writer_rank"]

METADATA_FILE = ".metadata"
DCP_COORDINATOR = 0
"""The group rank that plans a DCP save and writes ``.metadata`` (and, deduplicated to the
lowest rank, the replicated tensors): DCP's coordinator is always the group's rank 0
(``dcp.save`` takes no coordinator), whatever the Comm's coordinator is."""


class StorageFileSystem(FileSystemBase):
    """DCP's filesystem interface on our :class:`Storage`, through its public methods only:
    streams are :meth:`Storage.open_write` (the file appears whole when DCP's block ends)
    and :meth:`Storage.open_read`; every file written is recorded with the size and CRC32
    its stream counted. Travels to DCP's checkpoint process with the storage (pickled)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.records: dict[str, FileRecord] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # travels to DCP's background process
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        path = os.fspath(path)
        if "w" not in mode:
            with self.storage.open_read(path) as stream:
                yield stream  # type: ignore[misc]
            return
        with self.storage.open_write(path) as stream:
            yield stream  # type: ignore[misc]
        name = path.rsplit("/", 1)[-1]
        with self._lock:
            self.records[name] = FileRecord(name, stream.size, stream.crc)

    def concat_path(self, path: str | os.PathLike, suffix: str) -> str:
        return f"{os.fspath(path).rstrip('/')}/{suffix}"

    def init_path(self, path: str | os.PathLike, **kwargs: Any) -> str | os.PathLike:
        return path

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        # _Writer writes .metadata in one step (open_write is atomic): DCP's tmp-and-rename is not used
        raise NotImplementedError("noether_dist writes every file in one step; nothing is renamed")

    def mkdir(self, path: str | os.PathLike) -> None:
        self.storage.makedirs(os.fspath(path))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return False  # paths come with the storage, never as DCP checkpoint ids

    def exists(self, path: str | os.PathLike) -> bool:
        return self.storage.exists(os.fspath(path))

    def rm_file(self, path: str | os.PathLike) -> None:
        self.storage.remove(os.fspath(path))

    def ls(self, path: str | os.PathLike) -> list[str]:
        return [e.path for e in self.storage.list(os.fspath(path))]


class _Writer(FileSystemWriter):
    """DCP's file-system writer on our storage (:class:`StorageFileSystem`), recording
    every file it writes. Each file appears whole when written (no rename of ``.metadata``).

    In another process (DCP's process-based async save) the records cannot travel back in
    memory: with ``sidecar`` each rank writes them, once its files are complete, to a small
    JSON file ``.noether-files-<rank>.json`` in the directory, which the caller reads and
    removes (:func:`collect_sidecar`).
    """

    def __init__(self, path: str, storage: Storage, thread_count: int, sidecar: bool = False) -> None:
        # open_write fsyncs what it commits: DCP's own fsync would find no file descriptor
        super().__init__(path, sync_files=False, thread_count=thread_count, overwrite=True)
        self._threads = thread_count
        self.fs = StorageFileSystem(storage)
        self.path = path
        self.sidecar = sidecar
        self.local = storage.is_local
        self._coordinator = False

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        super().set_up_storage_writer(is_coordinator, *args, **kwargs)
        self._coordinator = is_coordinator

    def prepare_local_plan(self, plan: Any) -> Any:
        if self.local:
            return super().prepare_local_plan(plan)
        # Object stores: no folders to make, and the Checkpointer already removed what an
        # uncommitted save left (DCP's check would cost a HEAD and a LIST per rank).
        return plan

    def _write_metadata(self, metadata: Metadata, results: Any) -> None:
        # DCP writes .metadata.tmp and renames it: on an object store a rename is a copy and
        # a delete. open_write makes the file appear whole in one step anyway (one PUT).
        metadata.version = _DCP_VERSION
        metadata.storage_data = {wr.index: wr.storage_data for wr_list in results for wr in wr_list}
        metadata.storage_meta = self.storage_meta()
        with self.fs.create_stream(f"{self.path}/{METADATA_FILE}", "wb") as stream:
            pickle.dump(metadata, stream)

    def write_data(self, plan: Any, planner: Any) -> Any:
        # DCP writes one file per writer thread, empty ones included: a small state goes
        # into fewer files (one PUT each on an object store), at least MIN_FILE_BYTES each.
        size = sum(math.prod(item.tensor_data.chunk.sizes) * item.tensor_data.properties.dtype.itemsize
                   for item in plan.items if item.tensor_data is not None)
        self.thread_count = max(1, min(self._threads, len(plan.items), size // MIN_FILE_BYTES))
        fut = super().write_data(plan, planner)
        if self.sidecar and not self._coordinator:
            fut.wait()
            self._write_sidecar()
        return fut

    def finish(self, metadata: Metadata, results: Any) -> None:
        self._write_metadata(metadata, results)
        if self.sidecar:
            self._write_sidecar()

    def _write_sidecar(self) -> None:
        data = json.dumps([r.to_dict() for r in self.fs.records.values()]).encode()
        self.fs.storage.replace(f"{self.path}/{_sidecar_name(self.rank)}", data)


MIN_FILE_BYTES = 8 << 20
"""A rank writes its part of an artifact into at most one file per this many bytes."""


def _sidecar_name(rank: int | None) -> str:
    return f".noether-files-{rank or 0}.json"


def collect_sidecar(path: str, storage: Storage, rank: int) -> list[FileRecord]:
    """Read and remove the file records a rank's writer left in ``path`` (process mode)."""
    where = f"{path}/{_sidecar_name(rank)}"
    records = [FileRecord.from_dict(d) for d in json.loads(storage.read(where))]
    storage.remove(where)
    return sorted(records, key=lambda r: r.name)


class _NoStaging:
    """An AsyncStager that hands the state dict on as is: ours is already staged."""

    should_synchronize_after_execute = False

    def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


def save_state_in_process(state_dict: dict[str, Any], path: str, storage: Storage, *, comm: Comm,
                          thread_count: int = 1, replicated_on_rank0: bool = False,
                          timeout_s: float | None = None) -> list[FileRecord]:
    """Like :func:`save_state` on ``comm``'s control group (a collective of its ranks), but
    the writing runs in DCP's checkpoint process (one per rank, started on first use) so
    that it never holds this process's GIL. ``state_dict`` must already be staged (in
    shared memory)."""
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    writer = _Writer(path, storage, thread_count, sidecar=True)
    planner = DefaultSavePlanner(dedup_save_to_lowest_rank=replicated_on_rank0)
    _start_checkpoint_process(comm, timeout_s)
    with _quiet():
        future = dcp.async_save(state_dict, storage_writer=writer, planner=planner, process_group=comm.control_group,
                                async_checkpointer_type=AsyncCheckpointerType.PROCESS, async_stager=_NoStaging())
        future.result(timeout=timeout_s)
    return collect_sidecar(path, storage, comm.rank)


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata and nothing else: DCP's own classes, torch.Size, dtypes and
    the layout helper. A crafted ``.metadata`` cannot run code (plain pickle would)."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint."):
            return super().find_class(module, name)
        if module == "torch" and (name == "Size" or isinstance(getattr(torch, name, None), torch.dtype)):
            return getattr(torch, name)
        if (module, name) in (("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
                              ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"DCP metadata may not reference {module}.{name}")


DEFAULT_READ_THREADS = 8
"""Files a reader fetches at once (each file one GET, or one ranged GET per span)."""
_SPAN_GAP = 64 * 1024
"""Spans of one file closer than this are fetched as one ranged read."""
READ_CHUNK_BYTES = 8 << 20
"""A file read whole arrives in pieces of at most this size (memory per reader thread: the
item being loaded, and for an item bigger than this, its pieces while they are joined)."""


class _Reader(FileSystemReader):
    """DCP's file-system reader on our storage, with its own ``read_data``.

    - files are fetched in parallel (``threads`` at once) with plain GETs (no HEAD); a file
      read whole is streamed, each item deserialised on the reader thread as soon as its
      bytes have arrived (memory: a piece and an item per thread, not the file);
    - a file is read whole (one GET) when this rank needs at least half of its bytes, or it
      is at most ``whole_max_bytes``; otherwise only the spans its items occupy (ranged GETs);
    - with ``files`` (the commit record's size and CRC32 of each file), a file read whole is
      checked against them on the bytes streamed and loaded: no second download. With
      ``collect``, a missing, short or corrupt file is recorded in ``problems`` instead of
      raised, so that the caller can decide with the other ranks; items of it may already
      be in the state loaded into, which the caller then discards (resume loads into
      staging, never into the model);
    - ``metadata``: DCP metadata already read (e.g. by the coordinator and broadcast); then
      ``read_metadata`` costs no request;
    - ``adopt_from``: the flat dict being loaded into, whose tensors are fresh staging (never
      the model's). An item that fills a whole CPU tensor of it (or a DTensor's whole local
      part) with the same dtype and layout, and whose stored chunk is exactly that (not a
      bigger one saved on fewer ranks, which would stay in memory), is not copied into that
      tensor: the tensor
      deserialised goes into ``adopted`` under its key instead, for the caller to use in
      the staging's place. The staging is then never written, which saves a copy and
      touching its memory for the first time (measured: most of a resume's CPU beyond the
      bytes themselves).
    """

    def __init__(self, path: str, storage: Storage, *, metadata: Metadata | None = None,
                 files: list[FileRecord] | tuple[FileRecord, ...] | None = None, verify: bool = True,
                 whole_max_bytes: int = 0, threads: int = DEFAULT_READ_THREADS, collect: bool = False,
                 adopt_from: dict[str, Any] | None = None) -> None:
        super().__init__(path)
        self._adopt_from = adopt_from
        self.adopted: dict[str, Any] = {}
        self.fs = StorageFileSystem(storage)
        self.path = path
        self.storage = storage
        self._metadata = metadata
        self._files = {f.name: f for f in files} if files is not None else {}
        self._verify = verify
        self._whole_max = whole_max_bytes
        self._threads = max(1, threads)
        self._collect = collect
        self.problems: list[str] = []
        self.bytes_read = 0
        self.requests = 0
        self._lock = threading.Lock()

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        if self._metadata is not None:
            metadata = self._metadata
        else:
            raw = self.storage.read(f"{self.path}/{METADATA_FILE}")  # one GET, no HEAD
            with paused_gc():
                metadata = _MetadataUnpickler(io.BytesIO(raw)).load()
            if not isinstance(metadata, Metadata):
                raise pickle.UnpicklingError(f"{self.path}/{METADATA_FILE} holds {type(metadata).__name__}, not DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan: Any, planner: Any) -> Future:
        per_file: dict[str, list[Any]] = {}
        for item in plan.items:
            per_file.setdefault(self.storage_data[item.storage_index].relative_path, []).append(item)
        jobs = []
        for rel, items in sorted(per_file.items()):
            spans = _spans([(self.storage_data[i.storage_index].offset, self.storage_data[i.storage_index].length)
                            for i in items])
            record = self._files.get(rel)
            needed = sum(length for _, length in spans)
            whole = record is None or needed * 2 >= record.size or record.size <= self._whole_max
            jobs.append((rel, items, record, None if whole else spans))
        if jobs:
            with ThreadPoolExecutor(max_workers=min(self._threads, len(jobs)),
                                    thread_name_prefix="noether-read") as pool:
                futures = [pool.submit(self._read_file, rel, items, record, spans, planner)
                           for rel, items, record, spans in jobs]
                for fut in as_completed(futures):
                    problem = fut.result()
                    if problem is not None:
                        if not self._collect:
                            raise problem
                        self.problems.append(str(problem))
        done: Future = Future()
        done.set_result(None)
        return done

    def _read_file(self, rel: str, items: list[Any], record: FileRecord | None,
                   spans: list[tuple[int, int]] | None, planner: Any) -> Exception | None:
        """Read one file and load its items (on a reader thread); the problem that made the
        file unusable, or None. An error loading an item into a good file is raised."""
        path = f"{self.path}/{rel}"
        try:
            if spans is None:
                problem, load_error = self._stream_whole(path, items, record, planner)
            else:
                problem, load_error = self._read_spans(path, items, record, spans, planner)
        except FileNotFoundError:
            return FileNotFoundError(f"{path} is missing")
        except Exception as exc:  # noqa: BLE001 - reported (or raised) by the caller
            return _ReadProblem(f"{path} is unreadable: {type(exc).__name__}: {exc}") if self._collect else exc
        if problem is None and load_error is not None:
            raise load_error
        return problem

    def _stream_whole(self, path: str, items: list[Any], record: FileRecord | None,
                      planner: Any) -> tuple[Exception | None, Exception | None]:
        """Stream a file from the front, each item's bytes read exactly (in pieces of at most
        READ_CHUNK_BYTES) and loaded before the next is read, and the CRC32 computed on every
        byte; memory holds the item being loaded, never the file, and no byte is copied
        between buffers on the way (one piece: the item's bytes as the stream handed them).
        (problem, first load error): a file found short or corrupt at the end makes the
        items already loaded from it void (the caller discards them: resume loads into
        staging); only then is a load error, which damaged bytes may cause, the one to raise."""
        groups: dict[tuple[int, int], list[Any]] = {}  # items of one stored chunk share its bytes
        for item in items:
            info = self.storage_data[item.storage_index]
            groups.setdefault((info.offset, info.length), []).append(item)
        size, crc = 0, 0
        load_error: Exception | None = None
        short: int | None = None  # the end of the first item the file stops before
        held: tuple[int, bytes] = (0, b"")  # the last item's bytes: a later item inside them is sliced

        with self.storage.open_read(path) as stream:
            self._count(requests=1)

            def take(n: int, keep: bool) -> list[bytes]:
                """The next ``n`` bytes (fewer at the end), counted into size and CRC32: kept
                ones in one piece where the stream allows (an item is held whole anyway, and
                joining pieces would copy it), skipped ones in bounded pieces."""
                nonlocal size, crc
                pieces = []
                while n > 0 and (piece := stream.read(n if keep else min(n, READ_CHUNK_BYTES))):
                    crc = crc32(piece, crc)
                    size += len(piece)
                    n -= len(piece)
                    if keep:
                        pieces.append(piece)
                return pieces

            for (offset, length), its in sorted(groups.items()):
                if offset < size:  # inside bytes already read (never the case for DCP's own files)
                    if not (held[0] <= offset and offset + length <= held[0] + len(held[1])):
                        raise _ReadProblem(f"{path}: the item at byte {offset} overlaps the one before it")
                    data = held[1][offset - held[0]:offset - held[0] + length]
                else:
                    take(offset - size, keep=False)
                    pieces = take(length, keep=True)
                    data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    if len(data) < length:
                        short = offset + length
                        break
                    held = (offset, data)
                for item in its:
                    if load_error is None:
                        try:
                            self._load_item(item, data, planner)
                        except Exception as exc:  # noqa: BLE001 - decided once the CRC32 is known
                            load_error = exc
            held = (0, b"")
            while take(READ_CHUNK_BYTES, keep=False):  # the rest: for the size and the CRC32
                pass
        self._count(bytes_read=size)
        crc &= 0xFFFFFFFF
        if record is not None and size != record.size:
            return _ReadProblem(f"{path} has {size} bytes, the commit record says {record.size}"), load_error
        if record is not None and self._verify and crc != record.crc32:
            return _ReadProblem(f"{path} is corrupt: CRC32 {crc:08x}, the commit record says {record.crc32:08x}"), \
                load_error
        if short is not None:
            return _ReadProblem(f"{path} ends before byte {short} (it has {size} bytes)"), load_error
        return None, load_error

    def _read_spans(self, path: str, items: list[Any], record: FileRecord | None, spans: list[tuple[int, int]],
                    planner: Any) -> tuple[Exception | None, Exception | None]:
        """Read only the spans this rank's items occupy (one ranged read each) and load them."""
        pieces = []
        for start, length in spans:
            data = self.storage.read_range(path, start, start + length)
            self._count(requests=1, bytes_read=len(data))
            if len(data) != length:
                size = f", the commit record says {record.size}" if record is not None else ""
                return _ReadProblem(f"{path} ends before byte {start + length} (read {len(data)} of "
                                    f"{length} bytes at {start}){size}"), None
            pieces.append((start, data))
        for item in items:
            info = self.storage_data[item.storage_index]
            start, data = next((s, d) for s, d in pieces if s <= info.offset < s + len(d))
            self._load_item(item, memoryview(data)[info.offset - start: info.offset - start + info.length], planner)
        return None, None

    def _count(self, *, requests: int = 0, bytes_read: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.bytes_read += bytes_read

    def _load_item(self, item: Any, data: bytes | memoryview, planner: Any) -> None:
        """Deserialise one item and put it where the planner says (planner calls serialised:
        the planner builds nested containers)."""
        info = self.storage_data[item.storage_index]
        stream = self.transforms.transform_load_stream(item, info.transform_descriptors or (), io.BytesIO(data))
        if item.type == LoadItemType.BYTE_IO:
            value = io.BytesIO(stream.read(-1))
            with self._lock:
                planner.load_bytes(item, value)
            return
        if not stream.seekable():
            stream = io.BytesIO(stream.read(-1))
        tensor = torch.load(stream, map_location="cpu", weights_only=True)
        tensor = narrow_tensor_by_index(tensor, item.storage_offsets, item.lengths)
        with self._lock:
            target = planner.resolve_tensor(item).detach()
        if target.size() != tensor.size():
            raise StateMismatchError(f"{self.path}: item {item.storage_index} has size {list(tensor.size())}, "
                                     f"the state to load into {list(target.size())}")
        if self._adopt(item, tensor):
            return
        target.copy_(tensor)
        with self._lock:
            planner.commit_tensor(item, target)

    def _adopt(self, item: Any, tensor: torch.Tensor) -> bool:
        """Make ``tensor`` the staged value of the item's key when it is all of it (see the
        class docstring); False when the item must be copied into the staging instead."""
        if self._adopt_from is None:
            return False
        key = item.dest_index.fqn
        whole = self._adopt_from.get(key)
        if not isinstance(whole, torch.Tensor) or whole.requires_grad:
            return False
        sharded = is_sharded(whole)
        local = whole.to_local() if sharded else whole
        if (local.device.type != "cpu" or tensor.device.type != "cpu" or local.dtype != tensor.dtype
                or local.size() != tensor.size() or local.stride() != tensor.stride() or any(item.dest_offsets)):
            return False
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
            return False  # a view into a bigger stored chunk (another world size): keeping it would keep the chunk
        if sharded:
            from torch.distributed.tensor import DTensor

            tensor = DTensor.from_local(tensor, whole.device_mesh, whole.placements, run_check=False,
                                        shape=whole.size(), stride=whole.stride())
        with self._lock:
            self.adopted[key] = tensor
        return True


class _ReadProblem(OSError):
    """A file that cannot be used: missing, short, corrupt or unreadable."""


def _spans(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """(offset, length) ranges merged into sorted spans (gaps below _SPAN_GAP bridged)."""
    out: list[list[int]] = []
    for offset, length in sorted(ranges):
        if out and offset <= out[-1][0] + out[-1][1] + _SPAN_GAP:
            out[-1][1] = max(out[-1][1], offset + length - out[-1][0])
        else:
            out.append([offset, length])
    return [(a, b) for a, b in out]


@contextlib.contextmanager
def paused_gc() -> Generator[None, None, None]:
    """Python's cyclic garbage collector off for a moment: unpickling DCP metadata creates
    millions of objects at thousands of ranks, and the collector would walk them again and
    again (measured: 86 % of the unpickling time; benchmarks/bench_metadata.py)."""
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


_ZIP_CRC_LOCK = threading.Lock()
_ZIP_CRC_USERS = [0, True]  # saves running with torch's zip CRC32 off, and its value before them


@contextlib.contextmanager
def _without_zip_crc() -> Generator[None, None, None]:
    # torch.save computes a CRC32 per zip record; ours already covers every byte, and the
    # second pass over the data is about a sixth of a save's time. The flag is process-wide:
    # used only for blocking saves (no torch.save of the caller runs beside them); several
    # of our saves may run at once on threads, and the last one out restores the flag.
    from torch.utils.serialization import config

    with _ZIP_CRC_LOCK:
        if _ZIP_CRC_USERS[0] == 0:
            _ZIP_CRC_USERS[1] = config.save.compute_crc32
            config.save.compute_crc32 = False
        _ZIP_CRC_USERS[0] += 1
    try:
        yield
    finally:
        with _ZIP_CRC_LOCK:
            _ZIP_CRC_USERS[0] -= 1
            if _ZIP_CRC_USERS[0] == 0:
                config.save.compute_crc32 = _ZIP_CRC_USERS[1]


def save_state(state_dict: dict[str, Any], path: str, storage: Storage, *, process_group: Any = None,
               thread_count: int = 1, replicated_on_rank0: bool = False, blocking: bool = False) -> list[FileRecord]:
    """Save ``state_dict`` as a DCP directory at ``path`` (a collective over
    ``process_group``); return the files this rank wrote (the coordinator includes
    ``.metadata``). Replicated entries are written once (DCP's dedup): by the lowest rank
    holding them with ``replicated_on_rank0``, else by whichever rank balances the load.
    ``blocking``: called on the training thread (no torch.save runs beside it)."""
    writer = _Writer(path, storage, thread_count)
    planner = DefaultSavePlanner(dedup_save_to_lowest_rank=replicated_on_rank0)
    with _quiet(), (_without_zip_crc() if blocking else contextlib.nullcontext()):
        dcp.save(state_dict, storage_writer=writer, planner=planner, process_group=process_group,
                 no_dist=process_group is None and not _dist_ready())
    return sorted(writer.fs.records.values(), key=lambda r: r.name)


def load_state(state_dict: dict[str, Any], path: str, storage: Storage, *, process_group: Any = None,
               metadata: Metadata | None = None) -> None:
    """Load a DCP directory into ``state_dict`` in place (a collective), resharding as needed.
    Files are read in parallel; ``metadata``: already read (no request for it)."""
    reader = _Reader(path, storage, metadata=metadata)
    with _quiet():
        dcp.load(state_dict, storage_reader=reader, planner=DefaultLoadPlanner(), process_group=process_group,
                 no_dist=process_group is None and not _dist_ready())


@dataclass
class LoadReport:
    """What one rank's :func:`load_checked` read, and what was wrong with it."""

    problems: list[str]
    """Missing, short, corrupt or unreadable files (their items were not loaded)."""
    requests: int
    bytes_read: int
    adopted: dict[str, Any]
    """With ``adopt``: values loaded for keys of the state, to use in place of its tensors."""


def load_checked(flat: dict[str, Any], path: str, storage: Storage, *, metadata: Metadata,
                 files: tuple[FileRecord, ...], verify: bool, whole_max_bytes: int, process_group: Any = None,
                 collective: bool = False, adopt: bool = False) -> LoadReport:
    """Load a flat state dict (see :func:`staging`) from a DCP directory; check each file read
    whole against its commit-record size and CRC32 (``verify``) on the bytes loaded, reading
    files of at most ``whole_max_bytes`` whole even when only part is needed. Problems are
    reported, not raised, so that the ranks can agree before anything is applied.
    ``adopt``: ``flat`` holds fresh staging only, which the tensors in the report's
    ``adopted`` replace (see :class:`_Reader`).

    Every rank plans its own reads from the ``metadata`` it was given, with no collective:
    DCP's global step of a load changes no rank's plan, so gathering every rank's plan on
    the coordinator and scattering it back (and an all_gather after the reads) bought
    nothing but three collectives per artifact, the first two O(ranks) on the coordinator.
    A rank that raises here raises alone: call it where failures are agreed on (resume runs
    it under ``Comm.run_everywhere``). ``collective=True``: DCP's collective load over
    ``process_group`` instead."""
    reader = _Reader(path, storage, metadata=metadata, files=files, verify=verify, whole_max_bytes=whole_max_bytes,
                     collect=True, adopt_from=flat if adopt else None)
    with _quiet():
        dcp.load(flat, storage_reader=reader, planner=DefaultLoadPlanner(), process_group=process_group,
                 no_dist=not collective or (process_group is None and not _dist_ready()))
    return LoadReport(reader.problems, reader.requests, reader.bytes_read, reader.adopted)


@dataclass
class Staging:
    """A flat copy of a (nested) state dict to load into before anything is applied:
    ``flat`` maps DCP's flattened keys to fresh tensors (same shape, dtype, device and
    sharding) or to the original non-tensor values; :meth:`nested` rebuilds the structure."""

    flat: dict[str, Any]
    mapping: dict[str, Any]

    def nested(self) -> dict[str, Any]:
        """The staged values in the original nesting (new containers; values are shared)."""
        return unflatten_state_dict(self.flat, self.mapping)

    def copy_into(self, target: dict[str, Any]) -> None:
        """Write the staged values into ``target`` in place (tensors copied, others set)."""
        for key, path in self.mapping.items():
            parent: Any = target
            for part in path[:-1]:
                parent = parent[part]
            old = parent[path[-1]]
            if isinstance(old, torch.Tensor) and isinstance(self.flat[key], torch.Tensor):
                old.detach().copy_(self.flat[key])
            else:
                parent[path[-1]] = self.flat[key]


def staging(state_dict: dict[str, Any]) -> Staging:
    """Fresh, uninitialised storage shaped like ``state_dict`` (see :class:`Staging`)."""
    flat, mapping = flatten_state_dict(state_dict)
    return Staging({k: torch.empty_like(v) if isinstance(v, torch.Tensor) else v for k, v in flat.items()}, mapping)


def reader_of(key: str, metadata: Metadata, world_size: int) -> int:
    """The rank that reads the replicated entry ``key`` for everyone: the rank whose own
    file holds it (DCP names files ``__<rank>_<n>.distcp``; that rank reads the file whole
    anyway), so that reading replicated state adds no request; files of ranks beyond
    ``world_size`` (a checkpoint saved on more ranks) are spread over the ranks."""
    meta = metadata.state_dict_metadata[key]
    index = MetadataIndex(key, meta.chunks[0].offsets) if isinstance(meta, TensorStorageMetadata) else MetadataIndex(key)
    return writer_rank((metadata.storage_data or {})[index].relative_path, world_size)


def writer_rank(name: str, world_size: int) -> int:
    """The rank that wrote the file ``name`` of a DCP directory (``__<rank>_<n>.distcp``;
    ``.metadata`` and other names: rank 0), spread over ``world_size`` ranks when the file
    comes from a bigger world."""
    match = re.match(r"__(\d+)_", name)
    if match:
        return int(match.group(1)) % world_size
    return DCP_COORDINATOR if name == METADATA_FILE else zlib.crc32(name.encode()) % world_size


def placeholder(key: str, metadata: Metadata) -> Any:
    """A CPU value to load the entry ``key`` into, made from the metadata alone."""
    meta = metadata.state_dict_metadata[key]
    if isinstance(meta, TensorStorageMetadata):
        return torch.empty(tuple(meta.size), dtype=meta.properties.dtype)
    return None


def is_sharded(value: Any) -> bool:
    """True for a DTensor (each rank holds its own part); plain tensors and other values
    are the same on every rank that holds them, as DCP's dedup assumes."""
    from torch.distributed.tensor import DTensor

    return isinstance(value, DTensor)


@contextlib.contextmanager
def _quiet() -> Generator[None, None, None]:
    # DCP warns on every single-process call; a plain process is a supported use here.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_metadata(path: str, storage: Storage) -> Metadata:
    """The DCP metadata of a directory (one read); FileNotFoundError if absent."""
    return _Reader(path, storage).read_metadata()


def load_full(path: str, storage: Storage) -> dict[str, Any]:
    """Load a whole DCP directory into one nested state dict in this process (no
    collective): one copy of the state in memory, used to convert to a single file."""
    # The public dcp.load only fills keys the caller already has; building the dict from
    # the metadata needs DCP's own (private) planner and inner loader, as its format_utils do.
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state: dict[str, Any] = {}
    with _quiet():
        _load_state_dict(state, storage_reader=_Reader(path, storage), planner=_EmptyStateDictLoadPlanner(),
                         no_dist=True)
    return state


_PG_INIT_FIELDS = ("use_prefix_store", "tcp_store_master_addr", "tcp_store_master_port")


def _start_checkpoint_process(comm: Comm, timeout_s: float | None) -> None:
    """Start DCP's checkpoint process on every rank of ``comm`` unless this process has one,
    its ranks meeting through a store that the group's rank 0 hosts on a port the system
    assigned and that stays bound. Left to itself, DCP picks a free port, releases it and
    has its new process bind it seconds later (the spawn), and anything that binds it in
    between (another job's rendezvous, gloo's own sockets) fails the save.
    A collective of ``comm``; waits at most ``timeout_s`` for the processes."""
    from torch.distributed.checkpoint import _async_process_executor as executor

    if executor._CHECKPOINT_PROCESS is not None:
        return
    info = executor._ProcessGroupInitInfo(comm.control_group)  # DCP's address, ranks and GC settings
    if not all(hasattr(info, field) for field in _PG_INIT_FIELDS):
        return  # another torch: DCP starts its process as it does by itself
    # at DCP's address (MASTER_ADDR, else rank 0's host name); a fresh store: no keys of an earlier process
    store, info.tcp_store_master_port = comm.host_store(DCP_COORDINATOR, info.tcp_store_master_addr)
    info.use_prefix_store = True

    def start() -> None:
        process = executor._AsyncCheckpointProcess(pg_init_info=info)
        process.rendezvous_store = store  # on rank 0, the store lives as long as the process
        executor._CHECKPOINT_PROCESS = process

    # the start waits for every rank's process (DCP allows that 30 minutes); this wait is bounded
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="noether-ckpt-process-start")
    try:
        pool.submit(start).result(timeout=timeout_s)
    finally:
        pool.shutdown(wait=False)


def shutdown_checkpoint_process() -> None:
    """Stop DCP's background checkpoint process of this process, if one was started
    (process-mode async saves); it would otherwise live until interpreter exit."""
    from torch.distributed.checkpoint import _async_process_executor as executor

    process = executor._CHECKPOINT_PROCESS
    if process is not None:
        executor._CHECKPOINT_PROCESS = None
        process.__del__()


def cpu_buffers_like(state: Any, *, pinned: bool, shared: bool) -> Any:
    """A copy of ``state``'s structure whose tensors are new CPU tensors of the same shapes
    and dtypes (DTensors keep their placements), in pinned and/or shared memory: staging
    buffers for asynchronous saves. Their contents are undefined until copied into."""
    # DCP's own helper (what its async staging and torchtitan use): it knows how to pin
    # shared memory (cudaHostRegister) and how to give a DTensor a CPU local tensor.
    from torch.distributed._state_dict_utils import _create_cpu_state_dict

    return _create_cpu_state_dict(state, pin_memory=pinned, share_memory=shared)
