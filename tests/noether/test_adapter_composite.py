"""A CompositeModel (one optimizer per submodel) saved through the adapter's writer and
resumed through Noether's resume initializer config, in one process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from noether.core.providers import MetricPropertyProvider, PathProvider
from noether.core.schemas.initializers import ResumeInitializerConfig
from noether.core.trackers.noop import NoopTracker
from noether.data.container import DataContainer

from noether_dist.commit import list_commits, read_commit
from noether_dist.layout import StageLayout
from noether_dist.storage import open_storage

from .project.project import (SyntheticDataset, SyntheticDatasetConfig, TinyComposite, TinyCompositeConfig,
                              TinyNetConfig, TinyTrainer)

ADAM = {"kind": "torch.optim.AdamW", "lr": 0.01, "weight_decay": 0.05}


def _trainer_and_model(out: Path, run_id: str, initializer: Any = None) -> tuple[Any, Any]:
    path_provider = PathProvider(output_root_path=out, run_id=run_id, stage_name="train")
    metrics = MetricPropertyProvider()
    config = TinyTrainer._config_class(kind="tests.noether.project.project.TinyTrainer", effective_batch_size=4,
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


def test_composite_model_resumes_every_submodel_and_its_optimizer(tmp_path: Path) -> None:
    torch.manual_seed(0)
    trainer, model = _trainer_and_model(tmp_path, "comp")
    x = torch.randn(8, 4)
    for _ in range(3):
        model.optimizer_schedule_step()
        model(x).pow(2).mean().backward()
        model.optimizer_step(None)
        model.optimizer_zero_grad()
        trainer.update_counter.add_samples(4)
        trainer.update_counter.next_update()
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
