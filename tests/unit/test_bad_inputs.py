"""Bad input gets a clear error: the right type and a message that says what would be right.

A table of bad configs, names, URLs, CLI arguments and files, each with the expected error
type (or CLI exit code) and a fragment of the message. Then: path traversal through every
name that becomes a path is refused (also names read from stored records), and a
consolidated file holding a pickle with a malicious ``__reduce__`` is refused, not executed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from noether_dist import (Checkpointer, CheckpointerConfig, ResumeConfig, StorageOptions, TrainingIteration,
                          resume)
from noether_dist.tools.cli import main as cli_main
from noether_dist.format.records import CommitRecord, CorruptRecordError
from noether_dist.stage.commit import read_commit
from noether_dist.config import load_yaml
from noether_dist.io.consolidated import read_file
from noether_dist.errors import (CheckpointNotFoundError, ConfigError, InvalidNameError, NoetherDistError,
                                 RemoteRankError)
from noether_dist.initializers import PreviousRunInitializer, build_initializers
from noether_dist.format.layout import StageLayout
from noether_dist.format.names import TrainingIteration as TI
from noether_dist.format.names import normalize_model_info, parse_artifact, parse_checkpoint
from noether_dist.stage.retention import RetentionPolicy
from noether_dist.io.storage import RetryPolicy, open_storage
from noether_dist.trainer.config import TrainConfig
from noether_dist.stage.verify import verify_stage
from tests.support.models import EMA_INFO, build, make_mlp, train_steps

RUN, STAGE, MODEL = "run1", "train", "mlp"


@dataclass
class Ctx:
    """Paths the cases use: ``out`` holds run1/train with one committed checkpoint E0_U1_S8."""

    tmp: Path
    out: str
    stage: str


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> Ctx:
    tmp = tmp_path_factory.mktemp("bad")
    out = str(tmp / "out")
    model, opt, ema = build(sharded=False)
    train_steps(model, opt, ema, 1, 0)
    Checkpointer(CheckpointerConfig(output_dir=out, run_id=RUN, stage_name=STAGE, model_name=MODEL)).save(
        TrainingIteration(0, 1, 8), model=model, optimizer=opt, ema={EMA_INFO: ema})
    (tmp / "list.yaml").write_text("- a\n- b\n")
    (tmp / "broken.yaml").write_text("a: [1, 2\n")
    # a Noether-style single-file checkpoint whose model file is a list, not a dict
    notdict = tmp / "notdict" / "legacy" / "checkpoints"
    notdict.mkdir(parents=True)
    torch.save([1, 2, 3], notdict / f"{MODEL}_cp=E1_U1_S8_model.th")
    # a stage whose only commit record is garbage JSON
    garbage = tmp / "garbage"
    shutil.copytree(out, garbage)
    (garbage / RUN / STAGE / "checkpoints" / "_commits" / "E0_U1_S8.json").write_bytes(b'{"run_id": "run1", ')
    # an output dir with two stages
    shutil.copytree(out, tmp / "multi")
    shutil.copytree(tmp / "multi" / RUN / STAGE, tmp / "multi" / RUN / "second")
    return Ctx(tmp, out, os.path.join(out, RUN, STAGE))


def _cfg(c: Ctx, **kw: Any) -> CheckpointerConfig:
    return CheckpointerConfig(**{"output_dir": c.out, "run_id": RUN, **kw})


def _resume(c: Ctx, out: str | None = None, model_name: str = MODEL, **root: Any):
    model = make_mlp(3)
    return resume({"output_dir": out or c.out, "resume_run_id": RUN, "resume_stage_name": STAGE, **root},
                  model=model, model_name=model_name, timeout_s=30)


def _save(c: Ctx, iteration: Any, ema: dict | None = None):
    ck = Checkpointer(_cfg(c, stage_name="other", model_name=MODEL))
    return ck.save(iteration, model=make_mlp(0), ema=ema)


# (id, call, expected error type, message fragment)
CASES: list[tuple[str, Callable[[Ctx], Any], type, str]] = [
    # -- configs
    ("empty output_dir", lambda c: CheckpointerConfig(output_dir="", run_id="r"), ConfigError,
     "output_dir must be a non-empty path or URL"),
    ("run_id with slash", lambda c: _cfg(c, run_id="a/b"), InvalidNameError, "contains a path separator"),
    ("run_id ..", lambda c: _cfg(c, run_id=".."), InvalidNameError, "contains '..'"),
    ("empty run_id", lambda c: _cfg(c, run_id=""), InvalidNameError, "run_id must be a non-empty string"),
    ("run_id not a string", lambda c: _cfg(c, run_id=7), InvalidNameError, "run_id must be a non-empty string"),
    ("stage_name escaping", lambda c: _cfg(c, stage_name="../up"), InvalidNameError, "stage_name '../up'"),
    ("model_name with cp=", lambda c: _cfg(c, model_name="m_cp=E1"), InvalidNameError, "must not contain 'cp='"),
    ("model_name with backslash", lambda c: _cfg(c, model_name="a\\b"), InvalidNameError, "path separator"),
    ("metric name escaping", lambda c: _cfg(c, best_metrics={"../loss": "min"}), InvalidNameError,
     "metric name '../loss'"),
    ("metric mode", lambda c: _cfg(c, best_metrics={"loss": "lowest"}), ConfigError, "must be 'min' or 'max'"),
    ("timeout 0", lambda c: _cfg(c, timeout_s=0), ConfigError, "timeout_s must be > 0"),
    ("thread_count 0", lambda c: _cfg(c, thread_count=0), ConfigError, "thread_count must be an int >= 1"),
    ("async_mode string", lambda c: _cfg(c, async_mode="thread"), ConfigError, "async_mode must be an AsyncMode"),
    ("unknown config key", lambda c: CheckpointerConfig.from_dict({"output_dir": c.out, "run_id": RUN, "timeout": 5}),
     ConfigError, "unknown key 'timeout' in checkpointer config; did you mean 'timeout_s'?"),
    ("bad async_mode value", lambda c: CheckpointerConfig.from_dict({"output_dir": c.out, "run_id": RUN,
                                                                      "async_mode": "turbo"}),
     ConfigError, "async_mode 'turbo' is not valid; use off, thread or process"),
    ("full name as resume_checkpoint", lambda c: ResumeConfig(output_dir=c.out, resume_run_id=RUN,
                                                              resume_checkpoint="E10_U100_S200"),
     ConfigError, "use one of its parts instead: E10, U100 or S200"),
    ("half a training point", lambda c: ResumeConfig(output_dir=c.out, resume_run_id=RUN, resume_checkpoint="E10_U100"),
     ConfigError, "resume_checkpoint 'E10_U100' is not valid"),
    ("resume_checkpoint escaping", lambda c: ResumeConfig(output_dir=c.out, resume_run_id=RUN,
                                                          resume_checkpoint="best./etc"),
     ConfigError, "resume_checkpoint 'best./etc' is not valid"),
    ("resume_run_id escaping", lambda c: ResumeConfig(output_dir=c.out, resume_run_id="../x"), InvalidNameError,
     "resume_run_id '../x'"),
    ("resume keys without run id", lambda c: ResumeConfig.from_root_config({"resume_stage_name": "x"}), ConfigError,
     "resume_stage_name is set but resume_run_id is not"),
    ("resume without output_dir", lambda c: ResumeConfig.from_root_config({"resume_run_id": RUN}), ConfigError,
     "resume needs output_dir"),
    ("unknown storage option", lambda c: StorageOptions.from_dict({"endpoint": "http://x"}), ConfigError,
     "unknown storage option(s) ['endpoint']"),
    ("retry attempts 0", lambda c: RetryPolicy(attempts=0), ConfigError, "attempts must be >= 1"),
    ("keep_last 0", lambda c: RetentionPolicy(keep_last=0), ConfigError, "keep_last must be an int >= 1"),
    ("keep_every bool", lambda c: RetentionPolicy(keep_last=1, keep_every=True), ConfigError,
     "keep_every must be an int >= 1"),
    ("unknown retention key", lambda c: RetentionPolicy.from_dict({"keep": 3}), ConfigError, "unknown retention key"),
    ("unknown root key", lambda c: TrainConfig.from_dict({"outptu_dir": "x"}), ConfigError,
     "unknown key 'outptu_dir' in the root config; did you mean 'output_dir'?"),
    ("trainer epochs 0", lambda c: TrainConfig.from_dict({"trainer": {"epochs": 0}}), ConfigError,
     "trainer.epochs must be an int >= 1"),
    ("unknown checkpointer key", lambda c: TrainConfig.from_dict({"checkpointer": {"timeout": 1}}), ConfigError,
     "did you mean 'timeout_s'?"),
    ("missing yaml", lambda c: load_yaml(c.tmp / "nope.yaml"), ConfigError, "nope.yaml does not exist"),
    ("yaml not a mapping", lambda c: load_yaml(c.tmp / "list.yaml"), ConfigError, "must hold a mapping at the top"),
    ("broken yaml", lambda c: load_yaml(c.tmp / "broken.yaml"), ConfigError, "is not valid YAML"),
    ("initializer kind", lambda c: build_initializers([{"kind": "no.such.Initializer"}]), ConfigError,
     "initializer kind 'no.such.Initializer' does not import"),
    ("initializer key", lambda c: build_initializers([{"kind": "noether_dist.initializers.PreviousRunInitializer",
                                                       "run_id": RUN, "model_name": MODEL, "chekpoint": "latest"}]),
     ConfigError, "did you mean 'checkpoint'?"),
    # -- names
    ("training point negative", lambda c: TI(-1, 0, 0), ConfigError, "epoch must be an int >= 0"),
    ("training point text", lambda c: TI.parse("E1_U2"), InvalidNameError, "is not a training point"),
    ("checkpoint name", lambda c: parse_checkpoint("newest"), InvalidNameError, "use latest, last, best.<metric>"),
    ("artifact name", lambda c: parse_artifact("weights.th"), InvalidNameError,
     "is not a Noether checkpoint file name"),
    ("model_info escaping", lambda c: normalize_model_info("ema/../x"), InvalidNameError, "path separator"),
    ("save with a string point", lambda c: _save(c, "E0_U1_S8"), ConfigError, "iteration must be a TrainingIteration"),
    ("ema without model_info", lambda c: _save(c, TI(0, 1, 8), ema={"": make_mlp(0)}), ConfigError,
     "an EMA model needs a model_info"),
    # -- URLs and stores
    ("unknown protocol", lambda c: open_storage("nosuch://bucket/x"), ConfigError,
     "use a local path, file:// or s3://bucket/prefix"),
    ("empty URL", lambda c: open_storage(""), ConfigError, "storage URL must be a non-empty string"),
    ("unknown protocol in config", lambda c: Checkpointer(CheckpointerConfig(output_dir="nosuch://x", run_id=RUN)),
     ConfigError, "cannot open storage 'nosuch://x'"),
    # -- resume
    ("resume a run that does not exist", lambda c: _resume(c, resume_run_id="norun"), CheckpointNotFoundError,
     "run 'norun' does not exist under"),
    ("resume a point that does not exist", lambda c: _resume(c, resume_checkpoint="U7"), CheckpointNotFoundError,
     "no committed checkpoint matches U7 in"),
    ("resume another model", lambda c: _resume(c, model_name="other"), ConfigError,
     "holds model 'mlp', not 'other'"),
    # -- files
    ("consolidated file not a dict", lambda c: _resume(c, out=str(c.tmp / "notdict"), resume_run_id="legacy",
                                                       resume_stage_name=None),
     ConfigError, "is not a Noether model file: expected a dict with 'state_dict'"),
    ("garbage commit record", lambda c: read_commit(open_storage(str(c.tmp)), StageLayout(str(c.tmp / "garbage"), RUN,
                                                                                        STAGE), TI(0, 1, 8)),
     CorruptRecordError, "E0_U1_S8.json is corrupt: JSONDecodeError"),
    ("garbage commit record on resume", lambda c: _resume(c, out=str(c.tmp / "garbage"), resume_checkpoint="U1"),
     CorruptRecordError, "is corrupt"),
    ("commit record that is not JSON", lambda c: CommitRecord.from_json(b"\x89PNG"), CorruptRecordError,
     "commit record is corrupt"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_a_clear_error(ctx, case):
    _name, call, error, fragment = case
    with pytest.raises(error) as info:
        call(ctx)
    assert fragment in str(info.value), str(info.value)
    assert isinstance(info.value, NoetherDistError)  # one root for everything raised on purpose


# (id, argv, exit code, stderr fragment); "{stage}" and "{tmp}" are filled in
CLI_CASES: list[tuple[str, list[str], int, str]] = [
    ("no subcommand", [], 2, "the following arguments are required"),
    ("unknown subcommand", ["frobnicate", "{stage}"], 2, "invalid choice: 'frobnicate'"),
    ("missing URL", ["inspect"], 2, "the following arguments are required: url"),
    ("missing --keep-last", ["prune", "{stage}"], 2, "the following arguments are required: --keep-last"),
    ("--keep-last not a number", ["prune", "{stage}", "--keep-last", "many"], 2, "invalid int value: 'many'"),
    ("--keep-last 0", ["prune", "{stage}", "--keep-last", "0"], 2, "keep_last must be an int >= 1"),
    ("unknown option", ["list", "{stage}", "--colour"], 2, "unrecognized arguments: --colour"),
    ("nonexistent path", ["list", "{tmp}/missing"], 2, "missing does not exist"),
    ("nonexistent path for verify", ["verify", "{tmp}/missing"], 2, "does not exist"),
    ("unknown protocol", ["list", "nosuch://b/x"], 2, "use a local path, file:// or s3://bucket/prefix"),
    ("bad --to", ["convert", "{stage}", "{tmp}/dst", "--to", "zip"], 2, "invalid choice: 'zip'"),
    ("convert without --to", ["convert", "{stage}", "{tmp}/dst"], 2, "required: --to"),
    ("bad --checkpoint", ["inspect", "{stage}", "--checkpoint", "newest"], 2, "--checkpoint 'newest' is not valid"),
    ("escaping --checkpoint", ["verify", "{stage}", "--checkpoint", "../../etc"], 2, "'../../etc' is not valid"),
    ("escaping convert --checkpoint", ["convert", "{stage}", "{tmp}/dst", "--to", "consolidated", "--checkpoint",
                                       "../E0_U1_S8"], 2, "is not a training point"),
    ("checkpoint that does not exist", ["inspect", "{stage}", "--checkpoint", "E9_U9_S9"], 2,
     "E9_U9_S9 is not committed"),
    ("alias that does not exist", ["verify", "{stage}", "--checkpoint", "best.acc"], 2, "alias best.acc does not exist"),
    ("inspect over several stages", ["inspect", "{tmp}/multi"], 2, "inspect needs one stage folder"),
    ("not-a-dict file on inspect", ["inspect", "{tmp}/notdict/legacy"], 1, "is not a Noether model file"),
    ("corrupt record on inspect", ["inspect", "{tmp}/garbage/run1/train", "--checkpoint", "E0_U1_S8"], 1,
     "is corrupt"),
]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_bad_cli_input_exit_code_and_message(ctx, case, capsys):
    _name, argv, code, fragment = case
    argv = [a.replace("{stage}", ctx.stage).replace("{tmp}", str(ctx.tmp)) for a in argv]
    assert cli_main(argv) == code, capsys.readouterr().err
    err = capsys.readouterr().err
    assert fragment in err, err
    assert "Traceback" not in err
    assert not (ctx.tmp / "dst").exists()  # nothing was written for a refused command


# -- path traversal -------------------------------------------------------------------------
TRAVERSAL = ["../x", "a/../../b", "..", "/etc", "a\\..\\b", "x/y"]
NAME_FIELDS: dict[str, Callable[[str, str], Any]] = {
    "run_id": lambda out, v: CheckpointerConfig(output_dir=out, run_id=v),
    "stage_name": lambda out, v: CheckpointerConfig(output_dir=out, run_id=RUN, stage_name=v),
    "model_name": lambda out, v: CheckpointerConfig(output_dir=out, run_id=RUN, model_name=v),
    "metric name": lambda out, v: CheckpointerConfig(output_dir=out, run_id=RUN, best_metrics={v: "min"}),
    "model_info": lambda out, v: normalize_model_info(v),
    "resume_run_id": lambda out, v: ResumeConfig(output_dir=out, resume_run_id=v),
    "resume_stage_name": lambda out, v: ResumeConfig(output_dir=out, resume_run_id=RUN, resume_stage_name=v),
    "continue stage_name": lambda out, v: ResumeConfig(output_dir=out, resume_run_id=RUN, stage_name=v),
    "resume_checkpoint": lambda out, v: ResumeConfig(output_dir=out, resume_run_id=RUN, resume_checkpoint="best." + v),
    "checkpoint name": lambda out, v: parse_checkpoint(v),
    "initializer run_id": lambda out, v: PreviousRunInitializer(run_id=v, model_name=MODEL),
    "initializer stage": lambda out, v: PreviousRunInitializer(run_id=RUN, model_name=MODEL, stage_name=v),
    "initializer model_info": lambda out, v: PreviousRunInitializer(run_id=RUN, model_name=MODEL, model_info=v),
    "initializer checkpoint": lambda out, v: PreviousRunInitializer(run_id=RUN, model_name=MODEL, checkpoint=v),
    "layout run_id": lambda out, v: StageLayout(out, v, STAGE),
    "artifact name": lambda out, v: StageLayout(out, RUN, STAGE).artifact_path(v),
    "alias name": lambda out, v: StageLayout(out, RUN, STAGE).alias_path(v),
}


@pytest.mark.parametrize("field", list(NAME_FIELDS))
def test_path_traversal_in_every_name_is_refused(tmp_path, field):
    for value in TRAVERSAL:
        with pytest.raises((InvalidNameError, ConfigError)) as info:
            NAME_FIELDS[field](str(tmp_path), value)
        assert repr(value) in str(info.value) or "is not valid" in str(info.value), (field, value, str(info.value))
    assert os.listdir(tmp_path) == []


def _plant_record(ctx: Ctx, out: Path, *, artifact: str | None = None, alias: str | None = None) -> Path:
    """A copy of ctx.out whose commit record names ``artifact`` or whose latest alias names
    itself ``alias`` (what someone with write access to the store could plant)."""
    shutil.copytree(ctx.out, out)
    ck = out / RUN / STAGE / "checkpoints"
    if artifact is not None:
        path = ck / "_commits" / "E0_U1_S8.json"
        record = json.loads(path.read_text())
        record["artifacts"][0]["name"] = artifact
        path.write_text(json.dumps(record))
    if alias is not None:
        (ck / "_aliases" / "latest.json").write_text(json.dumps({"alias": alias, "checkpoint": "E0_U1_S8"}))
    return out


def test_names_read_from_stored_records_cannot_escape(ctx, tmp_path, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    # an artifact name in a commit record that points outside the checkpoints folder
    escape = "../../../../victim"
    out = _plant_record(ctx, tmp_path / "planted", artifact=escape)
    code = cli_main(["convert", str(out / RUN / STAGE), str(tmp_path / "dst"), "--to", "consolidated"])
    assert code == 2 and "artifact name '../../../../victim'" in capsys.readouterr().err
    assert (victim / "keep.txt").read_text() == "precious"
    with pytest.raises(InvalidNameError, match="artifact name"):
        _resume(ctx, out=str(out))
    report = verify_stage(open_storage(str(out)), StageLayout(str(out), RUN, STAGE))
    assert [d.kind.value for d in report.damages] == ["corrupt_record"]
    # an alias whose content names another, escaping alias: copying aliases refuses it
    shutil.rmtree(tmp_path / "dst", ignore_errors=True)
    out2 = _plant_record(ctx, tmp_path / "alias", alias="../../../../../victim/evil")
    code = cli_main(["convert", str(out2 / RUN / STAGE), str(tmp_path / "dst"), "--to", "consolidated"])
    assert code == 2 and "alias name" in capsys.readouterr().err
    assert sorted(os.listdir(victim)) == ["keep.txt"]
    report = verify_stage(open_storage(str(out2)), StageLayout(str(out2), RUN, STAGE))
    assert [(d.kind.value, d.checkpoint) for d in report.damages] == [("bad_alias", "latest")]


# -- weights_only ---------------------------------------------------------------------------
def _pwn(marker: str) -> dict:
    """What a malicious pickle would run on load: here it only leaves a marker file."""
    Path(marker).write_text("executed")
    return {}


class Malicious:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (_pwn, (self.marker,))


def test_malicious_pickle_in_a_consolidated_file_is_refused_not_executed(tmp_path, capsys):
    marker = tmp_path / "pwned"
    out = tmp_path / "out"
    ck = out / "legacy" / "checkpoints"
    ck.mkdir(parents=True)
    path = ck / f"{MODEL}_cp=E1_U1_S8_model.th"
    torch.save({"state_dict": make_mlp(0).state_dict(), "training_iteration": {"epoch": 1, "update": 1, "sample": 8},
                "extra": Malicious(str(marker))}, path)
    storage = open_storage(str(out))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        read_file(storage, str(path))
    with pytest.raises(CheckpointNotFoundError, match="unreadable: UnpicklingError"):
        resume({"output_dir": str(out), "resume_run_id": "legacy"}, model=make_mlp(1), model_name=MODEL)
    with pytest.raises(RemoteRankError, match="UnpicklingError"):
        PreviousRunInitializer(run_id="legacy", model_name=MODEL, output_dir=str(out)).apply(make_mlp(2))
    assert cli_main(["inspect", str(out / "legacy")]) == 1
    assert "cannot be read: UnpicklingError" in capsys.readouterr().err
    assert not marker.exists()  # refused, never executed
    # the file is really malicious: an unrestricted load runs the payload
    torch.load(path, weights_only=False)
    assert marker.read_text() == "executed"
