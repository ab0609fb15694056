"""Simulated nodes for peer-copy tests: groups of ranks, each node with a folder of its own
(set up as torchrun would on a node), and the saves and resumes the tests run on them."""

from __future__ import annotations

import os
import zlib
from pathlib import Path

from noether_dist import Checkpointer, CheckpointerConfig, TrainingIteration, resume
from noether_dist.config import Replicate
from noether_dist.stage.retention import RetentionPolicy
from tests.support.models import EMA_INFO, build, full_state, train_steps

__all__ = ["CK", "place", "save_points", "resume_points", "crc"]

CK = Path("r") / "s" / "checkpoints"
"""The checkpoints folder of run ``r``, stage ``s`` inside a node's folder."""


def place(rank: int, per_node: int) -> int:
    """Set what torchrun sets on a node of ``per_node`` ranks (GROUP_RANK, LOCAL_RANK) for
    ``rank``; return its node."""
    node = rank // per_node
    os.environ.update(GROUP_RANK=str(node), LOCAL_RANK=str(rank % per_node), LOCAL_WORLD_SIZE=str(per_node))
    return node


def save_points(rank: int, world_size: int, dirs: list, per_node: int, keep_last: int | None) -> dict:
    """Two synchronous saves (U1, U2) with peer copies to each node's folder ``dirs[node]``;
    the final state."""
    node = place(rank, per_node)
    model, opt, ema = build()
    ck = Checkpointer(CheckpointerConfig(
        output_dir=dirs[node], run_id="r", stage_name="s", model_name="mlp", node_local=True,
        replicate=Replicate.PEER, retention=RetentionPolicy(keep_last=keep_last) if keep_last else None))
    for update in (1, 2):
        train_steps(model, opt, ema, 1, rank, start=update)
        ck.save(TrainingIteration(0, update, 16 * update), model=model, optimizer=opt, ema={EMA_INFO: ema},
                trainer_state={"update": update}, rank_state={"rank": rank})
    return full_state(model, opt, ema)


def resume_points(rank: int, world_size: int, dirs: list, per_node: int) -> dict:
    """Resume from each node's folder with peer copies: what was loaded, and from where."""
    node = place(rank, per_node)
    model, opt, ema = build(seed=5)
    res = resume({"output_dir": dirs[node], "resume_run_id": "r", "resume_stage_name": "s"}, model=model,
                 optimizer=opt, ema={EMA_INFO: ema}, model_name="mlp", replicate=Replicate.PEER)
    return {"cp": res.checkpoint, "state": full_state(model, opt, ema), "trainer": res.trainer_state,
            "rank_state": res.rank_state, "fell_back": res.fell_back_from}


def crc(path: Path) -> int:
    """CRC32 of a file."""
    return zlib.crc32(path.read_bytes()) & 0xFFFFFFFF
