"""Two tiers in one process: the tiers config (bad values are one clear line) and local
retention while an upload runs, with the durable tier in a folder (the two tiers on real
ranks with S3: tests/integration/test_tiers.py)."""

from __future__ import annotations

import json
import os

import pytest

from noether_dist.config import CheckpointerConfig, TiersConfig
from noether_dist.errors import ConfigError


def _tiers(**over) -> dict:
    base = {"local": {"dir": "/nvme/ckpt", "every_updates": 50}, "durable": {"every_updates": 500}}
    for key, value in over.items():
        tier, field = key.split("__")
        base[tier][field] = value
    return base


@pytest.mark.parametrize("over, message", [
    ({"local__every_updates": 0}, "tiers.local.every_updates must be an int >= 1, got 0"),
    ({"durable__every_updates": 120}, "tiers.durable.every_updates (120) must be a multiple of tiers.local.every_updates (50)"),
    ({"local__dir": "s3://b/x"}, "tiers.local.dir must be a node-local path"),
    ({"local__replicate": "twice"}, "tiers.local.replicate 'twice' is not valid; use none or peer"),
    ({"durable__bandwidth_mb_s": -1}, "tiers.durable.bandwidth_mb_s must be a number > 0 or null"),
    ({"durable__bandwith_mb_s": 5}, "unknown key 'bandwith_mb_s' in tiers.durable; did you mean 'bandwidth_mb_s'?"),
    ({"durable__output_dir": "s3://other/x"}, "tiers.durable.output_dir 's3://other/x' differs from output_dir"),
    ({"durable__retention": {"keep_lats": 2}}, "unknown retention key(s)"),
])
def test_bad_tier_values_are_one_clear_line(over, message):
    with pytest.raises(ConfigError) as err:
        CheckpointerConfig.from_dict({"output_dir": "s3://b/x", "run_id": "r", "tiers": _tiers(**over)})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_tiers_config_parses_and_excludes_node_local():
    cfg = CheckpointerConfig.from_dict({"output_dir": "s3://b/x", "run_id": "r", "tiers": _tiers(
        local__replicate=None, durable__retention={"keep_last": 3}, durable__bandwidth_mb_s=200)})
    assert isinstance(cfg.tiers, TiersConfig) and cfg.tiers.durable.retention.keep_last == 3
    assert cfg.tiers.local.replicate.value == "none" and cfg.tiers.durable.bandwidth_mb_s == 200
    peer = CheckpointerConfig.from_dict({"output_dir": "s3://b/x", "run_id": "r", "tiers": _tiers(local__replicate="peer")})
    assert peer.tiers.local.replicate.value == "peer"
    with pytest.raises(ConfigError, match="set tiers.local.replicate: peer"):
        CheckpointerConfig.from_dict({"output_dir": "s3://b/x", "run_id": "r", "replicate": "peer", "tiers": _tiers()})
    with pytest.raises(ConfigError, match="node_local and tiers exclude each other"):
        CheckpointerConfig.from_dict({"output_dir": "s3://b/x", "run_id": "r", "node_local": True, "tiers": _tiers()})
    with pytest.raises(ConfigError, match="tiers.durable.every_updates is missing"):
        TiersConfig.from_dict({"local": {"dir": "/x", "every_updates": 2}, "durable": {}})
    assert json.dumps(_tiers())  # the block is plain YAML/JSON data


def test_local_retention_keeps_a_point_while_it_uploads(tmp_path):
    """One process: local tier keeps 1 point, the durable tier is a folder, uploads paced to
    5 kB/s. While U2 uploads, U3's retention must keep U2; once uploaded it may go."""
    from noether_dist import Checkpointer, TrainingIteration
    from tests.support.models import build

    model, _, _ = build(sharded=False)
    cfg = CheckpointerConfig.from_dict({
        "output_dir": str(tmp_path / "durable"), "run_id": "r", "model_name": "mlp",
        "tiers": {"local": {"dir": str(tmp_path / "local"), "every_updates": 1, "keep_last": 1},
                  "durable": {"every_updates": 2, "bandwidth_mb_s": 0.005}}})
    commits = tmp_path / "local" / "r" / "checkpoints" / "_commits"
    with Checkpointer(cfg) as ck:
        ck.save(TrainingIteration(0, 2, 2), model=model)  # local, then the (slow) upload starts
        ck.save(TrainingIteration(0, 3, 3), model=model)  # local only; retention would drop U2
        assert ck.durable.busy, "the upload should still be running (5 kB/s)"
        assert sorted(os.listdir(commits)) == ["E0_U2_S2.json", "E0_U3_S3.json"]
        ck.wait()
        assert os.path.exists(tmp_path / "durable" / "r" / "checkpoints" / "_commits" / "E0_U2_S2.json")
        ck.save(TrainingIteration(0, 5, 5), model=model)  # not due: the upload is over, U2 and U3 may go
        assert sorted(os.listdir(commits)) == ["E0_U5_S5.json"]
