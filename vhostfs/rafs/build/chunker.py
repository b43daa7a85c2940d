"""Cutting file contents into chunks, keeping each distinct chunk once, and storing it.

Files are fed in inode order and read in chunk-size pieces. Worker threads digest and compress
each piece (hashlib, blake3 and zstd all release the GIL); results are taken back strictly in
the order the pieces were read, and only then is each piece judged: a digest seen before (in
this build) reuses that chunk, so identical files and identical stretches inside files are
stored once; a new one gets the next index in the blob's chunk-info array and the next 4 KiB-
aligned place in the blob's uncompressed address space, and is written. Decisions made in read
order keep the blob's bytes independent of thread timing. (A duplicate that arrives while its
twin is still in flight is compressed for nothing; that costs time, not space.)

An image made of layers gets one blob per layer (`start_blob` begins the next): new chunks go
to the current blob, while a chunk some earlier blob already holds is referenced there, so the
layers of an image share their common data.
"""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType

from vhostfs.rafs import layout as L
from vhostfs.rafs.build.blob_writer import BlobWriter, Chunk, aligned
from vhostfs.rafs.build.compression import compress
from vhostfs.rafs.build.errors import BuildError
from vhostfs.rafs.build.progress import Progress
from vhostfs.rafs.build.tree import FileData
from vhostfs.storage.blob import Compressor, Digester
from vhostfs.storage.codec import digest_of

_MAX_CHUNKS = L.MAX_CHUNKS_PER_BLOB
_MAX_BLOCK_ADDRESS = 0xFFFF_FFFF  # chunk indexes hold a 32-bit block number
# Below this, handing a piece to a worker costs more than digesting and compressing it here.
_INLINE_PIECE = 64 * 1024


# A piece read, its (digest, compressed bytes) to come, and the file's chunk list to extend.
_Pending = tuple[bytes, Future[tuple[bytes, bytes | None]], list[Chunk]]


def _digest_and_compress(
    digester: Digester, compressor: Compressor, piece: bytes
) -> tuple[bytes, bytes | None]:
    return digest_of(digester, piece), compress(compressor, piece)


class Chunker:
    def __init__(
        self,
        chunk_size: int,
        compressor: Compressor,
        digester: Digester,
        progress: Progress,
        workers: int,
    ) -> None:
        self._blob: BlobWriter | None = None  # start_blob() names it
        self._chunk_size = chunk_size
        self._compressor = compressor
        self._digester = digester
        self._progress = progress
        self._chunks: list[Chunk] = []
        self._by_digest: dict[bytes, Chunk] = {}
        self._uncompressed_end = 0
        self.deduplicated_bytes = 0
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="chunk")
        self._pending: deque[_Pending] = deque()
        self._max_pending = 2 * workers + 2  # enough to keep workers busy, bounded memory
        self._open: tuple[str, int] | None = None  # layers share one file: keep it open
        self._blob_index = 0

    def start_blob(self, blob: BlobWriter, blob_index: int) -> None:
        """Send new chunks to `blob`, the image's blob `blob_index`, from now on. Call
        finish() for the previous blob first."""
        assert not self._pending, "finish() the previous blob first"
        self._blob = blob
        self._blob_index = blob_index
        self._chunks = []
        self._uncompressed_end = 0

    @property
    def uncompressed_size(self) -> int:
        return self._uncompressed_end

    def add_file(self, data: FileData, what: str) -> list[Chunk]:
        """The list that will hold the file's chunks, in file order, once finish() returns."""
        fd = self._source(data.path)
        chunks: list[Chunk] = []
        for offset in range(0, data.size, self._chunk_size):
            wanted = min(self._chunk_size, data.size - offset)
            piece = os.pread(fd, wanted, data.offset + offset)
            if len(piece) != wanted:
                raise BuildError(f"{what}: file ended early (changed while building?)")
            self._pending.append((piece, self._process(piece), chunks))
            self._drain(self._max_pending)
            self._progress.advance(wanted)
        return chunks

    def _process(self, piece: bytes) -> Future[tuple[bytes, bytes | None]]:
        if len(piece) >= _INLINE_PIECE:
            return self._pool.submit(_digest_and_compress, self._digester, self._compressor, piece)
        done: Future[tuple[bytes, bytes | None]] = Future()
        done.set_result(_digest_and_compress(self._digester, self._compressor, piece))
        return done

    def finish(self) -> list[Chunk]:
        """Every new chunk of the current blob, by index, all written to it."""
        self._drain(0)
        return self._chunks

    def close(self) -> None:
        self._pool.shutdown(cancel_futures=True)
        if self._open is not None:
            os.close(self._open[1])
            self._open = None

    def __enter__(self) -> Chunker:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _source(self, path: str) -> int:
        if self._open is None or self._open[0] != path:
            if self._open is not None:
                os.close(self._open[1])
                self._open = None
            self._open = (path, os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        return self._open[1]

    def _drain(self, keep: int) -> None:
        """Settle finished pieces, in read order, until at most `keep` are pending."""
        while len(self._pending) > keep:
            piece, future, file_chunks = self._pending.popleft()
            digest, stored = future.result()
            file_chunks.append(self._settle(piece, digest, stored))

    def _settle(self, piece: bytes, digest: bytes, stored: bytes | None) -> Chunk:
        known = self._by_digest.get(digest)
        if known is not None:
            self.deduplicated_bytes += len(piece)
            return known
        if len(self._chunks) >= _MAX_CHUNKS:
            raise BuildError(f"more than {_MAX_CHUNKS} distinct chunks: use a larger --chunk-size")
        chunk = Chunk(
            len(self._chunks),
            digest,
            self._uncompressed_end,
            len(piece),
            blob_index=self._blob_index,
        )
        self._uncompressed_end += aligned(len(piece))
        if self._uncompressed_end // L.RAFS_V6_BLOCK_SIZE > _MAX_BLOCK_ADDRESS:
            raise BuildError("more than 16 TiB of distinct chunk data")
        self._chunks.append(chunk)
        self._by_digest[digest] = chunk
        assert self._blob is not None, "start_blob() first"
        if stored is None:
            self._blob.write_chunk(chunk, piece, compressed=False)
        else:
            self._blob.write_chunk(chunk, stored, compressed=True)
        return chunk
