"""S3 operations against a real endpoint (moto on 127.0.0.1, through tests/support/fault_proxy.py
where a fault is needed): one retry layer, a private filesystem instance, refusal of a store
that ignores If-None-Match, CRC32 checksums kept by the store, and verify through the
store's checksum (fast path) and by reading the bytes (slow path); the stage index's
requests on S3 (the same on a local disk: tests/unit/test_select.py)."""

from __future__ import annotations

import json
import zlib

import fsspec
import pytest

from noether_dist import Checkpointer, CheckpointerConfig, StorageError, StorageOptions, TrainingIteration
from noether_dist.tools.cli import main as cli_main
from noether_dist.format.layout import StageLayout
from noether_dist.format.names import CheckpointRef
from noether_dist.io.storage import RetryPolicy, open_storage
from noether_dist.stage.index import StageIndex
from noether_dist.stage.verify import verify_stage
from tests.support.fault_proxy import FaultProxy
from tests.support.stages import CountingStorage, mixed_stage, point
from tests.support.models import EMA_INFO, build, train_steps

pytestmark = pytest.mark.slow

RUN, STAGE, MODEL = "run1", "train", "mlp"
MiB = 2**20


def _options(endpoint: str, **kw) -> StorageOptions:
    return StorageOptions(endpoint_url=endpoint, **kw)


def _save_two(out: str, options: StorageOptions) -> None:
    model, opt, ema = build(sharded=False)
    ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id=RUN, stage_name=STAGE, model_name=MODEL,
                                         timeout_s=30, storage=options))
    for update in (1, 2):
        train_steps(model, opt, ema, 1, 0, start=update)
        ck.save(TrainingIteration(0, update, 8 * update), model=model, optimizer=opt, ema={EMA_INFO: ema},
                trainer_state={"at": update})


def test_one_retry_layer_and_a_private_filesystem(s3_server, s3_bucket):
    options = _options(s3_server.endpoint_url, retry=RetryPolicy(attempts=3, base_delay_s=0.0))
    # Another user of s3fs in the process, with the very options we pass: fsspec would hand
    # both the same cached instance.
    kwargs = {k: v for k, v in options.fsspec_kwargs("s3").items() if k != "skip_instance_cache"}
    shared, _ = fsspec.url_to_fs(f"s3://{s3_bucket}", **kwargs)
    retries_before = shared.retries
    st = open_storage(f"s3://{s3_bucket}/x", options)
    assert st.fs is not shared and shared.retries == retries_before
    st.replace(f"s3://{s3_bucket}/x/obj", b"data")
    with FaultProxy(s3_server.endpoint_url) as proxy:
        st = open_storage(f"s3://{s3_bucket}/x", _options(proxy.endpoint_url, retry=RetryPolicy(attempts=3,
                                                                                                base_delay_s=0.0)))
        proxy.set_faults(kinds=("slowdown",), permanent=True, methods=("GET",))
        with pytest.raises(StorageError, match="SlowDown|reduce your request rate"):
            st.read(f"s3://{s3_bucket}/x/obj")
        # botocore's 3 tries, nothing around them (were: ours x s3fs's x botocore's)
        assert proxy.stats["by_method"].get("GET") == 3, proxy.stats
        proxy.set_faults(kinds=("slowdown",), count=2, methods=("GET",))
        assert st.read(f"s3://{s3_bucket}/x/obj") == b"data"


def test_a_store_that_ignores_if_none_match_is_refused(s3_server, s3_bucket):
    out = f"s3://{s3_bucket}/exp"
    with FaultProxy(s3_server.endpoint_url, drop_request_headers=("If-None-Match",)) as proxy:
        st = open_storage(out, _options(proxy.endpoint_url))
        with pytest.raises(StorageError, match="ignores If-None-Match"):
            st.check_root(out)
        with pytest.raises(StorageError, match="ignores If-None-Match"):
            st.write_once(f"{out}/{RUN}/rec.json", b"one")
        with pytest.raises(StorageError, match="ignores If-None-Match"):
            Checkpointer(CheckpointerConfig(output_dir=out, run_id=RUN, model_name=MODEL, timeout_s=30,
                                            storage=_options(proxy.endpoint_url)))
    assert open_storage(out, _options(s3_server.endpoint_url)).list(out) == []  # no probe left behind
    # the real endpoint honours the header: accepted, and a second write-once is refused
    st = open_storage(out, _options(s3_server.endpoint_url))
    st.check_root(out)
    st.write_once(f"{out}/{RUN}/rec.json", b"one")
    with pytest.raises(FileExistsError):
        st.write_once(f"{out}/{RUN}/rec.json", b"two")


def test_uploads_carry_a_full_object_crc32_multipart_included(s3_server, s3_bucket):
    st = open_storage(f"s3://{s3_bucket}/x", _options(s3_server.endpoint_url))
    completions = []
    st.fs.s3.meta.events.register("before-parameter-build.s3.CompleteMultipartUpload",
                                  lambda params, **_: completions.append(json.loads(json.dumps(params, default=str))))
    data = bytes(range(256)) * (11 * MiB // 256)
    with st.fs.open(f"{s3_bucket}/x/big", "wb", block_size=5 * MiB) as fh:
        for start in range(0, len(data), 5 * MiB):
            fh.write(data[start:start + 5 * MiB])
    assert st.stored_checksum(f"s3://{s3_bucket}/x/big") == (len(data), zlib.crc32(data))
    parts = completions[0]["MultipartUpload"]["Parts"]
    assert len(parts) >= 2 and all(p.get("ChecksumCRC32") for p in parts)  # what s3fs alone leaves out
    st.replace(f"s3://{s3_bucket}/x/small", b"abc")
    assert st.stored_checksum(f"s3://{s3_bucket}/x/small") == (3, zlib.crc32(b"abc"))


def _corrupt(st, path: str) -> None:
    data = bytearray(st.read(path))
    data[len(data) // 2] ^= 0xFF
    st.replace(path, bytes(data))


def test_verify_on_s3_fast_path_and_slow_path(s3_server, s3_bucket, capsys):
    ep = s3_server.endpoint_url
    # fast: every object has the store's CRC32, compared with the record, nothing read
    fast_out = f"s3://{s3_bucket}/fast"
    _save_two(fast_out, _options(ep))
    st = open_storage(fast_out, _options(ep))
    layout = StageLayout(fast_out, RUN, STAGE)
    report = verify_stage(st, layout)
    files = sum(c.files for c in report.checkpoints)
    assert report.ok and files > 0
    assert sum(c.store_checked for c in report.checkpoints) == files
    assert sum(c.bytes_read for c in report.checkpoints) == 0
    # slow: objects written without a checksum the store keeps are read in full
    slow_out = f"s3://{s3_bucket}/slow"
    plain = _options(ep, checksum=None, extra={"config_kwargs": {"request_checksum_calculation": "when_required"}})
    _save_two(slow_out, plain)
    slow_st = open_storage(slow_out, _options(ep))
    slow = verify_stage(slow_st, StageLayout(slow_out, RUN, STAGE))
    nbytes = sum(c.bytes for c in slow.checkpoints)
    assert slow.ok and sum(c.store_checked for c in slow.checkpoints) == 0
    assert sum(c.bytes_read for c in slow.checkpoints) == nbytes > 0
    # the tool only reads: GETs of records and listings, one HEAD per file, no bytes of files
    requests = {}
    with FaultProxy(ep) as proxy:
        for how in ([], ["--read-all"]):
            proxy.reset_stats()
            assert cli_main(["verify", "--json", "-q", *how, fast_out, "--endpoint-url", proxy.endpoint_url]) == 0
            assert json.loads(capsys.readouterr().out)["ok"]
            requests[bool(how)] = proxy.stats["by_method"]
    assert set(requests[False]) <= {"GET", "HEAD"} and requests[False]["HEAD"] >= files, requests
    assert requests[False]["GET"] + files <= requests[True]["GET"], requests  # no file was read
    # damage is found either way, and --read-all reads even where the store has a checksum
    shard = f"{layout.artifact_path(f'{MODEL}_cp=E0_U2_S16_model.th')}/__0_0.distcp"
    _corrupt(st, shard)
    slow_shard = shard.replace(fast_out, slow_out)
    _corrupt(slow_st, slow_shard)
    for out, path in ((fast_out, shard), (slow_out, slow_shard)):
        code = cli_main(["verify", "--json", out, "--endpoint-url", ep])
        found = json.loads(capsys.readouterr().out)
        assert code == 1 and [(d["kind"], d["path"]) for d in found["damages"]] == [("crc", path)], found
    code = cli_main(["verify", "--json", "--read-all", fast_out, "--endpoint-url", ep])
    found = json.loads(capsys.readouterr().out)
    assert code == 1 and found["stages"][0]["checkpoints"][0]["store_checked"] == 0
    assert [d["kind"] for d in found["damages"]] == ["crc"]


@pytest.mark.torch_compat  # as in tests/unit/test_select.py, where it came from
def test_index_on_s3_reads_the_alias_and_record_and_lists_only_for_a_fallback(s3_server, s3_bucket):
    root = f"s3://{s3_bucket}/o"
    st = CountingStorage(open_storage(root, StorageOptions(endpoint_url=s3_server.endpoint_url)))
    layout = mixed_stage(st, root)
    st.reads = st.lists = 0
    index = StageIndex(st, layout)
    assert index.resolve(CheckpointRef.latest()).iteration == point(2)
    assert (st.reads, st.lists) == (2, 0)
    st.replace(layout.alias_path("latest"), b"not json")
    st.reads = st.lists = 0
    index = StageIndex(st, layout)
    assert index.resolve(CheckpointRef.latest()).iteration == point(2)  # U4's record is corrupt: skipped
    assert st.lists == 1 and st.reads == 3  # alias, U4 (corrupt), U2
    assert [c.name for c in index.find_all()] == ["E0_U1_S8", "E0_U2_S16", "E0_U3_S24", "E0_U4_S32"]
    assert st.lists == 2
