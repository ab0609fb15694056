"""Noether names: formatting, parsing, validation."""

from __future__ import annotations

import pytest

from noether_dist.errors import ConfigError, InvalidNameError
from noether_dist.format.names import (ArtifactKind, CheckpointRef, TrainingIteration, format_artifact, is_tag,
                                noether_model_info, noether_tag, normalize_model_info, parse_artifact, parse_checkpoint,
                                parse_checkpoint_tag, parse_resume_checkpoint, validate_name)


def test_training_iteration_round_trip_and_order():
    it = TrainingIteration(10, 100, 200)
    assert str(it) == "E10_U100_S200"
    assert TrainingIteration.parse("E10_U100_S200") == it
    assert TrainingIteration.from_dict(it.to_dict()) == it
    assert TrainingIteration(1, 5, 40) < TrainingIteration(1, 6, 48) < TrainingIteration(2, 0, 0)


@pytest.mark.parametrize("bad", ["E10_U100", "e10_u100_s200", "E10_U100_S", "E-1_U0_S0", "", "latest"])
def test_training_iteration_rejects(bad):
    with pytest.raises(InvalidNameError, match="training point"):
        TrainingIteration.parse(bad)


def test_training_iteration_rejects_negative():
    with pytest.raises(ConfigError, match="epoch"):
        TrainingIteration(-1, 0, 0)


@pytest.mark.parametrize("kind,info,expected", [
    ("model", None, "transformer_cp=E10_U100_S200_model.th"),
    ("model", "ema_factor=0.9999", "transformer_ema_factor=0.9999_cp=E10_U100_S200_model.th"),
    ("optim", None, "transformer_cp=E10_U100_S200_optim.th"),
    ("trainer", None, "transformer_cp=E10_U100_S200_trainer.th"),
])
def test_format_and_parse_artifact(kind, info, expected):
    name = format_artifact("transformer", "E10_U100_S200", kind, info)
    assert name == expected
    parsed = parse_artifact(name)
    assert (parsed.model_name, parsed.checkpoint, parsed.kind, parsed.model_info) == (
        "transformer", "E10_U100_S200", ArtifactKind(kind), info)


@pytest.mark.parametrize("cp", ["latest", "last", "best.accuracy", "best.loss.test.total", "E1_U2_S3"])
def test_artifact_checkpoint_values(cp):
    assert parse_artifact(format_artifact("ab-upt", cp, "model")).checkpoint == cp


def test_parse_artifact_with_model_name_hint_and_noether_spellings():
    art = parse_artifact("my_model_ema=0.9999_cp=best_model.loss_model.th", model_name="my_model")
    assert art.model_name == "my_model" and art.model_info == "ema_factor=0.9999"
    assert parse_checkpoint("best_model.loss") == CheckpointRef.best("loss")
    assert normalize_model_info("ema=0.99") == "ema_factor=0.99"


def test_parse_checkpoint_kinds():
    assert parse_checkpoint("latest").kind is CheckpointRef.Kind.LATEST
    assert parse_checkpoint("last").kind is CheckpointRef.Kind.LAST
    assert parse_checkpoint("best.accuracy").alias_name == "best.accuracy"
    assert parse_checkpoint("E1_U2_S3").iteration == TrainingIteration(1, 2, 3)
    with pytest.raises(InvalidNameError, match="latest, last, best"):
        parse_checkpoint("newest")


def test_resume_checkpoint_refuses_full_name_and_names_its_parts():
    with pytest.raises(ConfigError, match="E10, U100 or S200"):
        parse_resume_checkpoint("E10_U100_S200")


@pytest.mark.parametrize("text,unit,value", [("E10", "E", 10), ("U100", "U", 100), ("S200", "S", 200)])
def test_resume_checkpoint_partials(text, unit, value):
    ref = parse_resume_checkpoint(text)
    assert ref.kind is CheckpointRef.Kind.PARTIAL and (ref.partial.unit, ref.partial.value) == (unit, value)
    assert ref.partial.matches(TrainingIteration(10, 100, 200))


def test_resume_checkpoint_defaults_and_aliases():
    assert parse_resume_checkpoint(None).kind is CheckpointRef.Kind.LATEST
    assert parse_resume_checkpoint("best.loss").alias_name == "best.loss"
    with pytest.raises(ConfigError, match="one of E<epoch>"):
        parse_resume_checkpoint("X5")


@pytest.mark.parametrize("bad", ["a/b", "..", "a..b", "../x", "a\\b", "", ".hidden", "-x", "a b", "x" * 201])
def test_validate_name_rejects_paths(bad):
    with pytest.raises(InvalidNameError):
        validate_name(bad, "run_id")


def test_validate_name_accepts():
    for good in ["run1", "2026-11-28_213005_abc", "ema_factor=0.9999", "slurm-123", "a.b+c"]:
        assert validate_name(good, "x") == good


def test_model_name_must_not_contain_cp():
    from noether_dist.format.names import validate_model_name

    with pytest.raises(InvalidNameError, match="cp="):
        validate_model_name("x_cp=y")


def test_noether_spellings():
    assert noether_tag(CheckpointRef.best("loss.val")) == "best_model.loss.val"
    assert noether_tag(CheckpointRef.latest()) == "latest" and noether_tag(CheckpointRef.last()) == "last"
    assert parse_checkpoint(noether_tag(CheckpointRef.best("loss.val"))) == CheckpointRef.best("loss.val")
    assert noether_model_info("ema_factor=0.99") == "ema=0.99" and noether_model_info("ema=0.99") == "ema=0.99"
    assert noether_model_info(None) is None and noether_model_info("fp16") == "fp16"
    assert [is_tag(t) for t in ("latest", "last", "best_model.x", "best.x", "E1_U2_S3", "junk")] == [
        True, True, True, True, False, False]
    assert str(parse_checkpoint_tag({"epoch": 3})) == "E3" and str(parse_checkpoint_tag({"sample": 8})) == "S8"
    assert str(parse_checkpoint_tag({"epoch": 1, "update": 2, "sample": 3})) == "E1_U2_S3"
    assert parse_checkpoint_tag("best_model.loss") == CheckpointRef.best("loss")
    for bad in ({"epoch": 1, "update": 2}, {}, {"step": 1}, {"epoch": "x"}, 3):
        with pytest.raises(ConfigError):
            parse_checkpoint_tag(bad)
