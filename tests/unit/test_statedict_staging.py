"""State capture and staging copies: the fast paths give what the general ones give."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_model_state_dict

from noether_dist.io.statedict import SaveStaging, model_state

pytestmark = pytest.mark.torch_compat


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_model_state_follows_the_model_after_it_changes():
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    _same(model_state(model), get_model_state_dict(model))  # first call: DCP's own
    _same(model_state(model), get_model_state_dict(model))  # later calls: the model's state_dict
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[0].bias.data = torch.full((3,), 5.0)  # new storage under the same parameter
    state = model_state(model)
    assert torch.equal(state["0.bias"], torch.full((3,), 5.0))
    _same(state, get_model_state_dict(model))
    model.append(nn.Linear(3, 2))  # new keys: DCP's path again
    _same(model_state(model), get_model_state_dict(model))
    assert "2.weight" in model_state(model)


def test_model_state_of_a_compiled_model_keeps_dcp_names():
    compiled = torch.compile(nn.Linear(4, 3))  # its own keys start with "_orig_mod.", DCP's do not
    assert list(compiled.state_dict()) == ["_orig_mod.weight", "_orig_mod.bias"]
    for _ in range(2):
        assert list(model_state(compiled)) == list(get_model_state_dict(compiled)) == ["weight", "bias"]


def test_staging_reuses_its_buffers_and_reallocates_when_the_state_changes():
    staging = SaveStaging()
    state = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}
    staging.stage("m", state)
    ptrs = staging.storage_ptrs()
    state["a"].add_(1.0)
    staged = staging.stage("m", state)
    assert staging.storage_ptrs() == ptrs  # copied into the same buffers
    _same(staged, state)
    state["a"].add_(1.0)  # a change after the stage is not in the staged copy
    assert torch.equal(staged["a"], torch.arange(6.0).reshape(2, 3) + 1)
    cases = [({"a": torch.zeros(3, 3), "b": torch.ones(4)}, True),  # a shape changed
             ({"a": torch.zeros(3, 3, dtype=torch.float64), "b": torch.ones(4)}, True),  # a dtype changed
             ({"b": torch.full((4,), 2.0), "a": torch.full((3, 3), 3.0, dtype=torch.float64)}, False),  # key order
             ({"a": torch.zeros(3, 3), "b": {"nested": torch.ones(4)}}, True)]  # structure
    for changed, reallocated in cases:
        ptrs = staging.storage_ptrs()
        staged = staging.stage("m", changed)
        assert (staging.storage_ptrs() != ptrs) == reallocated, changed
        assert torch.equal(staged["a"], changed["a"]) and staged["a"] is not changed["a"]
        assert str(staged["b"]) == str(changed["b"])
