"""The link-cutting proxy of the test bed (tests/testbed/linkcut.py) in front of a real registry.

Real parts: Debian's docker-registry on 127.0.0.1; pushes through the proxy by the project's own OCI
client, reads by urllib. Checks that the proxy is transparent, sees requests and Range headers, paces
responses and cuts the link mid-body, refusing connections until it comes back.
"""

from __future__ import annotations

import hashlib
import http.client
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgemodel_runtime.build import oci
from tests.helpers import eventually
from tests.testbed.linkcut import LinkCut
from tests.testbed.registry import Registry

SIZE = 3 * 1024 * 1024


@pytest.fixture
def link(tmp_path: Path) -> Iterator[tuple[LinkCut, str]]:
    registry = Registry(tmp_path / "registry").start()
    proxy = LinkCut(registry.address).start()
    blob = tmp_path / "weights.bin"
    blob.write_bytes(hashlib.sha256(b"seed").digest() * (SIZE // 32))
    try:
        digest = oci.push(oci.parse_reference(f"{proxy.address}/models/cut"), [blob], "v1", {})
        connection = http.client.HTTPConnection(proxy.address, timeout=10)
        connection.request("GET", f"/v2/models/cut/manifests/{digest}",
                           headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})  # fmt: skip
        import json

        layer = json.loads(connection.getresponse().read())["layers"][0]["digest"]
        connection.close()
        yield proxy, layer
    finally:
        proxy.stop()
        registry.stop()


def _get(address: str, path: str, start: int = 0) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(address, timeout=10)
    try:
        connection.request("GET", path, headers={"Range": f"bytes={start}-"} if start else {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_proxy_forwards_every_byte_and_records_requests_and_ranges(link: tuple[LinkCut, str]) -> None:
    proxy, layer = link
    path = f"/v2/models/cut/blobs/{layer}"
    status, whole = _get(proxy.address, path)
    assert status == 200
    assert "sha256:" + hashlib.sha256(whole).hexdigest() == layer
    status, tail = _get(proxy.address, path, 1000)
    assert status == 206
    assert tail == whole[1000:]
    # The proxy counts a response's bytes as it forwards them: its count of the last chunk may come a moment
    # after the client has read it.
    first, second = eventually(
        lambda: (found := proxy.gets(path)) and all(t.complete for t in found) and found,
        timeout=10,
        what="both responses counted whole by the proxy",
        interval=0.05,
    )
    assert (first.range, first.status, first.body, first.complete) == (None, 200, len(whole), True)
    assert (second.range, second.status, second.body) == ("bytes=1000-", 206, len(whole) - 1000)
    assert any(t.method in {"PUT", "PATCH", "POST"} for t in proxy.transfers)  # the push went through it too


def test_a_paced_download_is_cut_mid_body_and_the_link_refuses_until_it_is_back(link: tuple[LinkCut, str]) -> None:
    proxy, layer = link
    path = f"/v2/models/cut/blobs/{layer}"
    proxy.throttle(2 * 1024 * 1024, "/blobs/")
    proxy.cut_at(SIZE // 2, down=2)
    started = time.monotonic()
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        _get(proxy.address, path)
    assert 0.5 < time.monotonic() - started < 5  # paced: half of 3 MiB at 2 MiB/s
    (cut,) = proxy.gets(path)
    assert SIZE // 2 <= cut.body < SIZE
    assert not cut.complete
    with pytest.raises(ConnectionError):
        _get(proxy.address, path)
    assert proxy.refused
    time.sleep(2)
    proxy.throttle(None)
    status, tail = _get(proxy.address, path, cut.body)
    assert (status, len(tail)) == (206, SIZE - cut.body)


def test_a_cut_counted_over_several_downloads_falls_in_the_one_that_crosses_the_total(
    link: tuple[LinkCut, str],
) -> None:
    proxy, layer = link
    path = f"/v2/models/cut/blobs/{layer}"
    proxy.cut_at(SIZE + SIZE // 2, down=1, path_contains=path, total=True)
    status, whole = _get(proxy.address, path)  # the first one is not cut: it carries SIZE of the total
    assert (status, len(whole)) == (200, SIZE)
    with pytest.raises((http.client.IncompleteRead, ConnectionError)):
        _get(proxy.address, path)  # the second one crosses it
    first, second = proxy.gets(path)
    assert first.complete
    assert not second.complete
    assert SIZE // 2 <= second.body < SIZE
    assert len(proxy.cuts) == 1


STREAM = (
    b"GET /v2/ HTTP/1.1\r\nHost: r\r\n\r\n"
    b"PUT /v2/a/blobs/uploads/1?digest=x HTTP/1.1\r\nContent-Length: 25\r\n\r\nGET /not/a/request HTTP/1"
    b"PATCH /v2/a/blobs/uploads/2 HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5\r\nGET /\r\n10;ext=1\r\nGET /no HTTP/1.1\r\n0\r\n\r\n"
    b"GET /v2/a/blobs/sha256:00 HTTP/1.1\r\nRange: bytes=7-\r\n\r\n"
)


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, len(STREAM)])
def test_the_proxy_finds_request_heads_across_any_split_and_never_inside_bodies(step: int) -> None:
    from tests.testbed.linkcut import _RequestReader

    reader = _RequestReader()
    heads = [head for i in range(0, len(STREAM), step) for head in reader.feed(STREAM[i : i + step])]
    assert [(method, path) for method, path, _ in heads] == [
        ("GET", "/v2/"),
        ("PUT", "/v2/a/blobs/uploads/1?digest=x"),
        ("PATCH", "/v2/a/blobs/uploads/2"),
        ("GET", "/v2/a/blobs/sha256:00"),
    ]
    assert heads[-1][2]["range"] == "bytes=7-"
    assert not reader.buffer
