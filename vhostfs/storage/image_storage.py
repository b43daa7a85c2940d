"""The read path: from the chunk refs covering a file range to the segments the guest gets.

`ImageStorage.read` turns each ref into a segment (vhostfs.storage.plan): a `FileSlice` (a range
of an open file the transport copies into guest memory with one preadv: the chunk cache, the
bootstrap, or a local EROFS device) or `bytes` (zeros for holes, freshly fetched data when there
is no cache).

Hits never suspend: when every chunk is ready, `read` finishes on its first `send(None)`, so the
dispatcher runs it without creating a Task. Misses go through the single-flight table
(vhostfs.storage.flight), which fetches, decodes and caches them (vhostfs.storage.decode) on a
small thread pool.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from vhostfs.segments import FileSlice, Segment
from vhostfs.storage.backend import BlobBackend, LocalBlobFiles
from vhostfs.storage.blob import IN_BOOTSTRAP, ZERO_FILL, BlobInfo, ChunkRef, blob_names
from vhostfs.storage.cache import ChunkCache
from vhostfs.storage.config import RafsConfig
from vhostfs.storage.defaults import DEFAULT_AMPLIFY_IO, IO_THREADS
from vhostfs.storage.errors import BackendError, ChunkRefError, StorageClosedError
from vhostfs.storage.flight import SingleFlight
from vhostfs.storage.metrics import Metrics
from vhostfs.storage.null_cache import NULL_CACHE, BlobCache
from vhostfs.storage.plan import (
    OpenBlob,
    Pending,
    append_file,
    check_sizes,
    fill_pending,
    sizes_error,
)


@dataclass(frozen=True, slots=True)
class FetchOptions:
    digest_validate: bool = True
    amplify_io: int = DEFAULT_AMPLIFY_IO  # largest merged backend read for guest misses
    sync_data: bool = False  # fdatasync the cache before marking chunks ready
    io_threads: int = IO_THREADS  # decompress / verify / cache-write pool


class ImageStorage:
    """The data of one image's blobs: cached, fetched on demand, verified.

        `work_dir` None means no cache: every read of a blob chunk fetches it. `bootstrap` is the
        image file, for data stored inside it (plain EROFS). `config` is the config the storage
        was opened with (open_storage records it), for the layers above. `log_failures` False leaves
    reporting failed chunks to whoever catches the errors. Call `aclose()` to stop
        fetching and release everything; no segment handed out may be used after that.
    """

    def __init__(
        self,
        blobs: Sequence[BlobInfo],
        backend: BlobBackend,
        *,
        work_dir: str | os.PathLike[str] | None = None,
        bootstrap: str | os.PathLike[str] | None = None,
        options: FetchOptions | None = None,
        metrics: Metrics | None = None,
        executor: ThreadPoolExecutor | None = None,
        config: RafsConfig | None = None,
        log_failures: bool = True,
    ) -> None:
        self.options = options or FetchOptions()
        self.metrics = metrics or Metrics()
        self.config = config
        self._backend = backend
        self._local = backend if isinstance(backend, LocalBlobFiles) else None
        self._executor = executor or ThreadPoolExecutor(
            self.options.io_threads, thread_name_prefix="vhostfs-chunks"
        )
        self._flight = SingleFlight(
            backend, self._executor, self.metrics, log_failures=log_failures
        )
        self._guest_waits = 0
        self._guest_idle = asyncio.Event()
        self._guest_idle.set()
        self._closed = False
        self._bootstrap_fd = -1
        self._bootstrap_size = 0
        self._blobs: list[OpenBlob] = []
        try:
            self._open_blobs(blobs, work_dir)
            if bootstrap is not None:
                self._bootstrap_fd = os.open(bootstrap, os.O_RDONLY | os.O_CLOEXEC)
                self._bootstrap_size = os.fstat(self._bootstrap_fd).st_size
        except BaseException:
            self._close_files()
            self._executor.shutdown(wait=False)
            raise

    def _open_blobs(
        self, blobs: Sequence[BlobInfo], work_dir: str | os.PathLike[str] | None
    ) -> None:
        if work_dir is not None:
            # Ours alone: a planted chunk map and data file would be served as if verified.
            os.makedirs(work_dir, mode=0o700, exist_ok=True)
        names = blob_names([blob.blob_id for blob in blobs])
        for position, (info, name) in enumerate(zip(blobs, names, strict=True)):
            if info.index != position:
                raise ChunkRefError(f"blob table: entry {position} says it is blob {info.index}")
            cache: BlobCache = NULL_CACHE
            # Cache files are named by blob id and may be shared with other images: a blob
            # known only by its slot has no identity to share, so it is never cached.
            if work_dir is not None and info.chunk_count > 0 and name == info.blob_id:
                cache = ChunkCache(
                    work_dir, name, info.chunk_count, sync_data=self.options.sync_data
                )
            verify = self.options.digest_validate and info.digester is not None
            self._blobs.append(OpenBlob(info, name, cache, verify))

    # --- Reading ---------------------------------------------------------------------------

    @property
    def backend(self) -> BlobBackend:
        """Where the blobs come from (the daemon's API reloads registry credentials on it)."""
        return self._backend

    async def read(self, chunks: Sequence[ChunkRef], start: int, end: int) -> list[Segment]:
        """Segments covering file bytes [start, end), in order.

        `chunks` are the refs covering that range, as RafsImage.chunks() returns them. Raises
        StorageError (EIO): BackendError / ChunkDecodeError when a chunk cannot be fetched or
        fails verification, ChunkRefError when the refs do not cover the range.
        """
        began = time.perf_counter_ns()
        if self._closed:
            raise StorageClosedError("image storage is closed")
        segments: list[Segment] = []
        pending: list[Pending] = []
        misses: list[tuple[OpenBlob, ChunkRef]] = []
        position = start
        for ref in chunks:
            if position >= end:
                break
            if not ref.file_offset <= position < ref.file_end:
                raise ChunkRefError(
                    f"chunk for file bytes {ref.file_offset}..{ref.file_end} does not continue "
                    f"at byte {position}"
                )
            stop = min(end, ref.file_end)
            self._add_piece(
                segments, pending, misses, ref, position - ref.file_offset, stop - position
            )
            position = stop
        if position < end:
            raise ChunkRefError(f"chunks stop at file byte {position}, before {end}")
        if misses:
            # Started together, so that neighbouring misses merge into one backend read.
            futures = iter(self._flight.start(misses, self.options.amplify_io, prefetch=False))
            for piece in pending:
                if piece.future is None:
                    piece.future = next(futures)
        if pending:
            await self._wait_for_fetches(pending)
            segments = fill_pending(segments, pending)
        self.metrics.observe_read(end - start, time.perf_counter_ns() - began)
        return segments

    def _add_piece(
        self,
        segments: list[Segment],
        pending: list[Pending],
        misses: list[tuple[OpenBlob, ChunkRef]],
        ref: ChunkRef,
        skip: int,
        size: int,
    ) -> None:
        """The segment for bytes [skip, skip + size) of ref, or a placeholder (listed in
        pending, the chunk in misses) for one that must be fetched first."""
        if ref.blob_index == ZERO_FILL:
            segments.append(bytes(size))
            return
        if ref.blob_index == IN_BOOTSTRAP:
            offset = ref.compressed_offset + skip
            if self._bootstrap_fd < 0 or offset < 0 or offset + size > self._bootstrap_size:
                raise ChunkRefError(
                    f"file data at image bytes {offset}..{offset + size}: outside the image "
                    f"({self._bootstrap_size} bytes)"
                )
            append_file(segments, self._bootstrap_fd, offset, size)
            return
        blob = self._blob(ref)
        metrics = self.metrics
        if self._served_in_place(blob, ref):
            self._add_raw_range(segments, pending, blob, ref, skip, size)
            return
        if ref.chunk_index is not None:
            cache = blob.cache
            if not 0 <= ref.chunk_index < cache.chunk_count:
                raise ChunkRefError(
                    f"{ref.describe(blob.name)}: index outside the blob's "
                    f"{cache.chunk_count} chunks"
                )
            if cache.is_ready(ref.chunk_index):
                metrics.cache_hits += 1
                append_file(segments, cache.data_fd, ref.uncompressed_offset + skip, size)
                return
        check_sizes(ref, blob.name)
        metrics.cache_misses += 1
        misses.append((blob, ref))
        pending.append(Pending(len(segments), blob, ref, skip, size, None, skip, True))
        segments.append(b"")

    def _served_in_place(self, blob: OpenBlob, ref: ChunkRef) -> bool:
        """Whether ref's bytes are read straight from the backend, never cached: stored as
        they are, not to be verified, and either not a chunk (an EROFS device range) or in a
        local blob file, which is as good as the cache (so it is not copied there). A chunk
        whose stored and file sizes differ is not plain: the fetch path refuses it."""
        if ref.compressed or (ref.digest is not None and blob.verify):
            return False
        if ref.chunk_index is None:
            return True
        return self._local is not None and ref.compressed_size == ref.uncompressed_size

    def _add_raw_range(
        self,
        segments: list[Segment],
        pending: list[Pending],
        blob: OpenBlob,
        ref: ChunkRef,
        skip: int,
        size: int,
    ) -> None:
        """Stored as is and not to be verified: read just the bytes asked for, uncached."""
        offset = ref.compressed_offset + skip
        if self._local is not None:
            local = self._local.local_file(blob.name)
            if offset + size > local.size:
                raise BackendError(
                    f"{ref.describe(blob.name)}: bytes {offset}..{offset + size} run past the "
                    f"end of the blob file ({local.size} bytes)"
                )
            self.metrics.cache_hits += 1
            append_file(segments, local.fd, offset, size)
            return
        self.metrics.cache_misses += 1
        task = self._flight.read_range(blob, offset, size)
        pending.append(Pending(len(segments), blob, ref, skip, size, task, 0, False))
        segments.append(b"")

    def direct_place(self, chunks: Sequence[ChunkRef], start: int, end: int) -> FileSlice | None:
        """Where file bytes [start, end) lie back to back in one host file, every chunk
        ready: cached, stored as is in a local blob, or in the bootstrap. None otherwise (a
        chunk missing, a hole, a jump to another file or place)."""
        if self._closed:
            return None
        place: FileSlice | None = None
        position = start
        for ref in chunks:
            if position >= end:
                break
            if not ref.file_offset <= position < ref.file_end:
                return None
            where = self._ready_at(ref)
            if where is None:
                return None
            fd, pos = where[0], where[1] + (position - ref.file_offset)
            if place is None:
                place = FileSlice(fd, pos, 0)
            elif fd != place.fd or pos != place.pos + (position - start):
                return None
            position = min(end, ref.file_end)
        if place is None or position < end:
            return None
        return FileSlice(place.fd, place.pos, end - start)

    def _ready_at(self, ref: ChunkRef) -> tuple[int, int] | None:
        """(fd, position) of ref's first file byte when it can be read there now, else None."""
        if ref.blob_index == ZERO_FILL:
            return None
        if ref.blob_index == IN_BOOTSTRAP:
            ok = self._bootstrap_fd >= 0 and ref.compressed_offset >= 0
            size = ref.file_end - ref.file_offset
            if not ok or ref.compressed_offset + size > self._bootstrap_size:
                return None
            return self._bootstrap_fd, ref.compressed_offset
        if not 0 <= ref.blob_index < len(self._blobs):
            return None
        blob = self._blobs[ref.blob_index]
        if self._served_in_place(blob, ref):
            if self._local is None:
                return None
            local = self._local.local_file(blob.name)
            if ref.compressed_offset + ref.compressed_size > local.size:
                return None
            return local.fd, ref.compressed_offset
        index = ref.chunk_index
        cache = blob.cache
        if index is None or not 0 <= index < cache.chunk_count or not cache.is_ready(index):
            return None
        return cache.data_fd, ref.uncompressed_offset

    def _blob(self, ref: ChunkRef) -> OpenBlob:
        if not 0 <= ref.blob_index < len(self._blobs):
            raise ChunkRefError(
                f"chunk at file byte {ref.file_offset}: blob {ref.blob_index} is not in the "
                f"image's {len(self._blobs)} blobs"
            )
        return self._blobs[ref.blob_index]

    async def _wait_for_fetches(self, pending: list[Pending]) -> None:
        self._guest_waits += 1
        self._guest_idle.clear()
        try:
            await asyncio.wait({piece.future for piece in pending if piece.future is not None})
        finally:
            self._guest_waits -= 1
            if not self._guest_waits:
                self._guest_idle.set()

    # --- For the offline tools (vhostfs.storage.sync) --------------------------------------

    async def read_blob(self, blob_index: int, offset: int, size: int) -> bytes:
        """Stored bytes of a blob, as the backend has them (blob meta, ToC parts)."""
        if self._closed:
            raise StorageClosedError("image storage is closed")
        blob = self._blobs[blob_index]
        return await self._flight.read_range(blob, offset, size)

    async def blob_size(self, blob_index: int) -> int:
        return await self._backend.blob_size(self._blobs[blob_index].name)

    # --- For the prefetcher ----------------------------------------------------------------

    def wants_prefetch(self, ref: ChunkRef) -> bool:
        """Whether prefetching ref would bring something into the cache."""
        if ref.blob_index < 0 or ref.chunk_index is None or ref.blob_index >= len(self._blobs):
            return False
        blob = self._blobs[ref.blob_index]
        cache = blob.cache
        if self._served_in_place(blob, ref):
            return False
        return (
            cache.keeps_chunks
            and 0 <= ref.chunk_index < cache.chunk_count
            and not cache.is_ready(ref.chunk_index)
            and ref not in self._flight
        )

    def prefetch(self, refs: Sequence[ChunkRef], limit: int) -> list[asyncio.Future[bytes]]:
        """Start fetching those of these chunks the cache lacks, in runs of at most `limit`
        bytes and sharing fetches with guest reads. The fetches start before this returns, so
        the caller decides exactly when. Returns the shared futures (failures are logged
        already); await them with asyncio.wait, never cancel them."""
        if self._closed:
            raise StorageClosedError("image storage is closed")
        wanted = [
            (self._blob(ref), ref)
            for ref in refs
            if self.wants_prefetch(ref) and sizes_error(ref) is None
        ]
        return self._flight.start(wanted, limit, prefetch=True) if wanted else []

    @property
    def amplify_io(self) -> int:
        return self.options.amplify_io

    def read_ahead(self, refs: Sequence[ChunkRef]) -> None:
        """Fetch these chunks into the cache if they are not there or on their way, as the
        guest will soon want them (a file read sequentially); nothing waits for them, and a
        failure is logged and left for the guest's own read to retry."""
        if not self._closed:
            self.prefetch(refs, self.options.amplify_io)

    async def guest_idle(self) -> None:
        """Return once no guest read waits for a fetch."""
        while self._guest_waits:
            await self._guest_idle.wait()

    # --- Shutdown --------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._flight.aclose()
        # Pool threads may still be writing to cache files: let them finish before closing.
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        await self._backend.aclose()
        self._close_files()

    def _close_files(self) -> None:
        for blob in self._blobs:
            blob.cache.close()
        self._blobs = []
        if self._bootstrap_fd >= 0:
            os.close(self._bootstrap_fd)
            self._bootstrap_fd = -1
