"""Resume sends each rank only its part of a DCP artifact's metadata (issue 10).

Real ranks, FSDP2 on gloo: saved on 2 ranks and resumed on 4, saved on 4 and resumed on 2.
Every rank counts the metadata entries it received for each artifact (the DEBUG record
resume logs) and compares them with what it needs, computed here from the whole
``.metadata`` by brute force: the stored chunks that overlap its own shards, plus the
replicated entries (optimizer ``step``, hyperparameters, the trainer's common state) that
lie in its own files. The resumed state must be exact.
"""

from __future__ import annotations

import logging
import re

import pytest
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from noether_dist import Checkpointer, CheckpointerConfig, TrainingIteration, resume
from noether_dist.format.trainer_keys import TRAINER_COMMON_KEY, trainer_rank_key
from noether_dist.io import dcp_io
from noether_dist.io.statedict import model_state, optimizer_state
from noether_dist.io.storage import open_storage
from tests.support.models import EMA_INFO, assert_states_equal, build, full_state, train_steps
from tests.support.ranks import run_ranks

pytestmark = [pytest.mark.slow]


def save_job(rank: int, world_size: int, out: str) -> dict:
    model, opt, ema = build()
    train_steps(model, opt, ema, 2, rank)
    ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id="run", stage_name="s", model_name="mlp"))
    ck.save(TrainingIteration(0, 2, 16 * world_size), model=model, optimizer=opt, ema={EMA_INFO: ema},
            trainer_state={"progress": 2}, rank_state={"rank": rank})
    return full_state(model, opt, ema)


class _Parts(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.parts: dict[str, dict] = {}

    def emit(self, record: logging.LogRecord) -> None:
        part = getattr(record, "metadata_part", None)
        if part is not None:
            self.parts[part["artifact"]] = part


def _overlaps(chunk, offsets, sizes) -> bool:
    return all(min(o + s, lo + ls) > max(o, lo) for o, s, lo, ls in zip(chunk.offsets, chunk.sizes, offsets, sizes))


def _file_rank(metadata, index, world_size: int) -> int:
    return int(re.match(r"__(\d+)_", metadata.storage_data[index].relative_path).group(1)) % world_size


def _needed(metadata, flat: dict, rank: int, world_size: int) -> int:
    """Entries this rank needs, by brute force over every stored chunk."""
    count = 0
    for key, value in flat.items():
        md = metadata.state_dict_metadata[key]
        sharded = dcp_io.is_sharded(value)
        if not sharded and world_size > 1:  # replicated: read by the rank whose file holds it
            index = next(i for i in metadata.storage_data if i.fqn == key)
            count += len(getattr(md, "chunks", [None])) if _file_rank(metadata, index, world_size) == rank else 0
            continue
        if not sharded:
            count += len(md.chunks) if isinstance(md, TensorStorageMetadata) else 1
            continue
        for local in value.__create_chunk_list__():
            count += sum(1 for c in md.chunks if _overlaps(c, local.offsets, local.sizes))
    return count


def resume_and_count(rank: int, world_size: int, out: str) -> dict:
    handler = _Parts()
    logger = logging.getLogger("noether_dist.io.dcp_format")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    model, opt, ema = build(seed=123)  # different init: everything must come from the checkpoint
    res = resume({"output_dir": out, "resume_run_id": "run", "resume_stage_name": "s"},
                 model=model, optimizer=opt, ema={EMA_INFO: ema}, model_name="mlp")
    storage = open_storage(out)
    checks = {}
    for art in res.record.artifacts:
        path = res.layout.artifact_path(art.name)
        metadata = dcp_io.read_metadata(path, storage)
        total = sum(len(md.chunks) if isinstance(md, TensorStorageMetadata) else 1
                    for md in metadata.state_dict_metadata.values())
        if art.kind == "trainer":
            keys = [trainer_rank_key(rank)] if trainer_rank_key(rank) in metadata.state_dict_metadata else []
            common = next(i for i in metadata.storage_data if i.fqn == TRAINER_COMMON_KEY)
            needed = len(keys) + (1 if world_size == 1 or _file_rank(metadata, common, world_size) == rank else 0)
        else:
            state = (optimizer_state(model, opt) if art.kind == "optim"
                     else model_state(ema if art.model_info else model))
            needed = _needed(metadata, dcp_io.staging(state).flat, rank, world_size)
        size = storage.size(f"{path}/{dcp_io.METADATA_FILE}")
        checks[art.kind + (f":{art.model_info}" if art.model_info else "")] = {
            "got": handler.parts[art.name], "needed": needed, "total": total, "file_bytes": size}
    logger.removeHandler(handler)
    return {"state": full_state(model, opt, ema), "checks": checks, "rank_state": res.rank_state,
            "trainer": res.trainer_state}


@pytest.mark.parametrize("saved_on,resumed_on", [(2, 4), (4, 2)])
def test_each_rank_receives_only_its_part_of_the_metadata(tmp_path, saved_on, resumed_on):
    out = str(tmp_path)
    saved = run_ranks(save_job, saved_on, out)[0]
    results = run_ranks(resume_and_count, resumed_on, out, timeout_s=180)
    received = {}
    for rank, result in enumerate(results):
        assert_states_equal(saved, result["state"])
        assert result["trainer"] == {"progress": 2}
        assert result["rank_state"] == ({"rank": rank} if rank < saved_on else None)
        assert set(result["checks"]) == {"model", f"model:{EMA_INFO}", "optim", "trainer"}
        for what, check in result["checks"].items():
            got = check["got"]
            assert got["entries"] == check["needed"], (rank, what, check)
            if rank > 0:  # a non-coordinator rank never holds the whole metadata
                assert got["entries"] < check["total"], (rank, what, check)
                assert got["bytes"] < check["file_bytes"], (rank, what, check)
            received[what] = received.get(what, 0) + got["entries"]
    # every stored chunk of the model reaches some rank (a chunk that spans two ranks' shards: both)
    for what in ("model", f"model:{EMA_INFO}"):
        assert received[what] >= results[0]["checks"][what]["total"]
