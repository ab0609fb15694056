"""Shared fixtures: a real S3 endpoint (moto server over HTTP on 127.0.0.1)."""

from __future__ import annotations

import logging
import os
import uuid

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")
logging.getLogger("noether_dist").setLevel(logging.INFO)


@pytest.fixture(scope="session")
def s3_server():
    """One moto S3 server for the session; tests get their own bucket from ``s3_bucket``."""
    from tests.support.s3_server import S3Server, s3_server_available

    ok, why = s3_server_available()
    if not ok:
        pytest.skip(f"no S3 test server: {why}")
    with S3Server() as server:
        yield server


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """The AWS environment that points s3fs at the test server, set in this process too."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    return dict(s3_server.env)


@pytest.fixture
def s3_bucket(s3_server, s3_env):
    """A fresh, empty bucket on the test server; its name."""
    name = f"nd-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(name)
    return name


@pytest.fixture
def report(pytestconfig):
    """Write a line into pytest's output even when the test passes (figures such as trial
    counts belong in the CI log)."""

    def write(text: str) -> None:
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        capman = pytestconfig.pluginmanager.get_plugin("capturemanager")
        if reporter is None or capman is None:
            print(text)
            return
        with capman.global_and_fixture_disabled():
            reporter.write_line(text)

    return write


@pytest.fixture(scope="session")
def cluster():
    """A one-node SLURM cluster on localhost, started once for the session (skips where SLURM
    cannot run)."""
    from tests.support.slurm_cluster import LocalSlurmCluster, slurm_available

    ok, why = slurm_available()
    if not ok:
        pytest.skip(why)
    with LocalSlurmCluster() as c:
        yield c


@pytest.fixture
def two_hosts():
    """Two network-namespace hosts joined by a veth pair (skips where ip netns cannot run)."""
    from tests.support.netns_hosts import TwoHosts, netns_available

    ok, why = netns_available()
    if not ok:
        pytest.skip(why)
    with TwoHosts() as hosts:
        yield hosts
