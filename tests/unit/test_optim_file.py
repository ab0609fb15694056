"""Optimizer files matched by parameter name (one process): Noether's layout (named groups,
``param_idx_to_name``, an index order that is not ``model.parameters()`` order), torch's
index-keyed layout, and every way a file can fail to fit, refused before anything is applied."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from noether_dist.io.consolidated import load_optimizer_file
from noether_dist.errors import StateMismatchError

# torch's optimizer/model state-dict APIs are what differs between torch versions
pytestmark = pytest.mark.torch_compat


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.input_projection = nn.Linear(4, 10)
        self.norm = nn.LayerNorm(10)
        self.block = nn.Linear(10, 10)
        self.head = nn.Linear(10, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.norm(self.input_projection(x))))


WEIGHTS = ["input_projection.weight", "block.weight", "head.weight"]
NO_DECAY = ["input_projection.bias", "norm.weight", "norm.bias", "block.bias", "head.bias"]


def grouped(model: nn.Module, order: tuple[str, ...] = ("default", "weight_decay=0"),
            lrs: dict[str, float] | None = None) -> torch.optim.AdamW:
    """AdamW with Noether's two groups (weights; biases and norms without weight decay)."""
    params = dict(model.named_parameters())
    spec = {"default": (WEIGHTS, 0.05), "weight_decay=0": (NO_DECAY, 0.0)}
    lrs = lrs or {}
    return torch.optim.AdamW([{"params": [params[n] for n in spec[g][0]], "weight_decay": spec[g][1], "name": g,
                               "lr": lrs.get(g, 1e-2)} for g in order])


def step(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 2) -> None:
    for i in range(steps):
        g = torch.Generator().manual_seed(i)
        model(torch.randn(5, 4, generator=g)).pow(2).mean().backward()
        opt.step()
        opt.zero_grad()


def noether_file(lrs: dict[str, float] | None = None) -> tuple[dict, nn.Module, torch.optim.Optimizer]:
    """An optimizer file as Noether's OptimizerWrapper writes it: index-keyed in group order
    (weights first, then biases: not model.parameters() order) plus param_idx_to_name."""
    model = Net()
    opt = grouped(model, lrs=lrs)
    step(model, opt)
    sd = opt.state_dict()
    sd["param_idx_to_name"] = dict(enumerate(WEIGHTS + NO_DECAY))
    return sd, model, opt


def by_name(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, dict[str, torch.Tensor]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: {k: v.clone() for k, v in s.items()} for p, s in opt.state.items()}


@pytest.mark.slow
def test_noether_file_loads_by_name_and_groups_by_membership():
    sd, src_model, src_opt = noether_file(lrs={"default": 3e-3, "weight_decay=0": 7e-3})
    model = Net()
    # the target's groups come in the other order, with other settings: both must follow membership
    opt = grouped(model, order=("weight_decay=0", "default"), lrs={"default": 1.0, "weight_decay=0": 2.0})
    load_optimizer_file(model, opt, copy.deepcopy(sd))
    want, got = by_name(src_model, src_opt), by_name(model, opt)
    assert want.keys() == got.keys() == set(WEIGHTS + NO_DECAY)
    for name in want:
        for key in want[name]:
            assert torch.equal(want[name][key], got[name][key]), (name, key)
    # exp_avg of input_projection.bias is that parameter's (shape (10,), not a weight's)
    assert torch.equal(got["input_projection.bias"]["exp_avg"],
                       sd["state"][len(WEIGHTS)]["exp_avg"])
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["weight_decay=0"]["lr"] == 7e-3 and groups["weight_decay=0"]["weight_decay"] == 0.0
    assert groups["default"]["lr"] == 3e-3 and groups["default"]["weight_decay"] == 0.05
    assert groups["default"]["betas"] == (0.9, 0.999)  # as stored: a tuple, not the list torch's path makes
    names = {id(p): n for n, p in model.named_parameters()}
    assert [names[id(p)] for p in groups["default"]["params"]] == WEIGHTS


def assert_refused(model: nn.Module, opt: torch.optim.Optimizer, sd: dict, match: str) -> None:
    """The load raises and leaves the optimizer exactly as it was."""
    before = by_name(model, opt)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    with pytest.raises(StateMismatchError, match=match):
        load_optimizer_file(model, opt, sd)
    after = by_name(model, opt)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[n][k], after[n][k]) for n in before for k in before[n])
    assert settings == [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def stepped_target(groups: bool = True) -> tuple[nn.Module, torch.optim.Optimizer]:
    model = Net()
    opt = grouped(model) if groups else torch.optim.AdamW(model.parameters(), lr=1e-2)
    step(model, opt, 1)
    return model, opt


def test_index_keyed_file_without_names_loads_in_the_optimizers_own_order():
    """torch's own rule: same group sizes, index i is the optimizer's i-th parameter."""
    sd, src_model, src_opt = noether_file()
    del sd["param_idx_to_name"]
    model, opt = stepped_target()
    load_optimizer_file(model, opt, sd)
    want, got = by_name(src_model, src_opt), by_name(model, opt)
    assert all(torch.equal(want[n][k], got[n][k]) for n in want for k in want[n])


def _drop_names(sd: dict) -> None:
    del sd["param_idx_to_name"]


def _unknown_name(sd: dict) -> None:
    sd["param_idx_to_name"][1] = "encoder.weight"


def _unnamed_index(sd: dict) -> None:
    del sd["param_idx_to_name"][4]


def _swapped_names(sd: dict) -> None:
    """The state of the first parameters fits; a tensor later on does not: nothing lands."""
    sd["param_idx_to_name"][0], sd["param_idx_to_name"][1] = "block.weight", "input_projection.weight"


def _missing_state(sd: dict) -> None:
    del sd["state"][5]


def _not_an_optimizer_file(sd: dict) -> None:
    sd.clear()
    sd["state_dict"] = {}


@pytest.mark.parametrize("edit, groups, match", [
    (_drop_names, False, "no param_idx_to_name.*cannot be proven"),
    (_unknown_name, True, r"missing in the file: block\.weight.*does not have: encoder\.weight"),
    (_unnamed_index, True, r"indices \[4\] have no name"),
    (_swapped_names, True, r"exp_avg of block\.weight has shape \[10, 4\], the parameter \[10, 10\]"),
    (_missing_state, True, r"without optimizer state in the file: norm\.bias"),
    (lambda sd: None, False, r"param group 0 of the optimizer holds parameters of the file's groups "
                             r"'default', 'weight_decay=0'"),
    (_not_an_optimizer_file, True, "not an optimizer state dict"),
], ids=["ambiguous-order", "unknown-and-missing", "unnamed-index", "shape", "missing-state", "mixed-groups",
        "not-optimizer"])
def test_a_file_that_does_not_fit_is_refused_with_nothing_applied(edit, groups, match):
    sd, _, _ = noether_file()
    edit(sd)
    model, opt = stepped_target(groups=groups)
    assert_refused(model, opt, sd, match)
