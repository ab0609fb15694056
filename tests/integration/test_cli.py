"""noether-ckpt: list, inspect, verify, prune and convert on a local disk and on S3, with
--json and the documented exit codes (0 ok, 1 problem found, 2 bad usage/input, 3 storage)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from noether_dist import Checkpointer, CheckpointerConfig, StorageOptions, TrainingIteration
from noether_dist.tools.cli import main as cli_main
from noether_dist.io.storage import open_storage
from tests.support.ranks import run_ranks
from tests.support.models import EMA_INFO, build, train_steps

pytestmark = pytest.mark.slow

RUN, STAGE, MODEL = "run1", "train", "mlp"


def save_four(rank: int, world_size: int, out: str, storage: dict | None = None) -> None:
    """U1..U4 with a best.loss alias at U2 (on every rank of the job)."""
    model, opt, ema = build(sharded=world_size > 1)
    ck = Checkpointer(CheckpointerConfig(output_dir=out, run_id=RUN, stage_name=STAGE, model_name=MODEL,
                                         best_metrics={"loss": "min"}, timeout_s=30,
                                         storage=StorageOptions(**(storage or {}))))
    for update in (1, 2, 3, 4):
        train_steps(model, opt, ema, 1, rank, start=update)
        ck.save(TrainingIteration(0, update, 16 * update), model=model, optimizer=opt, ema={EMA_INFO: ema},
                trainer_state={"at": update}, rank_state={"rank": rank},
                metrics={"loss": 0.5 if update == 2 else 1.0 + update}, last=update == 4)


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """An output dir with run1/train holding U1..U4, saved on 2 ranks."""
    out = tmp_path_factory.mktemp("cli") / "out"
    run_ranks(save_four, 2, str(out))
    return out


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli_main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _json(capsys, *argv: str, code: int = 0):
    got, out, err = _run(capsys, *argv, "--json")
    assert got == code, (argv, got, err)
    return json.loads(out)


# -- local --------------------------------------------------------------------------------
def test_list_local(local, capsys):
    listing = _json(capsys, "list", str(local))
    assert [(s["run_id"], s["stage_name"]) for s in listing] == [(RUN, STAGE)]
    cps = listing[0]["checkpoints"]
    assert [c["checkpoint"] for c in cps] == ["E0_U1_S16", "E0_U2_S32", "E0_U3_S48", "E0_U4_S64"]
    assert all(c["committed"] and c["world_size"] == 2 and c["bytes"] > 0 for c in cps)
    assert listing[0]["aliases"] == {"best.loss": "E0_U2_S32", "last": "E0_U4_S64", "latest": "E0_U4_S64"}
    code, out, _ = _run(capsys, "list", str(local / RUN))  # a run dir works too, human output
    assert code == 0 and "E0_U4_S64" in out and "committed" in out and "last, latest" in out


def test_inspect_local(local, capsys):
    info = _json(capsys, "inspect", str(local / RUN / STAGE))
    assert info["checkpoint"] == "E0_U4_S64" and info["world_size"] == 2 and info["committed"]
    assert info["training_iteration"] == {"epoch": 0, "update": 4, "sample": 64}
    assert info["metrics"] == {"loss": 5.0} and info["aliases"] == ["last", "latest"]
    arts = {a["name"]: a for a in info["artifacts"]}
    assert set(arts) == {f"{MODEL}_cp=E0_U4_S64_model.th", f"{MODEL}_{EMA_INFO}_cp=E0_U4_S64_model.th",
                         f"{MODEL}_cp=E0_U4_S64_optim.th", f"{MODEL}_cp=E0_U4_S64_trainer.th"}
    model = {k["key"]: k for k in arts[f"{MODEL}_cp=E0_U4_S64_model.th"]["keys"]}
    assert model["0.weight"] == {"key": "0.weight", "shape": [30, 16], "dtype": "float32", "bytes": 30 * 16 * 4}
    assert set(model) == {"0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"}
    optim = {k["key"] for k in arts[f"{MODEL}_cp=E0_U4_S64_optim.th"]["keys"]}
    assert "state.0.weight.exp_avg" in optim and "param_groups.0.lr" in optim
    trainer = {k["key"] for k in arts[f"{MODEL}_cp=E0_U4_S64_trainer.th"]["keys"]}
    assert trainer == {"noether.trainer", "noether.rank.0", "noether.rank.1"}
    assert info["bytes"] == sum(a["bytes"] for a in info["artifacts"]) > 0
    for spec, want in (("best.loss", "E0_U2_S32"), ("U1", "E0_U1_S16"), ("E0_U3_S48", "E0_U3_S48")):
        assert _json(capsys, "inspect", str(local / RUN / STAGE), "--checkpoint", spec)["checkpoint"] == want
    code, out, err = _run(capsys, "inspect", str(local / RUN / STAGE), "--checkpoint", "best.loss")
    assert code == 0 and "saved on 2 rank(s)" in out and "0.weight" in out and "30x16" in out and "loss=0.5" in out
    code, _, err = _run(capsys, "inspect", str(local / RUN / STAGE), "--checkpoint", "U9")
    assert code == 2 and "no committed checkpoint matches U9" in err and "E0_U4_S64" in err
    code, _, err = _run(capsys, "inspect", str(local), "--checkpoint", "U1")
    assert code == 0  # one stage under the output dir: that one


def test_verify_local_and_progress(local, capsys):
    report = _json(capsys, "verify", str(local))
    assert report["ok"] and report["damages"] == [] and report["files"] == 4 * 4 * 3
    code, out, err = _run(capsys, "verify", str(local))
    assert code == 0 and "no damage found" in out and "E0_U4_S64                ok" in out
    total = report["bytes"]
    assert "verify: 100%" in err and "B/s" in err  # tqdm on stderr: bytes, rate, ETA
    assert f"{total / 1024:.1f}k" in err or f"{total / 1024:.0f}k" in err or "KiB" in err or "kB" in err, err
    code, out, err = _run(capsys, "verify", "--no-progress", str(local), "--checkpoint", "latest")
    assert code == 0 and "%" not in err and "1 checkpoint(s), 12 file(s)" in out
    code, out, err = _run(capsys, "verify", "-q", "--jobs", "1", str(local))
    assert code == 0 and err == "" and "no damage found" in out


def _imports(*argv: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run noether-ckpt in a fresh interpreter; the modules it imported (-X importtime)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "noether_dist.tools.cli", *argv], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return proc, modules


def test_record_work_does_not_load_torch(local, tmp_path):
    """list, verify, prune and inspect --record read records and bytes only: no torch."""
    copy = tmp_path / "copy"
    shutil.copytree(local, copy)
    stage = str(copy / RUN / STAGE)
    for argv in (("--help",), ("list", str(copy)), ("verify", "--no-progress", str(copy)),
                 ("prune", str(copy), "--keep-last", "3"), ("inspect", "--record", stage, "--json")):
        proc, modules = _imports(*argv)
        assert proc.returncode == 0, (argv, proc.stderr[-2000:])
        assert "noether_dist.stage.verify" in modules  # what the tool imported was recorded
        assert not {m for m in modules if m == "torch" or m.startswith("torch.")}, argv
    info = json.loads(proc.stdout)
    assert info["world_size"] == 2 and all(a["keys"] is None and a["bytes"] > 0 for a in info["artifacts"])
    proc, modules = _imports("inspect", stage, "--json")  # keys and shapes need torch
    assert proc.returncode == 0 and "torch" in modules


def test_prune_local(local, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(local, out)
    stage = str(out / RUN / STAGE)
    plan = _json(capsys, "prune", stage, "--keep-last", "1", "--dry-run")
    assert plan["dry_run"] and plan["stages"][0]["deleted"] == ["E0_U1_S16", "E0_U3_S48"]
    assert plan["stages"][0]["kept"] == ["E0_U2_S32", "E0_U4_S64"]  # best.loss target and the newest
    assert len(_json(capsys, "list", stage)[0]["checkpoints"]) == 4  # dry run deleted nothing
    (out / RUN / STAGE / "checkpoints" / f"{MODEL}_cp=E0_U3_S49_model.th").mkdir()  # a dead save's leftover
    done = _json(capsys, "prune", str(out), "--keep-last", "1", "--keep-every", "3")
    assert done["stages"][0]["deleted"] == ["E0_U1_S16"] and done["stages"][0]["kept"][-1] == "E0_U4_S64"
    assert done["stages"][0]["uncommitted_removed"] == [f"{MODEL}_cp=E0_U3_S49_model.th"]
    names = [c["checkpoint"] for c in _json(capsys, "list", stage)[0]["checkpoints"]]
    assert names == ["E0_U2_S32", "E0_U3_S48", "E0_U4_S64"]
    code, text, _ = _run(capsys, "prune", stage, "--keep-last", "1")
    assert code == 0 and "deleted: E0_U3_S48" in text
    assert _json(capsys, "verify", stage)["ok"]


def test_convert_local_and_inspect_consolidated(local, tmp_path, capsys):
    done = _json(capsys, "convert", str(local / RUN / STAGE), str(tmp_path / "cons"), "--to", "consolidated",
                 "--checkpoint", "E0_U4_S64")
    assert done["converted"] == ["E0_U4_S64"] and done["bytes"] > 0 and done["format"] == "consolidated"
    info = _json(capsys, "inspect", str(tmp_path / "cons" / RUN / STAGE))
    assert info["checkpoint"] == "E0_U4_S64" and {a["format"] for a in info["artifacts"]} == {"consolidated"}
    model = next(a for a in info["artifacts"] if a["name"] == f"{MODEL}_cp=E0_U4_S64_model.th")
    assert {"key": "0.weight", "shape": [30, 16], "dtype": "float32", "bytes": 1920} in model["keys"]
    assert _json(capsys, "verify", str(tmp_path / "cons"))["ok"]
    back = _json(capsys, "convert", str(tmp_path / "cons" / RUN / STAGE), str(tmp_path / "back"), "--to", "sharded")
    assert back["converted"] == ["E0_U4_S64"]
    code, _, err = _run(capsys, "convert", str(local / RUN / STAGE), str(tmp_path / "x"), "--to", "zip")
    assert code == 2 and "invalid choice: 'zip'" in err
    code, _, err = _run(capsys, "convert", str(local / RUN / STAGE), str(tmp_path / "x"), "--to", "consolidated",
                        "--checkpoint", "../../etc")
    assert code == 2 and "not a training point" in err and not (tmp_path / "x").exists()


def test_exit_codes_and_help(local, tmp_path, capsys):
    code, out, _ = _run(capsys, "--help")
    assert code == 0 and "exit codes" in out and "3  storage error" in out
    for sub in ("list", "inspect", "verify", "prune", "convert"):
        code, out, _ = _run(capsys, sub, "--help")
        assert code == 0 and "exit codes" in out, sub
    assert _run(capsys, "frobnicate", str(local))[0] == 2
    assert _run(capsys)[0] == 2
    code, _, err = _run(capsys, "list", str(tmp_path / "nothing-here"))
    assert code == 2 and "does not exist" in err
    code, _, err = _run(capsys, "prune", str(local))
    assert code == 2 and "--keep-last" in err
    # options before or after the subcommand
    assert json.loads(_run(capsys, "--json", "list", str(local))[1])[0]["run_id"] == RUN


def test_real_entry_point_exit_code(local, tmp_path):
    """The installed console script (or python -m) returns the codes to the shell."""
    damaged = tmp_path / "damaged"
    shutil.copytree(local, damaged)
    (damaged / RUN / STAGE / "checkpoints" / "_aliases" / "latest.json").write_text("{")
    cmd = [sys.executable, "-m", "noether_dist.tools.cli", "verify", "--json", str(damaged)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 1, proc.stderr
    assert [d["kind"] for d in json.loads(proc.stdout)["damages"]] == ["bad_alias"]


# -- S3 -----------------------------------------------------------------------------------
@pytest.fixture
def s3_out(s3_server, s3_bucket, s3_env, monkeypatch):
    """U1..U4 on S3 (one process); the endpoint then only reachable through --endpoint-url."""
    out = f"s3://{s3_bucket}/exp"
    save_four(0, 1, out, {"endpoint_url": s3_server.endpoint_url})
    for var in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(var)
    return out, ["--endpoint-url", s3_server.endpoint_url]


def test_all_subcommands_on_s3(s3_out, tmp_path, capsys):
    out, ep = s3_out
    listing = _json(capsys, "list", out, *ep)
    assert [c["checkpoint"] for c in listing[0]["checkpoints"]] == ["E0_U1_S16", "E0_U2_S32", "E0_U3_S48", "E0_U4_S64"]
    info = _json(capsys, "inspect", f"{out}/{RUN}/{STAGE}", "--checkpoint", "best.loss", *ep)
    assert info["checkpoint"] == "E0_U2_S32" and info["world_size"] == 1 and info["aliases"] == ["best.loss"]
    assert _json(capsys, "verify", out, *ep)["ok"]
    done = _json(capsys, "convert", f"{out}/{RUN}/{STAGE}", str(tmp_path / "local"), "--to", "consolidated",
                 "--checkpoint", "E0_U4_S64", *ep)
    assert done["converted"] == ["E0_U4_S64"]
    plan = _json(capsys, "prune", out, "--keep-last", "2", *ep)
    assert plan["stages"][0]["deleted"] == ["E0_U1_S16"]
    assert [c["checkpoint"] for c in _json(capsys, "list", out, *ep)[0]["checkpoints"]] == \
        ["E0_U2_S32", "E0_U3_S48", "E0_U4_S64"]
    # damage one object: verify exits 1 and names it
    st = open_storage(out, StorageOptions(endpoint_url=ep[1]))
    shard = f"{out}/{RUN}/{STAGE}/checkpoints/{MODEL}_cp=E0_U3_S48_model.th/__0_0.distcp"
    data = bytearray(st.read(shard))
    data[len(data) // 2] ^= 0xFF
    st.replace(shard, bytes(data))
    report = _json(capsys, "verify", out, *ep, code=1)
    assert [(d["kind"], d["path"]) for d in report["damages"]] == [("crc", shard)]
    code, _, err = _run(capsys, "list", f"s3://no-such-bucket-{os.getpid()}/x", *ep)
    assert code == 2 and "does not exist" in err


def test_storage_error_exit_code_on_s3(s3_out, capsys):
    from tests.support.fault_proxy import FaultProxy

    out, ep = s3_out
    with FaultProxy(ep[1]) as proxy:
        proxy.set_faults(kinds=("forbidden",), permanent=True)
        code, _, err = _run(capsys, "list", out, "--endpoint-url", proxy.endpoint_url)
    assert code == 3 and "storage error" in err and "Access Denied" in err
