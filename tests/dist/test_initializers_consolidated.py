"""PreviousRunInitializer from YAML; consolidated files: conversion round trip and Noether's own files.
The initializer's errors, in one process: tests/unit/test_initializer_errors.py."""

from __future__ import annotations

import os

import pytest
import torch
import yaml
from torch import nn

from noether_dist import Checkpointer, CheckpointerConfig, TrainingIteration, resume
from noether_dist.tools.cli import main as cli_main
from noether_dist.initializers import build_initializers
from tests.support.ranks import run_ranks
from tests.support.models import EMA_INFO, assert_states_equal, build, full_state, make_mlp, shard, train_steps

pytestmark = pytest.mark.slow

YAML = """
initializers:
  - kind: {kind}
    run_id: src
    model_name: mlp
    stage_name: train
    checkpoint: {checkpoint}
{extra}
"""


def save_source(rank: int, world_size: int, out: str) -> dict:
    model, opt, ema = build()
    ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id="src", stage_name="train", model_name="mlp"))
    train_steps(model, opt, ema, 2, rank)
    ck.save(TrainingIteration(0, 2, 32), model=model, optimizer=opt, ema={EMA_INFO: ema},
            trainer_state={"callbacks": {"cb": {"x": 1}}, "grad_scaler": {}}, rank_state={"r": rank})
    train_steps(model, opt, ema, 1, rank, start=2)
    ck.save(TrainingIteration(0, 3, 48), model=model, optimizer=opt, ema={EMA_INFO: ema})
    return full_state(model, opt, ema)


class Wrapped(nn.Module):
    """The MLP under another prefix and with a different head: needs rename and drop."""

    def __init__(self) -> None:
        super().__init__()
        self.body = make_mlp(seed=99)
        self.body[4] = nn.Linear(7, 2)


def init_from_yaml(rank: int, world_size: int, out: str, text: str, wrapped: bool) -> dict:
    model = Wrapped() if wrapped else make_mlp(seed=42)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    if world_size > 1:
        shard(model.body if wrapped else model)
        if wrapped:
            from torch.distributed.fsdp import fully_shard

            fully_shard(model)
    for init in build_initializers(yaml.safe_load(text)["initializers"]):
        init.apply(model, output_dir=out)
    state = full_state(model, None, None)["model"]
    return {"state": state, "before": before}


def test_previous_run_initializer_from_yaml_into_other_sharding(tmp_path):
    out = str(tmp_path)
    saved = run_ranks(save_source, 2, out)[0]
    plain = YAML.format(kind="noether_dist.initializers.PreviousRunInitializer", checkpoint="latest", extra="")
    for r in run_ranks(init_from_yaml, 3, out, plain, False):
        assert_states_equal({"model": saved["model"]}, {"model": r["state"]})
    ema = YAML.format(kind="noether.core.initializers.PreviousRunInitializer", checkpoint="E0_U3_S48",
                      extra="    model_info: ema_factor=0.9")
    got = run_ranks(init_from_yaml, 1, out, ema, False)[0]
    assert_states_equal({"model": saved["ema"]}, {"model": got["state"]})
    renamed = YAML.format(kind="noether_dist.initializers.PreviousRunInitializer", checkpoint="best.nothing",
                          extra='    drop_keys: ["4.*"]\n    rename_keys: {"": "body."}').replace("best.nothing", "latest")
    for r in run_ranks(init_from_yaml, 2, out, renamed, True):
        for key, value in r["state"].items():
            if key.startswith("body.4."):
                assert torch.equal(value, r["before"][key])  # dropped: keeps its own init
            else:
                assert torch.equal(value, saved["model"][key[len("body."):]])


def resume_full(rank: int, world_size: int, out: str, run_id: str, model_name: str, checkpoint: str | None) -> dict:
    model, opt, ema = build(seed=11)
    res = resume({"output_dir": out, "resume_run_id": run_id, "resume_stage_name": "train",
                  "resume_checkpoint": checkpoint}, model=model, optimizer=opt, ema={EMA_INFO: ema},
                 model_name=model_name)
    return {"cp": res.checkpoint, "state": full_state(model, opt, ema), "trainer": res.trainer_state,
            "rank_state": res.rank_state}


@pytest.mark.torch_compat  # load_full goes through DCP's private loader
def test_round_trip_sharded_consolidated_sharded_is_exact(tmp_path):
    src = tmp_path / "src"
    saved = run_ranks(save_source, 2, str(src))[0]
    (src / "src" / "train" / "hp_resolved.yaml").write_text("run_id: src\n")  # what a Noether run has there
    assert cli_main(["convert", str(src / "src" / "train"), str(tmp_path / "cons"), "--to", "consolidated"]) == 0
    assert (tmp_path / "cons" / "src" / "train" / "hp_resolved.yaml").read_text() == "run_id: src\n"
    folder = tmp_path / "cons" / "src" / "train" / "checkpoints"
    files = sorted(os.listdir(folder))
    assert "mlp_cp=E0_U3_S48_model.th" in files and os.path.isfile(folder / "mlp_cp=E0_U3_S48_model.th")
    # Noether's spellings: ema=<factor>, tag files for the latest alias, index-keyed optimizer with names
    for name in ("mlp_ema=0.9_cp=E0_U3_S48_model.th", "mlp_cp=latest_model.th", "mlp_ema=0.9_cp=latest_model.th",
                 "mlp_cp=latest_optim.th", "mlp_cp=latest_trainer.th"):
        assert name in files, (name, files)
    latest = torch.load(folder / "mlp_cp=latest_model.th", weights_only=True)
    assert latest["checkpoint_tag"] == "latest" and latest["training_iteration"] == {"epoch": 0, "update": 3, "sample": 48}
    optim = torch.load(folder / "mlp_cp=E0_U3_S48_optim.th", weights_only=True)
    names = optim["param_idx_to_name"]
    assert all(torch.equal(optim["state"][i]["exp_avg_sq"], saved["optim"][names[i]]["exp_avg_sq"]) for i in names)
    assert cli_main(["verify", str(tmp_path / "cons" / "src" / "train")]) == 0  # tag files are no leftovers
    assert cli_main(["convert", str(tmp_path / "cons" / "src" / "train"), str(tmp_path / "back"), "--to", "sharded"]) == 0
    for where in ("cons", "back"):  # consolidated files load into a sharded model too
        for r in run_ranks(resume_full, 2, str(tmp_path / where), "src", "mlp", None):
            assert r["cp"] == "E0_U3_S48"
            assert_states_equal(saved, r["state"])
        first = run_ranks(resume_full, 2, str(tmp_path / where), "src", "mlp", "U2")
        assert first[1]["trainer"]["callbacks"] == {"cb": {"x": 1}} and first[1]["rank_state"] == {"r": 1}


def write_noether_files(folder: str, model: nn.Module, opt: torch.optim.Optimizer, ema: nn.Module) -> None:
    """Files exactly as Noether lays them out (SPEC section 1), written on 'rank 0'."""
    os.makedirs(folder, exist_ok=True)
    it = {"epoch": 1, "update": 8, "sample": 64}
    for cp in ("latest", "E1_U8_S64", "best_model.loss"):
        torch.save({"state_dict": model.state_dict(), "checkpoint_tag": cp, "training_iteration": it, "run_id": "old"},
                   f"{folder}/net_cp={cp}_model.th")
        torch.save({"state_dict": ema.state_dict(), "checkpoint_tag": cp, "training_iteration": it, "run_id": "old",
                    "ema": 0.9999}, f"{folder}/net_ema=0.9999_cp={cp}_model.th")
        torch.save(opt.state_dict(), f"{folder}/net_cp={cp}_optim.th")
        torch.save({"callback_state_dicts": {"logger": {"n": 3}}, "training_iteration": it, "grad_scaler": {}},
                   f"{folder}/net_cp={cp}_trainer.th")


def resume_noether(rank: int, world_size: int, out: str, checkpoint: str) -> dict:
    model, opt, ema = build(seed=5)
    res = resume({"output_dir": out, "resume_run_id": "old", "resume_stage_name": "train",
                  "resume_checkpoint": checkpoint}, model=model, optimizer=opt, ema={"ema=0.9999": ema}, model_name="net")
    init_target = make_mlp(seed=8)
    shard(init_target)
    build_initializers([{"kind": "noether.core.initializers.PreviousRunInitializer", "run_id": "old",
                         "model_name": "net", "stage_name": "train",
                         "checkpoint": {"E1": "E1_U8_S64"}.get(checkpoint, checkpoint),
                         "model_info": "ema=0.9999"}])[0].apply(init_target, output_dir=out)
    return {"cp": res.checkpoint, "trainer": res.trainer_state, "state": full_state(model, opt, ema),
            "init": full_state(init_target, None, None)["model"]}


def test_files_in_noethers_own_layout_load_into_a_sharded_model(tmp_path):
    model, opt, ema = build(sharded=False, seed=1)
    train_steps(model, opt, ema, 2, 0)
    write_noether_files(str(tmp_path / "old" / "train" / "checkpoints"), model, opt, ema)
    want = full_state(model, opt, ema)
    want["ema"] = {k: v.clone() for k, v in ema.state_dict().items()}
    for checkpoint in (None, "best.loss", "E1"):
        for r in run_ranks(resume_noether, 2, str(tmp_path), checkpoint):
            assert r["cp"] == "E1_U8_S64" and r["trainer"]["callbacks"] == {"logger": {"n": 3}}
            assert_states_equal(want, r["state"])
            assert_states_equal({"model": want["ema"]}, {"model": r["init"]})


def test_previous_run_initializer_checks_the_files_it_loads(tmp_path):
    """A damaged shard of the checkpoint initialised from: every rank raises the same
    StorageError naming the file (its CRC32 against the commit record), and no rank loads."""
    out = str(tmp_path)
    run_ranks(save_source, 2, out)
    shard_file = tmp_path / "src" / "train" / "checkpoints" / "mlp_cp=E0_U3_S48_model.th" / "__1_0.distcp"
    raw = bytearray(shard_file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    shard_file.write_bytes(bytes(raw))
    plain = YAML.format(kind="noether_dist.initializers.PreviousRunInitializer", checkpoint="latest", extra="")
    got = run_ranks(init_from_yaml, 2, out, plain, False, raise_on_error=False)
    assert [g[:2] for g in got] == [("error", "StorageError")] * 2, got
    assert got[0][2] == got[1][2] and "__1_0.distcp is corrupt" in got[0][2], got
