"""Files that Noether's own code wrote load exactly, and files we convert load in Noether's own code.

1. Noether's trainer step and callbacks (CheckpointCallback, EmaCallback, BestCheckpointCallback)
   on the shared project's model and config (tests/integration/noether/project, adapter off) write a run through its CheckpointWriter and OptimizerWrapper (named param groups,
   ``param_idx_to_name``, an index order that is not ``model.parameters()`` order). We load it
   with ``noether_dist.resume`` (Noether's resume keys) and ``PreviousRunInitializer`` (Noether's
   keys) into FSDP2 models on 2 ranks and compare exactly: every parameter, every optimizer
   state tensor by name, param group settings, EMA weights, training_iteration.
2. That resumed state is saved with our Checkpointer, converted with ``noether-ckpt convert
   --to consolidated``, and read back by Noether's own ResumeInitializer, PreviousRunInitializer
   and EmaCallback.

Runs only in the Noether env (Python 3.12, torch 2.11, emmiai-noether).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

from noether_dist import Checkpointer, CheckpointerConfig, resume
from noether_dist.tools.cli import main as cli_main
from noether_dist.errors import StateMismatchError
from noether_dist.initializers import build_initializers
from tests.support.ranks import run_ranks
from tests.integration.noether.noether_files_helpers import (EMA_FACTOR, METRIC, MODEL, by_name, make_trainer, model_config,
                                                 sharded_net, write_noether_run)
from tests.integration.noether.project.project import TinyNet

EMA_INFO = f"ema={EMA_FACTOR}"
TAG_METRIC = METRIC.replace("/", ".")  # Noether's best_model.<metric> spelling
POINTS = {None: (1, 12, 48), "last": (1, 12, 48), "U4": (0, 4, 16), "S40": (1, 10, 40)}
FILE_OF = {None: "latest", "last": "last", "U4": "E0_U4_S16", "S40": "E1_U10_S40"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("noether")
    return {"two_groups": write_noether_run(root, "noe"), "four_groups": write_noether_run(root, "noe4",
                                                                                        lr_scale_input=True)}


def _full(model, optimizer=None) -> dict:
    opts = StateDictOptions(full_state_dict=True)
    out = {"model": {k: v.clone() for k, v in get_model_state_dict(model, options=opts).items()}}
    if optimizer is not None:
        osd = get_optimizer_state_dict(model, optimizer, options=opts)
        out["optim"] = {n: {k: v.clone() for k, v in st.items()} for n, st in osd["state"].items()}
        out["groups"] = [(sorted(g["params"]), {k: v for k, v in g.items() if k != "params"})
                         for g in osd["param_groups"]]
    return out


def load_on_ranks(rank: int, world_size: int, out: str, run_id: str, lr_scale_input: bool) -> dict:
    """Resume each checkpoint with Noether's keys into fresh FSDP2 models, and initialise
    from it with Noether's PreviousRunInitializer keys."""
    got: dict = {}
    for checkpoint in POINTS:
        model = sharded_net(seed=11, lr_scale_input=lr_scale_input)
        ema = sharded_net(seed=12, optimizer=False)
        res = resume({"output_dir": out, "resume_run_id": run_id, "resume_stage_name": "train",
                      "resume_checkpoint": checkpoint}, model=model, optimizer=model.optimizer.torch_optim,
                     ema={EMA_INFO: ema}, model_name=MODEL)
        got[checkpoint] = {**_full(model, model.optimizer.torch_optim), "ema": _full(ema)["model"],
                           "iteration": res.iteration.to_dict(), "callbacks": res.trainer_state.get("callbacks")}
    for tag, info in (("best_model." + TAG_METRIC, None), ({"update": 4}, EMA_INFO), ("latest", EMA_INFO)):
        target = sharded_net(seed=13, optimizer=False)
        build_initializers([{"kind": "noether.core.initializers.PreviousRunInitializer", "run_id": run_id,
                             "stage_name": "train", "checkpoint_tag": tag, "model_info": info,
                             "output_path": out}])[0].apply(target)
        got[("init", str(tag), info)] = _full(target)["model"]
    return got


def assert_equal_states(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    assert want.keys() == got.keys(), (sorted(want), sorted(got))
    for key in want:
        assert torch.equal(want[key], got[key]), key


def assert_optim_by_name(want: dict, got: dict) -> None:
    assert want.keys() == got.keys()
    for name in want:
        assert want[name].keys() == got[name].keys(), name
        for key in want[name]:
            assert torch.equal(want[name][key], got[name][key]), (name, key)


@pytest.mark.parametrize("variant", ["two_groups", "four_groups"])
def test_noether_written_files_load_exactly_into_fsdp2_on_two_ranks(runs, variant):
    run = runs[variant]
    latest_optim = run.file(f"{MODEL}_cp=latest_optim.th")
    # Noether's index order is its groups' order, not model.parameters() order: a positional
    # mapping would put weights' state on biases
    assert list(latest_optim["param_idx_to_name"].values()) != [n for n, _ in run.model.named_parameters()]
    assert {"default", "weight_decay=0"} <= {g["name"] for g in latest_optim["param_groups"]}
    results = run_ranks(load_on_ranks, 2, str(run.root), run.run_id, variant == "four_groups", timeout_s=600)
    assert len(results) == 2
    for got in results:
        for checkpoint, point in POINTS.items():
            g, tag = got[checkpoint], FILE_OF[checkpoint]
            assert g["iteration"] == dict(zip(("epoch", "update", "sample"), point))
            assert_equal_states(run.file(f"{MODEL}_cp={tag}_model.th")["state_dict"], g["model"])
            assert_equal_states(run.file(f"{MODEL}_ema={EMA_FACTOR}_cp={tag}_model.th")["state_dict"], g["ema"])
            assert_optim_by_name(run.optim_by_name(f"{MODEL}_cp={tag}_optim.th"), g["optim"])
            assert g["callbacks"] == run.file(f"{MODEL}_cp={tag}_trainer.th")["callback_state_dicts"]
            # param group settings landed on the groups that hold the same parameters
            file_sd = run.file(f"{MODEL}_cp={tag}_optim.th")
            names = file_sd["param_idx_to_name"]
            want = sorted((sorted(names[i] for i in grp["params"]), {k: v for k, v in grp.items() if k != "params"})
                          for grp in file_sd["param_groups"])
            assert sorted(g["groups"]) == want
        # the live state Noether's trainer ended with: model, optimizer by name, EMA
        final = got[None]
        assert_equal_states(run.model.state_dict(), final["model"])
        assert_optim_by_name(run.optim_by_name(), final["optim"])
        bias = dict(run.model.named_parameters())["inp.bias"]
        assert torch.equal(final["optim"]["inp.bias"]["exp_avg"],
                           run.model.optimizer.torch_optim.state[bias]["exp_avg"])
        assert_equal_states(run.ema, final["ema"])
        assert {g[1]["weight_decay"] for g in final["groups"] if "inp.bias" in g[0]} == {0.0}
        # PreviousRunInitializer with Noether's keys: best_model.<metric> (best at update 8), EMA by dict and tag
        assert_equal_states(run.file(f"{MODEL}_cp=E1_U8_S32_model.th")["state_dict"],
                            got[("init", f"best_model.{TAG_METRIC}", None)])
        assert_equal_states(run.file(f"{MODEL}_ema={EMA_FACTOR}_cp=E0_U4_S16_model.th")["state_dict"],
                            got[("init", "{'update': 4}", EMA_INFO)])
        assert_equal_states(run.ema, got[("init", "latest", EMA_INFO)])


def mismatched_optimizer(rank: int, world_size: int, out: str, run_id: str) -> str:
    """A plain one-group AdamW cannot take Noether's two groups' settings: refused on every rank."""
    model = sharded_net(seed=11, optimizer=False)
    for p in model.parameters():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(model.parameters(), lr=1.0)
    before = [p.detach().full_tensor().clone() for p in model.parameters()]
    try:
        resume({"output_dir": out, "resume_run_id": run_id, "resume_stage_name": "train"}, model=model,
               optimizer=opt, model_name=MODEL)
    except StateMismatchError as exc:
        after = [p.detach().full_tensor() for p in model.parameters()]
        assert all(torch.equal(a, b) for a, b in zip(before, after)), "weights changed before the refusal"
        return str(exc)
    return "loaded"


def test_a_mismatched_optimizer_is_refused_before_anything_loads(runs):
    run = runs["two_groups"]
    for msg in run_ranks(mismatched_optimizer, 2, str(run.root), run.run_id, timeout_s=600):
        assert "holds parameters of the file's groups 'default', 'weight_decay=0'" in msg, msg


def save_ours(rank: int, world_size: int, noether_out: str, out: str) -> None:
    """Resume Noether's files at update 4 and 12 and save them with our Checkpointer (sharded,
    committed; best.<metric> at update 4, latest and last at 12), with the trainer state and
    the model config the adapter stores."""
    cfg = model_config()
    configs = {MODEL: {"model_config": cfg.model_dump(exclude_computed_fields=True), "config_kind": cfg.config_kind}}
    ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id="ours", stage_name="train", model_name=MODEL,
                                         best_metrics={TAG_METRIC: "min"}))
    for checkpoint, value in (("U4", 0.25), (None, 0.75)):
        model = sharded_net(seed=11)
        ema = sharded_net(seed=12, optimizer=False)
        res = resume({"output_dir": noether_out, "resume_run_id": "noe", "resume_stage_name": "train",
                      "resume_checkpoint": checkpoint}, model=model, optimizer=model.optimizer.torch_optim,
                     ema={EMA_INFO: ema}, model_name=MODEL)
        state = {"callbacks": res.trainer_state["callbacks"], "grad_scaler": res.trainer_state.get("grad_scaler"),
                 "model_configs": configs}
        ck.save(res.iteration, model=model, optimizer=model.optimizer.torch_optim, ema={EMA_INFO: ema},
                trainer_state=state, metrics={TAG_METRIC: value}, last=checkpoint is None)
    ck.close()


def test_converted_run_reads_in_noethers_own_resume_and_initializers(runs, tmp_path):
    from noether.core.initializers import PreviousRunInitializer, ResumeInitializer
    from noether.core.providers import PathProvider
    from noether.core.schemas.initializers import PreviousRunInitializerConfig, ResumeInitializerConfig

    run = runs["two_groups"]
    run_ranks(save_ours, 2, str(run.root), str(tmp_path / "ours"), timeout_s=600)
    assert cli_main(["convert", str(tmp_path / "ours" / "ours" / "train"), str(tmp_path / "cons"),
                     "--to", "consolidated"]) == 0
    folder = tmp_path / "cons" / "ours" / "train" / "checkpoints"
    paths = PathProvider(output_root_path=tmp_path / "cons", run_id="elsewhere", stage_name="train")

    # Noether's ResumeInitializer (what HydraRunner builds from resume_run_id): cp=latest files
    resumer = ResumeInitializer(ResumeInitializerConfig(run_id="ours", stage_name="train", checkpoint_tag="latest",
                                                        model_name=MODEL), path_provider=paths)
    assert dict(resumer.start_checkpoint()) == {"epoch": 1, "update": 12, "sample": 48}
    torch.manual_seed(3)
    model = TinyNet(model_config())
    model.initialize()
    resumer.init_weights(model)
    resumer.init_optimizer(model)
    assert_equal_states(run.model.state_dict(), model.state_dict())
    assert_optim_by_name(run.optim_by_name(), by_name(model, model.optimizer.torch_optim))
    trainer = make_trainer(tmp_path / "noether_again", "again", "train")
    trainer.callbacks = trainer.get_user_callbacks(model)
    resumer.init_trainer(trainer)
    resumer.init_callbacks(trainer.callbacks, model)  # EmaCallback reads tinynet_ema=0.9_cp=latest_model.th
    best = next(c for c in trainer.callbacks if type(c).__name__ == "BestCheckpointCallback")
    assert best.best_metric_value == run.file(f"{MODEL}_cp=latest_trainer.th")["callback_state_dicts"][
        "BestCheckpointCallback"]["best_metric_value"]
    ema_cb = next(c for c in trainer.callbacks if type(c).__name__ == "EmaCallback")
    assert_equal_states(run.ema, {**ema_cb.parameters[(None, EMA_FACTOR)], **ema_cb.buffers[None]})

    # Noether's PreviousRunInitializer: best_model.<metric> and the EMA spelling
    for tag, info, want in ((f"best_model.{TAG_METRIC}", None, f"{MODEL}_cp=E0_U4_S16_model.th"),
                            ({"update": 4}, EMA_INFO, f"{MODEL}_ema={EMA_FACTOR}_cp=E0_U4_S16_model.th"),
                            ("last", None, f"{MODEL}_cp=last_model.th")):
        target = TinyNet(model_config())
        PreviousRunInitializer(PreviousRunInitializerConfig(run_id="ours", stage_name="train", model_name=MODEL,
                                                            checkpoint_tag=tag, model_info=info),
                               path_provider=paths).init_weights(target)
        assert_equal_states(run.file(want)["state_dict"], target.state_dict())

    # model files carry what Noether's tools rebuild the model from, and the EMA factor
    for name in (f"{MODEL}_cp=E1_U12_S48_model.th", f"{MODEL}_cp=latest_model.th", f"{MODEL}_ema={EMA_FACTOR}_cp=latest_model.th"):
        converted = torch.load(folder / name, weights_only=True)
        original = run.file(name.replace("E1_U12_S48", "latest"))
        assert converted["config_kind"] == original["config_kind"]
        assert converted["model_config"] == original["model_config"]
        assert converted.get("ema") == original.get("ema")
        assert converted["training_iteration"] == original["training_iteration"]
