"""Shadow evidence is gathered off the reconcile path: an unreachable Prometheus or unreachable pods delay
no other EdgeModel.

Real parts: the control plane and KWOK nodes of the test bed, the operator as a process at its default
settings, Debian's Prometheus. Ten EdgeModels shadow a candidate; then their evidence becomes
unreachable, in one of two real ways:
- `prometheus`: the operator reads Prometheus through a TCP relay that the test turns into a black
  hole: a listening socket that accepts every connection and never answers (as a host behind a
  dropping firewall or a hung server does);
- `scrape`: there is no Prometheus; the operator scrapes the stable pods. Their node's pod CIDR is a
  loopback range (127.77.0.0/24), so KWOK gives them addresses on this machine, and their port
  (`spec.serving.port`) is that of a black hole listening on every address: every scrape connects,
  then waits for its timeout. (An address routed nowhere would do as well, were it not that this kind
  of machine answers any outbound HTTP itself.)
An unrelated EdgeModel's spec is then changed and the time from that change to the operator's status
write for it (its `observedGeneration`) is measured, against the same measurement taken before.
"""

from __future__ import annotations

import json
import socket
import statistics
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client, config

from tests.helpers import eventually, get
from tests.integration.operators import OperatorProcess, Pool, apply_edgemodel, finish_builds, pool_targets
from tests.testbed.cluster import Testbed
from tests.testbed.nodes import X86_VNNI
from tests.testbed.prometheus import Prometheus

pytestmark = pytest.mark.testbed
SHADOWING = 10
ALLOWED_DELAY = 1.0  # seconds the stalled evidence may add to an unrelated EdgeModel's status write (issue 15)


class Relay:
    """A TCP relay to `upstream` on 127.0.0.1 that can become a black hole (see the module docstring)."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.blackhole = threading.Event()
        self.held: list[socket.socket] = []  # connections accepted while a black hole: never answered
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            if self.blackhole.is_set():
                self.held.append(conn)
                continue
            upstream = socket.create_connection(self.upstream)
            for a, b in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                if not self.blackhole.is_set():  # a black hole swallows what open connections send, too
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for s in (source, sink):
                s.close()

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:
            conn.close()


def _edgemodels(api: Any, namespace: str) -> dict[str, dict[str, Any]]:
    found = api.list_namespaced_custom_object("edgeml.dev", "v1alpha1", namespace, "edgemodels")
    return {item["metadata"]["name"]: item for item in found["items"]}


def _status_latency(api: Any, namespace: str, name: str, value: int) -> float:
    """Seconds from a spec change of EdgeModel `name` to the operator's status write that observed it."""
    start = time.monotonic()
    patch = {"spec": {"rollout": {"shadow": {"minRequests": value}}}}
    changed = api.patch_namespaced_custom_object("edgeml.dev", "v1alpha1", namespace, "edgemodels", name, patch)
    generation = changed["metadata"]["generation"]
    while time.monotonic() - start < 60:
        found = api.get_namespaced_custom_object("edgeml.dev", "v1alpha1", namespace, "edgemodels", name)
        if (found.get("status") or {}).get("observedGeneration") == generation:
            return time.monotonic() - start
        time.sleep(0.02)
    raise AssertionError(f"generation {generation} of {name} not observed within 60s")


def _metric(operator: OperatorProcess, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{operator.metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path / "prometheus").start()
    yield server
    server.stop()


def _all_shadowing(api: Any, namespace: str, names: list[str]) -> bool:
    states = {n: {c["state"] for c in (e.get("status") or {}).get("classes") or []}
              for n, e in _edgemodels(api, namespace).items() if n in names}  # fmt: skip
    return len(states) == len(names) and all(s == {"Shadowing"} for s in states.values())


def _mean_gathering(operator: OperatorProcess, sums: tuple[float, float], at_least: int) -> float:
    """Mean seconds of the next `at_least` evidence gatherings after the histogram stood at `sums`."""
    name = "edgemodel_operator_evidence_gather_seconds"

    def mean() -> float | None:
        count = _metric(operator, f"{name}_count") - sums[1]
        return (_metric(operator, f"{name}_sum") - sums[0]) / count if count >= at_least else None

    found: float = eventually(mean, timeout=60, what=f"{at_least} more evidence gatherings")
    return found


class Unreachable:
    """The evidence of one case (see the module docstring): where the operator reads it, and how it stops."""

    def __init__(self, case: str, crd: Testbed, node: str, request: pytest.FixtureRequest) -> None:
        self.relay: Relay | None = None
        self.blackhole: socket.socket | None = None
        self.settings: dict[str, str] = {}
        self.serving: dict[str, Any] = {}
        if case == "prometheus":
            prometheus: Prometheus = request.getfixturevalue("prometheus")
            host, port = prometheus.url.removeprefix("http://").rstrip("/").split(":")
            self.relay = Relay((host, int(port)))
            self.settings["prometheus_url"] = self.relay.url
        else:
            self.blackhole = socket.create_server(("0.0.0.0", 0), backlog=512)  # noqa: S104 - the pods' loopback addresses
            self.serving = {"port": self.blackhole.getsockname()[1]}
            cidr = {"spec": {"podCIDR": "127.77.0.0/24", "podCIDRs": ["127.77.0.0/24"]}}
            crd.kubectl("patch", "node", node, "-p", json.dumps(cidr))

    def stall(self, crd: Testbed, namespace: str, operator: OperatorProcess) -> None:
        """Make the evidence unreachable (scrapes: it has been all along), and wait until the operator met that."""
        if self.blackhole is not None:  # the stable pods are where the black hole listens
            pods = get(crd, "pods", "-n", namespace, "-l", "app.kubernetes.io/component=serve")["items"]
            assert pods
            assert all(p["status"].get("podIP", "").startswith("127.77.") for p in pods)
        if self.relay is not None:
            errors = _metric(operator, "edgemodel_operator_evidence_errors_total")
            self.relay.blackhole.set()
            # Every gathering now hangs until its timeout: wait until the poller has run into the black hole.
            eventually(
                lambda: _metric(operator, "edgemodel_operator_evidence_errors_total") >= errors + 8,
                timeout=90,
                what="gatherings that the black hole held past their timeout",
            )

    def close(self) -> None:
        if self.relay is not None:
            self.relay.close()
        if self.blackhole is not None:
            self.blackhole.close()


@pytest.mark.parametrize("case", ["prometheus", "scrape"])
def test_unreachable_evidence_does_not_delay_an_unrelated_edgemodel(
    crd: Testbed, namespace: str, tmp_path: Path, case: str, request: pytest.FixtureRequest
) -> None:
    pool = Pool(crd, namespace)
    node = pool.add(X86_VNNI, cpu="1000", memory="1000Gi", pods="1000")  # room for every build and serving pod
    evidence = Unreachable(case, crd, node["metadata"]["name"], request)
    settings = {"namespaces": json.dumps([namespace]), **evidence.settings}  # everything else at its default
    operator = OperatorProcess(crd, tmp_path / "operator.log", settings=settings)
    operator.start()
    config.load_kube_config(str(crd.kubeconfig))  # type: ignore[no-untyped-call]
    api: Any = client.CustomObjectsApi()
    targets, serving = pool_targets(namespace), evidence.serving
    try:
        names = [f"shadow-{i}" for i in range(SHADOWING)]
        for name in names:
            apply_edgemodel(crd, namespace, name, targets=targets, serving=serving)
        apply_edgemodel(crd, namespace, "other", targets=targets)
        finish_builds(crd, namespace, count=SHADOWING + 1)
        for name in [*names, "other"]:
            crd.kubectl("wait", "-n", namespace, "--for=condition=Ready", f"em/{name}", "--timeout=50s")
        before = [_status_latency(api, namespace, "other", 100 + i) for i in range(3)]  # nothing wants evidence
        for name in names:  # a new revision each: built, then shadowed (KWOK pods serve no traffic: it never ends)
            apply_edgemodel(crd, namespace, name, targets=targets, serving=serving, digest="0" * 64)
        finish_builds(crd, namespace, count=SHADOWING)
        eventually(lambda: _all_shadowing(api, namespace, names), timeout=180, what=f"{SHADOWING} shadowing")

        evidence.stall(crd, namespace, operator)
        name = "edgemodel_operator_evidence_gather_seconds"
        sums = (_metric(operator, f"{name}_sum"), _metric(operator, f"{name}_count"))
        after = [_status_latency(api, namespace, "other", 200 + i) for i in range(5)]
        # The evidence really was stalled meanwhile: gatherings took their timeouts (2 s a pod scrape, 10 s a query).
        mean = _mean_gathering(operator, sums, SHADOWING)
        assert mean >= 1.5, f"gatherings took {mean:.2f}s on average: the evidence was not unreachable"
        delay = statistics.median(after) - statistics.median(before)
        print(f"[evidence {case}] status write after a change, s: before {before}, stalled {after}")
        assert delay < ALLOWED_DELAY, f"stalled evidence delayed an unrelated status write: {before} -> {after}"

        # Missing evidence decided nothing: every shadowing class still shadows, nothing was rolled back.
        assert _all_shadowing(api, namespace, names)
        for name in names:
            status = get(crd, "em", name, "-n", namespace)["status"]
            assert status["classes"][0]["shadow"].get("decision") in {None, "Pending"}, status["classes"][0]
    finally:
        operator.stop()
        evidence.close()
        pool.remove()
