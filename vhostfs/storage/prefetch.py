"""Background prefetch: warm the chunk cache ahead of the guest, without getting in its way.

The file system hands over the chunk refs to warm (the image's prefetch table, a
`--prefetch-files` list, or every file for `prefetch_all`), as an iterable that is consumed
lazily, so walking a large image costs nothing up front. Refs are cut into batches: chunks of one
blob that lie back to back, at most `merging_size` bytes, skipping what is cached or already in
flight. Each batch goes through the storage's single-flight table, so a chunk the guest and the
prefetcher both want is fetched once.

The guest always goes first: before each batch the prefetcher waits until no guest read is
waiting for a fetch, and it yields to the event loop between batches. A token bucket holds the
backend bytes it starts to `bandwidth_rate` per second (0: unlimited), with a burst of a tenth
of a second's worth. At most `max_batches` batches are in flight at once (the config's
`threads_count`: nydusd runs that many worker threads, here batches are coroutines).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field

from vhostfs.storage.blob import ChunkRef
from vhostfs.storage.defaults import DEFAULT_MERGING_SIZE, DEFAULT_PREFETCH_CONCURRENCY
from vhostfs.storage.image_storage import ImageStorage

log = logging.getLogger(__name__)


class TokenBucket:
    """Allows `rate` bytes per second on average, `burst` at once.

    take() may overdraw; the debt is paid by sleeping, so concurrent takers queue up fairly and
    the long-run rate holds whatever sizes they ask for.
    """

    def __init__(
        self,
        rate: int,
        burst: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.rate = rate
        self.burst = rate // 10 if burst is None else burst
        self._clock = clock  # both replaceable, so tests can count tokens, not wall time
        self._sleep = sleep
        self._tokens = float(self.burst)
        self._last = clock()

    async def take(self, amount: int) -> None:
        if self.rate <= 0:
            return
        now = self._clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= amount
        if self._tokens < 0:
            await self._sleep(-self._tokens / self.rate)


@dataclass(slots=True)
class PrefetchStats:
    batches: int = 0
    chunks: int = 0
    bytes: int = 0  # compressed bytes asked for (chunks already in flight included)
    failed_chunks: int = 0


@dataclass(slots=True)
class _Batch:
    refs: list[ChunkRef] = field(default_factory=list)
    size: int = 0

    @property
    def end(self) -> int:
        last = self.refs[-1]
        return last.compressed_offset + last.compressed_size


class Prefetcher:
    def __init__(
        self,
        storage: ImageStorage,
        *,
        bandwidth_rate: int = 0,
        merging_size: int = DEFAULT_MERGING_SIZE,
        max_batches: int = DEFAULT_PREFETCH_CONCURRENCY,
    ) -> None:
        self._storage = storage
        self._bucket = TokenBucket(bandwidth_rate)
        self._merging_size = max(merging_size, 1)
        self._slots = asyncio.Semaphore(max(max_batches, 1))
        self._task: asyncio.Task[None] | None = None
        self._batches: set[asyncio.Task[None]] = set()
        self.stats = PrefetchStats()

    def start(self, refs: Iterable[ChunkRef]) -> None:
        """Begin warming these chunks in the background (call on the event loop)."""
        if self._task is not None:
            raise RuntimeError("prefetch already started")
        self._task = asyncio.get_running_loop().create_task(self._run(refs))

    @property
    def done(self) -> bool:
        return self._task is not None and self._task.done()

    async def wait(self) -> None:
        """Until every batch has been fetched (or has failed)."""
        if self._task is not None:
            await asyncio.wait([self._task])  # neither cancels it nor raises if it was stopped

    async def stop(self) -> None:
        """Cancel what is left and wait until nothing of the prefetch runs any more. Fetches
        already sent to the backend finish in the storage, for whoever else wants them."""
        if self._task is None:
            return
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def aclose(self) -> None:
        """The same as stop(), under the name the other closable parts use."""
        await self.stop()

    async def _run(self, refs: Iterable[ChunkRef]) -> None:
        try:
            for batch in self._cut(refs):
                await self._slots.acquire()
                await self._bucket.take(batch.size)
                # Checked last, right before the fetches start: no new prefetch traffic while
                # a guest read waits for the backend.
                await self._storage.guest_idle()
                self._start_batch(batch)
                await asyncio.sleep(0)  # let queued guest requests in between batches
            await asyncio.gather(*self._batches)
        except asyncio.CancelledError:
            for fetch in list(self._batches):
                fetch.cancel()
            await asyncio.gather(*self._batches, return_exceptions=True)
            raise
        except Exception as e:  # the storage closed under us, a corrupt ref
            log.warning("prefetch stopped: %s", e)
        else:
            stats = self.stats
            log.info(
                "prefetch done: %d chunks, %d bytes in %d batches, %d failed",
                stats.chunks,
                stats.bytes,
                stats.batches,
                stats.failed_chunks,
            )

    def _start_batch(self, batch: _Batch) -> asyncio.Task[None]:
        self.stats.batches += 1
        self.stats.chunks += len(batch.refs)
        self.stats.bytes += batch.size
        try:
            fetching = self._storage.prefetch(batch.refs, self._merging_size)
        except BaseException:
            self._slots.release()
            raise
        fetch = asyncio.get_running_loop().create_task(self._finish(fetching))
        self._batches.add(fetch)
        fetch.add_done_callback(self._batches.discard)
        return fetch

    async def _finish(self, fetching: list[asyncio.Future[bytes]]) -> None:
        try:
            if fetching:
                await asyncio.wait(fetching)
                failed = sum(1 for future in fetching if future.exception() is not None)
                self.stats.failed_chunks += failed
        finally:
            self._slots.release()

    def _cut(self, refs: Iterable[ChunkRef]) -> Iterator[_Batch]:
        """Batches of chunks worth fetching, checked just before each batch is handed out."""
        batch = _Batch()
        seen: set[tuple[int, int | None]] = set()
        for ref in refs:
            key = (ref.blob_index, ref.chunk_index)
            if key in seen or not self._storage.wants_prefetch(ref):
                continue
            seen.add(key)
            if batch.refs and not self._extends(batch, ref):
                yield batch
                batch = _Batch()
            batch.refs.append(ref)
            batch.size += ref.compressed_size
        if batch.refs:
            yield batch

    def _extends(self, batch: _Batch, ref: ChunkRef) -> bool:
        return (
            ref.blob_index == batch.refs[0].blob_index
            and ref.compressed_offset == batch.end
            and batch.size + ref.compressed_size <= self._merging_size
        )
