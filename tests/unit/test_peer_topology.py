"""replicate: peer without ranks: the ring of nodes (who keeps whose copies) and the config
it needs (peer copies on real ranks: tests/dist/test_peer_copy.py)."""

from __future__ import annotations

import pytest

from noether_dist import CheckpointerConfig
from noether_dist.config import Replicate
from noether_dist.dist.topology import NodeTopology
from noether_dist.errors import ConfigError


def test_ring_of_nodes():
    topo = NodeTopology(((0, 1), (2, 3), (4,)), (0, 2, 4), rank=3)
    assert topo.node == 1 and topo.peer_node() == 2 and not topo.is_leader
    assert [topo.copy_target(r) for r in range(5)] == [2, 3, 4, 4, 0]
    assert topo.copy_sources(4) == [2, 3] and topo.copy_sources(0) == [4] and topo.copy_sources(1) == []
    alone = NodeTopology(((0, 1, 2),), (0,), rank=1)
    assert alone.peer_node() is None and alone.copy_target(1) is None and alone.copy_sources(0) == []


def test_replicate_peer_needs_node_local_disks():
    with pytest.raises(ConfigError, match="needs node_local: true"):
        CheckpointerConfig(output_dir="/tmp/x", run_id="r", replicate=Replicate.PEER)
    with pytest.raises(ConfigError, match="node-local disk"):
        CheckpointerConfig(output_dir="s3://b/p", run_id="r", node_local=True, replicate=Replicate.PEER)
    with pytest.raises(ConfigError, match="use none or peer"):
        CheckpointerConfig.from_dict({"output_dir": "/tmp/x", "run_id": "r", "node_local": True, "replicate": "ring"})
