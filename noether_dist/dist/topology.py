"""Which ranks share a node, and which node keeps a copy of which node's local files.

A node is the set of ranks that share one local disk. Each rank names its node from the
launcher's environment: torchrun's ``GROUP_RANK`` (the node rank of the rendezvous), else
SLURM's ``SLURM_NODEID`` under ``srun``, else the host name. The names are gathered once
(one all_gather over the Comm's group: a subgroup sees its own ranks only) and numbered in
sorted order, so every rank of the group sees the same layout. Ranks are group ranks.

Peers: node ``i`` keeps its copies on node ``(i + 1) mod N`` (a ring), so each node holds
the copy of exactly one other node and losing any one node leaves every file on some disk.
With one node there is no peer (:attr:`NodeTopology.peer_node` is None).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import ConfigError
from .comm import Comm
from .launch_env import DistEnv

__all__ = ["NodeTopology", "node_name_from_env"]


def node_name_from_env(env: Mapping[str, str] | None = None) -> str:
    """This process's node, as the launcher names it: ``GROUP_RANK`` (torchrun), else
    ``SLURM_NODEID`` (a task of ``srun``), else the host name."""
    env = os.environ if env is None else env
    for key in ("GROUP_RANK", "SLURM_NODEID"):
        value = (env.get(key) or "").strip()
        if value:
            return f"{key}={value}"
    return f"host={socket.gethostname()}"


def _sort_key(name: str) -> tuple[str, int, str]:
    key, _, value = name.partition("=")
    return (key, int(value), "") if value.isdigit() else (key, -1, value)


@dataclass(frozen=True)
class NodeTopology:
    """The nodes of a job: ``nodes[i]`` are the ranks on node ``i``, lowest first."""

    nodes: tuple[tuple[int, ...], ...]
    leaders: tuple[int, ...]
    """The group's rank with the lowest local rank on each node (local rank 0 on the whole
    job), in node order: it writes what the node shares (:mod:`noether_dist.io.mirror`)."""
    rank: int
    """This process's rank."""

    @classmethod
    def gather(cls, comm: Comm) -> NodeTopology:
        """Collective on ``comm``'s group: every rank reports its node name and local rank;
        the same layout is returned on every rank. ConfigError on every rank when two ranks
        of one node report the same local rank (the launcher's variables disagree, or two
        hosts share a name and no GROUP_RANK / SLURM_NODEID tells them apart)."""
        mine = (node_name_from_env(), DistEnv.from_env().local_rank)
        reports = comm.all_gather(mine)
        names = sorted({name for name, _ in reports}, key=_sort_key)
        nodes = tuple(tuple(r for r, (name, _) in enumerate(reports) if name == n) for n in names)
        leaders = []
        for n, ranks in zip(names, nodes):
            local = [reports[r][1] for r in ranks]
            if len(set(local)) != len(local):
                raise ConfigError(f"node {n} has several ranks with the same local rank ({local}, ranks "
                                  f"{[comm.group_ranks[r] for r in ranks]}); check LOCAL_RANK / SLURM_LOCALID, "
                                  "and set GROUP_RANK or SLURM_NODEID where hosts share a name")
            leaders.append(min(ranks, key=lambda r: reports[r][1]))
        return cls(nodes, tuple(leaders), comm.rank)

    @property
    def node_count(self) -> int:
        """How many nodes the job has."""
        return len(self.nodes)

    def node_of(self, rank: int) -> int:
        """The node index of ``rank``."""
        for i, ranks in enumerate(self.nodes):
            if rank in ranks:
                return i
        raise ValueError(f"rank {rank} is on no node of {self.nodes}")

    @property
    def node(self) -> int:
        """This rank's node index."""
        return self.node_of(self.rank)

    @property
    def is_leader(self) -> bool:
        """True on the rank that leads its node."""
        return self.rank in self.leaders

    def peer_node(self, node: int | None = None) -> int | None:
        """The node that keeps node ``node``'s copies (default: this rank's node): the next
        one in the ring; None with a single node."""
        if self.node_count < 2:
            return None
        return ((self.node if node is None else node) + 1) % self.node_count

    def copy_target(self, rank: int) -> int | None:
        """The rank on the peer node that receives ``rank``'s copies: the one at the same
        position among its node's ranks (wrapping when the peer node has fewer); None with
        a single node."""
        node = self.node_of(rank)
        peer = self.peer_node(node)
        if peer is None:
            return None
        targets = self.nodes[peer]
        return targets[self.nodes[node].index(rank) % len(targets)]

    def copy_sources(self, rank: int) -> list[int]:
        """The ranks whose copies ``rank`` receives."""
        return [r for ranks in self.nodes for r in ranks if r != rank and self.copy_target(r) == rank]
