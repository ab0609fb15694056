"""The gathering writer on 2 real ranks with a real Noether trainer: calls of one training
point (some on rank 0 only) become one commit, aliases follow exactly the calls Noether made,
and a save that only some ranks reach never enters a collective."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.support.ranks import run_ranks

pytestmark = pytest.mark.slow


def _trainer(out: str) -> tuple[Any, Any]:
    from noether.core.providers import MetricPropertyProvider, PathProvider
    from noether.core.trackers.noop import NoopTracker
    from noether.data.container import DataContainer

    from .project.project import SyntheticDataset, SyntheticDatasetConfig, TinyNet, TinyNetConfig, TinyTrainer

    path_provider = PathProvider(output_root_path=Path(out), run_id="gather", stage_name="train")
    metrics = MetricPropertyProvider()
    config = TinyTrainer._config_class(kind="tests.integration.noether.project.project.TinyTrainer", effective_batch_size=4,
                                       max_updates=10, callbacks=[], add_default_callbacks=False,
                                       add_trainer_callbacks=False, checkpointer={"timeout_s": 30})
    data = DataContainer(datasets={"train": SyntheticDataset(SyntheticDatasetConfig())}, num_workers=0,
                         pin_memory=False)
    trainer = TinyTrainer(config, data_container=data, device="cpu", tracker=NoopTracker(metrics, path_provider),
                          path_provider=path_provider, metric_property_provider=metrics)
    model = TinyNet(TinyNetConfig(name="net", optimizer_config={"kind": "torch.optim.AdamW", "lr": 0.01}),
                    update_counter=trainer.update_counter, path_provider=path_provider)
    return trainer, trainer._prepare_model(model)


def _points(rank: int, world_size: int, out: str) -> dict[str, Any]:
    trainer, model = _trainer(out)
    writer, counter = trainer.checkpoint_writer, trainer.update_counter
    ema = {k: v.detach().clone() * 0.5 for k, v in model.state_dict().items()}
    results = {}

    def advance(updates: int) -> str:
        for _ in range(updates):
            counter.add_samples(4)
            counter.next_update()
        return str(counter.cur_iteration)

    def done(result: Any) -> Any:
        return None if result is None else (str(result.iteration), sorted(result.aliases), result.reused_existing)

    # U2: CheckpointCallback (every rank), EmaCallback (rank 0 only), BestCheckpointCallback (every rank).
    tag = advance(2)
    writer.save(model, tag, trainer=trainer, save_optim=True)
    if rank == 0:
        writer.save_model_checkpoint("net", tag, state_dict=ema, model_info="ema=0.5", ema=0.5)
    writer.save(model, "best_model.loss.val", save_optim=False)
    results["U2"] = done(writer.flush())
    # U4: only the EMA saves (its interval differs), on rank 0 only.
    tag = advance(2)
    if rank == 0:
        writer.save_model_checkpoint("net", tag, state_dict=ema, model_info="ema=0.5", ema=0.5)
    results["U4"] = done(writer.flush())
    # U6: a callback failed on rank 1 only; Noether asks that rank alone for an error save.
    advance(2)
    if rank == 1:
        started = time.monotonic()
        writer.save(model, f"{counter.cur_iteration}.error", trainer=trainer)
        results["error_save_s"] = time.monotonic() - started
    results["U6"] = done(writer.flush())
    # U8: the end of training: CheckpointCallback.after_training (last) and EMA save_last_weights.
    tag = advance(2)
    writer.save(model, tag, trainer=trainer)
    writer.save(model, "last", trainer=trainer)
    if rank == 0:
        writer.save_model_checkpoint("net", "last", state_dict=ema, model_info="ema=0.5", ema=0.5)
    results["U8"] = done(writer.flush())
    # U8 again: BestCheckpointCallback decides after the point committed: only the alias moves.
    writer.save(model, "best_model.loss.val", save_optim=False)
    results["U8 again"] = done(writer.flush())
    writer.close()
    return results


def test_points_commit_once_with_rank0_only_ema_and_aliases_as_noether_decided(tmp_path) -> None:
    from noether_dist.stage.commit import list_commits, read_alias, read_commit
    from noether_dist.format.layout import StageLayout
    from noether_dist.io.storage import open_storage

    results = run_ranks(_points, 2, str(tmp_path), timeout_s=240)
    assert results[0] == {k: v for k, v in results[1].items() if k != "error_save_s"}
    r = results[0]
    assert r["U2"] == ("E0_U2_S8", ["best.loss.val", "latest"], False)
    assert r["U4"] == ("E0_U4_S16", ["latest"], False)
    assert r["U6"] is None  # nothing gathered on rank 0: nothing committed, nobody waited
    assert results[1]["error_save_s"] < 1.0
    assert r["U8"] == ("E0_U8_S32", ["last", "latest"], False)
    assert r["U8 again"] == ("E0_U8_S32", ["best.loss.val", "latest"], True)

    storage, layout = open_storage(str(tmp_path)), StageLayout(str(tmp_path), "gather", "train")
    assert [str(it) for it in list_commits(storage, layout)] == ["E0_U2_S8", "E0_U4_S16", "E0_U8_S32"]
    kinds = {str(it): sorted((a.kind, a.model_info or "") for a in read_commit(storage, layout, it).artifacts)
             for it in list_commits(storage, layout)}
    ema = ("model", "ema_factor=0.5")
    assert kinds["E0_U2_S8"] == [("model", ""), ema, ("optim", ""), ("trainer", "")]
    assert kinds["E0_U4_S16"] == [("model", ""), ema, ("trainer", "")]  # no optimizer asked for
    assert kinds["E0_U8_S32"] == [("model", ""), ema, ("optim", ""), ("trainer", "")]
    assert str(read_alias(storage, layout, "best.loss.val").iteration) == "E0_U8_S32"
    assert str(read_alias(storage, layout, "last").iteration) == "E0_U8_S32"
