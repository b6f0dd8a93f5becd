"""`edgemodel serve --shadow-config`: mirroring that follows a file the kubelet updates, as real processes.

The file lives in a directory laid out and updated the way the kubelet updates a ConfigMap volume
(a timestamped directory per version, published by renaming a `..data` symlink), while a client
sends requests to the stable server the whole time.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import eventually, free_port
from tests.integration.test_serve import EDGEMODEL, Server, _classifier_body

INTERVAL = "0.2"  # seconds between reads of the file; the default (2) would only make the test slower


class ConfigMapVolume:
    """A directory holding one ConfigMap key, written as the kubelet's atomic writer does."""

    def __init__(self, directory: Path, key: str) -> None:
        self.directory = directory
        self.key = key
        self._versions = itertools.count()
        directory.mkdir(parents=True)

    @property
    def path(self) -> Path:
        return self.directory / self.key

    def publish(self, content: bytes | None) -> None:
        """Make `content` the key's value (None: the key is gone from the ConfigMap)."""
        version = self.directory / f"..{time.strftime('%Y_%m_%d_%H_%M_%S')}.{next(self._versions)}"
        version.mkdir()
        if content is not None:
            (version / self.key).write_bytes(content)
        data = self.directory / "..data"
        previous = os.readlink(data) if data.is_symlink() else None
        staged = self.directory / "..data_tmp"
        staged.symlink_to(version.name)
        staged.replace(data)  # rename(2): readers see the old version or the new one, never a mix
        link = self.path
        if content is not None and not link.is_symlink():
            link.symlink_to(f"..data/{self.key}")
        elif content is None and link.is_symlink():
            link.unlink()
        if previous is not None:
            shutil.rmtree(self.directory / previous)

    def publish_json(self, document: Any) -> None:
        self.publish(json.dumps(document).encode())


class ClientLoop:
    """One client sending inference requests to a server, back to back, until stopped."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.sent = 0
        self.failures: list[str] = []
        self.slowest = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> ClientLoop:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(60)

    def _run(self) -> None:
        for seed in itertools.count():
            if self._stop.is_set():
                return
            started = time.monotonic()
            try:
                code, body = self.server.request("POST", "/v2/models/clf/infer", _classifier_body(seed % 100))
                if code != 200:
                    self.failures.append(f"HTTP {code}: {body[:200]!r}")
            except OSError as error:
                self.failures.append(repr(error))
            self.slowest = max(self.slowest, time.monotonic() - started)
            self.sent += 1
            time.sleep(0.003)


def _grows(read: Callable[[], float], by: float, what: str) -> None:
    start = read()
    eventually(lambda: read() >= start + by, timeout=30, what=what, interval=0.05)


def _stays(read: Callable[[], float], seconds: float = 1.0) -> None:
    before = read()
    time.sleep(seconds)
    assert read() == before


@pytest.fixture(scope="module")
def models(classifiers: dict[str, Path]) -> dict[str, Path]:
    return classifiers


@pytest.fixture(scope="module")
def candidates(models: dict[str, Path]) -> Iterator[dict[str, Server]]:
    servers = {
        "a1": Server(models["same"], "clf", "--revision", "a1"),
        "b1": Server(models["different"], "clf", "--revision", "b1"),
    }
    yield servers
    for server in servers.values():
        server.stop()


def _stable(models: dict[str, Path], volume: ConfigMapVolume, log_dir: Path) -> Server:
    return Server(
        models["stable"], "clf", "--revision", "r1",
        "--shadow-config", str(volume.path), "--shadow-config-interval", INTERVAL,
        log_dir=log_dir,
    )  # fmt: skip


def test_mirroring_follows_the_file_and_no_client_request_fails(
    models: dict[str, Path], candidates: dict[str, Server], tmp_path: Path
) -> None:
    volume = ConfigMapVolume(tmp_path / "shadow", "clf.json")  # an optional ConfigMap without the key yet
    stable = _stable(models, volume, tmp_path)
    a1, b1 = candidates["a1"], candidates["b1"]

    def shadow(name: str, revision: str | None = None) -> Callable[[], float]:
        labels = {"model": "clf", "stable_revision": "r1"}
        if revision is not None:
            labels["candidate_revision"] = revision
        return lambda: stable.metric(f"edgemodel_shadow_{name}_total", **labels)

    def reloads(result: str) -> float:
        return stable.metric("edgemodel_shadow_config_reloads_total", model="clf", result=result)

    def invalid_seen(times: int) -> Callable[[], bool]:
        return lambda: reloads("invalid") == times

    def successful() -> float:
        return stable.metric("edgemodel_shadow_config_last_reload_successful", model="clf")

    def served(candidate: Server) -> Callable[[], float]:
        return lambda: candidate.metric("edgemodel_requests_total", outcome="ok")

    with ExitStack() as cleanup:
        cleanup.callback(stable.stop)
        client = cleanup.enter_context(ClientLoop(stable))

        # No file: serving, not mirroring.
        _grows(lambda: client.sent, 20, "requests before any configuration")
        assert shadow("mirrored")() == 0
        assert successful() == 1

        # The key appears: mirrored and compared under the file's candidateRevision.
        volume.publish_json({"url": a1.url, "mirrorPercent": 100, "candidateRevision": "a1"})
        _grows(shadow("compared", "a1"), 20, "comparisons with candidate a1")
        assert shadow("mirrored", "a1")() >= shadow("compared", "a1")()
        assert shadow("agreed", "a1")() > 0
        assert served(a1)() > 0

        # The kubelet swaps in another version: a new label series grows, the old one stops.
        volume.publish_json({"url": b1.url, "mirrorPercent": 100, "candidateRevision": "b1"})
        _grows(shadow("compared", "b1"), 20, "comparisons with candidate b1")
        _stays(shadow("mirrored", "a1"))
        _stays(served(a1), 0)
        _grows(served(b1), 10, "requests reaching candidate b1")

        # Content that is not a configuration is reported, and the previous one stays in effect.
        bad_contents = [
            b'{"url": "http://',
            b"[]",
            json.dumps({"url": "ftp://example.com", "candidateRevision": "c1"}).encode(),
            json.dumps({"url": b1.url, "mirrorPercent": 0, "candidateRevision": "c1"}).encode(),
            json.dumps({"url": b1.url, "mirrorPercent": 150, "candidateRevision": "c1"}).encode(),
            json.dumps({"url": b1.url, "mirrorPercent": "50", "candidateRevision": "c1"}).encode(),
            json.dumps({"url": b1.url, "mirrorPercentage": 50, "candidateRevision": "c1"}).encode(),
        ]
        for count, content in enumerate(bad_contents, start=1):
            volume.publish(content)
            eventually(invalid_seen(count), timeout=30, what=f"{content!r} reported")
            assert successful() == 0
        _grows(shadow("compared", "b1"), 20, "comparisons with candidate b1 after invalid content")
        assert shadow("mirrored", "c1")() == 0
        log = stable.log.read_text()
        assert "is invalid and was not applied (not valid JSON" in log
        assert "(mirrorPercent must be within (0, 100], not 150)" in log
        assert f"keeping the previous configuration: mirroring 100% to {b1.url} as candidate b1" in log

        # The key is removed: mirroring stops.
        volume.publish(None)
        eventually(lambda: successful() == 1, timeout=30, what="the removal applied")
        time.sleep(0.3)  # the replaced mirror finishes the copies it holds
        _stays(shadow("mirrored"))
        _stays(shadow("compared"), 0)
        _stays(served(b1), 0)
        _grows(lambda: client.sent, 20, "requests after mirroring stopped")
        assert "now no mirroring" in stable.log.read_text()
        assert shadow("dropped")() == 0

    assert client.failures == []
    assert client.slowest < 2.0  # a swap never holds a request back (one inference here takes well under 1 ms)


def test_a_file_present_at_start_mirrors_from_the_first_request(
    models: dict[str, Path], candidates: dict[str, Server], tmp_path: Path
) -> None:
    volume = ConfigMapVolume(tmp_path / "shadow", "clf.json")
    volume.publish_json({"url": candidates["a1"].url, "candidateRevision": "a1"})  # mirrorPercent defaults to 100
    stable = _stable(models, volume, tmp_path)
    try:
        codes = [stable.request("POST", "/v2/models/clf/infer", _classifier_body(i))[0] for i in range(10)]
        assert codes == [200] * 10
        eventually(
            lambda: stable.metric("edgemodel_shadow_compared_total", candidate_revision="a1") == 10,
            timeout=30,
            what="10 comparisons",
        )
        assert stable.metric("edgemodel_shadow_mirrored_total", candidate_revision="a1") == 10
    finally:
        assert stable.stop() == 0


def test_a_file_invalid_at_start_is_reported_and_the_server_serves(models: dict[str, Path], tmp_path: Path) -> None:
    volume = ConfigMapVolume(tmp_path / "shadow", "clf.json")
    volume.publish(b"url: http://candidate:8080\n")
    stable = _stable(models, volume, tmp_path)
    try:
        assert stable.request("POST", "/v2/models/clf/infer", _classifier_body(0))[0] == 200
        assert stable.metric("edgemodel_shadow_config_last_reload_successful") == 0
        assert stable.metric("edgemodel_shadow_config_reloads_total", result="invalid") == 1
        assert stable.metric("edgemodel_shadow_mirrored_total") == 0
        assert "is invalid and was not applied (not valid JSON" in stable.log.read_text()
    finally:
        assert stable.stop() == 0


def test_agreement_limits_for_an_output_the_model_lacks_are_reported_not_silently_dropped(
    models: dict[str, Path], candidates: dict[str, Server], tmp_path: Path
) -> None:
    volume = ConfigMapVolume(tmp_path / "shadow", "clf.json")
    agreement = {"outputs": {"logit": {"maxAbsError": 1e-3}, "logits": {"maxAbsError": 1e-3}}}
    volume.publish_json({"url": candidates["a1"].url, "candidateRevision": "a1", "agreement": agreement})
    stable = _stable(models, volume, tmp_path)
    try:
        assert stable.request("POST", "/v2/models/clf/infer", _classifier_body(0))[0] == 200
        log = stable.log.read_text()
        assert (
            "agreement.outputs ['logit'] are not outputs of the model (['logits']): their limits apply to nothing"
            in log
        )
        assert stable.metric("edgemodel_shadow_mirrored_total", candidate_revision="a1") == 1  # the rest applies
    finally:
        assert stable.stop() == 0


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--shadow-url", "http://candidate:8080", "--shadow-config", "shadow.json"], "not allowed with argument"),
        (["--shadow-config", "shadow.json", "--mirror-percent", "50"], "--mirror-percent goes with --shadow-url"),
        (["--shadow-config", "shadow.json", "--candidate-revision", "v2"], "--candidate-revision goes with"),
        (["--shadow-config", "shadow.json", "--shadow-config-interval", "0"], "must be more than 0 seconds"),
        (["--shadow-url", "candidate:8080"], "must be http:// or https:// with a host"),
    ],
    ids=["url and file", "percent with file", "revision with file", "no interval", "url without scheme"],
)
def test_contradictory_shadow_options_are_refused_at_start(
    models: dict[str, Path], arguments: list[str], message: str
) -> None:
    result = subprocess.run(
        [EDGEMODEL, "serve", str(models["stable"]), "--port", str(free_port()), *arguments],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr
