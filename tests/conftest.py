"""Shared fixtures: one real control plane with KWOK nodes per test session."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.testbed.cluster import COMPONENTS, Testbed

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def testbed(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Testbed]:
    """A running control plane (etcd, apiserver, controller-manager, scheduler) and KWOK nodes."""
    bed = Testbed(tmp_path_factory.mktemp("testbed"))
    seconds = bed.start()
    print(f"\n[testbed] started in {seconds:.1f}s; state and logs in {bed.directory}", file=sys.stderr)
    yield bed
    bed.stop()
    if request.session.testsfailed:
        print(f"\n[testbed] component logs kept in {bed.logs}", file=sys.stderr)


@pytest.fixture(scope="session")
def crd(testbed: Testbed) -> Testbed:
    """The test bed with the EdgeModel CRD installed and established."""
    testbed.kubectl("apply", "--server-side", "-f", str(ROOT / "crds" / "edgemodel.yaml"))
    testbed.kubectl("wait", "--for=condition=Established", "crd/edgemodels.edgeml.dev", "--timeout=60s")
    # Discovery is cached per kubectl run; wait until the new kind is served.
    deadline = time.monotonic() + 30
    while testbed.kubectl("get", "em", check=False).returncode != 0:
        if time.monotonic() > deadline:
            raise AssertionError("EdgeModel resources were not served 30s after the CRD was established")
        time.sleep(0.2)
    return testbed


@pytest.fixture
def namespace(testbed: Testbed, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards."""
    name = f"t-{os.getpid()}-{abs(hash(request.node.nodeid)) % 10**8}"
    testbed.kubectl("create", "namespace", name)
    yield name
    testbed.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Attach the tail of every component's log to a failed test that used the test bed."""
    report = yield
    if report.failed and isinstance(item, pytest.Function):
        bed = item.funcargs.get("testbed")
        if isinstance(bed, Testbed):
            for component in COMPONENTS:
                report.sections.append((f"{component} log", bed.log_tail(component, 30)))
            report.sections.append(("test bed state", json.dumps(bed.state(), indent=2)))
    return report
