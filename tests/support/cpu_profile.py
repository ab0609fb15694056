"""A pytest plugin that measures what each test costs: wall seconds and CPU seconds of the
whole process tree (load barely changes CPU seconds; it inflates wall seconds).

Not loaded by default: ``python3 -m pytest -p tests.support.cpu_profile ...``. CPU of a test =
the change, across the test (setup, call, teardown), of

- this process (user + system, all its threads: an in-process server counts here),
- the children it reaped (torchrun, trainer and CLI subprocesses), and
- every descendant still alive (its own time plus the children *it* reaped: the ranks a
  forkserver forks and reaps count through the forkserver; a session-wide S3 server through
  its live process), read from ``/proc/<pid>/stat``.

A process that daemonizes (re-parented to init) is missed; nothing in the suite does. At the
end it prints the 30 costliest tests by CPU and by waiting (``wall - CPU/2``: seconds on a
2-core machine that no core spent on the test, e.g. a timeout that has to expire), and with
``CPU_PROFILE_OUT=<path>`` writes every test's figures as JSON lines.
"""

from __future__ import annotations

import json
import os
import time

import pytest

_TICK = os.sysconf("SC_CLK_TCK")
_CORES = 2.0


def _stat(pid: int | str) -> tuple[int, list[str]] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            text = fh.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # fields from 3 (state) on
    return int(fields[1]), fields  # ppid


def _tree_cpu() -> float:
    """CPU seconds of this process, its reaped children and every live descendant."""
    me = os.getpid()
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        got = _stat(name)
        if got is None:
            continue
        ppid, f = got
        parents[int(name)] = ppid
        # utime stime cutime cstime are fields 14..17, i.e. f[11..14]
        cpu[int(name)] = sum(int(x) for x in f[11:15]) / _TICK
    total = 0.0
    for pid, value in cpu.items():
        p, seen = pid, 0
        while p not in (0, 1) and seen < 64:
            if p == me:
                total += value
                break
            p = parents.get(p, 0)
            seen += 1
    return total


_ROWS: list[dict] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    w0, c0 = time.monotonic(), _tree_cpu()
    yield
    wall, cpu = time.monotonic() - w0, _tree_cpu() - c0
    _ROWS.append({"test": item.nodeid, "wall": round(wall, 2), "cpu": round(cpu, 2),
                  "wait": round(wall - cpu / _CORES, 2)})


def pytest_terminal_summary(terminalreporter):
    if not _ROWS:
        return
    out = os.environ.get("CPU_PROFILE_OUT")
    if out:
        with open(out, "w") as fh:
            for row in _ROWS:
                fh.write(json.dumps(row) + "\n")
    tr = terminalreporter
    for key in ("cpu", "wait"):
        tr.write_sep("-", f"top 30 by {key} (s)")
        for row in sorted(_ROWS, key=lambda r: -r[key])[:30]:
            tr.write_line(f"{row['cpu']:7.1f} cpu {row['wait']:7.1f} wait {row['wall']:7.1f} wall  {row['test']}")
    tr.write_line(f"sum: {sum(r['cpu'] for r in _ROWS):.1f} cpu s, {sum(r['wait'] for r in _ROWS):.1f} wait s, "
                  f"{sum(r['wall'] for r in _ROWS):.1f} wall s over {len(_ROWS)} tests")
