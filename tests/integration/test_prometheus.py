"""Debian's Prometheus scraping a real `edgemodel serve`: what the rollout analysis will query."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import onnx_models
from tests.helpers import eventually
from tests.integration.test_serve import Server, _classifier_body
from tests.testbed.prometheus import Prometheus, PrometheusError

TARGET_LABELS = {"namespace": "shop", "edgemodel": "ocr", "class": "cpu-x86", "revision": "r1", "role": "stable"}


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Prometheus]:
    server = Prometheus(tmp_path / "prometheus").start()
    yield server
    server.stop()


def test_a_registered_server_is_scraped_and_its_requests_are_counted(prometheus: Prometheus, tmp_path: Path) -> None:
    served = Server(onnx_models.tiny_classifier(tmp_path / "clf.onnx"), "clf", "--revision", "r1", log_dir=tmp_path)
    try:
        address = f"127.0.0.1:{served.port}"
        prometheus.set_targets([(address, TARGET_LABELS)])  # while Prometheus runs
        target = prometheus.wait_until_up(address)
        assert target["labels"]["class"] == "cpu-x86"
        codes = [served.request("POST", "/v2/models/clf/infer", _classifier_body(i))[0] for i in range(7)]
        assert codes == [200] * 7
        query = 'sum(edgemodel_requests_total{namespace="shop",edgemodel="ocr",class="cpu-x86",role="stable"})'
        eventually(lambda: prometheus.value(query) == 7, timeout=30, what=f"{query} == 7", interval=0.5)
        [sample] = prometheus.query('edgemodel_requests_total{edgemodel="ocr",outcome="ok"}')
        # The target's labels win; the server's own `revision` is kept as `exported_revision`.
        assert sample.labels.items() >= {**TARGET_LABELS, "model": "clf", "exported_revision": "r1"}.items()
        assert sample.value == 7
        assert prometheus.value('sum(edgemodel_requests_total{edgemodel="nothing-here"})') is None
    finally:
        served.stop()


def test_a_bad_query_is_a_clear_error(prometheus: Prometheus) -> None:
    with pytest.raises(PrometheusError, match="bad_data"):
        prometheus.query("sum(")


def test_a_prometheus_that_cannot_start_says_why(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        blocked = Prometheus(tmp_path / "prometheus", port=taken.getsockname()[1])
        with pytest.raises(PrometheusError, match="address already in use"):
            blocked.start()
