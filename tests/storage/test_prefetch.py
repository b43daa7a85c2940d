"""Prefetch: warms the cache under a bandwidth limit, behind guest reads, sharing their fetches."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from tests.storage.blobs import Blob, RecordingBackend, build_blob, materialize, run
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


def make_storage(tmp_path: Path, blob: Blob) -> tuple[ImageStorage, RecordingBackend]:
    backend = RecordingBackend(LocalFsBackend(dir=tmp_path / "blobs"))
    storage = ImageStorage(
        [blob.info], backend, work_dir=tmp_path / "cache", options=FetchOptions()
    )
    return storage, backend


def test_token_bucket_holds_the_rate() -> None:
    async def scenario() -> float:
        bucket = TokenBucket(4 << 20, burst=0)
        began = time.monotonic()
        for _ in range(8):
            await bucket.take(128 << 10)
        return time.monotonic() - began

    assert 0.22 <= run(scenario()) <= 0.6  # 1 MiB at 4 MiB/s


def test_token_bucket_unlimited_never_waits() -> None:
    async def scenario() -> None:
        bucket = TokenBucket(0)
        for _ in range(1000):
            await bucket.take(1 << 30)

    began = time.monotonic()
    run(scenario())
    assert time.monotonic() - began < 0.5


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

    async def scenario() -> float:
        storage, backend = make_storage(tmp_path, blob)
        prefetcher = Prefetcher(storage, bandwidth_rate=rate, merging_size=4 * CHUNK)
        began = time.monotonic()
        prefetcher.start(blob.refs)
        await prefetcher.wait()
        elapsed = time.monotonic() - began
        assert backend.returned_bytes == total
        await storage.aclose()
        return elapsed

    elapsed = run(scenario())
    if rate:
        expected = (total - rate // 10) / rate  # the burst goes at once
        assert expected * 0.9 <= elapsed <= expected + 1.0
    else:
        assert elapsed < 0.3


def test_prefetch_waits_while_a_guest_read_misses(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir, chunk_count=64, compressor=Compressor.NONE)
    guest_ref = blob.refs[63]

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, blob)
        release_guest = asyncio.Event()
        guest_waiting = asyncio.Event()

        async def gate(blob_id: str, offset: int, size: int) -> None:
            if offset == guest_ref.compressed_offset:
                guest_waiting.set()
                await release_guest.wait()
            else:
                await asyncio.sleep(0.003)  # a slowish backend for prefetch traffic

        backend.gate = gate
        prefetcher = Prefetcher(storage, merging_size=CHUNK, max_batches=2)
        prefetcher.start(blob.refs[:60])
        await asyncio.sleep(0.02)
        guest = asyncio.ensure_future(storage.read([guest_ref], *blob.chunk_range(63)))
        await guest_waiting.wait()
        requests_when_guest_began = len(backend.requests)
        await asyncio.sleep(0.05)
        assert len(backend.requests) == requests_when_guest_began, "prefetch did not pause"
        assert not prefetcher.done
        release_guest.set()
        assert materialize(await guest) == blob.chunks[63]
        await prefetcher.wait()
        assert len(backend.requests) == 61
        await storage.aclose()

    run(scenario())


def test_a_guest_read_joins_a_chunk_being_prefetched(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir, chunk_count=4)

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, blob)
        release = asyncio.Event()

        async def hold(blob_id: str, offset: int, size: int) -> None:
            await release.wait()

        backend.gate = hold
        prefetcher = Prefetcher(storage, merging_size=1)
        prefetcher.start(blob.refs)
        await asyncio.sleep(0.01)
        in_flight = len(backend.requests)
        guest = asyncio.ensure_future(storage.read(blob.refs[:1], *blob.chunk_range(0)))
        await asyncio.sleep(0.01)
        assert len(backend.requests) == in_flight  # no second fetch of chunk 0
        release.set()
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
        prefetcher.start(blob.refs)
        await asyncio.sleep(0.1)
        began = time.monotonic()
        await prefetcher.stop()
        assert time.monotonic() - began < 0.1
        assert prefetcher.done
        fetched = len(backend.requests)
        assert 0 < fetched < 64
        await asyncio.sleep(0.1)
        assert len(backend.requests) == fetched
        # The storage serves on, and closes with nothing left running.
        assert materialize(await storage.read(blob.refs[-1:], *blob.chunk_range(63)))
        await storage.aclose()
        leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert leftover == []

    run(scenario())
    assert not [w for w in recwarn if "never awaited" in str(w.message)]


def test_closing_the_storage_under_a_prefetch_stops_it(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir, chunk_count=64, compressor=Compressor.NONE)

    async def scenario() -> None:
        storage, _ = make_storage(tmp_path, blob)
        prefetcher = Prefetcher(storage, bandwidth_rate=256 << 10, merging_size=CHUNK)
        prefetcher.start(blob.refs)
        await asyncio.sleep(0.05)
        await storage.aclose()
        await asyncio.wait_for(prefetcher.wait(), 2)
        assert prefetcher.done

    run(scenario())
