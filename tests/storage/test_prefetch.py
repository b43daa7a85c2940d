"""Prefetch: warms the cache under a bandwidth limit, behind guest reads, sharing their fetches."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.storage.blobs import (
    Blob,
    Gate,
    RecordingBackend,
    VirtualClock,
    build_blob,
    materialize,
    run,
    yield_to_loop,
)
from vhostfs.storage.blob import IN_BOOTSTRAP, ZERO_FILL, ChunkRef, Compressor
from vhostfs.storage.cache import ChunkCache
from vhostfs.storage.image_storage import FetchOptions, ImageStorage
from vhostfs.storage.localfs import LocalFsBackend
from vhostfs.storage.prefetch import Prefetcher, TokenBucket

CHUNK = 16384


@pytest.fixture
def blob_dir(tmp_path: Path) -> Path:
    path = tmp_path / "blobs"
    path.mkdir()
    return path


class StallingBucket(TokenBucket):
    """Lets `passes` takes through, then holds the next one until cancelled."""

    def __init__(self, passes: int) -> None:
        super().__init__(1)
        self.passes = passes
        self.stalled = asyncio.Event()

    async def take(self, amount: int) -> None:
        if self.passes:
            self.passes -= 1
            return
        self.stalled.set()
        await asyncio.Event().wait()


def make_storage(tmp_path: Path, blob: Blob) -> tuple[ImageStorage, RecordingBackend]:
    backend = RecordingBackend(LocalFsBackend(dir=tmp_path / "blobs"))
    storage = ImageStorage(
        [blob.info], backend, work_dir=tmp_path / "cache", options=FetchOptions()
    )
    return storage, backend


def test_token_bucket_holds_the_rate() -> None:
    clock = VirtualClock()

    async def scenario() -> None:
        bucket = TokenBucket(4 << 20, burst=0, clock=clock, sleep=clock.sleep)
        for _ in range(8):
            await bucket.take(128 << 10)

    run(scenario())
    assert clock.slept == pytest.approx(0.25)  # 1 MiB at 4 MiB/s
    assert clock.sleeps == 8


def test_token_bucket_lets_the_burst_through_at_once() -> None:
    clock = VirtualClock()

    async def scenario() -> None:
        bucket = TokenBucket(1 << 20, clock=clock, sleep=clock.sleep)  # burst: a tenth
        await bucket.take((1 << 20) // 10)
        assert clock.sleeps == 0
        await bucket.take(1 << 20)

    run(scenario())
    assert clock.slept == pytest.approx(1.0)


def test_token_bucket_unlimited_never_waits() -> None:
    clock = VirtualClock()

    async def scenario() -> None:
        bucket = TokenBucket(0, clock=clock, sleep=clock.sleep)
        for _ in range(1000):
            await bucket.take(1 << 30)

    run(scenario())
    assert clock.sleeps == 0


def test_prefetch_warms_everything_once(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir, chunk_count=32)
    extras = [
        ChunkRef(0, IN_BOOTSTRAP, 0, 10, 0, 10, False, None),
        ChunkRef(0, ZERO_FILL, 0, 0, 0, 10, False, None),
    ]

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, blob)
        await storage.read(blob.refs[5:7], *blob.chunk_range(5)[:1], blob.chunk_range(6)[1])
        backend.requests.clear()
        prefetcher = Prefetcher(storage, merging_size=4 * CHUNK)
        prefetcher.start([*extras, *blob.refs, *blob.refs])  # repeats are skipped
        await prefetcher.wait()
        cache = storage._blobs[0].cache
        assert isinstance(cache, ChunkCache) and cache.ready_count() == 32
        assert prefetcher.stats.chunks == 30 and prefetcher.stats.failed_chunks == 0
        assert sum(size for _, _, size in backend.requests) == sum(
            ref.compressed_size for i, ref in enumerate(blob.refs) if i not in (5, 6)
        )
        assert storage.metrics.prefetch_bytes == sum(size for _, _, size in backend.requests)
        assert all(size <= 4 * CHUNK for _, _, size in backend.requests)
        assert materialize(await storage.read(blob.refs, 0, 32 * CHUNK)) == blob.file_bytes
        await storage.aclose()

    run(scenario())


@pytest.mark.parametrize("rate", [0, 1 << 20])
def test_prefetch_respects_the_bandwidth_limit(tmp_path: Path, blob_dir: Path, rate: int) -> None:
    blob = build_blob(blob_dir, chunk_count=32, compressor=Compressor.NONE)
    total = 32 * CHUNK  # 512 KiB stored

    clock = VirtualClock()

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, blob)
        prefetcher = Prefetcher(storage, bandwidth_rate=rate, merging_size=4 * CHUNK)
        # Counted in tokens: the time the bucket makes the prefetch wait, not wall time.
        prefetcher._bucket = TokenBucket(rate, clock=clock, sleep=clock.sleep)
        prefetcher.start(blob.refs)
        await prefetcher.wait()
        assert backend.returned_bytes == total
        assert prefetcher.stats.bytes == total and prefetcher.stats.batches == 8
        await storage.aclose()

    run(scenario())
    if rate:
        assert clock.slept == pytest.approx((total - rate // 10) / rate)  # the burst goes at once
    else:
        assert clock.sleeps == 0


def test_prefetch_waits_while_a_guest_read_misses(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir, chunk_count=64, compressor=Compressor.NONE)
    guest_ref = blob.refs[63]

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, blob)
        prefetch_gate = Gate()
        guest_gate = Gate()

        async def gate(blob_id: str, offset: int, size: int) -> None:
            if offset == guest_ref.compressed_offset:
                await guest_gate(blob_id, offset, size)
            else:
                await prefetch_gate(blob_id, offset, size)

        backend.gate = gate
        prefetcher = Prefetcher(storage, merging_size=CHUNK, max_batches=2)
        prefetcher.start(blob.refs[:60])
        await prefetch_gate.reached(2)  # both batch slots are busy at the backend
        guest = asyncio.ensure_future(storage.read([guest_ref], *blob.chunk_range(63)))
        await guest_gate.reached(1)
        requests_when_guest_began = len(backend.requests)
        # The prefetch batches in flight finish, freeing their slots while the guest waits.
        prefetch_gate.release.set()
        await asyncio.wait(list(prefetcher._batches))
        await yield_to_loop()  # room for the prefetcher to start more, were it not paused
        assert len(backend.requests) == requests_when_guest_began, "prefetch did not pause"
        assert not prefetcher.done
        guest_gate.release.set()
        assert materialize(await guest) == blob.chunks[63]
        await prefetcher.wait()
        assert len(backend.requests) == 61
        await storage.aclose()

    run(scenario())


def test_a_guest_read_joins_a_chunk_being_prefetched(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir, chunk_count=4)

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, blob)
        gate = Gate()
        backend.gate = gate
        prefetcher = Prefetcher(storage, merging_size=1)
        prefetcher.start(blob.refs)
        await gate.reached(4)  # every chunk is being prefetched
        guest = asyncio.ensure_future(storage.read(blob.refs[:1], *blob.chunk_range(0)))
        await yield_to_loop()  # room for the guest read to fetch, were it not joining
        assert not guest.done()
        assert len(backend.requests) == 4  # no second fetch of chunk 0
        gate.release.set()
        assert materialize(await guest) == blob.chunks[0]
        await prefetcher.wait()
        assert len(backend.requests) == 4
        await storage.aclose()

    run(scenario())


def test_stop_cancels_cleanly(
    tmp_path: Path, blob_dir: Path, recwarn: pytest.WarningsRecorder
) -> None:
    blob = build_blob(blob_dir, chunk_count=64, compressor=Compressor.NONE)

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, blob)
        prefetcher = Prefetcher(storage, bandwidth_rate=256 << 10, merging_size=CHUNK)
        bucket = StallingBucket(passes=3)
        prefetcher._bucket = bucket
        prefetcher.start(blob.refs)
        await bucket.stalled.wait()  # three batches started, the fourth waits for tokens
        # stop() must not wait for the bandwidth limit (here: forever); the bound is a guard.
        await asyncio.wait_for(prefetcher.stop(), 10)
        assert prefetcher.done
        fetched = len(backend.requests)
        assert fetched == 3
        await yield_to_loop()
        assert len(backend.requests) == fetched
        # The storage serves on, and closes with nothing left running.
        data = materialize(await storage.read(blob.refs[-1:], *blob.chunk_range(63)))
        assert data == blob.chunks[63]
        await storage.aclose()
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert leftover == []

    run(scenario())
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_closing_the_storage_under_a_prefetch_stops_it(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir, chunk_count=64, compressor=Compressor.NONE)

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, blob)
        gate = Gate(holds=lambda *_: False)
        backend.gate = gate
        prefetcher = Prefetcher(storage, bandwidth_rate=256 << 10, merging_size=CHUNK)
        prefetcher.start(blob.refs)
        await gate.reached(1)  # prefetching has begun
        await storage.aclose()
        await asyncio.wait_for(prefetcher.wait(), 2)
        assert prefetcher.done

    run(scenario())
