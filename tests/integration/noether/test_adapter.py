"""The Noether adapter against the real Noether 2026.4.0: our small project trains on 2 ranks
under torchrun with Noether's own runner and callbacks (CheckpointCallback, EmaCallback,
BestCheckpointCallback), checkpointing through noether_dist."""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch
import yaml
from noether.core.providers import PathProvider

from noether_dist.io.dcp_io import load_full
from noether_dist.errors import CheckpointNotFoundError
from noether_dist.integrations.noether.initializer import install_previous_run_bridges
from noether_dist.format.layout import StageLayout
from noether_dist.io.storage import open_storage

from .adapter_helpers import (EMA, MAX_UPDATES, STAGE, alias_of, commits_of, digest_at, kill_tree, project_config,
                              run_to_end, start_run, wait_for_commit)
from .project.project import TinyNet, TinyNetConfig, metric_value

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """One uninterrupted run ("full") of the project; returns the output_path."""
    root = tmp_path_factory.mktemp("adapter")
    out = root / "out"
    run_to_end(project_config(out, "full"), root / "work")
    return out


def test_one_committed_save_per_point_with_ema_and_noether_aliases(full_run: Path) -> None:
    commits = commits_of(full_run, "full")
    # CheckpointCallback and EmaCallback every 2 updates, BestCheckpointCallback every epoch,
    # `last` at the end: every call of a point went into one commit, nothing else was written.
    points = [f"E{u // 8}_U{u}_S{u * 4}" for u in range(2, MAX_UPDATES + 1, 2)]
    assert sorted(commits) == sorted(points)
    for name, record in commits.items():
        kinds = sorted((a.kind, a.model_info or "") for a in record.artifacts)
        assert kinds == [("model", ""), ("model", f"ema_factor={EMA}"), ("optim", ""), ("trainer", "")], name
        assert record.world_size == 2
    # Noether decided: loss/val is best at update 8 (5.0), worse at 16 and 24.
    best_update = min((u for u in (8, 16, 24)), key=metric_value)
    assert alias_of(full_run, "full", "best.loss.val") == f"E{best_update // 8}_U{best_update}_S{best_update * 4}"
    assert alias_of(full_run, "full", "latest") == "E3_U24_S96"
    assert alias_of(full_run, "full", "last") == "E3_U24_S96"
    # Noether's own writer was replaced: none of its tag files exist.
    files = {p.name for p in (full_run / "full" / STAGE / "checkpoints").iterdir()}
    assert not [f for f in files if "cp=latest" in f or "cp=last" in f or "best_model" in f]
    # The trainer state is Noether's (callbacks by checkpoint key), plus the model config.
    storage, layout = open_storage(str(full_run)), StageLayout(str(full_run), "full", STAGE)
    trainer = load_full(layout.artifact_path("tinynet_cp=E3_U24_S96_trainer.th"), storage)
    from noether_dist.io.statedict import unpack_object

    common = unpack_object(trainer["noether.trainer"])
    assert common["training_iteration"] == {"epoch": 3, "update": 24, "sample": 96}
    best_states = [s for s in common["state"]["callbacks"].values() if "best_metric_value" in s]
    assert [s["best_metric_value"] for s in best_states] == [metric_value(8)]
    configs = common["state"]["model_configs"]
    assert configs["tinynet"]["config_kind"] == "tests.integration.noether.project.project.TinyNetConfig"
    assert configs["tinynet"]["model_config"]["width"] == 16
    # The EMA in the commit is the EMA Noether kept on rank 0 (not the model weights).
    model = load_full(layout.artifact_path("tinynet_cp=E3_U24_S96_model.th"), storage)
    ema = load_full(layout.artifact_path(f"tinynet_ema_factor={EMA}_cp=E3_U24_S96_model.th"), storage)
    assert set(ema) == set(model)
    assert not torch.equal(ema["inp.weight"], model["inp.weight"])


def test_sigkill_at_random_update_then_resume_with_noether_keys_gives_same_digest(full_run: Path, tmp_path) -> None:
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    commits_before_kill = rng.randrange(2, 10)
    delay = rng.uniform(0.0, 0.3)
    work = tmp_path / "work"
    proc = start_run(project_config(full_run, f"killed{seed}"), work)
    try:
        wait_for_commit(full_run, f"killed{seed}", commits_before_kill, proc)
        time.sleep(delay)
    finally:
        kill_tree(proc)
    committed = sorted(commits_of(full_run, f"killed{seed}"), key=lambda n: int(n.split("_U")[1].split("_")[0]))
    assert committed, f"seed {seed}: nothing committed before the kill"
    assert len(committed) < MAX_UPDATES // 2, f"seed {seed}: the run finished before the kill"
    # Noether's own keys; the continued run gets an id of its own.
    resumed = f"resumed{seed}"
    run_to_end(project_config(full_run, resumed, resume_run_id=f"killed{seed}", resume_stage_name=STAGE),
               work)
    first = min(commits_of(full_run, resumed), key=lambda n: int(n.split("_U")[1].split("_")[0]))
    newest_update = int(committed[-1].split("_U")[1].split("_")[0])
    assert int(first.split("_U")[1].split("_")[0]) == newest_update + 2, f"seed {seed}"
    assert digest_at(full_run, resumed) == digest_at(full_run, "full"), (
        f"seed {seed}: killed after {committed[-1]} (+{delay:.2f}s), resumed run differs")



def test_resume_from_noethers_best_model_tag_continues_exactly(full_run: Path, tmp_path) -> None:
    # resume_checkpoint in Noether's spelling: the best point (E1_U8_S32, an epoch boundary),
    # not the newest; the continued run then trains to the end exactly like the first one.
    run_to_end(project_config(full_run, "from_best", resume_run_id="full", resume_stage_name=STAGE,
                              resume_checkpoint="best_model.loss.val"), tmp_path / "work")
    assert min(commits_of(full_run, "from_best"), key=lambda n: int(n.split("_U")[1].split("_")[0])) == "E1_U10_S40"
    assert digest_at(full_run, "from_best") == digest_at(full_run, "full")
    assert alias_of(full_run, "from_best", "best.loss.val") is None  # Noether found nothing better

# The exact YAML a user writes under `model:` (Noether's own kind and keys).
INITIALIZER_YAML = f"""
initializers:
  - kind: noether.core.initializers.PreviousRunInitializer
    run_id: full
    stage_name: {STAGE}
    model_name: tinynet
    checkpoint_tag: best_model.loss.val
    model_info: ema={EMA}
"""


def _model(out: Path, initializers_yaml: str) -> TinyNet:
    spec = {"kind": "tests.integration.noether.project.project.TinyNet", "name": "tinynet",
            "optimizer_config": {"kind": "torch.optim.AdamW", "lr": 0.01}, **yaml.safe_load(initializers_yaml)}
    config = TinyNetConfig.model_validate(spec)  # Noether's closed union accepts its own kind
    return TinyNet(config, path_provider=PathProvider(output_root_path=out, run_id="finetune", stage_name=STAGE))


@pytest.mark.slow
def test_noether_previous_run_initializer_loads_ema_weights_of_the_best_checkpoint(full_run: Path) -> None:
    model = _model(full_run, INITIALIZER_YAML)
    assert install_previous_run_bridges(model, output_dir=str(full_run), timeout_s=60) == 1
    model.initialize()  # Noether applies model.initializers here
    storage, layout = open_storage(str(full_run)), StageLayout(str(full_run), "full", STAGE)
    expected = load_full(layout.artifact_path(f"tinynet_ema_factor={EMA}_cp=E1_U8_S32_model.th"), storage)
    got = model.state_dict()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


@pytest.mark.slow
def test_noether_previous_run_initializer_names_a_missing_checkpoint(full_run: Path) -> None:
    model = _model(full_run, INITIALIZER_YAML.replace("best_model.loss.val", "best_model.accuracy"))
    install_previous_run_bridges(model, output_dir=str(full_run), timeout_s=60)
    with pytest.raises(CheckpointNotFoundError, match="best.accuracy"):
        model.initialize()
