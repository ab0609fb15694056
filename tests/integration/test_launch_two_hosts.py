"""launch/torchrun/multi_node.sh across two "hosts" (network namespaces joined by a veth
pair, see tests/support/netns_hosts.py): torchrun --nnodes 2 with a c10d rendezvous on host 0.

* Checkpoints on an S3 server both hosts reach; a SIGUSR1 to the launcher on host 1 makes
  both ranks save the same step; then the run continues on host 0 alone (world size 2 -> 1)
  from that checkpoint and finishes.
* Every host writes to its own local disk (checkpointer.node_local=true; each host runs in
  its own mount namespace where the same path is a different directory); the run stops, and
  resumes on the same placement from those disks with the uninterrupted run's final digest.

Needs root and `ip netns` (skipped with the reason otherwise).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.netns_hosts import TwoHosts, own_disks

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "launch" / "configs" / "cpu_small.yaml"
MULTI_NODE = REPO / "launch" / "torchrun" / "multi_node.sh"
TOTAL_UPDATES = 24  # cpu_small.yaml: 3 epochs x 256 / 32
_COMMIT = re.compile(r"(E\d+_U(\d+)_S\d+)\.json$")



def launch(hosts: TwoHosts, idx: int, *, nnodes: int, port: int, rdzv_id: str, output_dir: str, log: Path,
           overrides: list[str], env: dict[str, str] | None = None, wrap: list[str] | None = None
           ) -> subprocess.Popen:
    """Start multi_node.sh (1 process per host) inside host ``idx``'s namespace."""
    full = {**os.environ, **(env or {})}
    full.update(
        OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHON=sys.executable, TMPDIR=str(log.parent),
        GLOO_SOCKET_IFNAME=hosts.ifname(idx),  # gloo must not pick lo (unreachable across hosts)
        NNODES=str(nnodes), NPROC_PER_NODE="1", RDZV_ENDPOINT=f"{hosts.ip(0)}:{port}", RDZV_ID=rdzv_id,
        # In a namespace the host name tells nothing: say who hosts the store, and which
        # address the other host reaches this one at.
        RDZV_CONF=f"is_host={int(idx == 0)},join_timeout=60", LOCAL_ADDR=hosts.ip(idx),
        CONFIG=str(CONFIG), OUTPUT_DIR=output_dir,
    )
    out = open(log, "w")  # noqa: SIM115 - closed by the child's exit
    return hosts.run(idx, [*(wrap or []), "bash", str(MULTI_NODE), *overrides], env=full,
                     stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 120) -> None:
    for proc in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            raise AssertionError("hosts did not finish in time:\n" + tails(logs)) from None
    for i, proc in enumerate(procs):
        assert proc.returncode == 0, f"host {i} exited with {proc.returncode}:\n" + tails(logs)


def tails(logs: list[Path]) -> str:
    return "\n".join(f"--- {p} ---\n{p.read_text(errors='replace')[-5000:]}" for p in logs if p.exists())


def wait_until(predicate, timeout: float, what: str, procs: list[subprocess.Popen], logs: list[Path]):
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            raise AssertionError(f"gave up waiting for {what}\n" + tails(logs))
        time.sleep(0.1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The digest of an uninterrupted run on 2 ranks (shared with test_launch_slurm.py)."""
    from tests.integration.test_launch_slurm import uninterrupted_digest

    return uninterrupted_digest(tmp_path_factory.mktemp("reference"))


# ----------------------------------------------------------------------------------- S3

def test_two_hosts_s3_then_one_host(two_hosts, s3_server, s3_bucket, tmp_path):
    endpoint = f"http://{two_hosts.server_ip}:{two_hosts.forward(s3_server.port)}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}
    output_dir = f"s3://{s3_bucket}/exp"
    run_id = "torchrun-s3pair"
    storage = f"checkpointer.storage.endpoint_url={endpoint}"
    client = s3_server.client()

    def keys(prefix: str) -> list[str]:
        res = client.list_objects_v2(Bucket=s3_bucket, Prefix=f"exp/{run_id}/train/{prefix}")
        return [o["Key"] for o in res.get("Contents", [])]

    def read_json(key: str) -> dict:
        return json.loads(client.get_object(Bucket=s3_bucket, Key=f"exp/{run_id}/train/{key}")["Body"].read())

    # 1. both hosts, one rank each; SIGUSR1 to the launcher of host 1 once a checkpoint exists
    logs = [tmp_path / "host0.log", tmp_path / "host1.log"]
    procs = [launch(two_hosts, i, nnodes=2, port=29400, rdzv_id="s3pair", output_dir=output_dir, log=logs[i],
                    overrides=["trainer.step_delay_s=0.15", storage], env=env) for i in (0, 1)]
    wait_until(lambda: keys("checkpoints/_commits/"), 120, "the first commit on S3", procs, logs)
    procs[1].send_signal(signal.SIGUSR1)  # multi_node.sh: `ip netns exec` execs it, same pid
    wait_all(procs, logs)
    first = read_json("summary.json")
    assert first["preempted"] and first["world_size"] == 2, first
    stop = first["checkpoint"]
    assert 4 <= int(re.search(r"_U(\d+)_", stop).group(1)) < TOTAL_UPDATES - 4, stop
    assert "[rank 1]" in logs[1].read_text() and "got SIGUSR1" in logs[1].read_text(), tails(logs)
    saved = read_json(f"checkpoints/_commits/{stop}.json")
    assert {f["name"] for a in saved["artifacts"] for f in a["files"]} >= {"__0_0.distcp", "__1_0.distcp"}

    # 2. host 0 alone (world size 1) continues the same run (same rdzv id -> same run id)
    log = tmp_path / "alone.log"
    proc = launch(two_hosts, 0, nnodes=1, port=29401, rdzv_id="s3pair", output_dir=output_dir, log=log,
                  overrides=[storage], env=env)
    wait_all([proc], [log])
    assert f"resumed from {run_id}/train at {stop}" in log.read_text(), tails([log])
    final = read_json("summary.json")
    assert final["finished"] and final["world_size"] == 1 and final["checkpoint"] == f"E3_U{TOTAL_UPDATES}_S768", final
    stop_update = int(re.search(r"_U(\d+)_", stop).group(1))
    commits = sorted((int(m.group(2)), m.group(1)) for k in keys("checkpoints/_commits/") if (m := _COMMIT.search(k)))
    assert [u for u, _ in commits if u > stop_update], commits
    for update, name in commits:  # saved by 2 ranks up to the stop, by 1 rank after it
        files = {f["name"] for a in read_json(f"checkpoints/_commits/{name}.json")["artifacts"] for f in a["files"]}
        shards = sorted(f for f in files if f.endswith(".distcp"))
        assert shards == (["__0_0.distcp", "__1_0.distcp"] if update <= stop_update else ["__0_0.distcp"]), (name, shards)


# ---------------------------------------------------------------------- node-local disks

def _node_local_supported() -> bool:
    from noether_dist.config import CheckpointerConfig

    return "node_local" in {f.name for f in dataclasses.fields(CheckpointerConfig)}


def test_two_hosts_node_local_disks(two_hosts, tmp_path, reference):
    if not _node_local_supported():
        pytest.skip("awaits the checkpointer flag node_local (CheckpointerConfig.node_local) in noether_dist")
    # The same path on both hosts, a different directory behind it on each: a private mount
    # namespace per host with its own bind mount ("its own local disk").
    disk, backing, wraps = own_disks(tmp_path)
    disk, backing = Path(disk), [Path(b) for b in backing]

    def own_disk(idx: int) -> list[str]:
        return wraps[idx]

    ckpt = Path("noether_runs") / "torchrun-nlpair" / "train" / "checkpoints"
    overrides = ["checkpointer.node_local=true"]

    # 1. both hosts, stop after 8 updates (checkpoints at U4 and U8)
    logs = [tmp_path / "host0.log", tmp_path / "host1.log"]
    procs = [launch(two_hosts, i, nnodes=2, port=29400, rdzv_id="nlpair", output_dir=str(disk / "noether_runs"),
                    log=logs[i], overrides=[*overrides, "trainer.stop_after_updates=8"], wrap=own_disk(i))
             for i in (0, 1)]
    wait_all(procs, logs)
    assert not any(disk.iterdir()), "the bind mounts leaked into the root namespace"
    for host in (0, 1):
        commits = backing[host] / ckpt / "_commits"
        assert sorted(os.listdir(commits)) == ["E0_U4_S128.json", "E1_U8_S256.json"], (host, tails(logs))
        assert json.loads((backing[host] / ckpt / "_aliases" / "latest.json").read_text())["checkpoint"] == "E1_U8_S256"
    model = "mlp_cp=E1_U8_S256_model.th"
    assert sorted(os.listdir(backing[0] / ckpt / model)) == [".metadata", "__0_0.distcp"]  # rank 1's shard: host 1
    assert sorted(os.listdir(backing[1] / ckpt / model)) == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # + mirror

    # 2. both hosts again, same placement: each resumes from its own disk and finishes
    logs = [tmp_path / "host0_resume.log", tmp_path / "host1_resume.log"]
    procs = [launch(two_hosts, i, nnodes=2, port=29401, rdzv_id="nlpair", output_dir=str(disk / "noether_runs"),
                    log=logs[i], overrides=overrides, wrap=own_disk(i)) for i in (0, 1)]
    wait_all(procs, logs)
    assert "resumed from torchrun-nlpair/train at E1_U8_S256" in logs[0].read_text(), tails(logs)
    assert "resumed from torchrun-nlpair/train at E1_U8_S256" in logs[1].read_text(), tails(logs)
    summary = json.loads((backing[0] / ckpt.parent / "summary.json").read_text())
    assert summary["finished"] and summary["world_size"] == 2, summary
    assert summary["digest"] == reference
    last = f"E3_U{TOTAL_UPDATES}_S768.json"
    assert last in os.listdir(backing[1] / ckpt / "_commits"), "host 1 must have the commit records too"
