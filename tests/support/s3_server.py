"""Run a real moto S3 server in a subprocess for tests.

``S3Server`` starts ``moto_server -H 127.0.0.1 -p PORT`` on a free loopback
port, waits until it answers HTTP, and stops it again on exit::

    with S3Server() as s3:
        s3.create_bucket("ckpt-bucket")
        fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3.storage_options)
        fs.pipe_file("ckpt-bucket/a", b"x")
        subprocess.run([...], env={**os.environ, **s3.env})

Facts verified against moto 5.2 / s3fs 2026.9 / botocore 1.43 (see
``tests/integration/test_s3_infra.py`` for the tests that pin them down):

* ``storage_options`` deliberately does NOT put ``region_name="us-east-1"`` into
  ``client_kwargs``: s3fs ``mkdir``/``makedirs`` of a bucket then sends
  ``CreateBucketConfiguration={"LocationConstraint": "us-east-1"}`` which S3
  (and moto) reject with ``InvalidLocationConstraint`` (surfaces as
  ``OSError(EINVAL)``).  Without a region botocore signs for us-east-1 anyway.
* Conditional create (``If-None-Match: *``) is supported by moto for
  ``PutObject`` and ``CompleteMultipartUpload``; s3fs maps the 412 to
  ``FileExistsError``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any

from tests.support.ports import free_port

logger = logging.getLogger(__name__)

#: Credentials moto accepts (it does not validate them by default).
TEST_ACCESS_KEY = "testing"
TEST_SECRET_KEY = "testing"
TEST_REGION = "us-east-1"

_STDERR_TAIL_CHARS = 4000


def _moto_command() -> list[str] | None:
    """Return the argv prefix that launches moto's standalone server, or None."""
    exe = shutil.which("moto_server")
    if exe:
        return [exe]
    try:
        import moto.server  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return None
    return [sys.executable, "-m", "moto.server"]


def s3_server_available() -> tuple[bool, str]:
    """Tell whether an ``S3Server`` can be started here.

    Returns:
        ``(True, "")`` when moto's server extra and s3fs are importable, a
        launcher exists and loopback sockets can be bound; otherwise
        ``(False, reason)`` suitable for ``pytest.skip(reason)``.
    """
    for mod in ("moto", "flask", "werkzeug", "s3fs", "boto3"):
        try:
            __import__(mod)
        except Exception as exc:  # ImportError or broken install
            return False, f"cannot import {mod!r} (need moto[server], s3fs, boto3): {exc}"
    if _moto_command() is None:
        return False, "moto_server executable not found and moto.server not importable"
    try:
        free_port()
    except OSError as exc:
        return False, f"cannot bind a loopback socket: {exc}"
    return True, ""


class S3ServerError(RuntimeError):
    """The moto server could not be started or did not answer in time."""


class S3Server:
    """A moto S3 server in a subprocess, bound to 127.0.0.1 on a free port.

    Use as a context manager (or call ``start()`` / ``stop()``).  Each instance
    owns exactly one process.

    Args:
        port: Port to bind; ``None`` picks a free one.
        startup_timeout: Seconds to wait for the server to answer HTTP.
        start_attempts: How many times to retry startup on a fresh port when
            the process dies early (covers the free-port race).
    """

    def __init__(
        self,
        port: int | None = None,
        startup_timeout: float = 20.0,
        start_attempts: int = 3,
    ) -> None:
        self._requested_port = port
        self.startup_timeout = float(startup_timeout)
        self.start_attempts = max(1, int(start_attempts))
        self.port: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._stderr_file: Any = None

    # ------------------------------------------------------------------ props
    @property
    def endpoint_url(self) -> str:
        """``http://127.0.0.1:PORT`` of the running server."""
        if self.port is None:
            raise S3ServerError("S3Server is not started")
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables pointing AWS SDKs (boto3/s3fs) at this server.

        Merge into ``os.environ`` for subprocesses:
        ``subprocess.run(..., env={**os.environ, **server.env})``.
        """
        url = self.endpoint_url
        return {
            "AWS_ENDPOINT_URL_S3": url,
            "AWS_ENDPOINT_URL": url,
            "AWS_ACCESS_KEY_ID": TEST_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": TEST_SECRET_KEY,
            "AWS_DEFAULT_REGION": TEST_REGION,
        }

    @property
    def storage_options(self) -> dict[str, Any]:
        """Keyword arguments for ``s3fs.S3FileSystem`` / ``fsspec.url_to_fs``.

        ``region_name`` is intentionally omitted (see module docstring: with
        ``region_name="us-east-1"`` s3fs bucket creation fails).  Returns a
        fresh dict each call, so callers may mutate it.
        """
        return storage_options_for(self.endpoint_url)

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # -------------------------------------------------------------- lifecycle
    def start(self) -> "S3Server":
        """Start the server and block until it answers; idempotent.

        Raises:
            S3ServerError: the process exited or did not answer within
                ``startup_timeout``; the message carries its stderr tail.
        """
        if self.running:
            return self
        last_error: Exception | None = None
        for attempt in range(self.start_attempts):
            port = self._requested_port or free_port()
            try:
                self._launch(port)
                self._wait_ready()
                logger.info("moto S3 server ready at %s (pid %s)", self.endpoint_url, self._proc.pid)
                return self
            except S3ServerError as exc:
                last_error = exc
                logger.warning("moto start attempt %d on port %d failed: %s", attempt + 1, port, exc)
                self.stop()
                if self._requested_port is not None:
                    break
        raise S3ServerError(str(last_error))

    def _launch(self, port: int) -> None:
        cmd = _moto_command()
        if cmd is None:
            raise S3ServerError("moto_server not available: " + s3_server_available()[1])
        self.port = port
        self._stderr_file = tempfile.TemporaryFile(prefix="moto-stderr-")
        env = dict(os.environ)
        # Keep the child from inheriting endpoint overrides that point elsewhere.
        for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
            env.pop(var, None)
        self._proc = subprocess.Popen(
            [*cmd, "-H", "127.0.0.1", "-p", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=self._stderr_file,
            stderr=self._stderr_file,
            env=env,
        )

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        url = self.endpoint_url + "/moto-api/"
        while True:  # bounded by the deadline below
            if self._proc is None or self._proc.poll() is not None:
                rc = None if self._proc is None else self._proc.returncode
                raise S3ServerError(
                    f"moto_server exited early (rc={rc}); stderr tail:\n{self.stderr_tail()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1.0) as resp:
                    resp.read()
                return
            except urllib.error.HTTPError:
                return  # it answered; any HTTP status means it is up
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() >= deadline:
                raise S3ServerError(
                    f"moto_server did not answer on {self.endpoint_url} within "
                    f"{self.startup_timeout:.0f}s; stderr tail:\n{self.stderr_tail()}"
                )
            time.sleep(0.1)

    def stderr_tail(self, chars: int = _STDERR_TAIL_CHARS) -> str:
        """Return the last ``chars`` characters of the server's stdout/stderr."""
        f = self._stderr_file
        if f is None:
            return ""
        try:
            f.flush()
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - chars))
            return f.read().decode("utf-8", "replace")
        except (OSError, ValueError):
            return ""

    def stop(self, timeout: float = 5.0) -> None:
        """Terminate the server process (SIGTERM, then SIGKILL); idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                logger.warning("moto_server pid %s ignored SIGTERM; killing", proc.pid)
                proc.kill()
                proc.wait(timeout=timeout)
        if self._stderr_file is not None:
            try:
                self._stderr_file.close()
            finally:
                self._stderr_file = None

    def __enter__(self) -> "S3Server":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # ---------------------------------------------------------------- helpers
    def client(self) -> Any:
        """Return a fresh boto3 S3 client bound to this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=TEST_ACCESS_KEY,
            aws_secret_access_key=TEST_SECRET_KEY,
            region_name=TEST_REGION,
        )

    def create_bucket(self, name: str) -> None:
        """Create bucket ``name`` (no error if this server already has it)."""
        cl = self.client()
        try:
            cl.create_bucket(Bucket=name)
        except cl.exceptions.BucketAlreadyOwnedByYou:
            pass

    def reset(self) -> None:
        """Drop all buckets/objects via moto's ``POST /moto-api/reset``."""
        req = urllib.request.Request(self.endpoint_url + "/moto-api/reset", data=b"", method="POST")
        with urllib.request.urlopen(req, timeout=10.0) as resp:
            resp.read()


def storage_options_for(endpoint_url: str) -> dict[str, Any]:
    """Return s3fs storage options for an S3 endpoint such as a ``FaultProxy``.

    Same shape as ``S3Server.storage_options``; pass to
    ``s3fs.S3FileSystem(**opts)`` or ``fsspec.url_to_fs("s3://b/k", **opts)``.
    """
    return {
        "key": TEST_ACCESS_KEY,
        "secret": TEST_SECRET_KEY,
        "endpoint_url": endpoint_url,
        "client_kwargs": {"endpoint_url": endpoint_url},
    }
