"""Progress for long work: a bar that redraws on a terminal, plain lines elsewhere (logs, Jobs)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} GiB"


class Progress:
    """Reports bytes done out of a total (which may be unknown)."""

    def __init__(self, label: str, total: int | None, stream: TextIO | None = None, interval: float = 2.0) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval
        self._last = 0.0
        self._last_decile = -1

    def update(self, count: int) -> None:
        self.done += count
        now = time.monotonic()
        if self.tty:
            if now - self._last >= 0.1:
                self._draw()
                self._last = now
            return
        decile = self.done * 10 // self.total if self.total else -1
        if (self.total and decile > self._last_decile) or (not self.total and now - self._last >= self.interval):
            self._last_decile, self._last = decile, now
            self.stream.write(f"{self.label}: {self._text()}\n")
            self.stream.flush()

    def _text(self) -> str:
        if self.total:
            return f"{_size(self.done)} / {_size(self.total)} ({100 * self.done // self.total}%)"
        return _size(self.done)

    def _draw(self) -> None:
        bar = ""
        if self.total:
            filled = int(30 * self.done / self.total)
            bar = "[" + "#" * filled + "." * (30 - filled) + "] "
        self.stream.write(f"\r{self.label}: {bar}{self._text()}")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self._draw()
            self.stream.write("\n")
        else:
            self.stream.write(f"{self.label}: done, {_size(self.done)}\n")
        self.stream.flush()
