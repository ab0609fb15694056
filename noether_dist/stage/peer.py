"""Peer copies of node-local checkpoints (``replicate: peer``): one lost node loses nothing.

With node-local disks every node keeps its own ranks' shards, and the files of DCP's
coordinator (the group's rank 0: the DCP metadata, replicated tensors) and the records (the
Comm's coordinator's) are mirrored to every node (:mod:`noether_dist.io.mirror`). With
peer copies, each rank's own files are also sent, before the point commits, to one rank of
the next node in the ring (:class:`noether_dist.dist.topology.NodeTopology`: node ``i`` ->
node ``(i + 1) mod N``), which keeps them in ``checkpoints/_peer/node<i>/``. All traffic is
point to point through :meth:`noether_dist.dist.comm.Comm.exchange` (gloo, bounded waits),
in chunks of at most :data:`CHUNK_BYTES`; every copy is written to a temporary name, checked
(size and CRC32 of the rank's FileRecord, as the commit record will list it), then renamed.

What survives:

- one node lost or its disk replaced: its ranks' files are on its peer's disk, group rank
  0's files, the metadata and the records on every other node. On resume the replaced node
  fetches them back (:func:`restore_records`, then :func:`restore` per candidate) before
  the ranks agree, and every rank reads from its own disk again;
- a node and its peer (the next node in the ring) both lost: the files of the first one's
  ranks exist nowhere on local disks; :func:`restore` fetches what it can and leaves the
  rest missing, the ranks' agreement finds the point unreadable, and resume falls back (to
  an older local point, which lacks the same files, and then to the durable tier where one
  is configured; without one it raises CheckpointNotFoundError on every rank);
- a single-node job has no peer: nothing is copied (a warning says so at start-up);
- the nodes changed between runs: a file is looked for wherever it is, not where the
  numbering puts it (first the copies on the rank's own disk, then every other node's), so
  another node order or fewer nodes at the same world size resume from local disks when
  they still hold every rank's files. With another world size a rank fetches only what its
  rank number wrote, and each node's leader puts every copy its disk keeps into place; the
  resharded load succeeds when that covers what each rank reads, else resume falls back.

Ranks are the Comm's group ranks throughout: on a subgroup (``process_group``) only its
ranks take part, its nodes are those its ranks run on, and their leaders are the group's
ranks with the lowest local rank there; the Comm's coordinator may be any of its ranks.

Protocol of a save (every rank, in this order, inside the save's collective, which runs on
the background writer's own Comm for asynchronous saves): :func:`replicate` after every
rank wrote its shards and the mirror ran, before the commit record; a copy that fails on
any rank fails the save on every rank (nothing committed; an asynchronous save raises it at
the next ``save``, ``wait`` or ``close``).
Protocol of a resume: :func:`restore_records` once before selection, then :func:`restore`
for every candidate point before it is staged.
"""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..dist.comm import Comm
from ..dist.topology import NodeTopology
from ..errors import CommitError
from ..format.layout import COMMITS_DIR, ALIASES_DIR, StageLayout, join_url
from ..format.names import ArtifactFormat, parse_artifact
from ..io.checksum import crc32
from ..io.dcp_io import DCP_COORDINATOR, writer_rank
from ..io.storage import Storage
from ..format.records import CommitRecord, CorruptRecordError, FileRecord
from .commit import alias_files, commit_files, list_commits
from .verify import _safe_file_name as safe_file_name
from .verify import file_crc32

__all__ = ["CHUNK_BYTES", "replicate", "restore_records", "restore", "prune_peer_copies"]

log = logging.getLogger(__name__)
CHUNK_BYTES = 64 << 20
"""The most bytes of a file one message carries (memory per transfer: about twice this)."""


@dataclass(frozen=True)
class _Item:
    """One file to send: ``key`` is ``<artifact>/<file>``; ``path`` where the sender reads it."""

    key: str
    path: str
    record: FileRecord


def _split_key(key: str) -> tuple[str, str]:
    art, _, name = key.partition("/")
    parse_artifact(art)  # a Noether artifact name, one path component (ValueError otherwise)
    if "/" in art or not name or not safe_file_name(name):
        raise ValueError(f"not an artifact file: {key!r}")
    return art, name


# ------------------------------------------------------------------------- transfer

class _Sink:
    """One file being received: chunks go to a temporary name beside the destination; the
    file gets its name only once its size and CRC32 match the record."""

    def __init__(self, dest: str, record: FileRecord) -> None:
        self.dest, self.record = dest, record
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        self.tmp = os.path.join(os.path.dirname(dest), f".peer-tmp-{uuid.uuid4().hex}")
        self.fh = open(self.tmp, "wb")  # noqa: SIM115 - closed by finish/abort
        self.size, self.crc = 0, 0

    def write(self, offset: int, data: bytes) -> None:
        if offset != self.size:
            raise OSError(f"chunk at offset {offset} after {self.size} bytes")
        self.fh.write(data)
        self.size += len(data)
        self.crc = crc32(data, self.crc)

    @property
    def complete(self) -> bool:
        return self.size >= self.record.size

    def finish(self) -> None:
        crc = self.crc & 0xFFFFFFFF
        try:
            if (self.size, crc) != (self.record.size, self.record.crc32):
                raise OSError(f"{self.dest}: received {self.size} bytes, CRC32 {crc:08x}; the record says "
                              f"{self.record.size} bytes, CRC32 {self.record.crc32:08x}")
            self.fh.flush()
            os.fsync(self.fh.fileno())
            self.fh.close()
            os.replace(self.tmp, self.dest)
        except BaseException:
            self.abort()
            raise
        fd = os.open(os.path.dirname(self.dest), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def abort(self) -> None:
        self.fh.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _messages(storage: Storage, items: list[_Item]) -> Iterator[tuple | None]:
    """What a sender sends to one destination: (key, record, offset, bytes) per chunk, or
    (key, record, -1, why) for a file it cannot read; None at the end."""
    for item in items:
        offset = 0
        try:
            while True:
                data = storage.read_range(item.path, offset, offset + CHUNK_BYTES)
                yield (item.key, item.record.to_dict(), offset, data)
                offset += len(data)
                if not data or offset >= item.record.size:
                    break
        except (OSError, ValueError) as exc:  # StorageError is an OSError too
            yield (item.key, item.record.to_dict(), -1, f"{type(exc).__name__}: {exc}")
    yield None


def _transfer(comm: Comm, storage: Storage, sends: dict[int, list[_Item]], sources: list[int],
              dest_of: Callable[[int, str], str]) -> tuple[list[str], list[str]]:
    """Send each ``sends[dst]`` to rank ``dst`` and receive from every rank in ``sources``
    (each rank calls it with its own part of one plan); a received file goes to
    ``dest_of(source, key)`` on this rank's storage. Returns (keys received and checked,
    problems). Only a failure of the transport raises; a file that cannot be read or
    written, or arrives damaged, is a problem and the transfer goes on."""
    if not storage.is_local:
        raise CommitError(f"peer copies need node-local disks, not {storage.protocol}://")
    pending = {dst: _messages(storage, items) for dst, items in sends.items() if dst != comm.rank}
    active = set(sources) - {comm.rank}
    sinks: dict[tuple[int, str], _Sink] = {}
    failed: set[tuple[int, str]] = set()  # the rest of such a file's chunks is dropped
    received: list[str] = []
    problems: list[str] = []
    try:
        while pending or active:
            out = {}
            for dst in list(pending):
                msg = next(pending[dst])
                out[dst] = msg
                if msg is None:
                    del pending[dst]
            got = comm.exchange(out, active)
            for src, msg in sorted(got.items()):
                if msg is None:
                    active.discard(src)
                    continue
                key, record, offset, data = msg
                if offset < 0:
                    problems.append(f"rank {src} cannot send {key}: {data}")
                    continue
                if (src, key) in failed:
                    continue
                sink = sinks.get((src, key))
                try:
                    if sink is None:
                        _split_key(key)
                        sink = sinks[(src, key)] = _Sink(storage._strip(dest_of(src, key)), FileRecord.from_dict(record))
                    sink.write(offset, data)
                    if sink.complete or not data:
                        del sinks[(src, key)]
                        sink.finish()
                        received.append(key)
                except (OSError, ValueError) as exc:
                    if sinks.pop((src, key), None) is not None:
                        sink.abort()
                    failed.add((src, key))
                    problems.append(f"{key} from rank {src}: {type(exc).__name__}: {exc}")
    finally:
        for sink in sinks.values():
            problems.append(f"{sink.dest}: incomplete ({sink.size} of {sink.record.size} bytes)")
            sink.abort()
    return received, problems


# ----------------------------------------------------------------------------- save

def replicate(comm: Comm, topology: NodeTopology, storage: Storage, layout: StageLayout,
              own_files: list[tuple[str, FileRecord]]) -> int:
    """Collective, inside a save before its commit: send this rank's files of one point
    (``(artifact name, FileRecord)`` as its write reported them) to its target on the peer
    node, and keep the copies sent to this rank under ``_peer/node<source node>/``. DCP's
    coordinator (group rank 0) sends nothing: its files and the metadata are mirrored to
    every node. A
    copy that is missing or damaged on any rank raises CommitError on every rank. Returns
    how many files this rank received."""
    target = topology.copy_target(comm.rank)
    if target is None:
        return 0
    items = [] if comm.rank == DCP_COORDINATOR else [
        _Item(f"{art}/{rec.name}", join_url(layout.artifact_path(art), rec.name), rec) for art, rec in own_files]

    def run() -> int:
        received, problems = _transfer(
            comm, storage, {target: items}, topology.copy_sources(comm.rank),
            lambda src, key: join_url(layout.peer_dir(topology.node_of(src)), key))
        if problems:
            raise CommitError(f"peer copy failed on rank {comm.rank}: {'; '.join(problems)}")
        return len(received)

    count = comm.run_everywhere(run)
    if count:
        log.debug("kept %d file(s) of node %s as its peer", count, [topology.node_of(s) for s in topology.copy_sources(comm.rank)])
    return count


def prune_peer_copies(storage: Storage, layout: StageLayout) -> int:
    """On a node's leader after retention: remove the copies of points this node has no
    commit record of (pruned, or never committed). Returns how many folders it removed."""
    committed = {str(p) for p in list_commits(storage, layout)}
    removed = 0
    for node_dir in storage.list(layout.peer_root):
        for entry in storage.list(node_dir.path):
            try:
                point = parse_artifact(entry.name).checkpoint
            except ValueError:
                continue
            if point not in committed:
                storage.remove(entry.path, recursive=True)
                removed += 1
    if removed:
        log.info("removed %d peer copies of points no longer committed in %s", removed, layout.checkpoints_dir)
    return removed


# --------------------------------------------------------------------------- resume

def restore_records(comm: Comm, topology: NodeTopology, storage: Storage, layout: StageLayout) -> int:
    """Collective, before a resume selects: every node leader gets the commit records and
    aliases that another node has and it lacks (a replaced node starts empty, and the
    coordinator selects from its own disk). Records are written once (never over one that
    exists), aliases only where missing. Returns how many this rank wrote."""
    def inventory() -> tuple[set[str], set[str]] | None:
        if not topology.is_leader:
            return None
        return ({p.rsplit("/", 1)[-1] for p in commit_files(storage, layout).values()},
                {p.rsplit("/", 1)[-1] for p in alias_files(storage, layout).values()})

    held = comm.all_gather_results(inventory)
    plan: dict[int, dict[int, list[str]]] = {}  # holder -> receiver -> names
    for leader in topology.leaders:
        mine = held[leader]
        for folder, idx in ((COMMITS_DIR, 0), (ALIASES_DIR, 1)):
            for name in sorted(set().union(*(held[r][idx] for r in topology.leaders)) - mine[idx]):
                holder = next(r for r in topology.leaders if name in held[r][idx])
                plan.setdefault(holder, {}).setdefault(leader, []).append(f"{folder}/{name}")

    def run() -> int:
        out = {dst: [(n, storage.read(join_url(layout.checkpoints_dir, n))) for n in names]
               for dst, names in plan.get(comm.rank, {}).items()}
        sources = [h for h, to in plan.items() if comm.rank in to]
        written = 0
        for src, files in comm.exchange(out, sources).items():
            for name, data in files:
                folder, _, base = name.partition("/")
                path = join_url(layout.checkpoints_dir, folder, base)
                if folder == COMMITS_DIR:
                    it = StageLayout.iteration_of_commit_file(base)
                    try:
                        if it is None or CommitRecord.from_json(data).iteration != it:
                            raise CorruptRecordError(f"names no point of {base}")
                    except CorruptRecordError as exc:
                        log.warning("not restoring commit record %s from rank %d: %s", base, src, exc)
                        continue
                    try:
                        storage.write_once(path, data)
                    except FileExistsError:
                        continue
                elif folder == ALIASES_DIR and StageLayout.alias_of_file(base) and not storage.exists(path):
                    storage.replace(path, data)
                else:
                    continue
                written += 1
        if written:
            log.warning("node %d lacked %d commit record(s)/alias(es) of %s: restored from other nodes",
                        topology.node, written, layout.checkpoints_dir)
        return written

    return comm.run_everywhere(run)


def _all_files(record: CommitRecord) -> list[tuple[str, FileRecord]]:
    """Every file of the DCP artifacts of ``record``: (artifact name, FileRecord)."""
    return [(art.name, rec) for art in record.artifacts if art.format is ArtifactFormat.DCP for rec in art.files]


def _needed(record: CommitRecord, rank: int, leader: bool) -> list[tuple[str, FileRecord]]:
    """The files of ``record`` that this rank's node must hold for this rank: the ones this
    rank number wrote, and on a node's leader also DCP's coordinator's (mirrored) files."""
    return [(art, rec) for art, rec in _all_files(record)
            if (writer := writer_rank(rec.name, record.world_size)) == rank or (leader and writer == DCP_COORDINATOR)]


def _present(storage: Storage, path: str, rec: FileRecord) -> bool:
    """True when ``path`` exists with the record's size (one stat; no bytes read)."""
    try:
        return storage.stored_checksum(path)[0] == rec.size
    except FileNotFoundError:
        return False


def _bad(storage: Storage, path: str, rec: FileRecord) -> str | None:
    try:
        size, crc = file_crc32(storage, path)
    except FileNotFoundError:
        return "missing"
    if size != rec.size or crc != rec.crc32:
        return f"{size} bytes, CRC32 {crc:08x} (the record says {rec.size}, {rec.crc32:08x})"
    return None


def _copy_from_own_disk(storage: Storage, layout: StageLayout, key: str, rec: FileRecord) -> str | None:
    """Put a good copy of ``key`` that this node's disk keeps for another node (under
    ``_peer/``, e.g. after the node order changed or nodes were merged) into place, checked
    by size and CRC32 on the way; the path it came from, or None when there is none."""
    for entry in storage.list(layout.peer_root):
        path = join_url(entry.path, key)
        try:
            if not entry.is_dir or not _present(storage, path, rec):
                continue
            sink = _Sink(storage._strip(join_url(layout.checkpoints_dir, key)), rec)
            try:
                offset = 0
                while not sink.complete:
                    data = storage.read_range(path, offset, offset + CHUNK_BYTES)
                    if not data:
                        break
                    sink.write(offset, data)
                    offset += len(data)
            except BaseException:
                sink.abort()
                raise
            sink.finish()
            return path
        except (OSError, ValueError) as exc:  # a damaged copy: try the next one
            log.warning("not using %s: %s", path, exc)
    return None


def restore(comm: Comm, topology: NodeTopology, storage: Storage, layout: StageLayout, record: CommitRecord) -> int:
    """Collective, before a resume stages ``record``: every rank checks the files its node
    must hold for it (size and CRC32); those missing or damaged are taken from a copy its
    own disk keeps for another node (``_peer/``: the node order changed, or fewer nodes
    now), else fetched from another node that holds a good copy (a peer copy, or the mirror
    of DCP's coordinator's files) and written into this node's local tier. What no node
    holds stays missing: the staging that follows reports it and the ranks agree on a
    fallback. Returns how many files this rank fetched from other nodes; raises on every
    rank only when the transport fails."""
    def check() -> list[tuple[str, dict]]:
        bad, why, local = [], [], 0
        needed = _needed(record, comm.rank, topology.is_leader)
        for art, rec in needed:
            key = f"{art}/{rec.name}"
            problem = _bad(storage, join_url(layout.artifact_path(art), rec.name), rec)
            if problem and _copy_from_own_disk(storage, layout, key, rec) is not None:
                local += 1
            elif problem:
                bad.append((key, rec.to_dict()))
                why.append(f"{key} is {problem}")
        if record.world_size != comm.world_size and topology.is_leader:
            # Resharding reads parts of other ranks' files: put every file this disk keeps a
            # copy of into place (a local copy; the load checks each file it reads).
            for art, rec in _all_files(record):
                if (art, rec) not in needed and not _present(storage, join_url(layout.artifact_path(art), rec.name),
                                                             rec) and _copy_from_own_disk(
                        storage, layout, f"{art}/{rec.name}", rec) is not None:
                    local += 1
        if local:
            log.warning("took %d file(s) of %s for rank %d from the peer copies on this node's disk",
                        local, record.iteration, comm.rank)
        if bad:
            log.warning("this node's copy of %s lacks %d good file(s) of rank %d (%s%s): looking for copies on "
                        "other nodes", record.iteration, len(bad), comm.rank, "; ".join(why[:3]),
                        "; ..." if len(why) > 3 else "")
        return bad

    bad = comm.run_everywhere(check)
    if comm.all_true(not bad):
        return 0
    wanted = comm.all_gather(bad)

    def offers() -> dict[str, str]:
        """On a leader: key -> local path of a copy it can send (size checked)."""
        if not topology.is_leader:
            return {}
        keys = {key: FileRecord.from_dict(rec) for r, items in enumerate(wanted)
                if topology.node_of(r) != topology.node for key, rec in items}
        if not keys:
            return {}
        places = [layout.checkpoints_dir] + [e.path for e in storage.list(layout.peer_root) if e.is_dir]
        found = {}
        for key, rec in keys.items():
            for base in places:
                path = join_url(base, key)
                if _present(storage, path, rec):
                    found[key] = path
                    break
        return found

    offered = comm.all_gather_results(offers)
    sends: dict[int, dict[int, list[_Item]]] = {}
    lost: list[str] = []
    for r, items in enumerate(wanted):
        for key, rec in items:
            holder = next((h for h in topology.leaders if topology.node_of(h) != topology.node_of(r)
                           and key in offered[h]), None)
            if holder is None:
                if r == comm.rank:
                    lost.append(key)
                continue
            sends.setdefault(holder, {}).setdefault(r, []).append(
                _Item(key, offered[holder][key], FileRecord.from_dict(rec)))

    if lost:
        log.error("no other node holds %d file(s) of %s that node %d lacks (e.g. %s): the node and its peer are both "
                  "gone; this point cannot be resumed from node-local disks", len(lost), record.iteration,
                  topology.node, lost[0])

    def run() -> int:
        received, problems = _transfer(comm, storage, sends.get(comm.rank, {}),
                                       [h for h, to in sends.items() if comm.rank in to],
                                       lambda _src, key: join_url(layout.checkpoints_dir, key))
        for problem in problems:
            log.error("restoring %s from a peer: %s", record.iteration, problem)
        if received:
            log.warning("fetched %d file(s) of %s from other nodes into this node's local tier",
                        len(received), record.iteration)
        return len(received)

    return comm.run_everywhere(run)
