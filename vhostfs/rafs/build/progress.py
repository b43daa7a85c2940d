"""A one-line progress bar for long builds, drawn only when the stream is a terminal."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

_WIDTH = 30
_REDRAW_SECONDS = 0.1
_MB = 1_000_000


class Progress:
    """Counts bytes done out of `total`; silent unless `stream` (stderr) is a tty."""

    def __init__(self, total: int, label: str, stream: TextIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        self._enabled = self._stream.isatty()
        self._total = total
        self._label = label
        self._done = 0
        self._started = time.monotonic()
        self._drawn_at = 0.0

    def advance(self, amount: int) -> None:
        self._done += amount
        if self._enabled:
            now = time.monotonic()
            if now - self._drawn_at >= _REDRAW_SECONDS:
                self._draw(now)

    def close(self) -> None:
        if self._enabled:
            self._draw(time.monotonic())
            self._stream.write("\n")
            self._stream.flush()
            self._enabled = False

    def _draw(self, now: float) -> None:
        self._drawn_at = now
        fraction = min(1.0, self._done / self._total) if self._total else 1.0
        filled = int(fraction * _WIDTH)
        elapsed = max(now - self._started, 1e-6)
        self._stream.write(
            f"\r{self._label} [{'#' * filled}{'.' * (_WIDTH - filled)}] {fraction:4.0%} "
            f"{self._done / _MB:.1f}/{self._total / _MB:.1f} MB "
            f"{self._done / _MB / elapsed:.1f} MB/s"
        )
        self._stream.flush()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
