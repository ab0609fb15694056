"""Whether DCP's checkpoint process can be started from this process (``async_mode: process``).

DCP starts that process with the ``spawn`` method, which runs the main module again in the
new process, and the new process joins a process group built from this process's one. Two
situations therefore fail, late and slowly (a dead checkpoint process, or ranks waiting on
one another for minutes), unless they are refused when the Checkpointer is built:

- no initialised ``torch.distributed`` process group (a plain single process);
- a main script whose training code is not under ``if __name__ == "__main__":``: the spawned
  process would run the training again instead of serving saves.
"""

from __future__ import annotations

import ast
import logging
import multiprocessing
import os
import sys
from types import FrameType, ModuleType

from .comm import is_distributed
from ..errors import ConfigError

__all__ = ["check_process_mode"]

log = logging.getLogger(__name__)

_GUARD = 'if __name__ == "__main__":'


def check_process_mode() -> None:
    """Raise ConfigError (one line) when DCP's checkpoint process cannot work from here:
    during a spawned process's re-run of the main module, without an initialised process
    group, or when the main module would run the caller's training again once re-run.
    Local and deterministic: every rank of one job comes to the same answer."""
    main = sys.modules.get("__main__")
    path = _rerun_source(main)
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise ConfigError(
            f"a Checkpointer with async_mode 'process' was created while a spawned process re-ran the main module "
            f"{path or '__main__'}: put the code that starts training under {_GUARD}"
        )
    if not is_distributed():
        raise ConfigError(
            "async_mode 'process' needs an initialised torch.distributed process group (DCP's checkpoint process "
            "joins one); in a plain single process use async_mode 'thread' or 'off', or call "
            "torch.distributed.init_process_group(world_size=1, ...) first"
        )
    if path is None or main is None:
        return
    guarded = _called_under_guard(main, path)
    if guarded is False:
        raise ConfigError(
            f"async_mode 'process' starts DCP's checkpoint process with 'spawn', which re-runs the main module {path}, "
            f"and there the Checkpointer is built outside {_GUARD} (the checkpoint process would start the training "
            f"again and hang): put the script's top-level code under {_GUARD}, or use async_mode 'thread'"
        )


def _rerun_source(main: ModuleType | None) -> str | None:
    """The file that ``spawn`` runs again in a new process, or None when it runs none
    (interactive, ``-c``, a package's ``__main__``), mirroring multiprocessing.spawn."""
    if main is None:
        return None
    spec_name = getattr(getattr(main, "__spec__", None), "name", None)
    path = getattr(main, "__file__", None)
    if spec_name is not None:
        if spec_name == "__main__" or spec_name.endswith(".__main__"):
            return None
        return path or spec_name
    if not path or os.path.splitext(os.path.basename(path))[0] == "ipython":
        return None
    return path


def _guard_ranges(source: str) -> list[tuple[int, int]] | None:
    """Line ranges of the top-level ``if __name__ == "__main__":`` blocks (None: unparsable)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return None
    ranges = []
    for node in tree.body:
        if isinstance(node, ast.If) and _is_main_test(node.test):
            ranges.append((node.body[0].lineno, node.body[-1].end_lineno or node.body[-1].lineno))
    return ranges


def _is_main_test(test: ast.expr) -> bool:
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.ops[0], ast.Eq)):
        return False
    sides = [test.left, test.comparators[0]]
    names = [s for s in sides if isinstance(s, ast.Name) and s.id == "__name__"]
    consts = [s for s in sides if isinstance(s, ast.Constant) and s.value == "__main__"]
    return len(names) == 1 and len(consts) == 1


def _called_under_guard(main: ModuleType, path: str) -> bool | None:
    """True when the main module's top-level code that led here is inside a guard block (or,
    when no such frame is on the stack, when the module has a guard at all); None when the
    source cannot be read (then nothing is refused)."""
    try:
        with open(getattr(main, "__file__", None) or "", encoding="utf-8") as fh:
            ranges = _guard_ranges(fh.read())
    except OSError:
        ranges = None
    if ranges is None:
        log.debug("cannot read the main module %s to check its __main__ guard", path)
        return None
    frame = _main_module_frame(main)
    if frame is None:
        return bool(ranges)
    return any(start <= frame.f_lineno <= end for start, end in ranges)


def _main_module_frame(main: ModuleType) -> FrameType | None:
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is vars(main):
            return frame
        frame = frame.f_back
    return None
