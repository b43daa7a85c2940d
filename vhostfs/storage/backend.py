"""Where blob bytes come from: the interface every backend offers.

A backend fetches byte ranges of a blob by name, as the blob stores them (compressed chunks
back to back). It knows nothing about chunks, caching or verification; the storage layer above
does all of that, so a registry backend (HTTP range requests) or a Dragonfly proxy only has to
implement `read`, `blob_size` and `aclose`, all coroutines so that an HTTP client's own
coroutines (httpx.AsyncClient.aclose...) can be awaited directly. Backends keep no counters:
the storage layer counts requests, bytes and errors in its Metrics.

A backend whose blobs are plain local files may also offer `local_file`, which lets data that
needs neither decompression nor caching (plain EROFS extra devices) go to the guest straight
from the blob file.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vhostfs.storage.errors import BackendError

__all__ = ["BackendError", "BlobBackend", "LocalBlobFiles", "LocalFile"]


@dataclass(frozen=True, slots=True)
class LocalFile:
    """An open blob file, owned by the backend and valid until it closes."""

    fd: int
    size: int


class BlobBackend(Protocol):
    async def read(self, blob_id: str, offset: int, size: int) -> bytes:
        """Exactly `size` bytes of blob `blob_id` at `offset`, or BackendError naming both."""
        ...

    async def blob_size(self, blob_id: str) -> int:
        """The blob's size in bytes (blob meta such as the ToC sits at its end)."""
        ...

    async def aclose(self) -> None:
        """Release files and connections. No read may be running."""
        ...


@runtime_checkable
class Reauthenticating(Protocol):
    def update_auth(self, auth: str | None) -> None:
        """Use `auth` (base64 "user:password"; None or blank: none) from now on, as nydusd's
        `PUT /api/v1/config {"registry_auth": ...}` asks; ConfigError when it is malformed."""
        ...


@runtime_checkable
class LocalBlobFiles(Protocol):
    def local_file(self, blob_id: str) -> LocalFile:
        """The blob's open file, opened on first use; BackendError if there is none."""
        ...
