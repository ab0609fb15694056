"""Node-local storage: copy what one rank alone writes to the leader of every other node.

With ``node_local`` every node saves to its own disk. Each rank's shards land on its own
node, but DCP writes ``.metadata`` (and, with ``dedup_save_to_lowest_rank``, every
replicated tensor) on its coordinator, the group's rank 0, and the commit record and
aliases are written by the Comm's coordinator (any rank of the group). Mirroring those few
files from the rank that wrote them to every node's leader
(:attr:`noether_dist.dist.topology.NodeTopology.leaders`) lets each node resume on the same
placement from its own disk.
"""

from __future__ import annotations

import logging

from ..dist.comm import Comm
from ..dist.topology import NodeTopology
from .storage import Storage

__all__ = ["mirror_from"]

log = logging.getLogger(__name__)


def mirror_from(comm: Comm, topology: NodeTopology, storage: Storage, base: str, names: list[str], *,
                source: int, once: set[str] | None = None) -> int:
    """Collective: the group's rank ``source`` reads ``base/<name>`` for every name and sends
    the bytes; the leader of every other node writes each one its own store lacks (``base``
    is each rank's own view of the same folder; the source's node has them already). Names
    in ``once`` are written with ``write_once`` (commit records), others replace. Returns how
    many files this rank wrote."""
    once = once or set()
    payload = comm.broadcast_from(source, lambda: [(name, storage.read(f"{base}/{name}")) for name in names])

    def write_missing() -> int:
        if not topology.is_leader or topology.node == topology.node_of(source):
            return 0
        written = 0
        for name, data in payload:
            path = f"{base}/{name}"
            if name in once:
                if storage.exists(path):
                    continue
                storage.write_once(path, data)
            else:
                try:
                    if storage.read(path) == data:
                        continue
                except FileNotFoundError:
                    pass
                storage.replace(path, data)
            written += 1
        if written:
            log.info("mirrored %d file(s) from rank %d into %s", written, comm.group_ranks[source], base)
        return written

    return comm.run_everywhere(write_missing)
