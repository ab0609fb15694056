"""A run that Noether's own writer produced (the project, adapter off) resumes through the
adapter: 2 ranks under torchrun, Noether's resume keys. Each rank starts from exactly the
state Noether saved (weights, optimizer state by parameter name and group settings, EMA,
callback states, update counter), and training continues to the end with noether_dist
checkpoints."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from .adapter_helpers import (EMA, MAX_UPDATES, STAGE, alias_of, commits_of, plain_config, project_config,
                              run_to_end)
from .project.project import RESUMED_STATE_DIR

pytestmark = pytest.mark.slow

PLAIN_UPDATES = 12
"""Noether's own run stops here (its ``latest`` and ``last`` at E1_U12_S48); the resumed runs go on to 24."""
PROBE = {"kind": "tests.integration.noether.project.project.ResumedStateProbe", "every_n_updates": MAX_UPDATES}


@pytest.fixture(scope="module")
def noether_run(tmp_path_factory) -> Path:
    """The project trained by Noether's own trainer and CheckpointWriter on 2 ranks; its output_path."""
    root = tmp_path_factory.mktemp("noether_files")
    config = plain_config(root / "out", "noe")
    config["trainer"]["max_updates"] = PLAIN_UPDATES
    run_to_end(config, root / "work")
    return root / "out"


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def _assert_tensors_equal(want: dict, got: dict, what: str) -> None:
    assert sorted(want) == sorted(got), what
    for key in want:
        if isinstance(want[key], dict):
            _assert_tensors_equal(want[key], got[key], f"{what}/{key}")
        else:
            assert torch.equal(torch.as_tensor(want[key]), torch.as_tensor(got[key])), f"{what}/{key}"


@pytest.mark.parametrize("resume_checkpoint, point", [(None, (1, 12, 48)), ("U6", (0, 6, 24))])
def test_noether_written_run_resumes_through_the_adapter_exactly(noether_run: Path, tmp_path, resume_checkpoint,
                                                                 point) -> None:
    files = noether_run / "noe" / STAGE / "checkpoints"
    tag = "latest" if resume_checkpoint is None else "E{}_U{}_S{}".format(*point)
    model = _load(files / f"tinynet_cp={tag}_model.th")
    optim = _load(files / f"tinynet_cp={tag}_optim.th")
    ema = _load(files / f"tinynet_ema={EMA}_cp={tag}_model.th")
    trainer = _load(files / f"tinynet_cp={tag}_trainer.th")
    assert model["training_iteration"] == dict(zip(("epoch", "update", "sample"), point))
    names = optim["param_idx_to_name"]
    # Noether's index order (its groups: weights, then biases and norms) is not the model's order
    assert list(names.values()) != sorted(names.values(), key=list(model["state_dict"]).index)

    run_id = f"adapter_{tag}"
    keys = {"resume_run_id": "noe", "resume_stage_name": STAGE}
    if resume_checkpoint is not None:
        keys["resume_checkpoint"] = resume_checkpoint
    config = project_config(noether_run, run_id, **keys)
    config["trainer"]["callbacks"].append(PROBE)
    run_to_end(config, tmp_path / "work")

    for rank in (0, 1):
        got = _load(noether_run / run_id / STAGE / RESUMED_STATE_DIR / f"rank{rank}.th")
        assert got["iteration"] == model["training_iteration"], rank
        _assert_tensors_equal(model["state_dict"], got["model"], f"rank {rank} model")
        _assert_tensors_equal({names[i]: s for i, s in optim["state"].items()}, got["optim"], f"rank {rank} optim")
        want_groups = sorted((sorted(names[i] for i in g["params"]), {k: v for k, v in g.items() if k != "params"})
                             for g in optim["param_groups"])
        assert sorted(got["groups"]) == want_groups, rank
        _assert_tensors_equal(ema["state_dict"], got["ema"][f"None:{EMA}"], f"rank {rank} EMA")
        assert got["callbacks"] == trainer["callback_state_dicts"], rank

    # training went on from there, checkpointing through noether_dist
    start = point[1]
    assert sorted(commits_of(noether_run, run_id), key=lambda n: int(n.split("_U")[1].split("_")[0])) == [
        f"E{u // 8}_U{u}_S{u * 4}" for u in range(start + 2, MAX_UPDATES + 1, 2)]
    assert alias_of(noether_run, run_id, "last") == f"E{MAX_UPDATES // 8}_U{MAX_UPDATES}_S{MAX_UPDATES * 4}"
