"""Both artifact formats behind one interface: the same state written, listed, read and
loaded through ``artifact_io``, on real files in one process."""

from __future__ import annotations

import os
import re
import zlib
from pathlib import Path

import pytest
import torch
from torch import nn

import noether_dist
from noether_dist.dist.comm import Comm
from noether_dist.errors import ConfigError
from noether_dist.format.layout import StageLayout
from noether_dist.format.names import ArtifactFormat, ArtifactKind, TrainingIteration, parse_artifact
from noether_dist.io.formats import ArtifactIO, LoadTarget, TrainerContent, WriteContext, artifact_io
from noether_dist.io.statedict import model_state, optimizer_state
from noether_dist.io.storage import open_storage
from noether_dist.format.records import ArtifactRecord, CommitRecord, CorruptRecordError

IT = TrainingIteration(1, 2, 3)
EMA = "ema_factor=0.99"


def _model(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def _trained() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    model(torch.ones(5, 3)).sum().backward()
    opt.step()
    return model, opt


def _files_on_disk(path: str) -> dict[str, tuple[int, int]]:
    """name -> (size, CRC32) of what lies at ``path`` (a file: name "")."""
    if os.path.isfile(path):
        names = {"": path}
    else:
        names = {n: os.path.join(path, n) for n in os.listdir(path)}
    out = {}
    for name, full in names.items():
        with open(full, "rb") as fh:
            data = fh.read()
        out[name] = (len(data), zlib.crc32(data) & 0xFFFFFFFF)
    return out


@pytest.mark.parametrize("fmt", list(ArtifactFormat))
def test_write_keys_read_and_load_round_trip(tmp_path, fmt):
    model, opt = _trained()
    contents = {ArtifactKind.MODEL: model.state_dict(), ArtifactKind.OPTIM: optimizer_state(model, opt),
                ArtifactKind.TRAINER: TrainerContent({"callbacks": {"cb": {"x": 1}}, "grad_scaler": None, "step": 7},
                                                     {0: {"rng": [1, 2]}})}
    io = artifact_io(fmt)
    assert isinstance(io, ArtifactIO) and io.format is fmt
    assert artifact_io(fmt.value) is io  # the stored value finds the same implementation
    storage = open_storage(str(tmp_path))
    layout = StageLayout(str(tmp_path), "run", "train")
    comm = Comm(30)
    arts = {}
    for kind, content in contents.items():
        info = EMA if kind is ArtifactKind.MODEL else None
        name = io.artifact_name("mlp", str(IT), kind, info)
        parsed = parse_artifact(name)
        assert parsed.kind is kind and parsed.checkpoint == str(IT)
        path = layout.artifact_path(name)
        assert io.check(storage, path) is not None  # nothing there yet: a reason
        files = io.write(storage, path, kind, content, WriteContext(IT, "run", info))
        assert io.check(storage, path) is None
        # the records say what lies on disk, byte for byte
        assert {f.name: (f.size, f.crc32) for f in files} == _files_on_disk(path)
        arts[kind] = ArtifactRecord(name, kind.value, info, fmt, files)

    # keys: names and shapes, as key/shape matching needs them
    model_path = layout.artifact_path(arts[ArtifactKind.MODEL].name)
    keys = {k.key: k.shape for k in io.keys(storage, model_path, ArtifactKind.MODEL)}
    assert keys == {k: tuple(v.shape) for k, v in model.state_dict().items()}

    # read: the whole content back, equal to what was written
    back = io.read(storage, model_path, ArtifactKind.MODEL)
    assert set(back) == set(contents[ArtifactKind.MODEL])
    assert all(torch.equal(back[k], v) for k, v in contents[ArtifactKind.MODEL].items())
    osd = io.read(storage, layout.artifact_path(arts[ArtifactKind.OPTIM].name), ArtifactKind.OPTIM)
    assert set(osd["state"]) == set(contents[ArtifactKind.OPTIM]["state"])
    trainer = io.read(storage, layout.artifact_path(arts[ArtifactKind.TRAINER].name), ArtifactKind.TRAINER)
    assert trainer.state["step"] == 7 and trainer.ranks == {0: {"rng": [1, 2]}}

    # load into live objects: stage (keys checked, CRC32 checked), then apply
    fresh = _model(1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    assert not torch.equal(fresh[0].weight, model[0].weight)
    targets = [LoadTarget(arts[ArtifactKind.MODEL], "model", model_state(fresh), fresh),
               LoadTarget(arts[ArtifactKind.OPTIM], "optim", optimizer_state(fresh, fresh_opt), fresh_opt, fresh),
               LoadTarget(arts[ArtifactKind.TRAINER], "trainer", {})]
    applied = []
    for target in targets:
        if target.module is not None:
            io.check_target(target)
        path = layout.artifact_path(target.art.name)
        staged, reason = io.stage(comm, storage, path, target, 1 << 30, io.prefetch(storage, path))
        assert reason is None
        applied.append(io.apply(staged, target, comm.rank))
    for key, value in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    assert fresh_opt.param_groups[0]["lr"] == 0.01
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(opt.state[p]["exp_avg"], fresh_opt.state[q]["exp_avg"])
    state, own = applied[-1]
    assert state["step"] == 7 and own == {"rng": [1, 2]}

    # weights only, with a key plan (initializers): one tensor kept fresh
    other = _model(2)
    kept = other[2].bias.detach().clone()
    count = io.load_weights(comm, storage, model_path, other,
                            lambda stored: {k: k for k in stored if k != "2.bias"}, arts[ArtifactKind.MODEL])
    assert count == 3 and torch.equal(other[0].weight, model[0].weight) and torch.equal(other[2].bias, kept)

    # a damaged file is a reason to fall back, not an error
    record = CommitRecord(IT, "run", "train", "mlp", 1, tuple(arts.values()))
    victim = record.artifact("model", EMA)
    where = layout.artifact_path(victim.name)
    damaged = where if os.path.isfile(where) else os.path.join(where, max(
        (f for f in victim.files if f.name != ".metadata"), key=lambda f: f.size).name)
    with open(damaged, "r+b") as fh:
        fh.seek(os.path.getsize(damaged) - 9)
        byte = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([byte[0] ^ 0xFF]))
    staged, reason = io.stage(comm, storage, where, targets[0], 1 << 30)
    assert reason is not None and "corrupt" in reason


def test_both_formats_hold_the_same_content(tmp_path):
    """What one format reads back, the other writes and reads back the same (convert's path)."""
    model, opt = _trained()
    storage = open_storage(str(tmp_path))
    context = WriteContext(IT, "run")
    content = {ArtifactKind.MODEL: model.state_dict(), ArtifactKind.OPTIM: optimizer_state(model, opt)}
    back = {}
    for fmt in ArtifactFormat:
        io = artifact_io(fmt)
        layout = StageLayout(str(tmp_path), "run", fmt.value)
        for kind, value in content.items():
            path = layout.artifact_path(io.artifact_name("mlp", str(IT), kind, None))
            io.write(storage, path, kind, value, context)
            back[fmt, kind] = io.read(storage, path, kind)
    dcp_model, file_model = back[ArtifactFormat.DCP, ArtifactKind.MODEL], back[ArtifactFormat.CONSOLIDATED, ArtifactKind.MODEL]
    assert set(dcp_model) == set(file_model) and all(torch.equal(dcp_model[k], file_model[k]) for k in dcp_model)
    dcp_osd, file_osd = back[ArtifactFormat.DCP, ArtifactKind.OPTIM], back[ArtifactFormat.CONSOLIDATED, ArtifactKind.OPTIM]
    assert set(dcp_osd["state"]) == set(file_osd["state"])
    for name, entry in dcp_osd["state"].items():
        assert torch.equal(entry["exp_avg_sq"], file_osd["state"][name]["exp_avg_sq"])
    assert [g["params"] for g in dcp_osd["param_groups"]] == [g["params"] for g in file_osd["param_groups"]]


def test_records_keep_the_stored_values():
    """Commit records store the format as they always did; an unknown one is refused."""
    art = ArtifactRecord("m_cp=E1_U2_S3_model.th", "model", None, "consolidated", ())
    assert art.format is ArtifactFormat.CONSOLIDATED and art.to_dict()["format"] == "consolidated"
    assert ArtifactRecord.from_dict({"name": "x", "kind": "model"}).format is ArtifactFormat.DCP
    assert ArtifactRecord.from_dict(art.to_dict()) == art
    with pytest.raises(ConfigError, match="artifact format 'zip' is not valid; use one of dcp, consolidated"):
        ArtifactRecord("x", "model", None, "zip")
    stored = CommitRecord(IT, "run", None, "mlp", 1, (art,)).to_json()
    assert CommitRecord.from_json(stored).artifacts == (art,)
    with pytest.raises(CorruptRecordError, match="is corrupt: ConfigError: artifact format 'zip'"):
        CommitRecord.from_json(stored.replace(b'"consolidated"', b'"zip"'))


def test_callers_dispatch_through_the_interface():
    """No module of the package compares an artifact's format with a string or writes one
    into a record by hand: the lookup goes through ``artifact_io``."""
    root = Path(noether_dist.__file__).parent
    pattern = re.compile(r"\.format\s*[!=]=|\.format\s+(is|in)\s+['\"(]|ArtifactRecord\([^)]*['\"](dcp|consolidated)['\"]")
    offenders = [f"{path.relative_to(root)}:{number}: {line.strip()}" for path in sorted(root.rglob("*.py"))
                 for number, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []
    assert pattern.search('if art.format == "consolidated":')  # the check itself finds what it looks for
