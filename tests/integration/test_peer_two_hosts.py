"""replicate: peer across two "hosts" (network namespaces, see tests/support/netns_hosts.py): each host
writes to its own local disk (a private mount namespace per host where the same path is a
different directory) and keeps a copy of the other host's files. One host's disk is then
emptied (the node was replaced); the run resumes on both hosts from the peer copy and ends
with the digest of an uninterrupted run.

Needs root and `ip netns` (skipped with the reason otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from tests.integration.test_launch_two_hosts import TOTAL_UPDATES, launch, tails, wait_all

pytestmark = pytest.mark.slow

CKPT = Path("noether_runs") / "torchrun-peerpair" / "train" / "checkpoints"
STOP = "E1_U8_S256"


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The digest of an uninterrupted run on 2 ranks (shared with test_launch_slurm.py)."""
    from tests.integration.test_launch_slurm import uninterrupted_digest

    return uninterrupted_digest(tmp_path_factory.mktemp("reference"))


def own_disk(disk: Path, backing: Path, idx: int) -> list[str]:
    """A command prefix: run in a private mount namespace where ``disk`` is ``backing``."""
    return ["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c",
            f'hostname host{idx} && mount --bind "$0" "$1" && shift && exec "$@"', str(backing), str(disk)]


def test_replaced_host_resumes_from_its_peer_copy(two_hosts, tmp_path, reference):
    """node_local + replicate: peer (one tier); host 1's disk is emptied."""
    replaced = 1
    disk = tmp_path / "local_disk"
    disk.mkdir()
    backing = [tmp_path / "host0_disk", tmp_path / "host1_disk"]
    for b in backing:
        b.mkdir()
    overrides = ["checkpointer.node_local=true", "checkpointer.replicate=peer"]

    def start(port: int, name: str, extra: list[str]) -> list[Path]:
        logs = [tmp_path / f"host0_{name}.log", tmp_path / f"host1_{name}.log"]
        procs = [launch(two_hosts, i, nnodes=2, port=port, rdzv_id="peerpair", output_dir=str(disk / "noether_runs"),
                        log=logs[i], overrides=[*overrides, *extra], wrap=own_disk(disk, backing[i], i))
                 for i in (0, 1)]
        wait_all(procs, logs, timeout=240)
        return logs

    # 1. both hosts, stop after 8 updates (commits at U4 and U8); each keeps the other's files
    logs = start(29400, "first", ["trainer.stop_after_updates=8"])
    for host in (0, 1):
        assert sorted(os.listdir(backing[host] / CKPT / "_commits")) == ["E0_U4_S128.json", f"{STOP}.json"], tails(logs)
    model = f"mlp_cp={STOP}_model.th"
    copy = backing[0] / CKPT / "_peer" / "node1" / model / "__1_0.distcp"
    assert copy.read_bytes() == (backing[1] / CKPT / model / "__1_0.distcp").read_bytes()
    assert not (backing[0] / CKPT / model / "__1_0.distcp").exists()  # only the peer copy on host 0

    # 2. the replaced host's disk is empty
    shutil.rmtree(backing[replaced])
    backing[replaced].mkdir()

    # 3. both hosts again: the replaced one fetches its files from the other, every rank
    #    resumes at the stop, and the run ends as if never interrupted
    logs = start(29401, "resume", [])
    for host in (0, 1):
        assert f"resumed from torchrun-peerpair/train at {STOP}" in logs[host].read_text(), tails(logs)
    assert "from other nodes into this node's local tier" in logs[replaced].read_text(), tails(logs)
    summary = json.loads((backing[0] / CKPT.parent / "summary.json").read_text())
    assert summary["finished"] and summary["world_size"] == 2, summary
    assert summary["digest"] == reference
    last = f"E3_U{TOTAL_UPDATES}_S768.json"
    for host in (0, 1):
        assert last in os.listdir(backing[host] / CKPT / "_commits"), tails(logs)
    # the replaced host holds its rank's files of the stop point again (its own, and the mirror)
    assert (backing[replaced] / CKPT / model / f"__{replaced}_0.distcp").exists()


def test_two_tiers_replaced_coordinator_host_resumes_from_the_local_tier(two_hosts, s3_server, s3_bucket, tmp_path,
                                                                        reference):
    """tiers (local: node-local disks with replicate: peer; durable: the S3 test server); the
    disk of host 0 (rank 0, which selects) is emptied: the local tier still serves the newest
    point, newer than the durable one."""
    endpoint = f"http://{two_hosts.server_ip}:{two_hosts.forward(s3_server.port)}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}
    disk = tmp_path / "local_disk"
    disk.mkdir()
    backing = [tmp_path / "host0_disk", tmp_path / "host1_disk"]
    for b in backing:
        b.mkdir()
    local = Path("torchrun-peertiers") / "train" / "checkpoints"
    overrides = [f"checkpointer.storage.endpoint_url={endpoint}",
                 "checkpointer.tiers={local: {dir: %s, every_updates: 4, keep_last: 2, replicate: peer}, "
                 "durable: {every_updates: 8}}" % disk]
    client = s3_server.client()

    def start(port: int, name: str, extra: list[str]) -> list[Path]:
        logs = [tmp_path / f"host0_{name}.log", tmp_path / f"host1_{name}.log"]
        procs = [launch(two_hosts, i, nnodes=2, port=port, rdzv_id="peertiers", output_dir=f"s3://{s3_bucket}/exp",
                        log=logs[i], overrides=[*overrides, *extra], env=env, wrap=own_disk(disk, backing[i], i))
                 for i in (0, 1)]
        wait_all(procs, logs, timeout=240)
        return logs

    # 1. both hosts, stop after 12 updates: local tier U4, U8, U12 (keeps 2); durable U8
    logs = start(29400, "first", ["trainer.stop_after_updates=12"])
    stop = "E1_U12_S384"
    durable = client.list_objects_v2(Bucket=s3_bucket, Prefix="exp/torchrun-peertiers/train/checkpoints/_commits/")
    assert [o["Key"].rsplit("/", 1)[-1] for o in durable.get("Contents", [])] == ["E1_U8_S256.json"], tails(logs)
    assert (backing[0] / local / "_peer" / "node1" / f"mlp_cp={stop}_model.th" / "__1_0.distcp").exists(), tails(logs)

    # 2. host 0 replaced: its disk is empty (records, aliases, rank 0's shards all gone)
    shutil.rmtree(backing[0])
    backing[0].mkdir()

    # 3. both hosts again: rank 0 gets the records and its files back from host 1; the local
    #    tier's U12 (newer than the durable U8) is resumed, and the run ends as never interrupted
    logs = start(29401, "resume", [])
    for host in (0, 1):
        assert f"resumed from torchrun-peertiers/train at {stop} (local tier)" in logs[host].read_text(), tails(logs)
    assert "from other nodes into this node's local tier" in logs[0].read_text(), tails(logs)
    summary = json.loads(client.get_object(Bucket=s3_bucket, Key="exp/torchrun-peertiers/train/summary.json")["Body"].read())
    assert summary["finished"] and summary["world_size"] == 2, summary
    assert summary["resumed"] == {"checkpoint": stop, "tier": "local"}, summary
    assert summary["digest"] == reference
