"""Node-local storage: copy what only the coordinator writes to the first rank of every node.

With ``node_local`` every node saves to its own disk. Each rank's shards land on its own
node, but DCP writes ``.metadata`` (and, with ``dedup_save_to_lowest_rank``, every
replicated tensor) on rank 0 only, and the commit record and aliases are written by rank 0
too. Mirroring those few files to every node lets each node resume on the same placement
from its own disk.
"""

from __future__ import annotations

import logging

from ..dist.comm import Comm
from ..dist.launch_env import DistEnv
from .storage import Storage

__all__ = ["is_node_leader", "mirror_from_coordinator"]

log = logging.getLogger(__name__)


def is_node_leader() -> bool:
    """True on the first rank of this node (LOCAL_RANK or SLURM_LOCALID 0)."""
    return DistEnv.from_env().local_rank == 0


def mirror_from_coordinator(comm: Comm, storage: Storage, base: str, names: list[str], *, once: set[str] | None = None) -> int:
    """Collective: rank 0 reads ``base/<name>`` for every name and sends the bytes; every
    other node leader writes each one its own store lacks (``base`` is each rank's own
    view of the same folder). Names in ``once`` are written with ``write_once`` (commit
    records), others replace. Returns how many files this rank wrote."""
    once = once or set()
    payload = comm.broadcast_from_coordinator(lambda: [(name, storage.read(f"{base}/{name}")) for name in names])

    def write_missing() -> int:
        if comm.is_coordinator or not is_node_leader():
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
            log.info("mirrored %d file(s) from rank 0 into %s", written, base)
        return written

    return comm.run_everywhere(write_missing)
