"""Small helpers shared by the integration tests."""

from __future__ import annotations

import json
import socket
import time
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
