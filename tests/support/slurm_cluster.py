"""A throw-away single-node Slurm cluster for integration tests.

:class:`LocalSlurmCluster` starts ``munged`` (when none is running),
``slurmctld`` and ``slurmd`` on this machine with a private ``slurm.conf``
written into a temporary directory, and tears everything down again on exit.
All Slurm state, spool and log files live in that temporary directory; the
daemons listen on free TCP ports picked at start-up, so several clusters may
run side by side.

Requirements: root, and the Debian packages installed by
``.ci/install_system.sh`` (slurmctld, slurmd, slurm-client, munge).
Use :func:`slurm_available` to decide whether to skip.

Example::

    from tests.support.slurm_cluster import LocalSlurmCluster, slurm_available

    ok, why = slurm_available()
    if not ok:
        pytest.skip(why)
    with LocalSlurmCluster() as cluster:
        job_id = cluster.sbatch(["--output", "/tmp/out.txt"], "job.sh")
        assert cluster.wait_job(job_id, timeout=30) == "COMPLETED"

Client commands (``sbatch``, ``srun``, ``squeue``, ``scontrol``, ``scancel``)
run by the test itself need :attr:`LocalSlurmCluster.env` (it carries
``SLURM_CONF``); use :meth:`LocalSlurmCluster.client_env` to get a complete
environment. Batch jobs inherit the submitter's environment
(``--export=ALL`` is Slurm's default), so ``PATH``, the Python interpreter and
``SLURM_CONF`` are available inside jobs.

Configuration notes (Slurm 22.05, see :meth:`LocalSlurmCluster.slurm_conf_text`):

* ``SlurmdParameters=config_overrides`` lets the node advertise more CPUs than
  the machine has (``CPUs=8`` by default), so ``srun -n 4`` fits on a 2-core
  machine.
* ``AuthInfo=cred_expire=5``: Slurm holds a requeued job (Reason=BeginTime)
  for ``cred_expire + 1`` seconds (default 120 s) before it becomes eligible
  again. 5 is the smallest value accepted (smaller values are rejected with
  "AuthInfo=cred_expire=N invalid" and the 120 s default is used).
* ``SchedulerParameters=sched_interval=1``: the end of a BeginTime hold is not
  an event that triggers scheduling, so with the default 60 s main-loop
  interval a requeued job sat pending for ~55 s more. With both settings a job
  that runs ``scontrol requeue $SLURM_JOB_ID`` on itself starts again about
  6 s later (measured: 6.0 s).
* ``MinJobAge=3600`` keeps finished jobs visible in ``scontrol show job``
  (there is no slurmdbd, hence no ``sacct``).
* ``ProctrackType=proctrack/linuxproc`` and ``TaskPlugin=task/none`` avoid
  cgroups, which are often unusable inside containers.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from tests.support.ports import free_port

__all__ = [
    "LocalSlurmCluster",
    "SlurmClusterError",
    "TERMINAL_STATES",
    "slurm_available",
]

logger = logging.getLogger(__name__)

#: Job states after which a job will not run again by itself.
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "SPECIAL_EXIT",
        "TIMEOUT",
    }
)

_REQUIRED_BINARIES = (
    "slurmctld", "slurmd", "munged", "munge", "unmunge",
    "sbatch", "srun", "squeue", "scontrol", "scancel", "sinfo",
)
_MUNGE_KEY = Path("/etc/munge/munge.key")
_MUNGE_SOCKET_DIR = Path("/run/munge")
# Environment variables that would leak an outer Slurm job (or user defaults)
# into the commands we run against the private cluster.
_SLURM_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_", "SQUEUE_", "SINFO_", "SCANCEL_")


class SlurmClusterError(RuntimeError):
    """Raised when the local cluster fails to start or a wait times out.

    The message includes the tail of the slurmctld and slurmd logs.
    """


def _which(name: str) -> str | None:
    # Daemons live in /usr/sbin, which is not always on a non-login PATH.
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/bin:/bin"
    return shutil.which(name, path=path)


def slurm_available() -> tuple[bool, str]:
    """Tell whether a :class:`LocalSlurmCluster` can be started here.

    Returns:
        ``(True, "")`` when running as root and the Slurm and munge binaries
        are installed, else ``(False, reason)`` suitable for ``pytest.skip``.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "LocalSlurmCluster needs root (it starts slurmctld/slurmd/munged)"
    missing = [b for b in _REQUIRED_BINARIES if _which(b) is None]
    if missing:
        return False, (
            f"Slurm binaries not found: {', '.join(missing)} "
            "(install them with .ci/install_system.sh)"
        )
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return False, "user 'munge' does not exist (munge package not installed properly)"
    return True, ""


def _die_with_parent() -> None:
    """preexec_fn: have the kernel SIGTERM the child when our process dies.

    Prevents daemons from outliving a test run that is killed hard (e.g. by a
    CI timeout), when ``__exit__`` never runs.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # 1 == PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _munge_works(timeout: float = 5.0) -> bool:
    """Return True when a munged answers on the default socket."""
    munge = _which("munge")
    unmunge = _which("unmunge")
    if not munge or not unmunge:
        return False
    try:
        cred = subprocess.run(
            [munge, "-n"], capture_output=True, timeout=timeout, check=True
        ).stdout
        subprocess.run(
            [unmunge], input=cred, capture_output=True, timeout=timeout, check=True
        )
    except (subprocess.SubprocessError, OSError):
        return False
    return True


# munged started by this module, shared by all clusters of this process and
# stopped when the last of them stops. A munged that was already running
# (system service, another process) is used as is and never stopped.
_munged_lock = threading.Lock()
_munged_proc: subprocess.Popen | None = None
_munged_users = 0


def _prepare_munge_files() -> None:
    munge = pwd.getpwnam("munge")
    if not _MUNGE_KEY.exists():
        _MUNGE_KEY.parent.mkdir(parents=True, exist_ok=True)
        os.chown(_MUNGE_KEY.parent, munge.pw_uid, munge.pw_gid)
        os.chmod(_MUNGE_KEY.parent, 0o700)
        fd = os.open(_MUNGE_KEY, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
        with os.fdopen(fd, "wb") as f:
            f.write(os.urandom(1024))
        logger.info("wrote new munge key %s", _MUNGE_KEY)
    os.chown(_MUNGE_KEY, munge.pw_uid, munge.pw_gid)
    os.chmod(_MUNGE_KEY, 0o400)
    for d, mode in (
        (_MUNGE_SOCKET_DIR, 0o755),
        (Path("/var/lib/munge"), 0o700),
        (Path("/var/log/munge"), 0o700),
    ):
        d.mkdir(parents=True, exist_ok=True)
        os.chown(d, munge.pw_uid, munge.pw_gid)
        os.chmod(d, mode)


def _acquire_munged(log_path: Path, timeout: float = 10.0) -> bool:
    """Make sure a munged answers; start one if needed.

    Returns True when the caller holds a reference on a munged started by
    this module (and must call :func:`_release_munged`).
    """
    global _munged_proc, _munged_users
    with _munged_lock:
        if _munged_proc is not None and _munged_proc.poll() is None:
            _munged_users += 1
            return True
        _munged_proc = None
        if _munge_works():
            logger.debug("using the munged that is already running")
            return False
        _prepare_munge_files()
        munge = pwd.getpwnam("munge")
        # Foreground munged as the munge user, so that we own its pid.
        # --force: start even if a stale socket file is left behind.
        with open(log_path, "ab") as out:
            proc = subprocess.Popen(
                [_which("munged") or "munged", "--foreground", "--force"],
                user=munge.pw_uid,
                group=munge.pw_gid,
                extra_groups=[],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        deadline = time.monotonic() + timeout
        while not _munge_works():
            if proc.poll() is not None:
                raise SlurmClusterError(
                    f"munged exited with {proc.returncode}:\n{_tail(log_path)}"
                )
            if time.monotonic() >= deadline:
                proc.kill()
                proc.wait()
                raise SlurmClusterError(
                    f"munged did not come up within {timeout} s:\n{_tail(log_path)}"
                )
            time.sleep(0.1)
        logger.info("started munged (pid %d)", proc.pid)
        _munged_proc, _munged_users = proc, 1
        return True


def _release_munged() -> None:
    """Drop a reference taken by :func:`_acquire_munged`; stop munged at zero."""
    global _munged_proc, _munged_users
    with _munged_lock:
        _munged_users -= 1
        if _munged_users > 0 or _munged_proc is None:
            return
        proc, _munged_proc = _munged_proc, None
        LocalSlurmCluster._terminate(proc, "munged")
        logger.info("stopped munged")



def _expand_task_ids(spec: str) -> list[int]:
    """Expand an ArrayTaskId spec such as ``1-3,5,7-11:2%1`` into ids."""
    spec = spec.split("%", 1)[0]
    ids: list[int] = []
    for part in spec.split(","):
        if not part:
            continue
        step = 1
        if ":" in part:
            part, step_s = part.split(":", 1)
            step = int(step_s)
        if "-" in part:
            lo, hi = part.split("-", 1)
            ids.extend(range(int(lo), int(hi) + 1, step))
        else:
            ids.append(int(part))
    return ids


def _field(record: str, key: str) -> str | None:
    m = re.search(rf"(?:^|\s){re.escape(key)}=(\S*)", record)
    return m.group(1) if m else None


class LocalSlurmCluster:
    """Context manager running a private one-node Slurm cluster as root.

    Args:
        cpus: CPUs declared for the single node (oversubscribes the machine;
            at least the real core count is used).
        real_memory_mb: ``RealMemory`` of the node; memory is not a consumable
            resource (``CR_CPU``), this only bounds ``--mem`` requests.
        workdir: directory for config, state and logs; a fresh temporary
            directory (removed on exit) when ``None``.
        cluster_name: Slurm ``ClusterName``.
        start_timeout: seconds to wait for the node to become idle.
        extra_conf: extra ``slurm.conf`` lines appended verbatim.
        keep_workdir: do not delete a temporary ``workdir`` on exit
            (useful for debugging).

    Attributes:
        workdir: directory holding ``slurm.conf``, state, spool and logs.
        conf_path: path of the generated ``slurm.conf``.
        env: environment variables client commands need (``SLURM_CONF``).
        node_name: name of the single node (``localhost``).
        partition: name of the default partition (``debug``).
        slurmctld_log / slurmd_log: log file paths.
    """

    node_name = "localhost"
    partition = "debug"

    def __init__(
        self,
        cpus: int = 8,
        real_memory_mb: int = 1024,
        workdir: str | os.PathLike[str] | None = None,
        cluster_name: str = "ndtest",
        start_timeout: float = 30.0,
        extra_conf: Iterable[str] = (),
        keep_workdir: bool = False,
    ) -> None:
        self.cpus = max(int(cpus), os.cpu_count() or 1)
        self.real_memory_mb = int(real_memory_mb)
        self.cluster_name = cluster_name
        self.start_timeout = start_timeout
        self.extra_conf = list(extra_conf)
        self.keep_workdir = keep_workdir
        self._own_workdir = workdir is None
        self._workdir_arg = workdir
        self.workdir: Path | None = None
        self.conf_path: Path | None = None
        self.env: dict[str, str] = {}
        self.slurmctld_port = 0
        self.slurmd_port = 0
        self._slurmctld: subprocess.Popen | None = None
        self._slurmd: subprocess.Popen | None = None
        self._holds_munged = False
        self._started = False

    # ------------------------------------------------------------------ paths
    @property
    def slurmctld_log(self) -> Path:
        """Path of the slurmctld log file."""
        return self._require_workdir() / "log" / "slurmctld.log"

    @property
    def slurmd_log(self) -> Path:
        """Path of the slurmd log file."""
        return self._require_workdir() / "log" / "slurmd.log"

    def _require_workdir(self) -> Path:
        if self.workdir is None:
            raise SlurmClusterError("cluster not started")
        return self.workdir

    # -------------------------------------------------------------- lifecycle
    def __enter__(self) -> "LocalSlurmCluster":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self) -> None:
        """Start munged (if needed), slurmctld and slurmd; wait for an idle node.

        Raises:
            SlurmClusterError: if a daemon dies or the node is not idle within
                ``start_timeout`` seconds. Anything already started is stopped.
        """
        ok, why = slurm_available()
        if not ok:
            raise SlurmClusterError(why)
        if self._started:
            raise SlurmClusterError("cluster already started")
        self._started = True
        try:
            self._setup_workdir()
            self._holds_munged = _acquire_munged(self._require_workdir() / "log" / "munged.log")
            self._write_conf()
            self._start_daemons()
            self._wait_node_idle(self.start_timeout)
        except BaseException:
            self.stop()
            raise
        logger.info(
            "local Slurm cluster up: conf=%s ctld_port=%d slurmd_port=%d cpus=%d",
            self.conf_path, self.slurmctld_port, self.slurmd_port, self.cpus,
        )

    def stop(self) -> None:
        """Cancel all jobs, stop the daemons (and munged if we started it), clean up.

        Safe to call more than once.
        """
        if not self._started:
            return
        self._started = False
        if self._slurmctld is not None and self._slurmctld.poll() is None:
            self._cancel_all_jobs()
        for attr in ("_slurmd", "_slurmctld"):
            proc = getattr(self, attr)
            if proc is not None:
                self._terminate(proc, attr.lstrip("_"))
                setattr(self, attr, None)
        self._kill_leftover_steps()
        if self._holds_munged:
            self._holds_munged = False
            _release_munged()
        if self.workdir is not None and self._own_workdir and not self.keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        logger.info("local Slurm cluster stopped")

    def _setup_workdir(self) -> None:
        if self._workdir_arg is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="nd-slurm-"))
        else:
            self.workdir = Path(self._workdir_arg)
            self.workdir.mkdir(parents=True, exist_ok=True)
        # slurmstepd and job processes must be able to reach the spool dir.
        os.chmod(self.workdir, 0o755)
        for sub in ("state", "spool", "log", "run", "tmp"):
            (self.workdir / sub).mkdir(exist_ok=True)

    def slurm_conf_text(self) -> str:
        """Return the ``slurm.conf`` contents for this cluster."""
        w = self._require_workdir()
        lines = [
            f"ClusterName={self.cluster_name}",
            "SlurmctldHost=localhost(127.0.0.1)",
            f"SlurmctldPort={self.slurmctld_port}",
            f"SlurmdPort={self.slurmd_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            # A requeued job waits cred_expire+1 s before it is eligible
            # again (default 120 s); 5 is the minimum Slurm accepts.
            "AuthInfo=cred_expire=5",
            f"StateSaveLocation={w / 'state'}",
            f"SlurmdSpoolDir={w / 'spool'}",
            f"SlurmctldPidFile={w / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={w / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.slurmctld_log}",
            f"SlurmdLogFile={self.slurmd_log}",
            f"TmpFS={w / 'tmp'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            # No cgroups: they are often unusable in containers.
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "SwitchType=switch/none",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=1,sched_min_interval=0,bf_interval=1",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_CPU",
            # Trust the CPU count below even though the machine has fewer.
            "SlurmdParameters=config_overrides",
            "ReturnToService=2",
            "JobRequeue=1",
            # Keep finished jobs visible to `scontrol show job` (no sacct).
            "MinJobAge=3600",
            "KillWait=2",
            "InactiveLimit=0",
            "WaitTime=0",
            "UnkillableStepTimeout=30",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=300",
            "MessageTimeout=10",
            "BatchStartTimeout=30",
            f"NodeName={self.node_name} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"RealMemory={self.real_memory_mb} State=UNKNOWN",
            f"PartitionName={self.partition} Nodes={self.node_name} Default=YES "
            "MaxTime=INFINITE State=UP OverSubscribe=YES",
        ]
        lines.extend(self.extra_conf)
        return "\n".join(lines) + "\n"

    def _write_conf(self) -> None:
        w = self._require_workdir()
        self.slurmctld_port = free_port()
        self.slurmd_port = free_port()
        while self.slurmd_port == self.slurmctld_port:
            self.slurmd_port = free_port()
        self.conf_path = w / "slurm.conf"
        self.conf_path.write_text(self.slurm_conf_text())
        os.chmod(self.conf_path, 0o644)
        self.env = {"SLURM_CONF": str(self.conf_path)}

    def _start_daemons(self) -> None:
        w = self._require_workdir()
        env = self.client_env()
        ctld_cmd = [_which("slurmctld") or "slurmctld", "-D", "-c", "-f", str(self.conf_path)]
        slurmd_cmd = [
            _which("slurmd") or "slurmd", "-D", "-f", str(self.conf_path), "-N", self.node_name,
        ]
        with open(w / "log" / "slurmctld.stdout", "ab") as out:
            self._slurmctld = subprocess.Popen(
                ctld_cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        def ctld_up() -> bool:
            res = self._run_client(["scontrol", "ping"], check=False)
            return res.returncode == 0 and "UP" in res.stdout

        self._wait_for(
            ctld_up,
            timeout=self.start_timeout,
            what="slurmctld to answer `scontrol ping`",
        )
        with open(w / "log" / "slurmd.stdout", "ab") as out:
            self._slurmd = subprocess.Popen(
                slurmd_cmd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def _check_daemons(self) -> None:
        for name, proc in (("slurmctld", self._slurmctld), ("slurmd", self._slurmd)):
            if proc is not None and proc.poll() is not None:
                raise SlurmClusterError(
                    f"{name} exited with code {proc.returncode}\n{self.log_tail()}"
                )

    def _wait_node_idle(self, timeout: float) -> None:
        def idle() -> bool:
            res = self._run_client(
                ["sinfo", "-h", "-N", "-n", self.node_name, "-o", "%T"], check=False
            )
            state = res.stdout.strip().lower()
            if state.startswith(("down", "drain", "fail", "inval")) and "*" not in state:
                # A registered node that is unusable: resume it once.
                self._run_client(
                    ["scontrol", "update", f"NodeName={self.node_name}", "State=RESUME"],
                    check=False,
                )
            return res.returncode == 0 and state == "idle"

        self._wait_for(idle, timeout=timeout, what=f"node {self.node_name} to be idle")

    def _cancel_all_jobs(self) -> None:
        res = self._run_client(["squeue", "-h", "-o", "%A"], check=False)
        if res.returncode != 0 or not res.stdout.strip():
            return
        self._run_client(["scancel", "--full", "--signal=KILL", "-u", "root"], check=False)
        self._run_client(["scancel", "-u", "root"], check=False)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            res = self._run_client(["squeue", "-h", "-o", "%A"], check=False)
            if res.returncode != 0 or not res.stdout.strip():
                return
            time.sleep(0.5)
        logger.warning("jobs still in the queue at shutdown:\n%s", res.stdout)

    @staticmethod
    def _terminate(proc: subprocess.Popen, name: str, timeout: float = 10.0) -> None:
        if proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop after SIGTERM; killing it", name)
            proc.kill()
            proc.wait(timeout=timeout)

    def _kill_leftover_steps(self) -> None:
        """Kill slurmstepd processes that belong to this cluster's spool dir."""
        if self.workdir is None:
            return
        marker = str(self.conf_path or "").encode()
        for pid_dir in Path("/proc").iterdir():
            if not pid_dir.name.isdigit():
                continue
            try:
                cmdline = (pid_dir / "cmdline").read_bytes()
                environ = (pid_dir / "environ").read_bytes()
            except OSError:
                continue
            if b"slurmstepd" in cmdline.split(b"\0")[0] and marker and marker in environ:
                with contextlib.suppress(OSError):
                    os.kill(int(pid_dir.name), signal.SIGKILL)

    # ---------------------------------------------------------------- helpers
    def client_env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """Return ``os.environ`` minus outer Slurm variables, plus :attr:`env` and ``extra``."""
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(_SLURM_ENV_PREFIXES)
        }
        path = env.get("PATH", "")
        for d in ("/usr/sbin", "/usr/bin", "/sbin", "/bin"):
            if d not in path.split(os.pathsep):
                path = path + os.pathsep + d if path else d
        env["PATH"] = path
        env.update(self.env)
        if extra:
            env.update(extra)
        return env

    def _run_client(
        self, cmd: Sequence[str], check: bool = True, timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        try:
            res = subprocess.run(
                list(cmd), env=self.client_env(env), capture_output=True, text=True,
                timeout=timeout, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise SlurmClusterError(
                f"`{' '.join(cmd)}` timed out after {timeout} s\n{self.log_tail()}"
            ) from exc
        if check and res.returncode != 0:
            raise SlurmClusterError(
                f"`{' '.join(cmd)}` failed with code {res.returncode}:\n"
                f"{res.stdout}{res.stderr}\n{self.log_tail()}"
            )
        return res

    def run(
        self, cmd: Sequence[str], check: bool = True, timeout: float = 30.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run a Slurm client command (e.g. ``["scontrol", "show", "job", "5"]``).

        Args:
            cmd: command and arguments.
            check: raise :class:`SlurmClusterError` on a non-zero exit code.
            timeout: seconds before the command is abandoned.
            env: extra environment variables on top of :meth:`client_env`.

        Returns:
            The completed process, with text ``stdout``/``stderr``.
        """
        return self._run_client(cmd, check=check, timeout=timeout, env=env)

    def log_tail(self, lines: int = 40) -> str:
        """Return the last ``lines`` lines of the slurmctld and slurmd logs."""
        if self.workdir is None:
            return "<no logs: cluster not started>"
        return (
            f"--- slurmctld log ({self.slurmctld_log}) ---\n{_tail(self.slurmctld_log, lines)}\n"
            f"--- slurmd log ({self.slurmd_log}) ---\n{_tail(self.slurmd_log, lines)}"
        )

    def _wait_for(self, predicate, timeout: float, what: str, interval: float = 0.2) -> None:
        deadline = time.monotonic() + timeout
        while True:
            self._check_daemons()
            if predicate():
                return
            if time.monotonic() >= deadline:
                raise SlurmClusterError(
                    f"timed out after {timeout:.0f} s waiting for {what}\n{self.log_tail()}"
                )
            time.sleep(interval)

    def sbatch(
        self,
        args: Sequence[str],
        script_path: str | os.PathLike[str],
        env: Mapping[str, str] | None = None,
        script_args: Sequence[str] = (),
    ) -> int:
        """Submit a batch script and return its job id.

        Args:
            args: extra ``sbatch`` options (e.g. ``["--array=0-2%1", "-o", out]``).
            script_path: the batch script.
            env: extra environment variables for sbatch; with the default
                ``--export=ALL`` they are also visible inside the job.
            script_args: arguments passed to the batch script (``$1``...).

        Returns:
            The numeric job id (for an array, the array's master job id).
        """
        res = self._run_client(
            ["sbatch", "--parsable", *args, str(script_path), *script_args], env=env
        )
        out = res.stdout.strip().splitlines()
        if not out:
            raise SlurmClusterError(f"sbatch printed no job id: {res.stderr}")
        job_id = int(out[-1].split(";", 1)[0])
        logger.debug("submitted %s as job %d", script_path, job_id)
        return job_id

    def _job_records(self, job_id: int | str) -> list[str] | None:
        res = self._run_client(
            ["scontrol", "-o", "show", "job", str(job_id)], check=False
        )
        if res.returncode != 0:
            if "Invalid job id" in res.stderr or "Invalid job id" in res.stdout:
                return None
            raise SlurmClusterError(
                f"scontrol show job {job_id} failed: {res.stderr}\n{self.log_tail()}"
            )
        return [line for line in res.stdout.splitlines() if line.strip()]

    def job_info(self, job_id: int | str) -> dict[str, str]:
        """Return the ``Key=Value`` fields of ``scontrol show job`` for one job.

        Values containing spaces are truncated at the first space. Raises
        :class:`SlurmClusterError` for an unknown job.
        """
        records = self._job_records(job_id)
        if not records:
            raise SlurmClusterError(f"unknown job {job_id}")
        return dict(re.findall(r"(?:^|\s)([A-Za-z:/]+)=(\S*)", records[0]))

    def job_state(self, job_id: int | str) -> str | None:
        """Return the current ``JobState`` of a job (e.g. ``"RUNNING"``).

        ``job_id`` may be ``"<array_id>_<task>"``. For an array job id the
        state of its first record is returned; use :meth:`array_task_states`
        for the tasks. Returns ``None`` if Slurm does not know the job.
        """
        records = self._job_records(job_id)
        if not records:
            return None
        return _field(records[0], "JobState")

    def array_task_states(self, array_job_id: int | str) -> dict[int, str]:
        """Return ``{task_id: JobState}`` for every task of an array job.

        Tasks not yet split off from the pending array record are reported
        as ``"PENDING"``.
        """
        records = self._job_records(array_job_id) or []
        states: dict[int, str] = {}
        for rec in records:
            task_spec = _field(rec, "ArrayTaskId")
            state = _field(rec, "JobState") or "UNKNOWN"
            if task_spec is None:
                continue
            for tid in _expand_task_ids(task_spec):
                states[tid] = state
        return states

    def wait_job(
        self,
        job_id: int | str,
        timeout: float = 60.0,
        states: Iterable[str] = TERMINAL_STATES,
    ) -> str:
        """Wait until a job reaches one of ``states`` (default: a terminal state).

        For an array job id, waits until every task has reached one of
        ``states``; returns ``"COMPLETED"`` if all tasks completed, else the
        first other state found (in task order).

        Raises:
            SlurmClusterError: on timeout (with log tails) or unknown job.
        """
        wanted = frozenset(states)
        deadline = time.monotonic() + timeout
        is_array = None
        last: str | None = None
        while True:
            self._check_daemons()
            records = self._job_records(job_id)
            if records is None:
                raise SlurmClusterError(f"job {job_id} unknown to slurmctld\n{self.log_tail()}")
            if is_array is None:
                is_array = "_" not in str(job_id) and any(
                    _field(r, "ArrayTaskId") is not None for r in records
                )
            if is_array:
                tasks = self.array_task_states(job_id)
                last = ",".join(f"{k}:{v}" for k, v in sorted(tasks.items()))
                if tasks and all(s in wanted for s in tasks.values()):
                    others = [tasks[k] for k in sorted(tasks) if tasks[k] != "COMPLETED"]
                    return others[0] if others else "COMPLETED"
            else:
                last = _field(records[0], "JobState")
                if last in wanted:
                    return last
            if time.monotonic() >= deadline:
                raise SlurmClusterError(
                    f"timed out after {timeout:.0f} s waiting for job {job_id} "
                    f"to reach {sorted(wanted)}; last state: {last}\n"
                    "--- scontrol show job ---\n" + "\n".join(records) + "\n"
                    + self.log_tail()
                )
            time.sleep(0.25)

    def wait_state(self, job_id: int | str, states: Iterable[str], timeout: float = 60.0) -> str:
        """Wait until a (non-array) job is in one of ``states``; return that state."""
        return self.wait_job(job_id, timeout=timeout, states=states)

    def scancel(self, job_id: int | str, *args: str) -> None:
        """Run ``scancel [args] job_id`` (e.g. ``"--signal=USR1", "--batch"``)."""
        self._run_client(["scancel", *args, str(job_id)])
