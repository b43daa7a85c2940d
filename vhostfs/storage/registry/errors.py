"""What the registry client raises."""

from __future__ import annotations


class RegistryError(Exception):
    """A registry request failed. `retryable`: the same request may succeed later (transport
    errors, 5xx, 429); otherwise it will not (404, a refused credential, a bad answer)."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status
        self.retry_after: float | None = None  # seconds the server asked us to wait
