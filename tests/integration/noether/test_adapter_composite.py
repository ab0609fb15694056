"""A CompositeModel (one optimizer per submodel) saved through the adapter's writer and
resumed through Noether's resume initializer config, in one process; converted to
consolidated files, it has the files Noether's own CheckpointWriter writes for it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from noether.core.providers import MetricPropertyProvider, PathProvider
from noether.core.schemas.initializers import ResumeInitializerConfig
from noether.core.trackers.noop import NoopTracker
from noether.data.container import DataContainer

from noether_dist.stage.commit import list_commits, read_commit
from noether_dist.format.layout import StageLayout
from noether_dist.io.storage import open_storage

from .project.project import (SyntheticDataset, SyntheticDatasetConfig, TinyComposite, TinyCompositeConfig,
                              TinyNetConfig, TinyTrainer)

ADAM = {"kind": "torch.optim.AdamW", "lr": 0.01, "weight_decay": 0.05}


def _trainer_and_model(out: Path, run_id: str, initializer: Any = None) -> tuple[Any, Any]:
    path_provider = PathProvider(output_root_path=out, run_id=run_id, stage_name="train")
    metrics = MetricPropertyProvider()
    config = TinyTrainer._config_class(kind="tests.integration.noether.project.project.TinyTrainer", effective_batch_size=4,
                                       max_updates=10, callbacks=[], add_default_callbacks=False,
                                       add_trainer_callbacks=False, initializer=initializer)
    data = DataContainer(datasets={"train": SyntheticDataset(SyntheticDatasetConfig())}, num_workers=0,
                         pin_memory=False)
    trainer = TinyTrainer(config, data_container=data, device="cpu", tracker=NoopTracker(metrics, path_provider),
                          path_provider=path_provider, metric_property_provider=metrics)
    model_config = TinyCompositeConfig(
        name="comp", encoder=TinyNetConfig(name="encoder", out_dim=4, optimizer_config=ADAM),
        decoder=TinyNetConfig(name="decoder", width=8, optimizer_config={**ADAM, "lr": 0.02}))
    model = TinyComposite(model_config, update_counter=trainer.update_counter, path_provider=path_provider)
    return trainer, trainer._prepare_model(model)


def _optim_states(model: Any) -> dict[str, Any]:
    return {name: sub.optimizer.torch_optim.state_dict()["state"] for name, sub in model.submodels.items()}


def _train(trainer: Any, model: Any, updates: int = 3) -> None:
    x = torch.randn(8, 4)
    for _ in range(updates):
        model.optimizer_schedule_step()
        model(x).pow(2).mean().backward()
        model.optimizer_step(None)
        model.optimizer_zero_grad()
        trainer.update_counter.add_samples(4)
        trainer.update_counter.next_update()


def test_composite_model_resumes_every_submodel_and_its_optimizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trainer, model = _trainer_and_model(tmp_path, "comp")
    _train(trainer, model)
    writer = trainer.checkpoint_writer
    writer.save(model, str(trainer.update_counter.cur_iteration), trainer=trainer)
    result = writer.flush()
    assert str(result.iteration) == "E0_U3_S12"
    storage, layout = open_storage(str(tmp_path)), StageLayout(str(tmp_path), "comp", "train")
    record = read_commit(storage, layout, list_commits(storage, layout)[0])
    assert sorted(a.kind for a in record.artifacts) == ["model", "optim", "trainer"]

    torch.manual_seed(1)  # a different fresh model: the resume must overwrite everything
    resume = ResumeInitializerConfig(run_id="comp", stage_name="train", checkpoint_tag="latest", model_name="comp")
    trainer2, model2 = _trainer_and_model(tmp_path, "comp2", initializer=resume)
    assert dict(trainer2.start_checkpoint) == {"epoch": 0, "update": 3, "sample": 12}
    for key, value in model.state_dict().items():
        assert torch.equal(model2.state_dict()[key], value), key
    before, after = _optim_states(model), _optim_states(model2)
    for name in ("encoder", "decoder"):
        assert before[name].keys() == after[name].keys() and before[name]
        for idx, state in before[name].items():
            for k, v in state.items():
                assert torch.equal(torch.as_tensor(after[name][idx][k]), torch.as_tensor(v)), (name, idx, k)


def _by_name(osd: dict[str, Any]) -> tuple[dict[str, Any], list[Any]]:
    """An optimizer file's state and group settings by parameter name (Noether's param_idx_to_name)."""
    names = osd["param_idx_to_name"]
    groups = sorted((sorted(names[i] for i in g["params"]), {k: v for k, v in g.items() if k != "params"})
                    for g in osd["param_groups"])
    return {names[i]: st for i, st in osd["state"].items()}, groups


def test_converted_composite_has_the_files_noethers_writer_writes(tmp_path: Path) -> None:
    from noether.core.initializers import ResumeInitializer
    from noether.core.writers.checkpoint_writer import CheckpointWriter

    from noether_dist.tools.cli import main as cli_main

    torch.manual_seed(0)
    trainer, model = _trainer_and_model(tmp_path / "ours", "comp")
    _train(trainer, model)
    point = str(trainer.update_counter.cur_iteration)
    ema = {k: v * 0.5 for k, v in model.encoder.state_dict().items()}  # an EMA of the encoder (model_paths)
    # the adapter saves the composite as ONE model, ONE optimizer artifact and the encoder's EMA
    writer = trainer.checkpoint_writer
    writer.save(model, point, trainer=trainer)
    writer.save_model_checkpoint("comp.encoder", point, ema, model_config=model.model_config, model_info="ema=0.9",
                                 ema=0.9)
    writer.flush()
    # Noether's own writer, same model and point, elsewhere
    noether = CheckpointWriter(PathProvider(output_root_path=tmp_path / "noether", run_id="comp", stage_name="train"),
                               trainer.update_counter)
    noether.save(model, point, save_weights=True, save_optim=True)
    noether.save_model_checkpoint("comp.encoder", point, ema, model_config=model.model_config, model_info="ema=0.9",
                                  ema=0.9)
    assert cli_main(["convert", str(tmp_path / "ours" / "comp" / "train"), str(tmp_path / "cons"),
                     "--to", "consolidated"]) == 0

    want_dir = tmp_path / "noether" / "comp" / "train" / "checkpoints"
    got_dir = tmp_path / "cons" / "comp" / "train" / "checkpoints"
    want = sorted(p.name for p in want_dir.iterdir())
    assert want == sorted(f"comp.{sub}_cp={point}_{kind}.th" for sub in ("decoder", "encoder") for kind in ("model", "optim")) \
        + [f"comp.encoder_ema=0.9_cp={point}_model.th"]
    got = {p.name for p in got_dir.iterdir()}
    for name in want:
        for tag in (point, "latest"):  # and under Noether's tag of the latest alias
            assert name.replace(point, tag) in got, name.replace(point, tag)
        w = torch.load(want_dir / name, weights_only=True)
        g = torch.load(got_dir / name, weights_only=True)
        if name.endswith("_optim.th"):
            (w_state, w_groups), (g_state, g_groups) = _by_name(w), _by_name(g)
            assert w_groups == g_groups, name
            assert w_state.keys() == g_state.keys() and w_state, name
            for param, st in w_state.items():
                assert st.keys() == g_state[param].keys(), (name, param)
                for k, v in st.items():
                    assert torch.equal(torch.as_tensor(v), torch.as_tensor(g_state[param][k])), (name, param, k)
            continue
        assert sorted(w) == sorted(g), name
        assert w["state_dict"].keys() == g["state_dict"].keys(), name
        for key, value in w["state_dict"].items():
            assert torch.equal(value, g["state_dict"][key]), (name, key)
        for key in ("model_config", "config_kind", "ema", "training_iteration", "checkpoint_tag", "run_id"):
            assert w.get(key) == g.get(key), (name, key)

    # Noether's own ResumeInitializer reads the converted composite (per-submodel files, cp=latest)
    torch.manual_seed(1)
    _, fresh = _trainer_and_model(tmp_path / "fresh", "fresh")
    resumer = ResumeInitializer(ResumeInitializerConfig(run_id="comp", stage_name="train", checkpoint_tag="latest",
                                                        model_name="comp"),
                                path_provider=PathProvider(output_root_path=tmp_path / "cons", run_id="x",
                                                           stage_name="train"))
    resumer.init_weights(fresh)
    resumer.init_optimizer(fresh)
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    before, after = _optim_states(model), _optim_states(fresh)
    for name in ("encoder", "decoder"):
        for idx, state in before[name].items():
            for k, v in state.items():
                assert torch.equal(torch.as_tensor(after[name][idx][k]), torch.as_tensor(v)), (name, idx, k)
