"""No cache, as an object: what a blob has when nothing keeps its chunks (nydusd's DummyCache).

The read path asks every blob's cache the same questions whether or not there is one; a
NullCache answers "not ready" to all of them and drops what it is given, so "no cache" is not a
branch at each use. Every read of a chunk then fetches it; the segments carry the fetched bytes.
"""

from __future__ import annotations

from typing import Final, TypeAlias

from vhostfs.storage.cache import ChunkCache

# Any chunk index may be fetched: nothing is indexed by it.
_ANY_INDEX: Final = 1 << 63


class NullCache:
    keeps_chunks = False
    chunk_count = _ANY_INDEX
    data_fd = -1
    data_path = ""

    def is_ready(self, index: int) -> bool:
        return False

    def write(self, offset: int, data: bytes) -> None:
        pass

    def flush(self) -> None:
        pass

    def mark_ready(self, index: int) -> None:
        pass

    def close(self) -> None:
        pass


NULL_CACHE: Final = NullCache()  # it holds nothing, so every blob can share one

BlobCache: TypeAlias = ChunkCache | NullCache
