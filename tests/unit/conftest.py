"""The unit tier is one process: after every test, no process group is initialised and no
child process of this one is alive (a library path that started one, e.g. DCP's checkpoint
process, belongs in tests/dist or tests/integration). tests/unit/test_architecture.py
checks the tests' source for the same."""

from __future__ import annotations

import glob
import os

import pytest


def _children() -> list[int]:
    """The live child processes of this process (Linux: /proc/self/task/*/children)."""
    pids = []
    for path in glob.glob(f"/proc/{os.getpid()}/task/*/children"):
        try:
            with open(path) as fh:
                pids += [int(p) for p in fh.read().split()]
        except OSError:  # a thread that ended meanwhile
            pass
    return pids


@pytest.fixture(autouse=True)
def _one_process():
    before = set(_children())
    yield
    import torch.distributed as dist

    assert not (dist.is_available() and dist.is_initialized()), \
        "a unit test left a torch.distributed process group behind: tests/unit is one process (see tests/dist)"
    started = sorted(set(_children()) - before)
    assert not started, f"a unit test left child processes {started} running: tests/unit is one process"
