"""Two tiers: the reference trainer on 2 real ranks, each rank its own "node" with its own
local-tier folder, the durable tier on the S3 test server (optionally behind the fault proxy).

Every case kills or breaks something and then runs the job to its end; the final digest of
model, optimizer and EMA state is compared with an uninterrupted run of the same config.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import threading
import time

import pytest

from tests.support.ranks import run_ranks

RUN, STAGE = "tiers", "train"
CK = f"{RUN}/{STAGE}/checkpoints"


def config(bucket: str, endpoint: str, prefix: str, **durable) -> dict:
    """16 updates; local tier every 2 updates, durable every 4."""
    return {
        "output_dir": f"s3://{bucket}/{prefix}", "run_id": RUN, "stage_name": STAGE, "auto_resume": True,
        "model": {"name": "mlp", "dim_in": 16, "hidden": 32, "dim_out": 4},
        "trainer": {"epochs": 2, "batch_size": 32, "dataset_size": 256, "test_size": 64, "eval_every": 4,
                    "log_every": 100, "warmup_updates": 3, "step_delay_s": 0.05},
        "checkpointer": {"timeout_s": 60, "storage": {"endpoint_url": endpoint},
                         "tiers": {"local": {"dir": "set per rank", "every_updates": 2, "keep_last": 3},
                                   "durable": {"every_updates": 4, "timeout_s": 60, **durable}}},
    }


def _storage(url: str):
    from noether_dist.io.storage import StorageOptions, open_storage

    options = StorageOptions(endpoint_url=os.environ.get("ND_TEST_ENDPOINT")) if url.startswith("s3://") else None
    return open_storage(url, options)


def _kill_when(paths: list[str], marker: str) -> None:
    # Local files are polled every 20 ms (a save every 2 updates of 50 ms must not slip by);
    # a file on S3 every 100 ms: each poll is a request the server on these same cores
    # answers, and the durable uploads these tests wait for take seconds.
    storages = [(path, _storage(path)) for path in paths]
    while missing := next((path for path, storage in storages if not storage.exists(path)), None):
        time.sleep(0.1 if missing.startswith("s3://") else 0.02)
    with open(marker, "w"):
        pass  # tells the test that this kill came from here (and not from a timeout)
    os.kill(os.getpid(), signal.SIGKILL)


def train(rank: int, world_size: int, cfg: dict, local_dirs: list[str], kill_when: list[str] | None) -> dict:
    """One rank of the trainer; with ``kill_when`` it SIGKILLs itself once all those paths
    exist (a rank that fails first, because its peer died, waits for its own SIGKILL)."""
    os.environ.update(LOCAL_RANK="0", GROUP_RANK=str(rank))  # every rank is alone on its "node"
    cfg = copy.deepcopy(cfg)
    cfg["checkpointer"]["tiers"]["local"]["dir"] = local_dirs[rank]
    os.environ["ND_TEST_ENDPOINT"] = cfg["checkpointer"]["storage"]["endpoint_url"]
    if kill_when:
        threading.Thread(target=_kill_when, args=(kill_when, f"{local_dirs[rank]}.killed"), daemon=True).start()
    from noether_dist.trainer.run import TrainConfig, run

    try:
        return run(TrainConfig.from_dict(cfg))
    except BaseException:
        if kill_when:
            time.sleep(60)
        raise


def run_job(cfg: dict, local_dirs: list[str], kill_when: list[str] | None = None) -> list:
    if kill_when:
        out = run_ranks(train, 2, cfg, local_dirs, kill_when, expect_dead={0, 1}, raise_on_error=False,
                        timeout_s=300)
        assert out == [None, None], f"every rank must die by SIGKILL: {out}"
        for d in local_dirs:
            assert os.path.exists(f"{d}.killed"), "a rank hung and was killed by the timeout, not by the test"
            os.remove(f"{d}.killed")
        return out
    return run_ranks(train, 2, cfg, local_dirs, None, timeout_s=300)


def durable_commits(s3_server, bucket: str, prefix: str) -> list[str]:
    client = s3_server.client()
    res = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{CK}/_commits/")
    return sorted(o["Key"].rsplit("/", 1)[-1][: -len(".json")] for o in res.get("Contents", []))


def durable_keys(s3_server, bucket: str, prefix: str, contains: str) -> list[str]:
    client = s3_server.client()
    res = client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{CK}/")
    return [o["Key"] for o in res.get("Contents", []) if contains in o["Key"]]


@pytest.fixture(scope="module")
def reference(s3_server, tmp_path_factory):
    """(bucket, endpoint, digest of the uninterrupted run); every test uses its own prefix."""
    import uuid

    bucket = f"nd-tiers-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    tmp = tmp_path_factory.mktemp("tiers-reference")
    with pytest.MonkeyPatch.context() as mp:
        for key, value in s3_server.env.items():
            mp.setenv(key, value)
        ref = run_job(config(bucket, s3_server.endpoint_url, "reference"), [str(tmp / f"node{r}") for r in (0, 1)])
    assert ref[0]["finished"] and ref[0]["digest"] == ref[1]["digest"]
    assert durable_commits(s3_server, bucket, "reference") == [
        "E0_U4_S128", "E1_U12_S384", "E1_U8_S256", "E2_U16_S512"]
    return bucket, s3_server.endpoint_url, ref[0]["digest"]


@pytest.fixture
def setup(reference, s3_env, tmp_path):
    """(bucket, endpoint, local dirs per tag, reference digest)."""
    bucket, endpoint, digest = reference

    def local_dirs(tag: str) -> list[str]:
        return [str(tmp_path / tag / f"node{r}") for r in (0, 1)]

    return bucket, endpoint, local_dirs, digest


def local_commit(local_dir: str, point: str) -> str:
    return f"{local_dir}/{CK}/_commits/{point}.json"


@pytest.mark.slow
def test_kill_all_ranks_resumes_from_local_tier_then_both_local_copies_gone_resumes_from_durable(
        setup, s3_server):
    s3_bucket, endpoint, local_dirs, reference = setup
    dirs = local_dirs("job")
    cfg = config(s3_bucket, endpoint, "job")
    durable_u4 = f"s3://{s3_bucket}/job/{CK}/_commits/E0_U4_S128.json"
    # 1. SIGKILL of every rank once both local disks hold U6 (and the durable tier U4)
    run_job(cfg, dirs, kill_when=[local_commit(d, "E0_U6_S192") for d in dirs] + [durable_u4])
    # 2. the job again: resumes from the local tier, runs to U10 and every rank is killed
    #    again once U10 is local and U8 durable
    durable_u8 = f"s3://{s3_bucket}/job/{CK}/_commits/E1_U8_S256.json"
    run_job(cfg, dirs, kill_when=[local_commit(d, "E1_U10_S320") for d in dirs] + [durable_u8])
    assert "E1_U10_S320" not in durable_commits(s3_server, s3_bucket, "job")
    # 3. both nodes replaced: the local folders are gone; the job resumes from the durable tier
    for d in dirs:
        shutil.rmtree(d)
    out = run_job(cfg, dirs)
    for summary in out:
        assert summary["finished"] and summary["digest"] == reference, summary
        assert summary["resumed"]["tier"] == "durable" and summary["resumed"]["checkpoint"] in (
            "E1_U8_S256", "E1_U12_S384"), summary["resumed"]
        assert summary["upload_errors"] == []


@pytest.mark.slow
def test_kill_all_ranks_resumes_from_local_tier(setup, s3_server):
    s3_bucket, endpoint, local_dirs, reference = setup
    dirs = local_dirs("local")
    cfg = config(s3_bucket, endpoint, "local")
    durable_u4 = f"s3://{s3_bucket}/local/{CK}/_commits/E0_U4_S128.json"
    run_job(cfg, dirs, kill_when=[local_commit(d, "E0_U6_S192") for d in dirs] + [durable_u4])
    out = run_job(cfg, dirs)
    for summary in out:
        assert summary["finished"] and summary["digest"] == reference, summary
        # U6 (or U8, when the kill came late) exists only on the local tier: it was newer
        assert summary["resumed"]["tier"] == "local" and summary["resumed"]["checkpoint"] in (
            "E0_U6_S192", "E1_U8_S256"), summary["resumed"]
    assert durable_commits(s3_server, s3_bucket, "local") == durable_commits(s3_server, s3_bucket, "reference")


@pytest.mark.slow
def test_store_failing_during_an_upload(setup, s3_server):
    from tests.support.fault_proxy import FaultProxy

    s3_bucket, endpoint, local_dirs, reference = setup
    dirs = local_dirs("faulty")
    with FaultProxy(endpoint, seed=0) as proxy:
        # every PUT of point U4's files is refused (403: permanent, nobody retries it)
        proxy.set_faults(kinds=("forbidden",), methods=("PUT",), path_contains="_U4_S", permanent=True)
        cfg = config(s3_bucket, proxy.endpoint_url, "faulty")
        cfg["checkpointer"]["tiers"]["local"]["keep_last"] = 20
        out = run_job(cfg, dirs)
        assert proxy.stats["faults"] >= 1
    for summary in out:  # raised on every rank, at the next save; training went on
        assert summary["finished"] and summary["digest"] == reference, summary
        assert len(summary["upload_errors"]) == 1 and "E0_U4_S128" in summary["upload_errors"][0], summary
    assert durable_commits(s3_server, s3_bucket, "faulty") == ["E1_U12_S384", "E1_U8_S256", "E2_U16_S512"]
    # the local tier stayed valid: U4 is committed on both local disks, and the two disks
    # together hold every file of it intact (each node has its own shards and rank 0's)
    from noether_dist.tools.cli import main as cli

    merged = os.path.join(os.path.dirname(dirs[0]), "merged")
    for d in dirs:
        assert os.path.exists(local_commit(d, "E0_U4_S128"))
        shutil.copytree(d, merged, dirs_exist_ok=True)
    assert cli(["verify", f"{merged}/{RUN}/{STAGE}", "--checkpoint", "E0_U4_S128", "--no-progress"]) == 0


@pytest.mark.slow
def test_kill_during_an_upload(setup, s3_server, capsys):
    s3_bucket, endpoint, local_dirs, reference = setup
    dirs = local_dirs("killed")
    # slow uploads (20 kB/s per rank): U8's upload takes a second or two; the ranks die once
    # its first file is in the store
    keep = {"keep_last": 10}
    cfg = config(s3_bucket, endpoint, "killed", bandwidth_mb_s=0.02, retention=keep)
    first_file = f"s3://{s3_bucket}/killed/{CK}/mlp_cp=E1_U8_S256_model.th/.metadata"
    run_job(cfg, dirs, kill_when=[first_file])
    assert "E1_U8_S256" not in durable_commits(s3_server, s3_bucket, "killed")
    assert durable_keys(s3_server, s3_bucket, "killed", "E1_U8_S256")  # a partial upload is left
    # resumed at full upload speed: only the killed upload had to be slow
    out = run_job(config(s3_bucket, endpoint, "killed", retention=keep), dirs)
    for summary in out:
        assert summary["finished"] and summary["digest"] == reference, summary
        assert summary["resumed"]["tier"] == "local", summary["resumed"]
    # the next durable saves uploaded in full; the killed upload's leftovers went with retention
    assert durable_commits(s3_server, s3_bucket, "killed") == ["E0_U4_S128", "E1_U12_S384", "E2_U16_S512"]
    assert not durable_keys(s3_server, s3_bucket, "killed", "E1_U8_S256")
    from noether_dist.tools.cli import main as cli

    durable = f"s3://{s3_bucket}/killed/{RUN}/{STAGE}"
    for d in dirs:  # both tiers, as each node sees them
        assert cli(["verify", durable, "--endpoint-url", endpoint, "--local-dir", f"{d}/{RUN}/{STAGE}",
                    "--no-progress"]) == 0
    capsys.readouterr()
    assert cli(["list", durable, "--endpoint-url", endpoint, "--local-dir", f"{dirs[1]}/{RUN}/{STAGE}"]) == 0
    shown = capsys.readouterr().out
    durable_part, local_part = shown.split("== local tier")
    assert "== durable tier" in durable_part and "E1_U8_S256" not in durable_part and "E1_U14_S448" not in durable_part
    assert "E1_U14_S448" in local_part and "E2_U16_S512" in local_part, shown


# --------------------------------------------------------------------------- peer copy

@pytest.mark.slow
@pytest.mark.parametrize("mode", ["off", "thread", "process"])
def test_one_node_replaced_resumes_from_its_peer_copy(setup, s3_server, mode):
    """replicate: peer: node 1's local folder is gone (node replaced); the local tier still
    serves the newest point (node 0 keeps node 1's copy), newer than the durable one. With
    asynchronous saves too: the copy is made in the background before the local commit."""
    s3_bucket, endpoint, local_dirs, reference = setup
    dirs = local_dirs(f"peer-{mode}")
    cfg = config(s3_bucket, endpoint, f"peer-{mode}")
    cfg["checkpointer"]["tiers"]["local"]["replicate"] = "peer"
    cfg["checkpointer"]["async_mode"] = mode
    first = copy.deepcopy(cfg)
    first["trainer"]["stop_after_updates"] = 6  # local tier: U2, U4, U6; durable: U4
    assert run_job(first, dirs)[0]["stopped"]
    assert os.path.exists(f"{dirs[0]}/{CK}/_peer/node1/mlp_cp=E0_U6_S192_model.th/__1_0.distcp")
    assert durable_commits(s3_server, s3_bucket, f"peer-{mode}") == ["E0_U4_S128"]
    shutil.rmtree(dirs[1])
    out = run_job(cfg, dirs)
    assert [r["resumed"] for r in out] == [{"checkpoint": "E0_U6_S192", "tier": "local"}] * 2, out
    assert out[0]["finished"] and out[0]["digest"] == reference


# ------------------------------------------------------------------ two network-namespace hosts

@pytest.mark.slow
def test_two_hosts_sigkill_resumes_from_local_disks(two_hosts, s3_server, s3_env, tmp_path):
    """torchrun across two namespace "hosts", each with its own local disk (a private bind
    mount at the same path), the durable tier on S3: SIGKILL of every process on both hosts
    once U12 is on both local disks, then the job again resumes from the local tier and ends
    with the digest of an uninterrupted run."""
    import uuid
    from pathlib import Path

    from tests.integration.test_launch_slurm import uninterrupted_digest
    from tests.support.netns_hosts import own_disks
    from tests.integration.test_launch_two_hosts import launch, wait_all, wait_until

    (tmp_path / "reference").mkdir()
    reference = uninterrupted_digest(tmp_path / "reference")
    bucket = f"nd-tiers2h-{uuid.uuid4().hex[:8]}"
    s3_server.create_bucket(bucket)
    endpoint = f"http://{two_hosts.server_ip}:{two_hosts.forward(s3_server.port)}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL_S3": endpoint}
    disk, backing, wraps = own_disks(tmp_path)
    backing = [Path(b) for b in backing]

    tiers = "{local: {dir: %s, every_updates: 4, keep_last: 2}, durable: {every_updates: 8}}" % disk
    overrides = [f"checkpointer.storage.endpoint_url={endpoint}", f"checkpointer.tiers={tiers}"]
    ck = Path("torchrun-tiers2h") / "train" / "checkpoints"
    client = s3_server.client()

    def durable(point: str) -> bool:
        res = client.list_objects_v2(Bucket=bucket, Prefix=f"exp/{ck}/_commits/{point}.json")
        return bool(res.get("Contents"))

    logs = [tmp_path / "host0.log", tmp_path / "host1.log"]
    procs = [launch(two_hosts, i, nnodes=2, port=29400, rdzv_id="tiers2h", output_dir=f"s3://{bucket}/exp",
                    log=logs[i], overrides=[*overrides, "trainer.step_delay_s=0.15"], env=env, wrap=wraps[i])
             for i in (0, 1)]
    wait_until(lambda: all((b / ck / "_commits" / "E1_U12_S384.json").exists() for b in backing)
               and durable("E1_U8_S256"), 180, "U12 on both local disks and U8 on S3", procs, logs)
    for idx in (0, 1):  # every process of both hosts, at once
        two_hosts._kill_ns_processes(two_hosts.ns_name(idx))
    for p in procs:
        p.wait(timeout=30)
    logs = [tmp_path / "host0_resume.log", tmp_path / "host1_resume.log"]
    procs = [launch(two_hosts, i, nnodes=2, port=29401, rdzv_id="tiers2h", output_dir=f"s3://{bucket}/exp",
                    log=logs[i], overrides=overrides, env=env, wrap=wraps[i]) for i in (0, 1)]
    wait_all(procs, logs, timeout=240)
    for log in logs:
        assert "(local tier)" in log.read_text(), log.read_text()[-3000:]
    summary = json.loads(client.get_object(Bucket=bucket, Key=f"exp/{ck.parent}/summary.json")["Body"].read())
    assert summary["finished"] and summary["world_size"] == 2, summary
    from noether_dist.format.names import TrainingIteration

    assert summary["resumed"]["tier"] == "local", summary
    assert TrainingIteration.parse(summary["resumed"]["checkpoint"]).update >= 12, summary
    assert summary["digest"] == reference


def _upload_process_killed(rank: int, world_size: int, bucket: str, endpoint: str, local_dirs: list[str]) -> dict:
    """Rank 0's upload process is SIGKILLed during U1's (slow) upload; then U2 is uploaded."""
    import signal as sig

    from noether_dist import Checkpointer, CheckpointerConfig, TrainingIteration
    from noether_dist.errors import UploadError
    from tests.support.models import build

    os.environ.update(LOCAL_RANK="0", GROUP_RANK=str(rank))  # every rank is alone on its "node"
    model, _, _ = build()
    cfg = CheckpointerConfig.from_dict({
        "output_dir": f"s3://{bucket}/killed-process", "run_id": "r", "model_name": "mlp", "timeout_s": 60,
        "storage": {"endpoint_url": endpoint},
        "tiers": {"local": {"dir": local_dirs[rank], "every_updates": 1, "keep_last": 5},
                  "durable": {"every_updates": 1, "bandwidth_mb_s": 0.005, "timeout_s": 60}}})
    out: dict = {}
    with Checkpointer(cfg) as ck:
        first_pid = ck.durable.process.pid
        ck.save(TrainingIteration(0, 1, 1), model=model)  # local, then the upload starts (5 kB/s per rank: seconds)
        if rank == 0:  # once the first file is in the store, the upload is under way: kill its process
            first = f"s3://{bucket}/killed-process/r/checkpoints/mlp_cp=E0_U1_S1_model.th/.metadata"
            store, deadline = _storage(first), time.monotonic() + 30
            while not store.exists(first) and time.monotonic() < deadline:
                time.sleep(0.02)
            out["killed_while_busy"] = ck.durable.busy
            os.kill(first_pid, sig.SIGKILL)
        try:
            ck.wait()
        except UploadError as exc:
            out["error"] = str(exc)
        out["local_u1"] = os.path.exists(f"{local_dirs[rank]}/r/checkpoints/_commits/E0_U1_S1.json")
        ck.save(TrainingIteration(0, 2, 2), model=model)  # a new upload process uploads U2
        ck.wait()
        out["new_process"] = ck.durable.process.pid != first_pid
    return out


@pytest.mark.slow
def test_upload_process_killed_mid_upload_fails_on_every_rank_then_the_next_upload_succeeds(
        s3_server, s3_bucket, tmp_path):
    dirs = [str(tmp_path / f"node{r}") for r in (0, 1)]
    out = run_ranks(_upload_process_killed, 2, s3_bucket, s3_server.endpoint_url, dirs, timeout_s=180,
                    env={"ND_TEST_ENDPOINT": s3_server.endpoint_url})
    assert out[0]["killed_while_busy"], out
    for rank, res in enumerate(out):  # raised on every rank; the local copy stays
        assert "the upload process" in res["error"] and "died during the upload" in res["error"], res
        assert res["local_u1"], res
    assert out[0]["new_process"] and not out[1]["new_process"], out
    res = s3_server.client().list_objects_v2(Bucket=s3_bucket, Prefix="killed-process/r/checkpoints/_commits/")
    assert [o["Key"].rsplit("/", 1)[-1] for o in res.get("Contents", [])] == ["E0_U2_S2.json"]
