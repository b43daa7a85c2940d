"""A blocking facade over an image's storage, for the offline tools (`vhostfs check`, `unpack`,
`inspect`) and the blob meta reader.

It runs the same ImageStorage and backend as the daemon on a private event loop, so every
backend the server can mount (a registry included, once it exists) also serves the tools, and
the bytes go through the same fetch and decode path. There is no chunk cache: a tool reads each
chunk once. Errors are raised, not logged; the caller reports them.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import Any, TypeVar

from vhostfs.segments import FileSlice
from vhostfs.storage.assemble import open_storage
from vhostfs.storage.blob import BlobInfo, ChunkRef
from vhostfs.storage.config import RafsConfig
from vhostfs.storage.errors import StorageClosedError, StorageError
from vhostfs.storage.fileio import pread_full
from vhostfs.storage.image_storage import ImageStorage

_T = TypeVar("_T")


class SyncStorage:
    """ImageStorage with blocking calls. Use as a context manager, or call close()."""

    def __init__(
        self,
        config: RafsConfig,
        blobs: Sequence[BlobInfo],
        *,
        bootstrap: str | os.PathLike[str] | None = None,
    ) -> None:
        self.blobs = tuple(blobs)
        # Opened before the loop exists: the storage binds its futures to whichever loop runs
        # it, and a failed open then cleans up without one.
        self._storage: ImageStorage = open_storage(
            config, self.blobs, bootstrap=bootstrap, use_cache=False, log_failures=False
        )
        self._loop = asyncio.new_event_loop()

    def _run(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        if self._loop.is_closed():
            coroutine.close()
            raise StorageClosedError("image storage is closed")
        return self._loop.run_until_complete(coroutine)

    def read(self, chunks: Sequence[ChunkRef], start: int, end: int) -> bytes:
        """File bytes [start, end), which `chunks` (as RafsImage.chunks returns them) cover."""
        segments = self._run(self._storage.read(chunks, start, end))
        out = bytearray()
        for segment in segments:
            if isinstance(segment, FileSlice):
                out += _pread_exactly(segment)
            else:
                out += segment
        return bytes(out)

    def read_blob(self, blob: BlobInfo, offset: int, size: int) -> bytes:
        """Exactly `size` stored bytes of the blob at `offset`."""
        return self._run(self._storage.read_blob(blob.index, offset, size))

    def blob_size(self, blob: BlobInfo) -> int:
        return self._run(self._storage.blob_size(blob.index))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        try:
            self._run(self._storage.aclose())
        finally:
            self._loop.close()

    def __enter__(self) -> SyncStorage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _pread_exactly(piece: FileSlice) -> bytes:
    try:
        data = pread_full(piece.fd, piece.size, piece.pos)
    except OSError as e:
        raise StorageError(f"reading {piece.size} bytes at {piece.pos}: {e.strerror}") from e
    if len(data) < piece.size:
        raise StorageError(f"file ends inside bytes {piece.pos}..{piece.pos + piece.size}")
    return data
