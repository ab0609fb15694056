"""Damaged checkpoints: verify names the damage; resume falls back or refuses, on every rank alike.

One 2-rank job commits U1, U2, U3 (FSDP-sharded model, optimizer, EMA). Each scenario copies
that folder and damages it the way disks and people do: flipped bytes in a shard, a
truncated shard, a deleted shard file, a deleted commit record, a garbage commit record, a
garbage alias. Then:

- ``noether-ckpt verify`` exits 1 and its JSON names the damaged path and the kind;
- resume without an explicit checkpoint loads the newest intact committed checkpoint
  (exact state) and logs a warning that says why;
- resume of the damaged checkpoint by name raises, the same error on every rank.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

from noether_dist import Checkpointer, CheckpointerConfig, TrainingIteration, resume
from noether_dist.tools.cli import main as cli_main
from noether_dist.errors import NoetherDistError
from tests.support.ranks import run_ranks
from tests.support.models import EMA_INFO, assert_states_equal, build, full_state, train_steps

pytestmark = pytest.mark.slow

RUN, STAGE, MODEL = "run1", "train", "mlp"
U1, U2, U3 = "E0_U1_S16", "E0_U2_S32", "E0_U3_S48"
CK = Path(RUN) / STAGE / "checkpoints"


def save_three(rank: int, world_size: int, out: str) -> dict:
    model, opt, ema = build()
    ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id=RUN, stage_name=STAGE, model_name=MODEL,
                                         timeout_s=30))
    states = {}
    for update in (1, 2, 3):
        train_steps(model, opt, ema, 1, rank, start=update)
        it = TrainingIteration(0, update, 16 * update)
        states[str(it)] = full_state(model, opt, ema)
        ck.save(it, model=model, optimizer=opt, ema={EMA_INFO: ema}, trainer_state={"at": str(it)},
                rank_state={"rank": rank})
    return states


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    mid = len(data) // 2
    data[mid] ^= 0xFF
    data[mid + 1] ^= 0x55
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


SHARD = f"{MODEL}_cp={U3}_model.th/__0_0.distcp"
OPTIM_SHARD = f"{MODEL}_cp={U3}_optim.th/__1_0.distcp"
TRAINER_META = f"{MODEL}_cp={U3}_trainer.th/.metadata"
# name -> (damage, verify kind, damaged path relative to checkpoints/, latest resumes, warning fragment,
#          explicit U3: error type and fragment, or None when it must load)
SCENARIOS = {
    "flipped_bytes": (lambda ck: _flip(ck / SHARD), "crc", SHARD, U2, "cannot be read by every rank",
                      ("CheckpointNotFoundError", f"{SHARD} is corrupt: CRC32")),
    "truncated": (lambda ck: _truncate(ck / OPTIM_SHARD), "size", OPTIM_SHARD, U2, "cannot be read by every rank",
                  ("CheckpointNotFoundError", "bytes, the commit record says")),
    "deleted_file": (lambda ck: (ck / TRAINER_META).unlink(), "missing", TRAINER_META, U2,
                     "cannot be read by every rank", ("CheckpointNotFoundError", f"{MODEL}_cp={U3}_trainer.th")),
    "deleted_commit_record": (lambda ck: (ck / "_commits" / f"{U3}.json").unlink(), "uncommitted",
                              f"{MODEL}_cp={U3}_model.th", U2, f"alias latest names {U3}, which is not an intact commit",
                              ("CheckpointNotFoundError", "no committed checkpoint matches U3")),
    "garbage_commit_record": (lambda ck: (ck / "_commits" / f"{U3}.json").write_bytes(b'{"artifacts": [tru'),
                              "corrupt_record", f"_commits/{U3}.json", U2, f"{U3}.json is corrupt",
                              ("CorruptRecordError", f"{U3}.json is corrupt")),
    "garbage_alias": (lambda ck: (ck / "_aliases" / "latest.json").write_bytes(b"\x00\xffnot an alias"),
                      "bad_alias", "_aliases/latest.json", U3, "_aliases/latest.json is corrupt", None),
}


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """The base checkpoints and one damaged copy per scenario: (states, {name: folder})."""
    base = tmp_path_factory.mktemp("corruption")
    states = run_ranks(save_three, 2, str(base / "base"))[0]
    folders = {}
    for name, (damage, *_rest) in SCENARIOS.items():
        folder = base / name
        shutil.copytree(base / "base", folder)
        damage(folder / CK)
        folders[name] = str(folder)
    return states, folders


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def resume_each(rank: int, world_size: int, folders: dict[str, str]) -> dict:
    """For every scenario: resume latest (warnings captured), then U3 by name."""
    handler = _Warnings()
    logging.getLogger("noether_dist").addHandler(handler)
    out = {}
    for name, folder in folders.items():
        root = {"output_dir": folder, "resume_run_id": RUN, "resume_stage_name": STAGE}
        handler.messages.clear()
        model, opt, ema = build(seed=11)
        res = resume(root, model=model, optimizer=opt, ema={EMA_INFO: ema}, model_name=MODEL, timeout_s=20)
        entry = {"latest": res.checkpoint, "skipped": res.fell_back_from, "state": full_state(model, opt, ema),
                 "trainer": res.trainer_state, "warnings": list(handler.messages)}
        model, opt, ema = build(seed=12)
        try:
            res = resume({**root, "resume_checkpoint": "U3"}, model=model, optimizer=opt, ema={EMA_INFO: ema},
                         model_name=MODEL, timeout_s=20)
            entry["explicit"] = ("ok", res.checkpoint, full_state(model, opt, ema))
        except NoetherDistError as exc:
            entry["explicit"] = (type(exc).__name__, str(exc), None)
        out[name] = entry
    return out


def test_resume_falls_back_to_the_newest_intact_checkpoint_or_refuses(damaged):
    states, folders = damaged
    per_rank = run_ranks(resume_each, 2, folders, timeout_s=120)
    for name, (_damage, _kind, _path, want, warning, explicit) in SCENARIOS.items():
        got = [r[name] for r in per_rank]
        for entry in got:
            assert entry["latest"] == want, (name, entry["latest"])
            assert_states_equal(states[want], entry["state"])
            assert entry["trainer"] == {"at": want}
        assert any(warning in w for w in got[0]["warnings"]), (name, got[0]["warnings"])
        if explicit is None:
            assert all(e["explicit"][0] == "ok" and e["explicit"][1] == U3 for e in got), name
            assert_states_equal(states[U3], got[0]["explicit"][2])
        else:
            kinds = {e["explicit"][0] for e in got}
            messages = {e["explicit"][1] for e in got}
            assert kinds == {explicit[0]} and len(messages) == 1, (name, kinds, messages)  # every rank alike
            assert explicit[1] in messages.pop(), (name, got[0]["explicit"][1])


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_verify_names_the_damage(damaged, name, capsys):
    _states, folders = damaged
    _damage, kind, rel, *_rest = SCENARIOS[name]
    stage = os.path.join(folders[name], RUN, STAGE)
    assert cli_main(["verify", "--json", stage]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    found = [(d["kind"], d["path"]) for d in report["damages"]]
    expected_path = os.path.join(folders[name], str(CK), rel)
    assert (kind, expected_path) in found, found
    if name == "deleted_commit_record":  # latest now names a point that is not committed
        assert ("bad_alias", os.path.join(folders[name], str(CK), "_aliases", "latest.json")) in found
    # the other checkpoints are reported intact
    intact = {c["checkpoint"] for c in report["stages"][0]["checkpoints"] if c["ok"]}
    assert {U1, U2} <= intact, report["stages"][0]["checkpoints"]
    # the human-readable form names it too, and so does verify of that checkpoint alone
    assert cli_main(["verify", "--no-progress", stage]) == 1
    text = capsys.readouterr()
    assert kind in text.out and "problem(s) found" in text.err
    assert cli_main(["verify", "--json", stage, "--checkpoint", "U2"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_verify_clean_folder_exits_0(damaged, capsys):
    _states, folders = damaged
    base = os.path.join(os.path.dirname(folders["garbage_alias"]), "base")
    assert cli_main(["verify", "--json", base]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["files"] == 36 and report["damages"] == []  # 3 points x 4 artifacts x (.metadata + 2 shards)
