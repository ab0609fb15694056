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
def report(request, pytestconfig):
    """Write a line into pytest's output even when the test passes (figures such as trial
    counts belong in the CI log). On a pytest-xdist worker the line travels with the test's
    report and the controller writes it (``_WorkerReportLines``)."""

    def write(text: str) -> None:
        if hasattr(pytestconfig, "workerinput"):
            request.node.user_properties.append((_REPORT_LINE, text))
            return
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        capman = pytestconfig.pluginmanager.get_plugin("capturemanager")
        if reporter is None or capman is None:
            print(text)
            return
        with capman.global_and_fixture_disabled():
            reporter.write_line(text)

    return write


_REPORT_LINE = "report line"


class _WorkerReportLines:
    """On the pytest-xdist controller: writes the lines that a worker's test gave ``report``
    once the test's teardown report arrives."""

    def __init__(self, config):
        self.config = config

    def pytest_runtest_logreport(self, report):
        if report.when != "teardown":
            return
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        for name, value in getattr(report, "user_properties", ()):
            if name != _REPORT_LINE:
                continue
            if reporter is not None:
                reporter.write_line(value)
            else:
                print(value)


def pytest_configure(config):
    if not hasattr(config, "workerinput"):
        config.pluginmanager.register(_WorkerReportLines(config), "noether-dist-report-lines")


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


_MACHINE_GROUPS = {"cluster": "slurm"}
"""Fixtures that stand for one thing on this machine (the one SLURM cluster), and the marker
and pytest-xdist group of the tests that use them. ``two_hosts`` is not one: each
``TwoHosts`` picks a subnet of its own, so namespace hosts of several tests coexist."""


def _must_be_slow(nodeid: str) -> bool:
    """True for a test of tests/dist or tests/integration: those start processes or servers
    and are marked ``slow``. Not for tests/integration/noether: it runs in the Noether
    environment only (part 3), and its one-process tests (test_adapter_units.py) belong to
    the inner loop there."""
    return (nodeid.startswith(("tests/dist/", "tests/integration/"))
            and not nodeid.startswith("tests/integration/noether/"))


@pytest.hookimpl(tryfirst=True)  # before ``-m`` deselects by marker
def pytest_collection_modifyitems(config, items):
    """Refuses a test that :func:`_must_be_slow` but is not marked ``slow`` (so that ``-m "not
    slow"`` stays the one-process inner loop). Marks every test that uses a machine-wide
    fixture (``_MACHINE_GROUPS``) with its group (``slurm``). Under pytest-xdist (``-n N
    --dist loadgroup``, as ``scripts/test.sh`` runs part 1) it also puts each test in a
    group: the tests of one machine-wide fixture form one group, so no two workers use it at
    once; every other test runs in the group of its module, so that a module's shared setup
    is built once."""
    xdist = hasattr(config, "workerinput")  # the workers collect; their options say dist "no"
    unmarked = [item.nodeid for item in items
                if _must_be_slow(item.nodeid) and item.get_closest_marker("slow") is None]
    if unmarked:
        raise pytest.UsageError(f"{len(unmarked)} test(s) of tests/dist or tests/integration are not marked slow "
                                f"(they start processes or servers; see README, Development): {unmarked[:5]}")
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        machine = next((group for fixture, group in _MACHINE_GROUPS.items() if fixture in fixtures), None)
        if machine:
            item.add_marker(getattr(pytest.mark, machine))
        if xdist:
            item.add_marker(pytest.mark.xdist_group(machine or item.nodeid.split("::")[0]))
