"""A real S3 endpoint for the benchmarks: moto's standalone server on 127.0.0.1.

Started here (not borrowed from the tests) so that the benchmarks own their setup:
``with MotoServer() as s3: s3.create_bucket("b")``. Every wait is bounded; the server is
terminated (then killed) on exit. Request counts come from moto's own recorder
(:meth:`MotoServer.start_recording` / :meth:`MotoServer.stop_recording`): every request the
server answered, from every process.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

__all__ = ["MotoServer", "moto_available", "start_recording", "stop_recording", "ACCESS_KEY", "SECRET_KEY"]

log = logging.getLogger(__name__)
ACCESS_KEY = "testing"
SECRET_KEY = "testing"


def moto_available() -> tuple[bool, str]:
    """(True, "") when moto's server and s3fs can run here, else (False, why)."""
    for mod in ("moto", "flask", "s3fs"):
        try:
            __import__(mod)
        except Exception as exc:  # noqa: BLE001
            return False, f"cannot import {mod}: {exc} (install moto[server] and s3fs)"
    return True, ""


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _recorder(endpoint_url: str, action: str, method: str = "POST") -> str:
    req = urllib.request.Request(f"{endpoint_url}/moto-api/recorder/{action}",
                                 data=b"" if method == "POST" else None, method=method)
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.read().decode("utf-8", "replace")


def start_recording(endpoint_url: str) -> None:
    """Forget recorded requests, then record every S3 request from now on (moto's recorder;
    the server must be a :class:`MotoServer`, which gives it a file to record into)."""
    _recorder(endpoint_url, "stop-recording")
    _recorder(endpoint_url, "reset-recording")
    _recorder(endpoint_url, "start-recording")


def stop_recording(endpoint_url: str) -> list[dict[str, str]]:
    """Stop recording; every request recorded since :func:`start_recording`, in order
    (``method``, ``url`` and ``agent``, the User-Agent header, of each; bodies dropped)."""
    _recorder(endpoint_url, "stop-recording")
    text = _recorder(endpoint_url, "download-recording", "GET")
    _recorder(endpoint_url, "reset-recording")
    # moto appends one JSON object and then a newline per request, from concurrent threads:
    # two objects can end up on one line, so read them one after another, not per line.
    decoder, out, pos = json.JSONDecoder(), [], 0
    while True:
        while pos < len(text) and text[pos].isspace():
            pos += 1
        if pos >= len(text):
            return out
        entry, pos = decoder.raw_decode(text, pos)
        agent = next((v for k, v in (entry.get("headers") or {}).items() if k.lower() == "user-agent"), "")
        out.append({"method": entry["method"], "url": entry["url"], "agent": agent})


class MotoServer:
    """``moto_server`` in a subprocess on a free loopback port."""

    def __init__(self, startup_timeout_s: float = 30.0) -> None:
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: Any = None
        self._recording_dir: str | None = None

    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs (to read its CPU time), else None."""
        return self._proc.pid if self._proc is not None else None

    def storage_extra(self) -> dict[str, Any]:
        """Extra s3fs options (credentials moto accepts) for ``StorageOptions.extra``."""
        return {"key": ACCESS_KEY, "secret": SECRET_KEY}

    def start(self) -> MotoServer:
        """Start the server and wait (bounded) until it answers HTTP."""
        exe = shutil.which("moto_server")
        cmd = [exe] if exe else [sys.executable, "-m", "moto.server"]
        self.port = _free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_ENDPOINT_URL")}
        # moto's request recorder appends to this file (default: the working directory)
        self._recording_dir = tempfile.mkdtemp(prefix="nd-bench-moto-rec-")
        env["MOTO_RECORDER_FILEPATH"] = os.path.join(self._recording_dir, "recording.jsonl")
        # Objects stay in the server's memory, as a remote store's data stays off this machine's
        # disk: by default moto spills every object over 5 MiB to a temporary file, so the
        # throughput figures would also time this disk's writeback (the benchmarks delete what
        # they no longer need, so memory stays bounded).
        env["MOTO_S3_DEFAULT_KEY_BUFFER_SIZE"] = str(1 << 40)
        self._log = tempfile.TemporaryFile(prefix="nd-bench-moto-")
        self._proc = subprocess.Popen([*cmd, "-H", "127.0.0.1", "-p", str(self.port)], stdin=subprocess.DEVNULL,
                                      stdout=self._log, stderr=self._log, env=env)
        deadline = time.monotonic() + self.startup_timeout_s
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"moto_server exited early (rc={self._proc.returncode}): {self._tail()}")
            try:
                with urllib.request.urlopen(self.endpoint_url + "/moto-api/", timeout=1.0) as resp:
                    resp.read()
                break
            except urllib.error.HTTPError:
                break  # it answered
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto_server did not answer within {self.startup_timeout_s:.0f}s")
            time.sleep(0.1)
        log.info("moto S3 server at %s (pid %d)", self.endpoint_url, self._proc.pid)
        return self

    def _tail(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-2000:].decode("utf-8", "replace")

    def create_bucket(self, name: str) -> None:
        """Create a bucket (s3fs ``mkdir`` of a bucket name)."""
        import s3fs

        fs = s3fs.S3FileSystem(skip_instance_cache=True, endpoint_url=self.endpoint_url, **self.storage_extra())
        fs.mkdir(name)

    def start_recording(self) -> None:
        """See :func:`start_recording`."""
        start_recording(self.endpoint_url)

    def stop_recording(self) -> list[dict[str, str]]:
        """See :func:`stop_recording`."""
        return stop_recording(self.endpoint_url)

    def stop(self) -> None:
        """Terminate the server (kill after 10 s); idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if self._log is not None:
            self._log.close()
            self._log = None
        if getattr(self, "_recording_dir", None):
            shutil.rmtree(self._recording_dir, ignore_errors=True)
            self._recording_dir = None

    def __enter__(self) -> MotoServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
