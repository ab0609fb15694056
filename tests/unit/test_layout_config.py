"""Folders, run ids, and config parsing."""

from __future__ import annotations

import datetime as dt

import pytest

from noether_dist import CheckpointerConfig, ResumeConfig
from noether_dist.errors import ConfigError, InvalidNameError
from noether_dist.format.layout import StageLayout, default_run_id, join_url
from noether_dist.format.names import TrainingIteration


def test_stage_layout_with_and_without_stage():
    with_stage = StageLayout("/out", "run1", "train")
    assert with_stage.checkpoints_dir == "/out/run1/train/checkpoints"
    assert StageLayout("s3://b/p/", "run1", None).checkpoints_dir == "s3://b/p/run1/checkpoints"
    assert StageLayout("/out", "run1", "").stage_dir == "/out/run1"
    assert with_stage.commit_path(TrainingIteration(1, 2, 3)) == "/out/run1/train/checkpoints/_commits/E1_U2_S3.json"
    assert with_stage.alias_path("best.loss") == "/out/run1/train/checkpoints/_aliases/best.loss.json"
    assert StageLayout.iteration_of_commit_file("x/_commits/E1_U2_S3.json") == TrainingIteration(1, 2, 3)
    assert StageLayout.iteration_of_commit_file("E1_U2.json") is None


@pytest.mark.parametrize("run_id,stage", [("../x", None), ("a/b", None), ("ok", "../../etc"), ("ok", "a/b")])
def test_stage_layout_refuses_traversal(run_id, stage):
    with pytest.raises(InvalidNameError):
        StageLayout("/out", run_id, stage)


def test_join_url():
    assert join_url("s3://bucket", "a", "b") == "s3://bucket/a/b"
    assert join_url("/x/", "", "y") == "/x/y"


def test_default_run_id_sources():
    assert default_run_id({"SLURM_ARRAY_JOB_ID": "77", "SLURM_JOB_ID": "80"}) == "slurm-77"
    assert default_run_id({"SLURM_JOB_ID": "80"}) == "slurm-80"
    assert default_run_id({"TORCHELASTIC_RUN_ID": "job5"}) == "torchrun-job5"
    rid = default_run_id({}, now=dt.datetime(2026, 11, 28, 21, 30, 5))
    assert rid.startswith("2026-11-28_213005_") and len(rid) == len("2026-11-28_213005_") + 6
    assert rid != default_run_id({}, now=dt.datetime(2026, 11, 28, 21, 30, 5))


def test_resume_config_from_root_config_defaults():
    cfg = ResumeConfig.from_root_config({"output_dir": "/o", "resume_run_id": "r", "resume_stage_name": "train"})
    assert cfg.continue_stage_name == "train"
    assert cfg.checkpoint_ref.alias_name == "latest" and not cfg.explicit
    cfg = ResumeConfig.from_root_config({"output_dir": "/o", "resume_run_id": "r", "resume_stage_name": "train",
                                         "stage_name": "continue_training", "resume_checkpoint": "E3"})
    assert cfg.continue_stage_name == "continue_training" and cfg.explicit
    assert ResumeConfig.from_root_config({"output_dir": "/o"}) is None


def test_resume_config_errors():
    with pytest.raises(ConfigError, match="E10, U100 or S200"):
        ResumeConfig(output_dir="/o", resume_run_id="r", resume_checkpoint="E10_U100_S200")
    with pytest.raises(ConfigError, match="resume_run_id is not"):
        ResumeConfig.from_root_config({"output_dir": "/o", "resume_checkpoint": "E1"})
    with pytest.raises(InvalidNameError):
        ResumeConfig(output_dir="/o", resume_run_id="r", resume_stage_name="../up")


def test_checkpointer_config_validation_and_unknown_keys():
    cfg = CheckpointerConfig.from_dict({"output_dir": "/o", "run_id": "r", "best_metrics": {"loss": "min"},
                                        "async_mode": "thread", "storage": {"endpoint_url": "http://127.0.0.1:1"}})
    assert cfg.async_mode.value == "thread" and cfg.storage.endpoint_url == "http://127.0.0.1:1"
    with pytest.raises(ConfigError, match="did you mean 'model_name'"):
        CheckpointerConfig.from_dict({"output_dir": "/o", "run_id": "r", "modelname": "x"})
    with pytest.raises(ConfigError, match="'min' or 'max'"):
        CheckpointerConfig(output_dir="/o", run_id="r", best_metrics={"loss": "lowest"})
    with pytest.raises(ConfigError, match="off, thread or process"):
        CheckpointerConfig.from_dict({"output_dir": "/o", "run_id": "r", "async_mode": "fast"})
