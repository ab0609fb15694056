"""Save and resume through s3:// against a real S3 server over HTTP on 127.0.0.1."""

from __future__ import annotations

import json

import pytest

from noether_dist import Checkpointer, CheckpointerConfig, StorageError, StorageOptions, TrainingIteration
from noether_dist.tools.cli import main as cli_main
from noether_dist.io.storage import open_storage
from noether_dist.stage.commit import list_commits
from noether_dist.stage.retention import RetentionPolicy, plan_prune
from tests.support.ranks import run_ranks
from tests.support.models import EMA_INFO, assert_states_equal, build, train_steps
from tests.dist.test_dist_fsdp import resume_job, save_job
from tests.unit.test_retention import _run as _retention_run

pytestmark = pytest.mark.slow


# Not torch_compat (the slowest test there): resharding runs on torch 2.11 in test_dist_fsdp,
# DCP on S3 in the one-process tests below.
def test_fsdp_save_on_4_resume_on_2_and_3_over_s3(s3_bucket, s3_env):
    out = f"s3://{s3_bucket}/experiments"
    saved = run_ranks(save_job, 4, out, 2, env=s3_env)[0]
    st = open_storage(out)
    names = sorted(e.name for e in st.list(f"{out}/run1/train/checkpoints"))
    assert names == sorted(["_aliases", "_commits", f"mlp_{EMA_INFO}_cp=E0_U2_S64_model.th",
                            "mlp_cp=E0_U2_S64_model.th", "mlp_cp=E0_U2_S64_optim.th", "mlp_cp=E0_U2_S64_trainer.th"])
    for world_size in (2, 3):
        for rank, state in enumerate(run_ranks(resume_job, world_size, out, env=s3_env)):
            meta = state.pop("meta")
            assert meta["cp"] == "E0_U2_S64" and meta["rank_state"] == {"rank": rank}
            assert_states_equal(saved, state)


@pytest.mark.torch_compat
def test_missing_bucket_is_an_error_and_is_not_created(s3_server, s3_env):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' .* does not exist; create it first"):
        Checkpointer(CheckpointerConfig(output_dir="s3://no-such-bucket/x", run_id="r"))
    st = open_storage("s3://probe")
    assert "no-such-bucket" not in [e.name for e in st.list("s3://")]


@pytest.mark.torch_compat
def test_storage_options_from_config_without_env(s3_server, s3_bucket, monkeypatch):
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var)
    opts = StorageOptions(endpoint_url=s3_server.endpoint_url)
    model, opt, ema = build(sharded=False)
    train_steps(model, opt, ema, 1, 0)
    ck = Checkpointer(CheckpointerConfig(output_dir=f"s3://{s3_bucket}/o", run_id="r", model_name="m", storage=opts))
    result = ck.save(TrainingIteration(0, 1, 8), model=model, optimizer=opt)
    assert result.record.total_bytes > 0
    st = open_storage(f"s3://{s3_bucket}", opts)
    assert json.loads(st.read(f"s3://{s3_bucket}/o/r/checkpoints/_aliases/latest.json"))["checkpoint"] == "E0_U1_S8"


@pytest.mark.torch_compat
def test_cli_list_on_s3(s3_bucket, s3_env, capsys):
    model, opt, ema = build(sharded=False)
    ck = Checkpointer(CheckpointerConfig(output_dir=f"s3://{s3_bucket}/o", run_id="r", stage_name="s", model_name="m"))
    ck.save(TrainingIteration(0, 1, 8), model=model, optimizer=opt, ema={EMA_INFO: ema})
    assert cli_main(["list", "--json", f"s3://{s3_bucket}/o"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing[0]["run_id"] == "r" and listing[0]["stage_name"] == "s"
    assert listing[0]["checkpoints"][0]["checkpoint"] == "E0_U1_S8" and listing[0]["checkpoints"][0]["committed"]
    assert listing[0]["checkpoints"][0]["aliases"] == ["latest"]


@pytest.mark.torch_compat
def test_s3_storage_primitives(s3_bucket, s3_env):
    st = open_storage(f"s3://{s3_bucket}")
    path = f"s3://{s3_bucket}/a/commit.json"
    st.write_once(path, b"one")
    with pytest.raises(FileExistsError):
        st.write_once(path, b"two")
    assert st.read(path) == b"one" and st.exists(path) and not st.exists(f"s3://{s3_bucket}/a/none")
    other = open_storage(f"s3://{s3_bucket}", StorageOptions(extra={"skip_instance_cache": True}))  # a 2nd client
    assert [e.name for e in other.list(f"s3://{s3_bucket}/a")] == ["commit.json"]
    st.replace(f"s3://{s3_bucket}/a/second", b"x")
    assert [e.name for e in other.list(f"s3://{s3_bucket}/a")] == ["commit.json", "second"]
    st.remove(f"s3://{s3_bucket}/a", recursive=True)
    assert other.list(f"s3://{s3_bucket}/a") == []


@pytest.mark.torch_compat
def test_big_files_go_up_in_parts_with_checksums_and_load_back(s3_bucket, s3_env, monkeypatch):
    import zlib

    import torch

    from noether_dist.io import dcp_io, s3store

    monkeypatch.setattr(s3store, "MULTIPART_MIN_BYTES", 6 << 20)
    monkeypatch.setattr(s3store, "_PART_BYTES", 5 << 20)  # S3's smallest part
    st = open_storage(f"s3://{s3_bucket}")
    torch.manual_seed(0)
    state = {"big": torch.randn(3 << 20), "small": torch.randn(100)}  # 12 MiB and 400 bytes
    path = f"s3://{s3_bucket}/ck/m_cp=E0_U1_S1_model.th"
    records = dcp_io.save_state(state, path, st, thread_count=1)
    big = max(records, key=lambda r: r.size)
    assert big.size > 12 << 20
    stored = st.read(f"{path}/{big.name}")
    assert len(stored) == big.size and zlib.crc32(stored) == big.crc32
    # one object made of 3 parts (5 + 5 + 2 MiB): S3 reports the part count in the ETag;
    # the store keeps the full-object CRC32 that the commit record holds
    assert st.fs.info(f"{path}/{big.name}")["ETag"].strip('"').endswith("-3")
    assert st.stored_checksum(f"{path}/{big.name}") == (big.size, big.crc32)
    target = {"big": torch.zeros(3 << 20), "small": torch.zeros(100)}
    dcp_io.load_state(target, path, st)
    assert torch.equal(target["big"], state["big"]) and torch.equal(target["small"], state["small"])


@pytest.mark.torch_compat
def test_each_object_carries_the_crc32_of_the_commit_record(s3_bucket, s3_env):
    """The CRC32 recorded for a file travels with its PUT (S3 checks it on arrival, and
    botocore need not compute its own): the store keeps the same value."""
    import torch

    from noether_dist.io import dcp_io

    st = open_storage(f"s3://{s3_bucket}")
    path = f"s3://{s3_bucket}/ck/m_cp=E0_U1_S1_model.th"
    records = dcp_io.save_state({"w": torch.arange(1000.0)}, path, st)
    assert {r.name for r in records} == {".metadata", "__0_0.distcp"}  # one data file for a small state
    for record in records:
        assert st.stored_checksum(f"{path}/{record.name}") == (record.size, record.crc32)


@pytest.mark.torch_compat
def test_save_and_load_with_upload_checksums_off(s3_bucket, s3_env):
    import torch

    from noether_dist.io import dcp_io

    st = open_storage(f"s3://{s3_bucket}", StorageOptions(checksum=None))  # for stores that reject them
    path = f"s3://{s3_bucket}/ck/m_cp=E0_U1_S1_model.th"
    state = {"w": torch.arange(1000.0)}
    records = dcp_io.save_state(state, path, st)
    assert all(st.stored_checksum(f"{path}/{r.name}")[0] == r.size for r in records)
    target = {"w": torch.zeros(1000)}
    dcp_io.load_state(target, path, st)
    assert torch.equal(target["w"], state["w"])


@pytest.mark.torch_compat
def test_streamed_write_uploads_parts_while_writing_and_an_aborted_one_leaves_nothing(s3_bucket, s3_env, monkeypatch):
    import os
    import zlib

    from noether_dist.io import s3store

    monkeypatch.setattr(s3store, "MULTIPART_MIN_BYTES", 6 << 20)
    monkeypatch.setattr(s3store, "_PART_BYTES", 5 << 20)  # S3's smallest part
    st = open_storage(f"s3://{s3_bucket}")
    data = os.urandom(13 << 20)
    path = f"s3://{s3_bucket}/x/big"

    def uploads() -> list:
        return st.fs.call_s3("list_multipart_uploads", Bucket=s3_bucket).get("Uploads", [])

    with st.open_write(path) as stream:
        for start in range(0, len(data), 1 << 20):
            stream.write(data[start:start + (1 << 20)])
        assert len(uploads()) == 1 and not st.exists(path)  # parts went up; the object is not there yet
    assert uploads() == [] and (stream.size, stream.crc) == (len(data), zlib.crc32(data))
    assert st.stored_checksum(path) == (len(data), zlib.crc32(data))  # the store kept the whole-object CRC32
    assert st.fs.info(path)["ETag"].strip('"').endswith("-3")  # 5 + 5 + 3 MiB
    with st.open_read(path, start=(5 << 20) - 10, end=(5 << 20) + 10) as stream:
        assert stream.read() == data[(5 << 20) - 10:(5 << 20) + 10]
    with st.open_read(path) as stream:  # pieces of exactly the size asked for (resume reads items so), the last shorter
        pieces = [stream.read(3 << 20) for _ in range(6)]
    assert [len(p) for p in pieces] == [3 << 20] * 4 + [1 << 20, 0] and b"".join(pieces) == data
    with pytest.raises(RuntimeError, match="boom"):
        with st.open_write(f"s3://{s3_bucket}/x/aborted") as stream:
            stream.write(data)
            raise RuntimeError("boom")
    assert uploads() == [] and not st.exists(f"s3://{s3_bucket}/x/aborted")
    with st.open_write(f"s3://{s3_bucket}/x/small") as stream:
        stream.write(b"small")
    assert st.read(f"s3://{s3_bucket}/x/small") == b"small"
    assert st.stored_checksum(f"s3://{s3_bucket}/x/small") == (5, zlib.crc32(b"small"))


# -- moved from the one-process tiers: these need the S3 server -------------------------
def test_retention_on_s3(s3_bucket, s3_env):
    ck = _retention_run(f"s3://{s3_bucket}/o", RetentionPolicy(keep_last=1), updates=range(1, 5), best_at=1)
    st = open_storage(f"s3://{s3_bucket}/o")
    assert [p.update for p in list_commits(st, ck.layout)] == [1, 4]
    assert not [e for e in st.list(ck.layout.checkpoints_dir) if "_U2_" in e.name or "_U3_" in e.name]
    assert plan_prune(st, ck.layout, RetentionPolicy(keep_last=1)).delete == ()


def test_missing_s3_bucket_is_a_clear_error(s3_server, s3_env, capsys):
    with pytest.raises(StorageError, match="bucket 'no-such-bucket-x' of s3://no-such-bucket-x/o does not exist; "
                                           "create it first"):
        Checkpointer(CheckpointerConfig(output_dir="s3://no-such-bucket-x/o", run_id="run1"))
    assert cli_main(["list", "s3://no-such-bucket-x/o"]) == 2
    assert "bucket 'no-such-bucket-x'" in capsys.readouterr().err


def test_previous_run_initializer_reads_the_metadata_once_for_all_ranks(s3_bucket, s3_env, s3_server):
    """Weights-only initialization on 3 ranks: the coordinator reads the model's ``.metadata``
    and passes it on; no rank reads it again (before: two GETs per rank)."""
    from tests.dist.test_initializers_consolidated import YAML, init_from_yaml, save_source
    from tests.support.fault_proxy import FaultProxy

    out = f"s3://{s3_bucket}/o"
    saved = run_ranks(save_source, 2, out, env=s3_env)[0]
    plain = YAML.format(kind="noether_dist.initializers.PreviousRunInitializer", checkpoint="latest", extra="")
    with FaultProxy(s3_server.endpoint_url) as proxy:
        env = {**s3_env, "AWS_ENDPOINT_URL_S3": proxy.endpoint_url, "AWS_ENDPOINT_URL": proxy.endpoint_url}
        got = run_ranks(init_from_yaml, 3, out, plain, False, env=env)
        metadata_reads = [e for e in proxy.events if e[0] == "GET" and e[1].endswith("/.metadata")]
    assert len(metadata_reads) == 1, metadata_reads
    for r in got:
        assert_states_equal({"model": saved["model"]}, {"model": r["state"]})
