"""``async_mode: process`` without a process group is refused at construction, before
anything is written (a main script without a main guard: tests/integration/test_async_process_guard.py)."""

from __future__ import annotations

import pytest

from noether_dist import AsyncMode, Checkpointer, CheckpointerConfig, ConfigError

pytestmark = pytest.mark.torch_compat


def test_process_mode_without_a_process_group_is_refused_at_construction(tmp_path):
    with pytest.raises(ConfigError, match="needs an initialised torch.distributed process group.*'thread'"):
        Checkpointer(CheckpointerConfig(output_dir=str(tmp_path), run_id="run1", async_mode=AsyncMode.PROCESS))
    assert not (tmp_path / "run1").exists()
