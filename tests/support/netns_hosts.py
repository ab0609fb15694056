"""Two simulated "hosts" on one machine, built from Linux network namespaces.

:class:`TwoHosts` creates two network namespaces joined by a veth pair::

    <prefix><x>a  (10.200.<x>.1/24, if <prefix><x>a-v)  <== veth ==>
    <prefix><x>b  (10.200.<x>.2/24, if <prefix><x>b-v)

``x`` (1..250) is chosen at start-up so that concurrent users do not collide:
the first ``x`` whose namespace name can be created exclusively wins. Each
namespace has its own loopback (brought up) and no route anywhere else, so
traffic from the simulated hosts can only reach ``127.0.0.0/8`` inside the
same namespace or the other namespace over the veth.

Reaching a server from both hosts: namespaces cannot see the root namespace's
``127.0.0.1``. Two ways are offered; both make the server reachable at
``10.200.<x>.1`` (:attr:`TwoHosts.server_ip`), directly from namespace a and
over the veth from namespace b:

* run the server *inside namespace a*, bound to ``server_ip``
  (``hosts.run(0, [...server..., "--host", hosts.server_ip])``); or
* keep a server that listens on ``127.0.0.1:PORT`` in the root namespace (such
  as ``tests.support.s3_server.S3Server``) and call ``hosts.forward(PORT)``: this
  process then listens on ``server_ip:<returned port>`` inside namespace a and
  relays each connection to ``127.0.0.1:PORT`` (see :meth:`TwoHosts.forward`).
  Only loopback targets are accepted.

Requires root and ``iproute2``; use :func:`netns_available` to skip.
Processes are started with ``ip netns exec``; environment variables are passed
through unchanged.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from typing import Mapping, Sequence

__all__ = ["NetnsError", "TwoHosts", "netns_available"]

logger = logging.getLogger(__name__)

_NETNS_DIR = "/run/netns"
# One "<ns_a>.pid" file per namespace pair, naming the process that owns it,
# so that pairs left behind by a killed test run can be reclaimed.
_OWNER_DIR = "/run/noether-netns"


class NetnsError(RuntimeError):
    """Raised when a namespace or link operation fails."""


_CLONE_NEWNET = 0x40000000


def _socket_in_netns(ns_name: str, family: int = socket.AF_INET,
                     kind: int = socket.SOCK_STREAM) -> socket.socket:
    """Create a socket that belongs to network namespace ``ns_name``.

    A socket stays in the namespace it was created in. A short-lived helper
    thread switches into the namespace (``setns`` affects only the calling
    thread), creates the socket and exits, so no other thread of this process
    ever changes namespace.
    """
    result: dict[str, object] = {}

    def worker() -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        own = target = -1
        try:
            own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
            target = os.open(os.path.join(_NETNS_DIR, ns_name), os.O_RDONLY)
            if libc.setns(target, _CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns({ns_name}): {os.strerror(err)}")
            try:
                result["sock"] = socket.socket(family, kind)
            finally:
                # Best effort: the thread ends right after anyway.
                libc.setns(own, _CLONE_NEWNET)
        except BaseException as exc:  # reported to the caller below
            result["error"] = exc
        finally:
            for fd in (own, target):
                if fd >= 0:
                    os.close(fd)

    t = threading.Thread(target=worker, name=f"netns-socket-{ns_name}", daemon=True)
    t.start()
    t.join()
    if "error" in result:
        raise NetnsError(f"cannot create a socket in netns {ns_name}: {result['error']}")
    return result["sock"]  # type: ignore[return-value]


class _Forwarder:
    """Relay TCP connections accepted on a listening socket to a loopback port."""

    def __init__(self, listener: socket.socket, target: tuple[str, int]) -> None:
        self.listener = listener
        self.target = target
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, daemon=True,
                                        name=f"netns-forward-{target[1]}")
        self._thread.start()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # listener closed
            try:
                upstream = socket.create_connection(self.target, timeout=10)
                upstream.settimeout(None)
            except OSError as exc:
                logger.warning("forward to %s:%d failed: %s", *self.target, exc)
                client.close()
                continue
            with self._lock:
                if self._closed:
                    client.close()
                    upstream.close()
                    return
                self._conns += [client, upstream]
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            conns, self._conns = self._conns, []
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        for c in conns:
            with contextlib.suppress(OSError):
                c.shutdown(socket.SHUT_RDWR)
            c.close()
        self._thread.join(timeout=5)


def _ip_binary() -> str | None:
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin:/usr/bin:/bin"
    return shutil.which("ip", path=path)


def _ip(*args: str, check: bool = True, timeout: float = 15.0) -> subprocess.CompletedProcess:
    ip = _ip_binary()
    if ip is None:
        raise NetnsError("`ip` (iproute2) not found")
    res = subprocess.run(
        [ip, *args], capture_output=True, text=True, timeout=timeout,
        stdin=subprocess.DEVNULL,
    )
    if check and res.returncode != 0:
        raise NetnsError(
            f"`ip {' '.join(args)}` failed with code {res.returncode}: "
            f"{res.stderr.strip() or res.stdout.strip()}"
        )
    return res


def netns_available() -> tuple[bool, str]:
    """Tell whether :class:`TwoHosts` can work here.

    Checks for root and ``ip``, then really creates and deletes a scratch
    namespace with a veth pair.

    Returns:
        ``(True, "")`` on success, else ``(False, reason)`` for ``pytest.skip``.
    """
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False, "network namespaces need root"
    if _ip_binary() is None:
        return False, "`ip` (iproute2) not found; install it with .ci/install_system.sh"
    probe = f"ndprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return False, f"`ip netns add` does not work here: {exc}"
    try:
        _ip("-n", probe, "link", "add", "ndprb0", "type", "veth", "peer", "name", "ndprb1")
        _ip("-n", probe, "link", "set", "lo", "up")
    except (NetnsError, OSError, subprocess.SubprocessError) as exc:
        return False, f"veth pairs cannot be created in a namespace: {exc}"
    finally:
        with contextlib.suppress(NetnsError, OSError, subprocess.SubprocessError):
            _ip("netns", "del", probe)
    return True, ""


class TwoHosts:
    """Context manager creating two network namespaces linked by a veth pair.

    Args:
        prefix: start of the namespace names (at most 8 characters of
            ``[A-Za-z0-9_]``); namespaces are ``<prefix><x>a`` and
            ``<prefix><x>b``.

    Attributes:
        x: the number picked for this instance; subnet ``10.200.<x>.0/24``.
        hosts: ``[(ns_name, ip, ifname), (ns_name, ip, ifname)]`` for host 0
            (namespace a) and host 1 (namespace b).
        server_ip: ``10.200.<x>.1``, where servers shared by both hosts
            should listen (inside namespace a).
    """

    def __init__(self, prefix: str = "nd") -> None:
        if not re.fullmatch(r"[A-Za-z0-9_]{1,8}", prefix):
            raise ValueError("prefix must be 1-8 characters of [A-Za-z0-9_]")
        self.prefix = prefix
        self.x: int | None = None
        self.hosts: list[tuple[str, str, str]] = []
        self._created: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._forwarders: list[_Forwarder] = []

    @property
    def server_ip(self) -> str:
        """Address (in namespace a) that both hosts can reach."""
        if not self.hosts:
            raise NetnsError("TwoHosts not started")
        return self.hosts[0][1]

    def __enter__(self) -> "TwoHosts":
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _claim(self) -> int:
        """Create ``<prefix><x>a`` and ``<prefix><x>b`` for the first free x; return x."""
        os.makedirs(_NETNS_DIR, exist_ok=True)
        os.makedirs(_OWNER_DIR, exist_ok=True)
        self._reclaim_stale()
        start = os.getpid() % 250
        for i in range(250):
            x = (start + i) % 250 + 1
            names = [f"{self.prefix}{x}a", f"{self.prefix}{x}b"]
            if any(os.path.exists(os.path.join(_NETNS_DIR, n)) for n in names):
                continue
            # `ip netns add` creates the mount point with O_EXCL, so only one
            # concurrent caller can win a given name.
            claimed: list[str] = []
            for name in names:
                res = _ip("netns", "add", name, check=False)
                if res.returncode != 0:
                    if "exist" not in (res.stderr + res.stdout).lower():
                        for n in claimed:
                            _ip("netns", "del", n, check=False)
                        raise NetnsError(f"`ip netns add {name}` failed: {res.stderr.strip()}")
                    break
                claimed.append(name)
            if len(claimed) == len(names):
                self._created.extend(claimed)
                with open(self._owner_file(names[0]), "w") as f:
                    f.write(str(os.getpid()))
                return x
            for n in claimed:
                _ip("netns", "del", n, check=False)
        raise NetnsError("no free 10.200.x.0/24 slot (x in 1..250)")

    @staticmethod
    def _owner_file(ns_a: str) -> str:
        return os.path.join(_OWNER_DIR, f"{ns_a}.pid")

    @classmethod
    def _reclaim_stale(cls) -> None:
        """Delete namespace pairs whose recorded owner process is gone.

        Such pairs are left behind when a test process is killed before
        :meth:`stop` runs.
        """
        try:
            entries = os.listdir(_OWNER_DIR)
        except OSError:
            return
        for entry in entries:
            if not entry.endswith("a.pid"):
                continue
            ns_a = entry[: -len(".pid")]
            names = [ns_a, ns_a[:-1] + "b"]
            owner_file = cls._owner_file(ns_a)
            try:
                with open(owner_file) as f:
                    pid = int(f.read().strip())
                os.kill(pid, 0)
                continue  # owner alive
            except (OSError, ValueError) as exc:
                if not isinstance(exc, ProcessLookupError):
                    continue  # unreadable, or owner alive but not ours to signal
            logger.info("removing stale netns pair %s (owner pid %d is gone)", names, pid)
            for n in names:
                if os.path.exists(os.path.join(_NETNS_DIR, n)):
                    cls._kill_ns_processes(n)
                    _ip("netns", "del", n, check=False)
            with contextlib.suppress(OSError):
                os.unlink(owner_file)

    def start(self) -> None:
        """Create the namespaces, the veth pair, addresses and routes.

        On failure everything created so far is removed again.
        """
        if self.hosts:
            raise NetnsError("TwoHosts already started")
        try:
            self.x = self._claim()
            ns_a, ns_b = self._created
            if_a, if_b = f"{ns_a}-v", f"{ns_b}-v"
            ip_a, ip_b = f"10.200.{self.x}.1", f"10.200.{self.x}.2"
            # Create both ends directly inside their namespaces: the names
            # never appear in the root namespace.
            _ip("link", "add", if_a, "netns", ns_a, "type", "veth",
                "peer", "name", if_b, "netns", ns_b)
            for ns, ifname, addr in ((ns_a, if_a, ip_a), (ns_b, if_b, ip_b)):
                _ip("-n", ns, "link", "set", "lo", "up")
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", ifname)
                _ip("-n", ns, "link", "set", ifname, "up")
            self.hosts = [(ns_a, ip_a, if_a), (ns_b, ip_b, if_b)]
            self._wait_link_up()
        except BaseException:
            self.stop()
            raise
        logger.info("netns hosts up: %s", self.hosts)

    def _wait_link_up(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            states = [
                _ip("-n", ns, "-o", "link", "show", ifname).stdout
                for ns, _, ifname in self.hosts
            ]
            if all("LOWER_UP" in s for s in states):
                return
            if time.monotonic() >= deadline:
                raise NetnsError(f"veth pair not up after {timeout} s: {states}")
            time.sleep(0.05)

    def ns_name(self, host_index: int) -> str:
        """Namespace name of host 0 (a) or 1 (b)."""
        return self.hosts[host_index][0]

    def ip(self, host_index: int) -> str:
        """IPv4 address of host 0 (a) or 1 (b)."""
        return self.hosts[host_index][1]

    def ifname(self, host_index: int) -> str:
        """veth interface name of host 0 (a) or 1 (b), e.g. for GLOO_SOCKET_IFNAME."""
        return self.hosts[host_index][2]

    def command(self, host_index: int, cmd: Sequence[str]) -> list[str]:
        """Return ``cmd`` wrapped so that it runs inside the host's namespace."""
        if not self.hosts:
            raise NetnsError("TwoHosts not started")
        ip = _ip_binary() or "ip"
        return [ip, "netns", "exec", self.hosts[host_index][0], *cmd]

    def run(
        self,
        host_index: int,
        cmd: Sequence[str],
        env: Mapping[str, str] | None = None,
        **popen_kwargs,
    ) -> subprocess.Popen:
        """Start ``cmd`` inside host ``host_index``'s namespace.

        Args:
            host_index: 0 for namespace a, 1 for namespace b.
            cmd: command and arguments.
            env: full environment for the command (default: ``os.environ``).
            **popen_kwargs: passed to :class:`subprocess.Popen`.

        Returns:
            The process; it is killed on :meth:`stop` if still running.
        """
        proc = subprocess.Popen(
            self.command(host_index, cmd),
            env=dict(os.environ if env is None else env),
            **popen_kwargs,
        )
        self._procs.append(proc)
        return proc

    def run_sync(
        self, host_index: int, cmd: Sequence[str], timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess:
        """Run ``cmd`` in a namespace to completion, capturing text output."""
        return subprocess.run(
            self.command(host_index, cmd),
            env=dict(os.environ if env is None else env),
            capture_output=True, text=True, timeout=timeout,
            stdin=subprocess.DEVNULL,
        )

    def forward(self, target_port: int, target_host: str = "127.0.0.1",
                listen_port: int = 0) -> int:
        """Make a root-namespace loopback server reachable from both hosts.

        Listens on ``server_ip:listen_port`` inside namespace a (``0``: any
        free port) and relays every connection, from this process, to
        ``target_host:target_port`` in the root namespace. The relay stops on
        :meth:`stop`.

        Args:
            target_port: port of the server in the root namespace.
            target_host: its address; must be in ``127.0.0.0/8``.
            listen_port: port to listen on in namespace a.

        Returns:
            The port to use together with :attr:`server_ip`.
        """
        if not ipaddress.ip_address(target_host).is_loopback:
            raise ValueError(f"forward target must be a loopback address, not {target_host}")
        sock = _socket_in_netns(self.ns_name(0))
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.server_ip, listen_port))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        port = sock.getsockname()[1]
        self._forwarders.append(_Forwarder(sock, (target_host, target_port)))
        logger.info("forwarding %s:%d (netns %s) -> %s:%d",
                    self.server_ip, port, self.ns_name(0), target_host, target_port)
        return port

    def stop(self) -> None:
        """Kill processes started here or still inside the namespaces; delete them.

        Safe to call more than once and after a partial :meth:`start`.
        """
        for fwd in self._forwarders:
            fwd.close()
        self._forwarders.clear()
        for proc in self._procs:
            if proc.poll() is None:
                with contextlib.suppress(OSError):
                    proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        self._procs.clear()
        for ns in self._created:
            self._kill_ns_processes(ns)
        for ns in reversed(self._created):
            res = _ip("netns", "del", ns, check=False)
            if res.returncode != 0:
                logger.warning("could not delete netns %s: %s", ns, res.stderr.strip())
        if self._created:
            with contextlib.suppress(OSError):
                os.unlink(self._owner_file(self._created[0]))
        self._created.clear()
        self.hosts = []

    @staticmethod
    def _kill_ns_processes(ns: str) -> None:
        """SIGKILL stray processes that still live in namespace ``ns``."""
        res = _ip("netns", "pids", ns, check=False)
        pids = [int(p) for p in res.stdout.split() if p.isdigit()]
        for pid in pids:
            if pid == os.getpid():
                continue
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        if pids:
            logger.debug("killed %d stray processes in netns %s", len(pids), ns)


def own_disks(root: "os.PathLike[str] | str", hosts: int = 2) -> tuple[str, list[str], list[list[str]]]:
    """Give each host its own "local disk" at one path: (the shared mount point, each host's
    backing folder, each host's command prefix). The prefix runs a command in a private mount
    namespace (and its own host name, ``host<i>``) where the backing folder is bind-mounted at
    the mount point, so the same path is a different folder on each host."""
    disk = os.path.join(os.fspath(root), "local_disk")
    os.makedirs(disk, exist_ok=True)
    backing = [os.path.join(os.fspath(root), f"host{i}_disk") for i in range(hosts)]
    for b in backing:
        os.makedirs(b, exist_ok=True)
    wraps = [["unshare", "--mount", "--uts", "--propagation", "private", "sh", "-c",
              f'hostname host{i} && mount --bind "$0" "$1" && shift && exec "$@"', backing[i], disk]
             for i in range(hosts)]
    return disk, backing, wraps
