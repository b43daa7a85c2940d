"""The single-flight table: one fetch per missing chunk, however many readers want it.

Every chunk in flight has one future, shared by every read (and the prefetcher) that wants it.
Missing chunks of one blob that lie back to back in its compressed space are fetched as runs of
at most `limit` bytes, one backend read each, as nydusd merges them. Each run is its own Task,
never part of any reader, so a reader that gives up (an interrupted request) never cancels a
fetch others wait for. Decoding runs on the pool; marking chunks ready and settling futures
happens back on the event loop.

A chunk whose fetched bytes do not decode or verify (bad compression, digest mismatch) is
fetched once more, alone: a network backend may have handed over a corrupted body, and a
second fetch is cheap next to failing a read. If it fails again it fails for good.

A chunk that fails (backend error, bad compression, digest mismatch) is logged once (unless
the owner reports failures itself, as the offline tools do), stays unmarked, and fails every
read waiting for it with a StorageError (EIO for the guest). The next read of it tries again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from concurrent.futures import Executor
from typing import Any, TypeAlias

from vhostfs.storage.backend import BlobBackend
from vhostfs.storage.blob import ChunkRef
from vhostfs.storage.decode import Decoded, decode_run
from vhostfs.storage.errors import (
    BackendError,
    ChunkDecodeError,
    ChunkDigestError,
    StorageClosedError,
    StorageError,
)
from vhostfs.storage.metrics import Metrics
from vhostfs.storage.plan import OpenBlob

log = logging.getLogger(__name__)

# The compressed offset keeps apart refs without a chunk index.
Key: TypeAlias = tuple[int, int | None, int]


def key_of(ref: ChunkRef) -> Key:
    return ref.blob_index, ref.chunk_index, ref.compressed_offset


class SingleFlight:
    def __init__(
        self, backend: BlobBackend, executor: Executor, metrics: Metrics, *, log_failures: bool
    ) -> None:
        self._backend = backend
        self._log_failures = log_failures
        self._executor = executor
        self._metrics = metrics
        self._inflight: dict[Key, asyncio.Future[bytes]] = {}
        self._fetches: set[asyncio.Task[Any]] = set()  # run fetches and raw range reads

    def __contains__(self, ref: ChunkRef) -> bool:
        return key_of(ref) in self._inflight

    def start(
        self, wanted: Iterable[tuple[OpenBlob, ChunkRef]], limit: int, *, prefetch: bool
    ) -> list[asyncio.Future[bytes]]:
        """A future of the whole decoded chunk for each wanted ref, in order; fetches those
        not in flight yet, merged into runs of at most `limit` backend bytes. The refs' sizes
        must have passed plan.check_sizes: nothing may fail once futures are registered."""
        loop = asyncio.get_running_loop()
        futures = []
        new: dict[int, tuple[OpenBlob, list[ChunkRef]]] = {}
        for blob, ref in wanted:
            future = self._inflight.get(key_of(ref))
            if future is None:
                future = loop.create_future()
                future.add_done_callback(_mark_retrieved)
                self._inflight[key_of(ref)] = future
                new.setdefault(blob.info.index, (blob, []))[1].append(ref)
            futures.append(future)
        for blob, refs in new.values():
            for run in runs(refs, limit):
                self._track(loop.create_task(self._fetch_run(blob, run, prefetch)))
        return futures

    def read_range(self, blob: OpenBlob, offset: int, size: int) -> asyncio.Task[bytes]:
        """Just these stored bytes, uncached and not shared (they need no decoding)."""
        task = asyncio.get_running_loop().create_task(self._read_range(blob, offset, size))
        self._track(task)
        return task

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._fetches.add(task)
        task.add_done_callback(self._fetches.discard)

    async def _fetch_run(self, blob: OpenBlob, run: list[ChunkRef], prefetch: bool) -> None:
        offset = run[0].compressed_offset
        size = run[-1].compressed_offset + run[-1].compressed_size - offset
        loop = asyncio.get_running_loop()
        try:
            stored = await self._backend_read(blob, offset, size, prefetch)
            decoded = await loop.run_in_executor(self._executor, decode_run, blob, run, stored)
        except asyncio.CancelledError:
            self._settle(run, StorageClosedError(f"{describe_run(blob, run)}: storage closed"))
            raise
        except Exception as e:
            self._metrics.chunk_errors += len(run)
            error = e if isinstance(e, StorageError) else StorageError(f"{type(e).__name__}: {e}")
            if self._log_failures:
                log.error("%s: %s", describe_run(blob, run), error)
            self._settle(run, error)
            return
        for ref, result in zip(run, decoded, strict=True):
            if isinstance(result, ChunkDecodeError):
                result = await self._refetch(blob, ref, prefetch)
            if isinstance(result, StorageError):
                self._metrics.chunk_errors += 1
                if isinstance(result, ChunkDigestError):
                    self._metrics.digest_failures += 1
                if self._log_failures:
                    log.error("%s", result)
            elif result.cached and ref.chunk_index is not None:
                blob.cache.mark_ready(ref.chunk_index)
            self._settle([ref], result)

    async def _refetch(
        self, blob: OpenBlob, ref: ChunkRef, prefetch: bool
    ) -> Decoded | StorageError:
        """The chunk fetched and decoded once more, or the error that ends it."""
        self._metrics.chunk_refetches += 1
        loop = asyncio.get_running_loop()
        try:
            stored = await self._backend_read(
                blob, ref.compressed_offset, ref.compressed_size, prefetch
            )
            (result,) = await loop.run_in_executor(self._executor, decode_run, blob, [ref], stored)
        except StorageError as e:
            return e
        except Exception as e:
            return StorageError(f"{type(e).__name__}: {e}")
        return result

    async def _backend_read(self, blob: OpenBlob, offset: int, size: int, prefetch: bool) -> bytes:
        metrics = self._metrics
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

    async def _read_range(self, blob: OpenBlob, offset: int, size: int) -> bytes:
        try:
            return await self._backend_read(blob, offset, size, prefetch=False)
        except StorageError as e:
            if self._log_failures:
                log.error("%s", e)
            raise

    def _settle(self, refs: list[ChunkRef], outcome: Decoded | BaseException) -> None:
        for ref in refs:
            future = self._inflight.pop(key_of(ref), None)
            if future is None or future.done():
                continue
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome.data)

    async def aclose(self) -> None:
        """Cancel every fetch and fail every future still waiting."""
        fetches = list(self._fetches)
        for fetch in fetches:
            fetch.cancel()
        await asyncio.gather(*fetches, return_exceptions=True)
        # A fetch cancelled before it ever ran could not settle its chunks: do it here.
        for future in self._inflight.values():
            if not future.done():
                future.set_exception(StorageClosedError("image storage closed while fetching"))
        self._inflight.clear()


def runs(refs: list[ChunkRef], limit: int) -> list[list[ChunkRef]]:
    """Refs grouped into backend reads: back to back in the blob, at most `limit` bytes each
    (a single chunk larger than that is read alone)."""
    grouped: list[list[ChunkRef]] = []
    run_end = -1
    run_size = 0
    for ref in sorted(refs, key=lambda r: r.compressed_offset):
        if grouped and ref.compressed_offset == run_end and run_size + ref.compressed_size <= limit:
            grouped[-1].append(ref)
            run_size += ref.compressed_size
        else:
            grouped.append([ref])
            run_size = ref.compressed_size
        run_end = ref.compressed_offset + ref.compressed_size
    return grouped


def describe_run(blob: OpenBlob, run: list[ChunkRef]) -> str:
    if len(run) == 1:
        return run[0].describe(blob.name)
    indexes = ", ".join(str(ref.chunk_index) for ref in run)
    end = run[-1].compressed_offset + run[-1].compressed_size
    return f"blob {blob.name} chunks {indexes} (compressed {run[0].compressed_offset}..{end})"


def _mark_retrieved(future: asyncio.Future[bytes]) -> None:
    # A failed chunk nobody waits for any more (its readers were interrupted) is not a bug.
    if not future.cancelled():
        future.exception()
