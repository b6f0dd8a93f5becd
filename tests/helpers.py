"""Small helpers shared by the integration tests."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

from tests.testbed.cluster import Testbed

EXIT_CODE = "testbed.edgemodel.dev/exit-code"
MESSAGE = "testbed.edgemodel.dev/termination-message"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(bed: Testbed, *args: str) -> Any:
    """`kubectl get ... -o json`, parsed."""
    return json.loads(bed.kubectl("get", *args, "-o", "json").stdout)


def eventually(check: Callable[[], Any], timeout: float = 90, what: str = "condition", interval: float = 0.25) -> Any:
    """The first truthy result of `check`, or AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout:.0f}s")
        time.sleep(interval)


def post_json(url: str, body: bytes, timeout: float = 10) -> tuple[int, dict[str, Any]]:
    """POST a JSON body; the status and the decoded reply (an HTTP error's body under "error")."""
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, {"error": error.read().decode(errors="replace")}


class LiveRequests(threading.Thread):
    """Requests sent to `url` in a loop until `stop` is set, as live clients would send them.

    `body(n)` makes the n-th request's body. Counts what was sent and served; keeps each failure, timed.
    """

    def __init__(self, url: str, body: Callable[[int], bytes], pause: float) -> None:
        super().__init__(daemon=True)
        self.url, self.body, self.pause = url, body, pause
        self.sent, self.served, self.stop = 0, 0, threading.Event()
        self.failed: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                status, reply = post_json(self.url, self.body(self.sent + 1))
            except OSError as error:
                status, reply = 0, {"error": str(error)}
            self.sent += 1
            self.served += status == 200
            if status != 200:
                self.failed.append(f"{time.strftime('%H:%M:%S')} {status}: {str(reply)[:200]}")
            time.sleep(self.pause)
