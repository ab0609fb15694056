"""Kill a rank at random moments of a save (and during resume's agreement); the others fail
in bounded time, nothing half-written is ever selected, and resume loads exact state.

Trials: ``NOETHER_DIST_KILL_TRIALS`` (default 10), seed ``NOETHER_DIST_KILL_SEED`` (default:
random, printed so that a failure can be replayed). Each trial, on 2 ranks in a fresh
folder: commit 1-2 checkpoints, then SIGKILL one rank during the next save at a random
point: after a random number of bytes written (torn file), after a random delay (any phase:
capture, planning, writing, exchange of reports, commit, aliases), or right before / after
the commit record or the ``latest`` alias is written. The next process pair resumes that
folder (``latest``), compares the loaded state exactly with the state of the selected
point, saves the killed point again, and ``verify`` must then find the folder clean.
To save process start-ups, one ``run_ranks`` call resumes trial i and runs trial i+1.
"""

from __future__ import annotations

import importlib
import os
import pickle
import random
import signal
import threading
import time

import pytest

from noether_dist import Checkpointer, CheckpointerConfig, TrainingIteration, resume
from noether_dist.stage.commit import list_commits, read_alias
from noether_dist.errors import DistributedTimeoutError, NoetherDistError
from noether_dist.format.layout import StageLayout
from noether_dist.io.storage import open_storage
from noether_dist.stage.verify import verify_stage
from tests.support.ranks import run_ranks
from tests.support.models import EMA_INFO, assert_states_equal, build, full_state, train_steps
from tests.support.storage_faults import FaultyStorage

pytestmark = pytest.mark.slow

RUN, STAGE, MODEL = "run1", "train", "mlp"
TIMEOUT_S = 6.0
"""Timeout of every collective in these tests: a survivor must give up within it."""
MODES = ("bytes", "bytes", "timer", "timer", "before_commit", "after_commit", "after_alias")


def _it(update: int) -> TrainingIteration:
    return TrainingIteration(0, update, 16 * update)


def _checkpointer(out: str, storage=None) -> Checkpointer:
    return Checkpointer(CheckpointerConfig(output_dir=out, run_id=RUN, stage_name=STAGE, model_name=MODEL,
                                           timeout_s=TIMEOUT_S), storage=storage)


class _Killer:
    """A rank's storage for a trial (:class:`FaultyStorage`): counts the bytes this rank
    writes and SIGKILLs the process at the moment the trial chose."""

    def __init__(self, out: str) -> None:
        self.written = 0
        self.kill_at_byte: int | None = None
        self.commit_hook: str | None = None  # before_commit, after_commit, after_alias
        self.lock = threading.Lock()
        self.storage = FaultyStorage(open_storage(out), stream_write=self._write, write_once=self._write_once,
                                     replace=self._replace)

    def _write(self, write, stream, data):
        with self.lock:
            size = memoryview(data).nbytes
            limit = self.kill_at_byte
            if limit is not None and self.written + size >= limit:
                keep = max(0, limit - self.written)
                write(memoryview(data).cast("B")[:keep])
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001 - dying anyway
                    pass
                _die()
            self.written += size
        return write(data)

    def _write_once(self, original, path, data):
        if self.commit_hook == "before_commit" and "/_commits/" in path:
            _die()
        original(path, data)
        if self.commit_hook == "after_commit" and "/_commits/" in path:
            _die()

    def _replace(self, original, path, data):
        original(path, data)
        if self.commit_hook == "after_alias" and path.endswith("/_aliases/latest.json"):
            _die()


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # never reached


def _resume_and_check(rank: int, prev: dict) -> dict:
    """Resume ``prev``'s folder (latest; and the newest point by name, should latest ever
    resolve to anything else), then save the killed point again (what a restarted job does)."""
    model, opt, ema = build(seed=1000 + prev["index"])
    out = {}
    root = {"output_dir": prev["dir"], "resume_run_id": RUN, "resume_stage_name": STAGE}
    res = resume(root, model=model, optimizer=opt, ema={EMA_INFO: ema}, model_name=MODEL, timeout_s=TIMEOUT_S)
    out["latest"] = {"cp": res.checkpoint, "state": full_state(model, opt, ema), "trainer": res.trainer_state,
                     "rank_state": res.rank_state, "skipped": res.fell_back_from}
    if prev["newest"] != res.checkpoint:
        m2, o2, e2 = build(seed=2000 + prev["index"])
        res2 = resume({**root, "resume_checkpoint": f"U{TrainingIteration.parse(prev['newest']).update}"},
                      model=m2, optimizer=o2, ema={EMA_INFO: e2}, model_name=MODEL, timeout_s=TIMEOUT_S)
        out["by_name"] = {"cp": res2.checkpoint, "state": full_state(m2, o2, e2), "trainer": res2.trainer_state}
    # the restarted job trains on and saves the point that was killed
    train_steps(model, opt, ema, 1, rank, start=50)
    result = _checkpointer(prev["dir"]).save(TrainingIteration.parse(prev["killed_point"]), model=model,
                                             optimizer=opt, ema={EMA_INFO: ema})
    out["resaved"] = {"cp": str(result.iteration), "reused": result.reused_existing}
    return out


def trial_job(rank: int, world_size: int, prev: dict | None, trial: dict | None) -> dict:
    """Resume and check the previous trial's folder, then run this trial (a rank dies)."""
    out: dict = {"rank": rank}
    if prev is not None:
        # kept in a file: this process may be the victim of the trial below
        with open(os.path.join(prev["dir"], f"resumed.rank{rank}.pkl"), "wb") as fh:
            pickle.dump(_resume_and_check(rank, prev), fh)
    if trial is None:
        return out
    killer = _Killer(trial["dir"])
    model, opt, ema = build(seed=trial["index"])
    ck = _checkpointer(trial["dir"], killer.storage)
    states = {}
    save_s = bytes_per_save = 0.0
    for update in range(1, trial["committed_before"] + 1):
        train_steps(model, opt, ema, 1, rank, start=update)
        states[str(_it(update))] = full_state(model, opt, ema)
        before, started = killer.written, time.perf_counter()
        ck.save(_it(update), model=model, optimizer=opt, ema={EMA_INFO: ema}, trainer_state={"point": str(_it(update))},
                rank_state={"rank": rank, "point": str(_it(update))})
        save_s, bytes_per_save = time.perf_counter() - started, killer.written - before
    killed = _it(trial["committed_before"] + 1)
    train_steps(model, opt, ema, 1, rank, start=killed.update)
    states[str(killed)] = full_state(model, opt, ema)  # collective: before anyone dies
    out.update(states=states, killed_point=str(killed))
    timer = None
    if rank == trial["victim"]:
        mode = trial["mode"]
        if mode == "bytes":
            killer.kill_at_byte = killer.written + max(1, int(trial["fraction"] * bytes_per_save))
        elif mode == "timer":
            timer = threading.Timer(trial["fraction"] * save_s * 1.2, _die)
            timer.daemon = True
        else:
            killer.commit_hook = mode
    started = time.perf_counter()
    if timer is not None:
        timer.start()
    try:
        ck.save(killed, model=model, optimizer=opt, ema={EMA_INFO: ema}, trainer_state={"point": str(killed)},
                rank_state={"rank": rank, "point": str(killed)})
        out["save"] = ("ok", None, time.perf_counter() - started)
    except NoetherDistError as exc:
        out["save"] = (type(exc).__name__, str(exc), time.perf_counter() - started)
    finally:
        if timer is not None:
            timer.cancel()
    return out


def _trials(count: int, seed: int, base) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(count):
        mode = MODES[i % len(MODES)] if i < len(MODES) else rng.choice(MODES)  # every mode at least once
        victim = 0 if mode in ("before_commit", "after_commit", "after_alias") else rng.randrange(2)
        out.append({"index": i, "dir": str(base / f"trial{i:03d}"), "mode": mode, "victim": victim,
                    "fraction": rng.uniform(0.02, 1.0), "committed_before": rng.choice((1, 2))})
    return out


def _on_disk(folder: str) -> tuple[list[str], str | None]:
    st = open_storage(folder)
    layout = StageLayout(folder, RUN, STAGE)
    alias = read_alias(st, layout, "latest")
    return [str(p) for p in list_commits(st, layout)], (str(alias.iteration) if alias else None)


def test_random_kills_during_save_then_resume_is_exact(tmp_path, pytestconfig, report, record_property):
    count = int(os.environ.get("NOETHER_DIST_KILL_TRIALS", "10"))
    seed = int(os.environ.get("NOETHER_DIST_KILL_SEED", str(random.randrange(2**31))))
    record_property("kill_trials", count)
    record_property("kill_seed", seed)
    trials = _trials(count, seed, tmp_path)
    report(f"\n[kill] {count} trials, seed {seed} (NOETHER_DIST_KILL_TRIALS / NOETHER_DIST_KILL_SEED)")
    started = time.perf_counter()
    prev = None
    summary: dict[str, int] = {}
    worst_fail_s = 0.0
    slowest_call = (0.0, "")
    for i in range(count + 1):
        trial = trials[i] if i < count else None
        where = f"seed {seed} trial {trial['index'] if trial else '-'} {trial if trial else ''}"
        call_started = time.perf_counter()
        results = run_ranks(trial_job, 2, prev, trial, timeout_s=90, expect_dead={0, 1}, raise_on_error=True)
        slowest_call = max(slowest_call, (time.perf_counter() - call_started, where))
        if prev is not None:
            _check_resumed(prev, results)
        if trial is None:
            break
        dead = [r for r, res in enumerate(results) if res is None]
        alive = [res for res in results if res is not None]
        assert dead in ([], [trial["victim"]]), where  # only the victim may die
        assert alive, where
        states = alive[0]["states"]
        for res in alive:
            kind, message, elapsed = res["save"]
            if dead:
                # the survivor either finished (the victim died after the last collective) or
                # raised a clear error, in bounded time
                assert kind in ("ok", "CommitError", "DistributedTimeoutError", "RemoteRankError"), (where, kind, message)
                assert elapsed < 2 * TIMEOUT_S + 5, (where, elapsed, message)
                worst_fail_s = max(worst_fail_s, elapsed)
        committed, latest = _on_disk(trial["dir"])
        pre = [str(_it(u)) for u in range(1, trial["committed_before"] + 1)]
        killed = alive[0]["killed_point"]
        assert committed in (pre, pre + [killed]), (where, committed)
        # latest moves just before the commit record: it names a committed point, or the
        # killed one when the kill came between the two (selection then skips it)
        assert latest in committed or latest == killed, (where, latest, committed)
        if not dead:
            assert committed[-1] == killed, where  # the kill came too late: the save went through
        outcome = "committed" if committed[-1] == killed else "not committed"
        if latest != committed[-1]:
            outcome += ", latest alias names the uncommitted point"
        summary[f"{trial['mode']}: {outcome}"] = summary.get(f"{trial['mode']}: {outcome}", 0) + 1
        prev = {"index": trial["index"], "dir": trial["dir"], "newest": committed[-1], "latest": latest,
                "killed_point": killed, "states": states, "where": where}
    elapsed = time.perf_counter() - started
    record_property("kill_outcomes", summary)
    report(f"[kill] {count} trials in {elapsed:.0f}s; slowest survivor failure {worst_fail_s:.1f}s "
                          f"(timeout {TIMEOUT_S:.0f}s); slowest process pair {slowest_call[0]:.0f}s; outcomes: "
                          + "; ".join(f"{k} x{v}" for k, v in sorted(summary.items())))


def _check_resumed(prev: dict, results: list) -> None:
    where = prev["where"]
    resumed = []
    for rank in range(len(results)):
        with open(os.path.join(prev["dir"], f"resumed.rank{rank}.pkl"), "rb") as fh:
            resumed.append({"resume": pickle.load(fh)})
    for rank, res in enumerate(resumed):
        got = res["resume"]["latest"]
        # resume always selects the newest committed point, whatever moment the kill hit
        assert got["cp"] == prev["newest"], (where, got["cp"], prev)
        assert_states_equal(prev["states"][got["cp"]], got["state"])
        assert got["trainer"] == {"point": got["cp"]} and got["rank_state"] == {"rank": rank, "point": got["cp"]}
        if "by_name" in res["resume"]:
            by_name = res["resume"]["by_name"]
            assert by_name["cp"] == prev["newest"], where
            assert_states_equal(prev["states"][prev["newest"]], by_name["state"])
        assert res["resume"]["resaved"]["cp"] == prev["killed_point"]
        assert res["resume"]["resaved"]["reused"] == (prev["newest"] == prev["killed_point"]), where
    # after the restarted job saved again, nothing is damaged and nothing is left over
    report = verify_stage(open_storage(prev["dir"]), StageLayout(prev["dir"], RUN, STAGE))
    assert report.ok, (where, [str(d) for d in report.damages])
    assert [c.checkpoint for c in report.checkpoints][-1] == prev["killed_point"]


# -- a rank that dies or hangs while the others wait -------------------------------------------
def _pids_and_save(rank: int, out: str) -> tuple[list[int], object, object, object]:
    from noether_dist.dist.comm import Comm

    pids = Comm(TIMEOUT_S).all_gather(os.getpid())
    model, opt, ema = build()
    train_steps(model, opt, ema, 1, rank)
    _checkpointer(out).save(_it(1), model=model, optimizer=opt, ema={EMA_INFO: ema})
    return pids, model, opt, ema


def resume_with_dead_peer(rank: int, world_size: int, out: str, how: str) -> dict:
    """Rank 1 dies (SIGKILL) or hangs (SIGSTOP) right before resume's agreement step."""
    resume_mod = importlib.import_module("noether_dist.resume")  # the package exports a function of that name

    pids, model, opt, ema = _pids_and_save(rank, out)
    if rank == 1:
        original = resume_mod._stage_all  # loads into staging; the agreement follows

        def check_then_vanish(*args, **kwargs):
            verdict = original(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL if how == "kill" else signal.SIGSTOP)
            return verdict

        resume_mod._stage_all = check_then_vanish
    started = time.perf_counter()
    try:
        resume({"output_dir": out, "resume_run_id": RUN, "resume_stage_name": STAGE}, model=model, optimizer=opt,
               ema={EMA_INFO: ema}, model_name=MODEL, timeout_s=TIMEOUT_S)
        outcome = ("ok", "")
    except NoetherDistError as exc:
        outcome = (type(exc).__name__, str(exc))
    elapsed = time.perf_counter() - started
    if how == "stop":  # a stopped peer would otherwise keep run_ranks waiting; a killed one is gone (and reaped)
        os.kill(pids[1], signal.SIGKILL)
    return {"outcome": outcome, "elapsed": elapsed}


def test_dead_or_hung_rank_during_resume_agreement(tmp_path, report):
    for how in ("kill", "stop"):
        results = run_ranks(resume_with_dead_peer, 2, str(tmp_path / how), how, timeout_s=60, expect_dead={1})
        assert results[1] is None
        kind, message = results[0]["outcome"]
        assert kind == DistributedTimeoutError.__name__, (how, kind, message)
        assert "did not complete within" in message and "a rank died or is stuck" in message
        assert results[0]["elapsed"] < TIMEOUT_S + 4, (how, results[0]["elapsed"])
        report(f"[kill] resume agreement, peer {how}: rank 0 raised {kind} after "
                              f"{results[0]['elapsed']:.1f}s (timeout {TIMEOUT_S:.0f}s)")


def save_with_hung_peer(rank: int, world_size: int, out: str) -> dict:
    """Rank 1 stops (SIGSTOP: alive but silent) in the middle of writing its shards."""
    pids, model, opt, ema = _pids_and_save(rank, out)
    storage = FaultyStorage(open_storage(out))
    if rank == 1:
        def write_then_hang(write, stream, data):
            write(data)
            os.kill(os.getpid(), signal.SIGSTOP)

        storage.stream_write = write_then_hang
    train_steps(model, opt, ema, 1, rank, start=1)
    started = time.perf_counter()
    try:
        _checkpointer(out, storage).save(_it(2), model=model, optimizer=opt, ema={EMA_INFO: ema})
        outcome = ("ok", "")
    except NoetherDistError as exc:
        outcome = (type(exc).__name__, str(exc))
    elapsed = time.perf_counter() - started
    os.kill(pids[1], signal.SIGKILL)
    return {"outcome": outcome, "elapsed": elapsed}


def test_hung_rank_during_save_fails_the_others_in_bounded_time(tmp_path, report):
    results = run_ranks(save_with_hung_peer, 2, str(tmp_path), timeout_s=90, expect_dead={1})
    kind, message = results[0]["outcome"]
    assert kind == "CommitError" and "nothing was committed" in message, (kind, message)
    assert results[0]["elapsed"] < 3 * TIMEOUT_S + 5, results[0]["elapsed"]
    committed, latest = _on_disk(str(tmp_path))
    assert committed == [str(_it(1))] and latest == str(_it(1))
    report(f"[kill] save, peer hung mid-write: rank 0 raised {kind} after {results[0]['elapsed']:.1f}s "
                          f"(timeout {TIMEOUT_S:.0f}s)")
