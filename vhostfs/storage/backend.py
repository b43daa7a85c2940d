"""Where blob bytes come from: the interface every backend offers.

A backend fetches byte ranges of a blob by name, as the blob stores them (compressed chunks
back to back). It knows nothing about chunks, caching or verification; the storage layer above
does all of that, so a registry backend (HTTP range requests) or a Dragonfly mirror only has to
implement `read`.

A backend whose blobs are plain local files may also offer `local_file`, which lets data that
needs neither decompression nor caching (plain EROFS extra devices) go to the guest straight
from the blob file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vhostfs.rafs.errors import BlobError


class BackendError(BlobError):
    """A blob range could not be fetched: missing blob, I/O error, short read."""


@dataclass(slots=True)
class BackendCounters:
    """What a backend has been asked for; updated on the event loop thread."""

    requests: int = 0
    bytes: int = 0  # successfully returned
    errors: int = 0


@dataclass(frozen=True, slots=True)
class LocalFile:
    """An open blob file, owned by the backend and valid until it closes."""

    fd: int
    size: int


class BlobBackend(Protocol):
    @property
    def counters(self) -> BackendCounters: ...

    async def read(self, blob_id: str, offset: int, size: int) -> bytes:
        """Exactly `size` bytes of blob `blob_id` at `offset`, or BackendError naming both."""
        ...

    def close(self) -> None:
        """Release files and connections. No read may be running."""
        ...


@runtime_checkable
class LocalBlobFiles(Protocol):
    def local_file(self, blob_id: str) -> LocalFile:
        """The blob's open file, opened on first use; BackendError if there is none."""
        ...


def blob_names(blob_ids: Sequence[str]) -> list[str]:
    """The name each blob of an image's blob table is fetched by, in table order.

    Normally its id. A blob with no id (an anonymous EROFS extra device), or whose id another
    blob of the table also carries, is named by its slot instead. Such a name contains a space,
    which the ids images carry (hex digests, printable device tags) never do, so it cannot
    collide with one.
    """
    counts = Counter(blob_ids)
    return [
        blob_id if blob_id and counts[blob_id] == 1 else f"<device {index}>"
        for index, blob_id in enumerate(blob_ids)
    ]
