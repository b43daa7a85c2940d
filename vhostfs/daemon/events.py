"""The daemon's recent error events, as nydusd's `GET /api/v1/daemon/events` shows them.

A logging handler keeps the last ERROR (and worse) records in a bounded ring: at most
MAX_ERRORS messages and MAX_SIZE bytes of them, oldest dropped first, with a count of every
error ever seen. A guest that makes the daemon log errors fast can fill it, but not grow it.
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any, Final

MAX_ERRORS: Final = 1024
MAX_SIZE: Final = 256 * 1024
MAX_MESSAGE: Final = 4096


class ErrorEvents(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self._errors: deque[str] = deque()
        self._size = 0
        self.total = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = f"{record.name}: {record.getMessage()}"[:MAX_MESSAGE]
        except Exception:  # a bad format string in a log call must not break the caller
            message = f"{record.name}: {record.msg!r}"[:MAX_MESSAGE]
        self.total += 1
        self._errors.append(message)
        self._size += len(message)
        while len(self._errors) > MAX_ERRORS or self._size > MAX_SIZE:
            self._size -= len(self._errors.popleft())

    def snapshot(self) -> dict[str, Any]:
        return {
            "max_errors": MAX_ERRORS,
            "total_errors": self.total,
            "max_size": MAX_SIZE,
            "errors": list(self._errors),
        }
