"""The read path: from the chunk refs covering a file range to the segments the guest gets.

`ImageStorage.read` turns each ref into a segment: a `FileSlice` (a range of an open file the
transport copies into guest memory with one preadv: the chunk cache, the bootstrap, or a local
EROFS device) or `bytes` (zeros for holes, freshly fetched data when there is no cache).

Hits never suspend: when every chunk is ready, `read` finishes on its first `send(None)`, so the
dispatcher runs it without creating a Task. Misses go through the single-flight table: one
future per chunk in flight, shared by every read (and the prefetcher) that wants that chunk.
Missing chunks that lie back to back in the blob's compressed space are fetched with one backend
read of at most `amplify_io` bytes, as nydusd does. Each such run is its own Task, not part of
any reader, so a reader that gives up (an interrupted request) never cancels a fetch others wait
for. Decompression, digest checks and cache writes run on a small thread pool (zstandard,
blake3 and hashlib release the GIL); marking a chunk ready happens back on the event loop.

A chunk that fails (backend error, bad compression, digest mismatch) is logged once, stays
unmarked, and fails every read waiting for it with a BlobError (EIO for the guest). The next
read of it tries again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from vhostfs.rafs.blob import BlobInfo
from vhostfs.rafs.chunk import (
    IN_BOOTSTRAP,
    ZERO_FILL,
    ChunkRef,
    Compressor,
    Digester,
    decompress,
    verify_digest,
)
from vhostfs.rafs.errors import BlobError, ChunkDigestError, CorruptError
from vhostfs.segments import FileSlice, Segment
from vhostfs.storage.backend import BackendError, BlobBackend, LocalBlobFiles, blob_names
from vhostfs.storage.cache import ChunkCache
from vhostfs.storage.metrics import Metrics

log = logging.getLogger(__name__)

# Nothing the builders produce comes near this; a larger chunk is a corrupt image asking us to
# allocate without bound.
MAX_CHUNK_SIZE: Final = 1 << 26
DEFAULT_AMPLIFY_IO: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class FetchOptions:
    digest_validate: bool = True
    amplify_io: int = DEFAULT_AMPLIFY_IO  # largest merged backend read for guest misses
    sync_data: bool = False  # fdatasync the cache before marking chunks ready
    threads: int = 4  # decompress / verify / cache-write pool


@dataclass(slots=True)
class _Blob:
    info: BlobInfo
    name: str  # what the backend fetches it by
    cache: ChunkCache | None
    digester: Digester | None  # None: do not verify this blob's chunks
    write_failure_logged: bool = False


# Single-flight key. The compressed offset keeps apart refs without a chunk index.
_Key: TypeAlias = tuple[int, int | None, int]


def _key(ref: ChunkRef) -> _Key:
    return ref.blob_index, ref.chunk_index, ref.compressed_offset


@dataclass(slots=True)
class _Pending:
    """A piece of the reply that waits for a fetch."""

    slot: int  # index in the segment list
    blob: _Blob
    ref: ChunkRef
    skip: int  # from the start of the chunk (whole_chunk) or of the fetched range
    size: int
    future: asyncio.Future[bytes] | None  # None until the fetches start
    whole_chunk: bool  # the future yields the whole chunk, not just this piece


@dataclass(slots=True)
class _Decoded:
    data: bytes
    cached: bool  # written to the cache file, may be marked ready


class ImageStorage:
    """The data of one image's blobs: cached, fetched on demand, verified.

    `work_dir` None means no cache: every read of a blob chunk fetches it. `bootstrap` is the
    image file, for data stored inside it (plain EROFS). Call `aclose()` to stop fetching and
    release everything; no segment handed out may be used after that.
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
    ) -> None:
        self.options = options or FetchOptions()
        self.metrics = metrics or Metrics()
        self._backend = backend
        self._local = backend if isinstance(backend, LocalBlobFiles) else None
        self._executor = executor or ThreadPoolExecutor(
            self.options.threads, thread_name_prefix="vhostfs-chunks"
        )
        self._inflight: dict[_Key, asyncio.Future[bytes]] = {}
        self._fetches: set[asyncio.Task[Any]] = set()  # run fetches and raw range reads
        self._guest_waits = 0
        self._guest_idle = asyncio.Event()
        self._guest_idle.set()
        self._closed = False
        self._bootstrap_fd = -1
        self._bootstrap_size = 0
        self._blobs: list[_Blob] = []
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
            os.makedirs(work_dir, exist_ok=True)
        names = blob_names([blob.blob_id for blob in blobs])
        for position, (info, name) in enumerate(zip(blobs, names, strict=True)):
            if info.index != position:
                raise CorruptError(f"blob table: entry {position} says it is blob {info.index}")
            cache = None
            # Cache files are named by blob id and may be shared with other images: a blob
            # known only by its slot has no identity to share, so it is never cached.
            if work_dir is not None and info.chunk_count > 0 and name == info.blob_id:
                cache = ChunkCache(
                    work_dir, name, info.chunk_count, sync_data=self.options.sync_data
                )
            digester = info.digester if self.options.digest_validate else None
            self._blobs.append(_Blob(info, name, cache, digester))

    # --- Reading ---------------------------------------------------------------------------

    async def read(self, chunks: Sequence[ChunkRef], start: int, end: int) -> list[Segment]:
        """Segments covering file bytes [start, end), in order.

        `chunks` are the refs covering that range, as RafsImage.chunks() returns them. Raises
        BlobError (EIO) when a chunk cannot be fetched or fails verification, CorruptError when
        the refs do not cover the range.
        """
        began = time.perf_counter_ns()
        if self._closed:
            raise BlobError("image storage is closed")
        segments: list[Segment] = []
        pending: list[_Pending] = []
        misses: list[tuple[_Blob, ChunkRef]] = []
        position = start
        for ref in chunks:
            if position >= end:
                break
            if not ref.file_offset <= position < ref.file_end:
                raise CorruptError(
                    f"chunk for file bytes {ref.file_offset}..{ref.file_end} does not continue "
                    f"at byte {position}"
                )
            stop = min(end, ref.file_end)
            self._add_piece(
                segments, pending, misses, ref, position - ref.file_offset, stop - position
            )
            position = stop
        if position < end:
            raise CorruptError(f"chunks stop at file byte {position}, before {end}")
        if misses:
            # Started together, so that neighbouring misses merge into one backend read.
            futures = iter(self._start_fetches(misses, self.options.amplify_io, prefetch=False))
            for piece in pending:
                if piece.future is None:
                    piece.future = next(futures)
        if pending:
            await self._wait_for_fetches(pending)
            segments = self._fill_pending(segments, pending)
        self.metrics.observe_read(end - start, time.perf_counter_ns() - began)
        return segments

    def _add_piece(
        self,
        segments: list[Segment],
        pending: list[_Pending],
        misses: list[tuple[_Blob, ChunkRef]],
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
                raise CorruptError(
                    f"file data at image bytes {offset}..{offset + size}: outside the image "
                    f"({self._bootstrap_size} bytes)"
                )
            _append_file(segments, self._bootstrap_fd, offset, size)
            return
        blob = self._blob(ref)
        metrics = self.metrics
        if ref.chunk_index is None:
            if not ref.compressed and (ref.digest is None or blob.digester is None):
                self._add_raw_range(segments, pending, blob, ref, skip, size)
                return
        elif blob.cache is not None:
            if not 0 <= ref.chunk_index < blob.cache.chunk_count:
                raise CorruptError(
                    f"{ref.describe(blob.name)}: index outside the blob's "
                    f"{blob.cache.chunk_count} chunks"
                )
            if blob.cache.is_ready(ref.chunk_index):
                metrics.cache_hits += 1
                _append_file(segments, blob.cache.data_fd, ref.uncompressed_offset + skip, size)
                return
        _check_sizes(ref, blob.name)
        metrics.cache_misses += 1
        misses.append((blob, ref))
        pending.append(_Pending(len(segments), blob, ref, skip, size, None, True))
        segments.append(b"")

    def _add_raw_range(
        self,
        segments: list[Segment],
        pending: list[_Pending],
        blob: _Blob,
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
            _append_file(segments, local.fd, offset, size)
            return
        self.metrics.cache_misses += 1
        task = asyncio.get_running_loop().create_task(self._read_raw_range(blob, offset, size))
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)
        pending.append(_Pending(len(segments), blob, ref, 0, size, task, False))
        segments.append(b"")

    def _blob(self, ref: ChunkRef) -> _Blob:
        if not 0 <= ref.blob_index < len(self._blobs):
            raise CorruptError(
                f"chunk at file byte {ref.file_offset}: blob {ref.blob_index} is not in the "
                f"image's {len(self._blobs)} blobs"
            )
        return self._blobs[ref.blob_index]

    async def _wait_for_fetches(self, pending: list[_Pending]) -> None:
        self._guest_waits += 1
        self._guest_idle.clear()
        try:
            await asyncio.wait({piece.future for piece in pending if piece.future is not None})
        finally:
            self._guest_waits -= 1
            if not self._guest_waits:
                self._guest_idle.set()

    def _fill_pending(self, segments: list[Segment], pending: list[_Pending]) -> list[Segment]:
        for piece in pending:
            assert piece.future is not None
            data = piece.future.result()  # the first failed chunk, in file order, fails the read
            cache = piece.blob.cache
            index = piece.ref.chunk_index
            if (
                piece.whole_chunk
                and cache is not None
                and index is not None
                and cache.is_ready(index)
            ):
                offset = piece.ref.uncompressed_offset + piece.skip
                segments[piece.slot] = FileSlice(cache.data_fd, offset, piece.size)
                continue
            segments[piece.slot] = data[piece.skip : piece.skip + piece.size]
        return _coalesce(segments)

    # --- Fetching --------------------------------------------------------------------------

    def _start_fetches(
        self, wanted: Iterable[tuple[_Blob, ChunkRef]], limit: int, *, prefetch: bool
    ) -> list[asyncio.Future[bytes]]:
        """A future of the whole decoded chunk for each wanted ref, in order; fetches those
        not in flight yet, merged into runs of at most `limit` backend bytes. The refs' sizes
        must have passed _check_sizes: nothing may fail once futures are registered."""
        if self._closed:
            raise BlobError("image storage is closed")
        loop = asyncio.get_running_loop()
        futures = []
        new: dict[int, list[ChunkRef]] = {}
        for blob, ref in wanted:
            future = self._inflight.get(_key(ref))
            if future is None:
                future = loop.create_future()
                future.add_done_callback(_mark_retrieved)
                self._inflight[_key(ref)] = future
                new.setdefault(blob.info.index, []).append(ref)
            futures.append(future)
        for blob_index, refs in new.items():
            blob = self._blobs[blob_index]
            for run in _runs(refs, limit):
                fetch = loop.create_task(self._fetch_run(blob, run, prefetch))
                self._fetches.add(fetch)
                fetch.add_done_callback(self._fetches.discard)
        return futures

    async def _fetch_run(self, blob: _Blob, run: list[ChunkRef], prefetch: bool) -> None:
        offset = run[0].compressed_offset
        size = run[-1].compressed_offset + run[-1].compressed_size - offset
        loop = asyncio.get_running_loop()
        try:
            stored = await self._backend_read(blob, offset, size, prefetch)
            decoded = await loop.run_in_executor(
                self._executor, self._decode_run, blob, run, stored
            )
        except asyncio.CancelledError:
            self._settle(run, BlobError(f"{_describe_run(blob, run)}: storage closed"))
            raise
        except Exception as e:
            self.metrics.chunk_errors += len(run)
            error = e if isinstance(e, BlobError) else BlobError(f"{type(e).__name__}: {e}")
            log.error("%s: %s", _describe_run(blob, run), error)
            self._settle(run, error)
            return
        for ref, result in zip(run, decoded, strict=True):
            if isinstance(result, BlobError):
                self.metrics.chunk_errors += 1
                if isinstance(result, ChunkDigestError):
                    self.metrics.digest_failures += 1
                log.error("%s", result)
            elif result.cached and blob.cache is not None and ref.chunk_index is not None:
                blob.cache.mark_ready(ref.chunk_index)
            self._settle([ref], result)

    async def _backend_read(self, blob: _Blob, offset: int, size: int, prefetch: bool) -> bytes:
        metrics = self.metrics
        try:
            stored = await self._backend.read(blob.name, offset, size)
            if len(stored) != size:
                raise BackendError(
                    f"blob {blob.name}: backend returned {len(stored)} bytes at {offset}, "
                    f"asked for {size}"
                )
        except Exception:
            metrics.backend_errors += 1
            raise
        metrics.backend_requests += 1
        metrics.backend_bytes += size
        if prefetch:
            metrics.prefetch_requests += 1
            metrics.prefetch_bytes += size
        return stored

    def _settle(self, refs: list[ChunkRef], outcome: _Decoded | BaseException) -> None:
        for ref in refs:
            future = self._inflight.pop(_key(ref), None)
            if future is None or future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome.data)

    def _decode_run(
        self, blob: _Blob, run: list[ChunkRef], stored: bytes
    ) -> list[_Decoded | BlobError]:
        """On a pool thread: decompress, verify and cache each chunk of a fetched run."""
        base = run[0].compressed_offset
        results: list[_Decoded | BlobError] = []
        for ref in run:
            what = ref.describe(blob.name)
            start = ref.compressed_offset - base
            piece = stored if len(run) == 1 else stored[start : start + ref.compressed_size]
            compressor = blob.info.compressor if ref.compressed else Compressor.NONE
            try:
                data = decompress(compressor, piece, ref.uncompressed_size, what)
                if blob.digester is not None and ref.digest is not None:
                    verify_digest(blob.digester, data, ref.digest, what)
            except BlobError as e:
                results.append(e)
                continue
            results.append(_Decoded(data, self._write_to_cache(blob, ref, data)))
        if blob.cache is not None and any(isinstance(r, _Decoded) and r.cached for r in results):
            try:
                blob.cache.flush()
            except OSError as e:
                self._log_write_failure(blob, e)
                results = [
                    _Decoded(r.data, False) if isinstance(r, _Decoded) else r for r in results
                ]
        return results

    def _write_to_cache(self, blob: _Blob, ref: ChunkRef, data: bytes) -> bool:
        if blob.cache is None or ref.chunk_index is None:
            return False
        try:
            blob.cache.write(ref.uncompressed_offset, data)
        except OSError as e:
            self._log_write_failure(blob, e)
            return False
        return True

    def _log_write_failure(self, blob: _Blob, error: OSError) -> None:
        # The chunk is still served from memory; a full disk must not flood the log.
        if not blob.write_failure_logged:
            blob.write_failure_logged = True
            where = blob.cache.data_path if blob.cache is not None else blob.name
            log.warning("%s: cannot cache chunks: %s", where, error.strerror)

    async def _read_raw_range(self, blob: _Blob, offset: int, size: int) -> bytes:
        try:
            return await self._backend_read(blob, offset, size, prefetch=False)
        except BlobError as e:
            log.error("%s", e)
            raise

    # --- For the prefetcher ----------------------------------------------------------------

    def wants_prefetch(self, ref: ChunkRef) -> bool:
        """Whether prefetching ref would bring something into the cache."""
        if ref.blob_index < 0 or ref.chunk_index is None or ref.blob_index >= len(self._blobs):
            return False
        cache = self._blobs[ref.blob_index].cache
        return (
            cache is not None
            and 0 <= ref.chunk_index < cache.chunk_count
            and not cache.is_ready(ref.chunk_index)
            and _key(ref) not in self._inflight
        )

    def prefetch(self, refs: Sequence[ChunkRef], limit: int) -> list[asyncio.Future[bytes]]:
        """Start fetching those of these chunks the cache lacks, in runs of at most `limit`
        bytes and sharing fetches with guest reads. The fetches start before this returns, so
        the caller decides exactly when. Returns the shared futures (failures are logged
        already); await them with asyncio.wait, never cancel them."""
        wanted = [
            (self._blob(ref), ref)
            for ref in refs
            if self.wants_prefetch(ref) and _sizes_error(ref) is None
        ]
        return self._start_fetches(wanted, limit, prefetch=True) if wanted else []

    async def guest_idle(self) -> None:
        """Return once no guest read waits for a fetch."""
        while self._guest_waits:
            await self._guest_idle.wait()

    # --- Shutdown --------------------------------------------------------------------------

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        fetches = list(self._fetches)
        for fetch in fetches:
            fetch.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)
        # A fetch cancelled before it ever ran could not settle its chunks: do it here.
        for future in self._inflight.values():
            if not future.done():
                future.set_exception(BlobError("image storage closed while fetching"))
        self._inflight.clear()
        # Pool threads may still be writing to cache files: let them finish before closing.
        await asyncio.to_thread(self._executor.shutdown, wait=True)
        await asyncio.to_thread(self._backend.close)
        self._close_files()

    def _close_files(self) -> None:
        for blob in self._blobs:
            if blob.cache is not None:
                blob.cache.close()
        self._blobs = []
        if self._bootstrap_fd >= 0:
            os.close(self._bootstrap_fd)
            self._bootstrap_fd = -1


def _sizes_error(ref: ChunkRef) -> str | None:
    for name in ("compressed_size", "uncompressed_size"):
        if not 0 < getattr(ref, name) <= MAX_CHUNK_SIZE:
            return f"{name} {getattr(ref, name)} out of range"
    if ref.compressed_offset < 0 or ref.uncompressed_offset < 0:
        return "negative offset"
    return None


def _check_sizes(ref: ChunkRef, blob_name: str) -> None:
    error = _sizes_error(ref)
    if error is not None:
        raise CorruptError(f"{ref.describe(blob_name)}: {error}")


def _runs(refs: list[ChunkRef], limit: int) -> list[list[ChunkRef]]:
    """Refs grouped into backend reads: back to back in the blob, at most `limit` bytes each
    (a single chunk larger than that is read alone)."""
    runs: list[list[ChunkRef]] = []
    run_end = -1
    run_size = 0
    for ref in sorted(refs, key=lambda r: r.compressed_offset):
        if runs and ref.compressed_offset == run_end and run_size + ref.compressed_size <= limit:
            runs[-1].append(ref)
            run_size += ref.compressed_size
        else:
            runs.append([ref])
            run_size = ref.compressed_size
        run_end = ref.compressed_offset + ref.compressed_size
    return runs


def _describe_run(blob: _Blob, run: list[ChunkRef]) -> str:
    if len(run) == 1:
        return run[0].describe(blob.name)
    indexes = ", ".join(str(ref.chunk_index) for ref in run)
    end = run[-1].compressed_offset + run[-1].compressed_size
    return f"blob {blob.name} chunks {indexes} (compressed {run[0].compressed_offset}..{end})"


def _append_file(segments: list[Segment], fd: int, pos: int, size: int) -> None:
    if segments:
        last = segments[-1]
        if isinstance(last, FileSlice) and last.fd == fd and last.pos + last.size == pos:
            segments[-1] = FileSlice(fd, last.pos, last.size + size)
            return
    segments.append(FileSlice(fd, pos, size))


def _coalesce(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        if isinstance(segment, FileSlice):
            _append_file(merged, segment.fd, segment.pos, segment.size)
        elif segment:
            merged.append(segment)
    return merged


def _mark_retrieved(future: asyncio.Future[bytes]) -> None:
    # A failed chunk nobody waits for any more (its readers were interrupted) is not a bug.
    if not future.cancelled():
        future.exception()
