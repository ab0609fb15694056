"""PreviousRunInitializer with the keys of Noether's own PreviousRunInitializer (one process):
checkpoint_tag (a name or an {epoch, update, sample} dict), keys_to_remove,
patterns_to_remove, patterns_to_rename, patterns_to_instantiate, output_path; and the
conflicting spellings refused."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from noether_dist.errors import AmbiguousCheckpointError, ConfigError, StateMismatchError
from noether_dist.initializers import build_initializers

# torch's optimizer/model state-dict APIs are what differs between torch versions
pytestmark = pytest.mark.torch_compat

KIND = "noether.core.initializers.PreviousRunInitializer"


class Backbone(nn.Module):
    """The previous run's model: backbone, an auxiliary head, a head."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6))
        self.aux = nn.Linear(6, 2)
        self.head = nn.Linear(6, 3)


class Encoder(nn.Module):
    """The new model: the backbone is called encoder, no aux head; Noether models have a name."""

    name = "net"

    def __init__(self, seed: int = 50) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.encoder = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 6))
        self.head = nn.Linear(6, 3)


POINTS = {"E1_U8_S64": 1, "E2_U16_S128": 2, "best_model.loss": 3, "latest": 2}


@pytest.fixture
def runs(tmp_path):
    """Single files as Noether writes them, each point with its own weights."""
    folder = tmp_path / "old" / "train" / "checkpoints"
    os.makedirs(folder)
    for tag, seed in POINTS.items():
        it = {"E1_U8_S64": (1, 8, 64), "best_model.loss": (1, 8, 64)}.get(tag, (2, 16, 128))
        torch.save({"state_dict": Backbone(seed).state_dict(), "checkpoint_tag": tag, "run_id": "old",
                    "training_iteration": dict(zip(("epoch", "update", "sample"), it))},
                   folder / f"net_cp={tag}_model.th")
    return str(tmp_path)


def init(out: str, model: nn.Module | None = None, **keys) -> nn.Module:
    model = model or Encoder()
    spec = {"kind": KIND, "run_id": "old", "stage_name": "train", "output_path": out,
            "patterns_to_remove": ["aux."], "patterns_to_rename": [{"src": "backbone.", "dst": "encoder."}], **keys}
    build_initializers([spec])[0].apply(model)
    return model


def expected(seed: int) -> dict[str, torch.Tensor]:
    src = Backbone(seed).state_dict()
    return {k.replace("backbone.", "encoder."): v for k, v in src.items() if not k.startswith("aux.")}


def assert_loaded(model: nn.Module, seed: int, fresh: tuple[str, ...] = ()) -> None:
    want, before = expected(seed), Encoder().state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key] if key.startswith(fresh) and fresh else want[key]), key


@pytest.mark.parametrize("tag, seed", [
    ("best_model.loss", 3), ("best.loss", 3), ({"epoch": 1}, 1), ({"update": 16}, 2), ({"sample": 64}, 1),
    ({"epoch": 2, "update": 16, "sample": 128}, 2), ("E1_U8_S64", 1), (None, 2),
])
def test_checkpoint_tag_names_and_dicts(runs, tag, seed):
    assert_loaded(init(runs, checkpoint_tag=tag), seed)


def test_removals_renames_and_instantiation(runs):
    assert_loaded(init(runs, checkpoint_tag="latest", patterns_to_instantiate=["head."]), 2, fresh=("head.",))
    # keys_to_remove: exact keys; removing one the model needs leaves it missing, as in Noether
    with pytest.raises(StateMismatchError, match=r"missing in checkpoint: \['head.bias'\]"):
        init(runs, keys_to_remove=["head.bias"])
    with pytest.raises(ConfigError, match=r"keys_to_remove \['head.nothing'\] are not keys"):
        init(runs, keys_to_remove=["head.nothing"])
    assert_loaded(init(runs, keys_to_remove=["aux.weight", "aux.bias"], patterns_to_remove=[]), 2)
    # without the rename the backbone has no place in the model
    with pytest.raises(StateMismatchError, match="checkpoint keys the model has no place for: .*backbone.0.bias"):
        init(runs, patterns_to_rename=[])
    # a dst that is already a key: the renamed key wins (Noether's order)
    # aux (2 outputs) renamed onto head (3 outputs) replaces the stored head: refused by shape, nothing loaded
    model = Encoder()
    with pytest.raises(StateMismatchError, match=r"shape mismatch: head.bias \(checkpoint aux.bias \[2\], model \[3\]\)"):
        init(runs, model, patterns_to_rename=[{"src": "backbone.", "dst": "encoder."}, {"src": "aux.", "dst": "head."}],
             patterns_to_remove=[], checkpoint_tag="E1_U8_S64")
    assert all(torch.equal(v, Encoder().state_dict()[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("keys, match", [
    ({"checkpoint": "latest", "checkpoint_tag": "last"}, "both checkpoint and checkpoint_tag"),
    ({"output_dir": "/x"}, "both output_dir and output_path"),
    ({"rename_keys": {"a.": "b."}}, "both rename_keys and patterns_to_rename"),
    ({"load_optim": True}, "loads weights only"),
    ({"checkpoint_tag": {"epoch": 1, "update": 8}}, "exactly one of epoch, update, sample, or all three"),
    ({"checkpoint_tag": {"epochs": 1}}, "dict with epoch, update and/or sample"),
    ({"patterns_to_rename": [{"src": "a."}, {"from": "b."}]}, "list of {src, dst} mappings"),
    ({"keys_to_remove": "head.weight"}, "keys_to_remove must be a list of non-empty strings"),
    ({"pop_ckpt_kwargs_keys": ["x"]}, "unknown key 'pop_ckpt_kwargs_keys'"),
])
def test_conflicting_or_bad_keys_are_config_errors(runs, keys, match):
    with pytest.raises(ConfigError, match=match):
        init(runs, **keys)


def test_partial_tag_that_matches_two_checkpoints_is_an_error(runs):
    """Noether takes the first file the directory listing returns; we refuse to guess."""
    torch.save({"state_dict": Backbone(9).state_dict(), "checkpoint_tag": "E2_U17_S136", "run_id": "old",
                "training_iteration": {"epoch": 2, "update": 17, "sample": 136}},
               os.path.join(runs, "old", "train", "checkpoints", "net_cp=E2_U17_S136_model.th"))
    with pytest.raises(AmbiguousCheckpointError, match="matches 2 checkpoints"):
        init(runs, checkpoint_tag={"epoch": 2})


def test_model_name_is_required_without_a_name_attribute(runs):
    with pytest.raises(ConfigError, match="needs model_name"):
        init(runs, model=nn.Linear(2, 2))
