"""``python -m MODULE ARGS...`` as a process forked from the ranks' forkserver (which imported
torch and noether_dist once), for tests of what a command prints and exits with, not of how
a Python process starts: each run is still its own process (own environment, working
directory, stdout/stderr and exit code) but skips torch's import (seconds of CPU per run).
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
import traceback

from tests.support.ranks import _context, exit_now


def _main(module: str, argv: list[str], environ: dict[str, str], cwd: str, out: str, err: str) -> None:
    for fd, path in ((1, out), (2, err)):
        handle = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(handle, fd)
        os.close(handle)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)
    code = 0
    try:
        import runpy

        sys.argv = [module, *argv]
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if exc.code is not None and not isinstance(exc.code, int):
            print(exc.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - what the interpreter would print, and its exit code
        traceback.print_exc()
        code = 1
    exit_now(code)


def run_all(runs: list[tuple[str, list[str], dict[str, str]]], *, cwd: str,
            timeout_s: float = 300) -> list[subprocess.CompletedProcess]:
    """Start ``python -m module *argv`` with environment ``env`` (the whole environment, as
    ``subprocess`` takes it) for each ``(module, argv, env)`` at once; wait for all, each
    bounded by the shared deadline (one still running then is killed and fails the caller's
    assertions with return code -9)."""
    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="nd-main-") as folder:
        procs = []
        for i, (module, argv, env) in enumerate(runs):
            paths = (os.path.join(folder, f"{i}.out"), os.path.join(folder, f"{i}.err"))
            p = ctx.Process(target=_main, args=(module, list(argv), dict(env), str(cwd), *paths), daemon=False)
            p.start()
            procs.append((p, argv, paths))
        deadline = time.monotonic() + timeout_s
        done = []
        for p, argv, (out, err) in procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.exitcode is None:
                p.kill()
                p.join(10)
            with open(out, errors="replace") as fo, open(err, errors="replace") as fe:
                done.append(subprocess.CompletedProcess([sys.executable, "-m", *argv], p.exitcode, fo.read(),
                                                        fe.read()))
        return done
