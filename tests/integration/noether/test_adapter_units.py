"""The adapter's pieces in one process, against the real Noether classes."""

from __future__ import annotations

from pathlib import Path

import pytest
from torch.utils.data import DistributedSampler

from noether_dist.errors import ConfigError, InvalidNameError
from noether_dist.integrations.noether.block import checkpointer_config
from noether_dist.integrations.noether.data import EpochCountingSampler
from noether_dist.integrations.noether.gather import noether_tag
from noether_dist.integrations.noether.resume import checkpoint_ref_of_tag
from noether_dist.format.names import CheckpointRef, TrainingIteration
from tests.support.ranks import run_ranks


@pytest.mark.parametrize("tag, expected", [
    ("E1_U8_S32", ("point", None)),
    ("latest", ("latest", None)),
    ("last", ("alias", "last")),
    ("best_model.loss.val.total", ("alias", "best.loss.val.total")),
    ("best_model.loss.tolerance=2", ("alias", "best.loss.tolerance=2")),
    ("E1_U8_S32.error", ("error", None)),
    ("E1_U8_S32.early_exit", ("early_exit", None)),
])
def test_noether_tags_map_to_points_and_aliases(tag, expected) -> None:
    assert noether_tag(tag) == expected


@pytest.mark.parametrize("tag", ["pretrain_end", "best_model.", "best_model.a/b"])
def test_a_tag_without_meaning_is_refused(tag) -> None:
    with pytest.raises((ConfigError, InvalidNameError)):
        noether_tag(tag)


@pytest.mark.parametrize("tag, ref, explicit", [
    (None, CheckpointRef.latest(), False),
    ("latest", CheckpointRef.latest(), False),
    ("last", CheckpointRef.last(), True),
    ("best_model.loss.val", CheckpointRef.best("loss.val"), True),
    ({"epoch": 2}, "E2", True),
    ({"update": 16, "epoch": None}, "U16", True),
    ({"epoch": 2, "update": 16, "sample": 64}, CheckpointRef.at(TrainingIteration(2, 16, 64)), True),
])
def test_noether_checkpoint_tags_select_as_noether_means(tag, ref, explicit) -> None:
    got, got_explicit = checkpoint_ref_of_tag(tag)
    assert (str(got) if isinstance(ref, str) else got) == ref
    assert got_explicit is explicit


def test_checkpoint_tag_with_two_counters_is_refused() -> None:
    with pytest.raises(ConfigError, match="one of epoch, update, sample"):
        checkpoint_ref_of_tag({"epoch": 2, "update": 16})


def test_checkpointer_block_takes_names_from_noether_and_refuses_them_in_the_block(tmp_path) -> None:
    config = checkpointer_config({"async_mode": "thread", "retention": {"keep_last": 2}}, output_dir=str(tmp_path),
                                 run_id="r1", stage_name="train", model_name="net")
    assert (config.output_dir, config.run_id, config.stage_name, config.model_name) == (str(tmp_path), "r1", "train",
                                                                                       "net")
    assert config.async_mode.value == "thread"
    assert checkpointer_config({"output_dir": "s3://b/p"}, output_dir=str(tmp_path), run_id="r1", stage_name=None,
                               model_name="net").output_dir == "s3://b/p"
    for key in ("run_id", "best_metrics", "model_name", "stage_name"):
        with pytest.raises(ConfigError, match=f"checkpointer.{key} cannot be set"):
            checkpointer_config({key: "x"}, output_dir=str(tmp_path), run_id="r1", stage_name=None, model_name="n")
    with pytest.raises(ConfigError, match="did you mean 'timeout_s'"):
        checkpointer_config({"timeout": 5}, output_dir=str(tmp_path), run_id="r1", stage_name=None, model_name="n")


def test_epoch_counting_sampler_numbers_the_epochs_after_a_mid_epoch_resume() -> None:
    data = list(range(16))
    counted = EpochCountingSampler(DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, drop_last=True))
    reference = DistributedSampler(data, num_replicas=2, rank=0, shuffle=True, drop_last=True)
    # Noether's sampler calls set_epoch(1) for the resumed epoch and again for the next one.
    for call, real_epoch in ((1, 1), (1, 2), (1, 3)):
        counted.set_epoch(call)
        reference.set_epoch(real_epoch)
        assert list(counted) == list(reference)
    assert len(counted) == 8 and counted.dataset is data


def link_ancestor(rank: int, world_size: int, out: str) -> bool:
    """Rank 1 links first (a no-op), then rank 0; returns whether rank 1's call made a link."""
    from noether.core.providers import PathProvider

    from noether_dist.dist.comm import Comm
    from noether_dist.integrations.noether.train import link_ancestor_on_rank0

    link_ancestor_on_rank0()
    link_ancestor_on_rank0()  # idempotent: still one wrapper
    comm = Comm(60.0)
    paths = PathProvider(output_root_path=Path(out), run_id="resumed", stage_name="train")
    ancestor = PathProvider(output_root_path=Path(out), run_id="first", stage_name="train")
    made_by_rank1 = False
    if rank == 1:
        paths.link(ancestor)
        made_by_rank1 = (paths.run_output_path / "ancestor").is_symlink()
    comm.barrier()
    if rank == 0:
        paths.link(ancestor)
    comm.barrier()
    return made_by_rank1


def test_only_rank0_links_the_ancestor_of_a_resumed_run(tmp_path) -> None:
    # Noether lets every rank replace the symlink, a race that fails one rank at random
    (tmp_path / "first" / "train").mkdir(parents=True)
    assert run_ranks(link_ancestor, 2, str(tmp_path), timeout_s=120) == [False, False]
    link = tmp_path / "resumed" / "train" / "ancestor"
    assert link.is_symlink() and link.resolve() == (tmp_path / "first" / "train").resolve()
