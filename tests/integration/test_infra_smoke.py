"""Smoke tests for the test infrastructure in tests/support/slurm_cluster.py and tests/support/netns_hosts.py.

They need root plus the packages from ``.ci/install_system.sh``; otherwise
they are skipped with the reason reported by ``slurm_available()`` /
``netns_available()``.
"""

from __future__ import annotations

import functools
import http.server
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


logger = logging.getLogger(__name__)


def _script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body).lstrip())
    path.chmod(0o755)
    return path


def _wait_for_file(path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what} ({path})")
        time.sleep(0.1)


# --------------------------------------------------------------------- Slurm



def test_sbatch_simple_job(cluster, tmp_path):
    result = tmp_path / "result.txt"
    script = _script(
        tmp_path / "job.sh",
        f"""
        echo "job $SLURM_JOB_ID on $SLURMD_NODENAME python=$(command -v python3)" > {result}
        """,
    )
    job = cluster.sbatch(["-o", str(tmp_path / "out.txt")], script)
    assert cluster.wait_job(job, timeout=30) == "COMPLETED"
    text = result.read_text()
    assert f"job {job} on localhost" in text
    # The submitter's PATH is exported into the job.
    assert "python=/" in text


def test_array_job_runs_in_order(cluster, tmp_path):
    order = tmp_path / "order.txt"
    script = _script(
        tmp_path / "array.sh",
        f"""
        echo "$SLURM_ARRAY_TASK_ID" >> {order}
        """,
    )
    job = cluster.sbatch(
        ["--array=0-2%1", "-o", str(tmp_path / "out_%A_%a.txt")], script
    )
    assert cluster.wait_job(job, timeout=45) == "COMPLETED"
    assert order.read_text().split() == ["0", "1", "2"]
    assert cluster.array_task_states(job) == {0: "COMPLETED", 1: "COMPLETED", 2: "COMPLETED"}


def test_job_requeues_itself_once(cluster, tmp_path):
    marker = tmp_path / "requeued.marker"
    log = tmp_path / "runs.txt"
    script = _script(
        tmp_path / "requeue.sh",
        f"""
        echo "start restart_count=${{SLURM_RESTART_COUNT:-0}} t=$(date +%s.%N)" >> {log}
        if [ ! -e {marker} ]; then
            date +%s.%N > {marker}
            scontrol requeue "$SLURM_JOB_ID"
            sleep 60  # killed by the requeue
            exit 3
        fi
        echo "done" >> {log}
        """,
    )
    job = cluster.sbatch(["-o", str(tmp_path / "out.txt"), "--open-mode=append"], script)
    assert cluster.wait_job(job, timeout=60) == "COMPLETED"
    lines = log.read_text().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("start restart_count=0")
    assert lines[1].startswith("start restart_count=1")
    assert lines[2] == "done"
    requeued_at = float(marker.read_text())
    restarted_at = float(lines[1].rsplit("t=", 1)[1])
    logger.info("requeued job restarted %.1f s after `scontrol requeue`", restarted_at - requeued_at)
    assert cluster.job_info(job)["Restarts"] == "1"


def test_srun_four_tasks(cluster, tmp_path):
    script = _script(
        tmp_path / "srun.sh",
        """
        srun -n 4 bash -c 'echo "procid=$SLURM_PROCID ntasks=$SLURM_NTASKS"'
        """,
    )
    out = tmp_path / "out.txt"
    job = cluster.sbatch(["-n", "4", "-o", str(out)], script)
    assert cluster.wait_job(job, timeout=30) == "COMPLETED"
    procids = sorted(int(m) for m in re.findall(r"procid=(\d+) ntasks=4", out.read_text()))
    assert procids == [0, 1, 2, 3], out.read_text()


@pytest.mark.parametrize("flag", ["--batch", "--full"])
def test_usr1_reaches_batch_script(cluster, tmp_path, flag):
    ready = tmp_path / "ready"
    got = tmp_path / "got_usr1"
    script = _script(
        tmp_path / "trap.sh",
        f"""
        trap 'echo "USR1 received" > {got}; exit 0' USR1
        touch {ready}
        for i in $(seq 600); do
            sleep 0.1 & wait $!   # `wait` returns early when a trapped signal arrives
        done
        exit 4
        """,
    )
    job = cluster.sbatch(["-o", str(tmp_path / "out.txt")], script)
    _wait_for_file(ready, 30, "the batch script to start")
    cluster.scancel(job, "--signal=USR1", flag)
    assert cluster.wait_job(job, timeout=30) == "COMPLETED"
    assert got.read_text().strip() == "USR1 received"


# -------------------------------------------------------------------- netns



def test_netns_http_between_hosts(two_hosts, tmp_path):
    (tmp_path / "hello.txt").write_text("hello from ns a\n")
    server = two_hosts.run(
        0,
        [sys.executable, "-m", "http.server", "--bind", two_hosts.server_ip,
         "--directory", str(tmp_path), "8000"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    client_code = textwrap.dedent(
        f"""
        import sys, time, urllib.request
        url = "http://{two_hosts.server_ip}:8000/hello.txt"
        for _ in range(100):
            try:
                sys.stdout.write(urllib.request.urlopen(url, timeout=5).read().decode())
                break
            except OSError:
                time.sleep(0.1)
        else:
            sys.exit("server not reachable")
        """
    )
    res = two_hosts.run_sync(1, [sys.executable, "-c", client_code], timeout=30)
    assert res.returncode == 0, res.stderr
    assert res.stdout == "hello from ns a\n"
    assert server.poll() is None


def test_netns_forward_reaches_root_loopback_server(two_hosts, tmp_path):
    (tmp_path / "hello.txt").write_text("hello from the root namespace\n")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        port = two_hosts.forward(server.server_address[1])
        url = f"http://{two_hosts.server_ip}:{port}/hello.txt"
        code = (
            "import urllib.request; "
            f"print(urllib.request.urlopen({url!r}, timeout=10).read().decode(), end='')"
        )
        for idx in (0, 1):
            res = two_hosts.run_sync(idx, [sys.executable, "-c", code], timeout=30)
            assert res.returncode == 0, res.stderr
            assert res.stdout == "hello from the root namespace\n"
    finally:
        server.shutdown()
        server.server_close()


_ALLREDUCE_SCRIPT = """
import os
import torch
import torch.distributed as dist

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
t = torch.tensor([float(rank + 1)])
dist.all_reduce(t)
assert world == 2, world
assert t.item() == 3.0, t.item()
print(f"ALLREDUCE_OK rank={rank} value={t.item()}", flush=True)
dist.destroy_process_group()
"""


def test_torchrun_gloo_across_namespaces(two_hosts, tmp_path):
    pytest.importorskip("torch")
    script = tmp_path / "allreduce.py"
    script.write_text(_ALLREDUCE_SCRIPT)
    # Any port works: namespace a is fresh, nothing else listens there.
    port = 29400
    procs = []
    for idx, is_host in ((0, 1), (1, 0)):
        env = dict(os.environ)
        env.update(
            OMP_NUM_THREADS="1",
            GLOO_SOCKET_IFNAME=two_hosts.ifname(idx),
            PYTHONUNBUFFERED="1",
            TMPDIR=str(tmp_path),  # torchrun's torchelastic_* log dirs
        )
        cmd = [
            sys.executable, "-m", "torch.distributed.run",
            "--nnodes", "2", "--nproc-per-node", "1",
            "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"{two_hosts.server_ip}:{port}",
            "--rdzv-id", "smoke",
            "--rdzv-conf", f"is_host={is_host},join_timeout=60",
            # Without --local-addr the agents advertise the hostname, which
            # resolves to 127.0.0.1 and is unreachable from the other netns.
            "--local-addr", two_hosts.ip(idx),
            "--max-restarts", "0",
            str(script),
        ]
        procs.append(
            two_hosts.run(idx, cmd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
        )
    outputs = []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
        outputs.append(out)
    for idx, (proc, out) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"host {idx} torchrun failed:\n{out}"
    joined = "\n".join(outputs)
    assert "ALLREDUCE_OK rank=0 value=3.0" in joined, joined
    assert "ALLREDUCE_OK rank=1 value=3.0" in joined, joined
