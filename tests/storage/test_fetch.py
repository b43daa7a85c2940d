"""The read path against real blob files, cache files and thread pools."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import os
import types
from collections.abc import Coroutine, Generator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.storage.blobs import (
    Blob,
    Gate,
    RecordingBackend,
    build_blob,
    materialize,
    refs_for,
    run,
    run_to_completion_without_suspending,
)
from vhostfs.segments import FileSlice, Segment
from vhostfs.storage.blob import IN_BOOTSTRAP, ZERO_FILL, BlobInfo, ChunkRef, Compressor, Digester
from vhostfs.storage.cache import ChunkCache
from vhostfs.storage.errors import (
    BackendError,
    ChunkDecodeError,
    ChunkDigestError,
    ChunkRefError,
    StorageClosedError,
    StorageError,
)
from vhostfs.storage.image_storage import FetchOptions, ImageStorage
from vhostfs.storage.localfs import LocalFsBackend

CHUNK = 16384


def make_storage(
    tmp_path: Path,
    blobs: list[Blob],
    *,
    cache: bool = True,
    bootstrap: Path | None = None,
    **options: object,
) -> tuple[ImageStorage, RecordingBackend]:
    backend = RecordingBackend(LocalFsBackend(dir=tmp_path / "blobs"))
    storage = ImageStorage(
        [blob.info for blob in blobs],
        backend,
        work_dir=tmp_path / "cache" if cache else None,
        bootstrap=bootstrap,
        options=FetchOptions(**options),  # type: ignore[arg-type]
    )
    return storage, backend


@pytest.fixture
def blob_dir(tmp_path: Path) -> Path:
    path = tmp_path / "blobs"
    path.mkdir()
    return path


async def read_all(storage: ImageStorage, blob: Blob, start: int = 0, end: int = -1) -> bytes:
    end = len(blob.file_bytes) if end < 0 else end
    return materialize(await storage.read(refs_for(blob, start, end), start, end))


# --- Misses, then hits ----------------------------------------------------------------------


@pytest.mark.parametrize("compressor", [Compressor.ZSTD, Compressor.NONE])
@pytest.mark.parametrize("digester", [Digester.BLAKE3, Digester.SHA256])
def test_miss_fetches_verifies_and_caches(
    tmp_path: Path, blob_dir: Path, compressor: Compressor, digester: Digester
) -> None:
    blob = build_blob(blob_dir, compressor=compressor, digester=digester, last_size=1000)

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, [blob])
        assert await read_all(storage, blob) == blob.file_bytes
        assert len(backend.requests) == 1  # all 8 chunks back to back: one merged read
        assert storage.metrics.cache_misses == 8
        cache_file = tmp_path / "cache" / f"{blob.blob_id}.blob.data"
        assert cache_file.exists()
        # Again: every chunk is a hit now, served from the cache file as one segment.
        segments = await storage.read(blob.refs, 0, len(blob.file_bytes))
        assert len(backend.requests) == 1
        assert len(segments) == 1
        assert isinstance(segments[0], FileSlice)
        assert os.path.samestat(os.fstat(segments[0].fd), os.stat(cache_file))
        assert materialize(segments) == blob.file_bytes
        await storage.aclose()

    run(scenario())


def test_hit_path_finishes_without_suspending(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir)

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, [blob])
        await read_all(storage, blob)
        # As the dispatcher runs an op: one send(None), no Task.
        start, end = 100, 5 * CHUNK + 7
        segments = run_to_completion_without_suspending(
            storage.read(refs_for(blob, start, end), start, end)
        )
        assert all(isinstance(s, FileSlice) for s in segments)
        assert len(segments) == 1  # chunks at 4K-aligned offsets, back to back in the cache
        assert materialize(segments) == blob.file_bytes[start:end]
        assert storage.metrics.cache_hits == 5 + 1 and len(backend.requests) == 1
        await storage.aclose()

    run(scenario())


def test_cache_survives_a_new_storage(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir)

    async def scenario() -> None:
        storage, _ = make_storage(tmp_path, [blob])
        await read_all(storage, blob, 0, 3 * CHUNK)
        await storage.aclose()
        storage, backend = make_storage(tmp_path, [blob])
        segments = run_to_completion_without_suspending(storage.read(blob.refs[:3], 0, 3 * CHUNK))
        assert materialize(segments) == blob.file_bytes[: 3 * CHUNK]
        assert await read_all(storage, blob) == blob.file_bytes
        assert [offset for _, offset, _ in backend.requests] == [blob.refs[3].compressed_offset]
        await storage.aclose()

    run(scenario())


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    warm=st.sets(st.integers(0, 7)),
    ranges=st.lists(st.tuples(st.integers(0, 8 * CHUNK), st.integers(1, 3 * CHUNK)), max_size=4),
)
def test_any_range_with_any_cache_state_reads_the_file(
    tmp_path_factory: pytest.TempPathFactory, warm: set[int], ranges: list[tuple[int, int]]
) -> None:
    tmp_path = tmp_path_factory.mktemp("any")
    (tmp_path / "blobs").mkdir()
    blob = build_blob(tmp_path / "blobs", last_size=5000)
    size = len(blob.file_bytes)

    async def scenario() -> None:
        storage, _ = make_storage(tmp_path, [blob])
        for index in warm:
            await storage.read([blob.refs[index]], *blob.chunk_range(index))
        for start, length in ranges:
            start = min(start, size - 1)
            end = min(start + length, size)
            assert await read_all(storage, blob, start, end) == blob.file_bytes[start:end]
        await storage.aclose()

    run(scenario())


# --- Single flight and merging --------------------------------------------------------------


def test_concurrent_reads_of_one_chunk_fetch_it_once(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir)

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, [blob])
        start, end = blob.chunk_range(2)
        results = await asyncio.gather(*(read_all(storage, blob, start, end) for _ in range(10)))
        assert results == [blob.chunks[2]] * 10
        assert len(backend.requests) == 1
        assert storage.metrics.cache_misses == 10
        await storage.aclose()

    run(scenario())


def test_adjacent_misses_merge_up_to_amplify_io(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir, chunk_count=10)
    sizes = [ref.compressed_size for ref in blob.refs]
    limit = sum(sizes[:3])  # room for three chunks, not four

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, [blob], amplify_io=limit)
        assert await read_all(storage, blob) == blob.file_bytes
        assert [size for _, _, size in backend.requests] == [
            sum(sizes[0:3]),
            sum(sizes[3:6]),
            sum(sizes[6:9]),
            sizes[9],
        ]
        assert all(size <= limit for _, _, size in backend.requests)
        await storage.aclose()

    run(scenario())


def test_misses_separated_by_gaps_or_hits_are_not_merged(tmp_path: Path, blob_dir: Path) -> None:
    gapped = build_blob(blob_dir, chunk_count=3, gap=10, seed=1)
    blob = build_blob(blob_dir, chunk_count=3, seed=2)

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, [gapped])
        await read_all(storage, gapped)
        assert len(backend.requests) == 3  # 10 stray bytes between chunks: no merging
        await storage.aclose()

        (tmp_path / "cache").rename(tmp_path / "old-cache")
        storage, backend = make_storage(tmp_path, [blob])
        await storage.read([blob.refs[1]], *blob.chunk_range(1))
        backend.requests.clear()
        await read_all(storage, blob)
        assert [(offset, size) for _, offset, size in backend.requests] == [
            (blob.refs[0].compressed_offset, blob.refs[0].compressed_size),
            (blob.refs[2].compressed_offset, blob.refs[2].compressed_size),
        ]
        await storage.aclose()

    run(scenario())


def test_a_file_that_repeats_a_chunk_fetches_it_once(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir, chunk_count=2)
    refs = [blob.refs[0], dataclasses.replace(blob.refs[0], file_offset=CHUNK)]

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, [blob])
        data = materialize(await storage.read(refs, 0, 2 * CHUNK))
        assert data == blob.chunks[0] * 2
        assert len(backend.requests) == 1
        await storage.aclose()

    run(scenario())


# --- Concurrency with hits, cancellation, shutdown ------------------------------------------


def test_hits_keep_flowing_while_a_miss_waits(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir)

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, [blob])
        await read_all(storage, blob, 0, CHUNK)
        gate = Gate()
        backend.gate = gate
        miss = asyncio.ensure_future(read_all(storage, blob, 5 * CHUNK, 6 * CHUNK))
        await gate.reached(1)  # the miss is at the backend
        assert not miss.done()
        for _ in range(100):
            segments = run_to_completion_without_suspending(storage.read(blob.refs[:1], 0, CHUNK))
            assert materialize(segments) == blob.chunks[0]
        gate.release.set()
        assert await miss == blob.chunks[5]
        await storage.aclose()

    run(scenario())


def test_an_interrupted_reader_does_not_cancel_the_shared_fetch(
    tmp_path: Path, blob_dir: Path
) -> None:
    blob = build_blob(blob_dir)

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, [blob])
        gate = Gate()
        backend.gate = gate
        first = asyncio.ensure_future(read_all(storage, blob, 0, CHUNK))
        second = asyncio.ensure_future(read_all(storage, blob, 0, CHUNK))
        await gate.reached(1)  # both readers wait for the one fetch, which is at the backend
        assert not first.done() and not second.done()
        first.cancel()
        await asyncio.wait([first])  # the cancellation has gone through
        assert not second.done()
        gate.release.set()
        assert await second == blob.chunks[0]
        assert first.cancelled()
        assert len(backend.requests) == 1
        await storage.aclose()

    run(scenario())


def test_close_fails_waiting_reads_and_later_reads(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir)

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, [blob])
        gate = Gate()  # never released
        backend.gate = gate
        waiting = asyncio.ensure_future(read_all(storage, blob, 0, CHUNK))
        await gate.reached(1)
        await storage.aclose()
        with pytest.raises(StorageClosedError, match="closed"):
            await waiting
        with pytest.raises(StorageClosedError, match="closed"):
            await read_all(storage, blob, 0, CHUNK)

    run(scenario())


# --- Bad data -------------------------------------------------------------------------------


def test_digest_mismatch_fails_once_and_heals(
    tmp_path: Path, blob_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blob = build_blob(blob_dir, compressor=Compressor.NONE, digester=Digester.SHA256)
    good = blob.path.read_bytes()
    bad = bytearray(good)
    bad[blob.refs[3].compressed_offset + 100] ^= 0xFF
    blob.path.write_bytes(bad)
    caplog.set_level(logging.ERROR, logger="vhostfs.storage")

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, [blob])
        start, end = blob.chunk_range(3)
        results = await asyncio.gather(
            *(read_all(storage, blob, start, end) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, ChunkDigestError) for r in results)
        assert results[0].errno == errno.EIO  # type: ignore[union-attr]
        lines = [r.getMessage() for r in caplog.records]
        assert len(lines) == 1
        assert blob.blob_id in lines[0] and "chunk 3" in lines[0] and "digest" in lines[0]
        assert storage.metrics.digest_failures == 1
        cache = storage._blobs[0].cache
        assert isinstance(cache, ChunkCache) and not cache.is_ready(3)
        assert cache.ready_count() == 0
        await read_all(storage, blob, 0, 3 * CHUNK)
        assert cache.ready_count() == 3

        blob.path.write_bytes(good)
        assert await read_all(storage, blob, start, end) == blob.chunks[3]
        assert cache.is_ready(3)
        # The bad chunk, fetched once more before failing; its neighbours; the healed chunk.
        assert len(backend.requests) == 4 and storage.metrics.chunk_refetches == 1
        await storage.aclose()

    run(scenario())


def test_chunks_around_a_bad_one_in_a_merged_read_are_cached(
    tmp_path: Path, blob_dir: Path
) -> None:
    blob = build_blob(blob_dir, digester=Digester.BLAKE3)
    bad = bytearray(blob.path.read_bytes())
    bad[blob.refs[4].compressed_offset + 5] ^= 0x55  # a zstd frame that no longer decodes
    blob.path.write_bytes(bad)

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, [blob])
        with pytest.raises(ChunkDecodeError, match="chunk 4"):
            await read_all(storage, blob)
        # One merged read, then the bad chunk alone once more (it might have been a corrupted
        # transfer) before it fails.
        bad_ref = blob.refs[4]
        assert backend.requests[1:] == [
            (blob.blob_id, bad_ref.compressed_offset, bad_ref.compressed_size)
        ]
        assert storage.metrics.chunk_refetches == 1
        cache = storage._blobs[0].cache
        assert isinstance(cache, ChunkCache)
        assert [cache.is_ready(i) for i in range(8)] == [True] * 4 + [False] + [True] * 3
        await storage.aclose()

    run(scenario())


def test_digests_are_not_checked_unless_asked(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir, compressor=Compressor.NONE)
    bad = bytearray(blob.path.read_bytes())
    bad[10] ^= 1
    blob.path.write_bytes(bad)

    async def scenario() -> None:
        storage, _ = make_storage(tmp_path, [blob], digest_validate=False)
        assert await read_all(storage, blob, 0, CHUNK) == bytes(bad[:CHUNK])
        await storage.aclose()

    run(scenario())


def test_a_short_blob_fails_the_read(
    tmp_path: Path, blob_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blob = build_blob(blob_dir)
    blob.path.write_bytes(blob.path.read_bytes()[: blob.refs[6].compressed_offset + 3])
    caplog.set_level(logging.ERROR, logger="vhostfs.storage")

    async def scenario() -> None:
        storage, _ = make_storage(tmp_path, [blob], amplify_io=1)
        with pytest.raises(BackendError, match=f"blob {blob.blob_id}.*past the end"):
            await read_all(storage, blob, *blob.chunk_range(6))
        assert len(caplog.records) == 1 and "chunk 6" in caplog.records[0].getMessage()
        assert await read_all(storage, blob, 0, CHUNK) == blob.chunks[0]
        await storage.aclose()

    run(scenario())


def test_refs_that_do_not_cover_the_range_are_corrupt(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir)

    async def scenario() -> None:
        storage, _ = make_storage(tmp_path, [blob])
        with pytest.raises(ChunkRefError, match="does not continue"):
            await storage.read([blob.refs[0], blob.refs[2]], 0, 3 * CHUNK)
        with pytest.raises(ChunkRefError, match="stop at file byte"):
            await storage.read(blob.refs[:2], 0, 3 * CHUNK)
        outside = ChunkRef(0, 0, 0, 10, 0, CHUNK, True, None, chunk_index=99)
        with pytest.raises(ChunkRefError, match="index outside"):
            await storage.read([outside], 0, CHUNK)
        other_blob = ChunkRef(0, 5, 0, 10, 0, CHUNK, True, None, chunk_index=0)
        with pytest.raises(ChunkRefError, match="blob 5"):
            await storage.read([other_blob], 0, CHUNK)
        huge = ChunkRef(0, 0, 0, 1 << 40, 0, CHUNK, True, None, chunk_index=1)
        with pytest.raises(ChunkRefError, match="out of range"):
            await storage.read([huge], 0, CHUNK)
        assert storage._flight._inflight == {}
        await storage.aclose()

    run(scenario())


# --- Data that needs no cache ---------------------------------------------------------------


def test_holes_bootstrap_data_and_local_devices_are_served_in_place(
    tmp_path: Path, blob_dir: Path
) -> None:
    image = tmp_path / "image.erofs"
    image.write_bytes(bytes(range(256)) * 64)
    device = blob_dir / "device-a"
    device.write_bytes(b"D" * 8192 + b"E" * 8192)
    devices = [
        BlobInfo(0, "device-a", Compressor.NONE, None, 4096, 0, 16384, 16384, 0),
    ]
    refs = [
        ChunkRef(0, IN_BOOTSTRAP, 4096, 4096, 4096, 4096, False, None),
        ChunkRef(4096, ZERO_FILL, 0, 0, 0, 4096, False, None),
        ChunkRef(8192, 0, 4096, 8192, 4096, 8192, False, None),
        ChunkRef(16384, 0, 12288, 4096, 12288, 4096, False, None),
    ]
    expected = image.read_bytes()[4096:8192] + bytes(4096) + b"D" * 4096 + b"E" * 8192

    async def scenario() -> None:
        backend = LocalFsBackend(dir=blob_dir)
        storage = ImageStorage(devices, backend, work_dir=tmp_path / "cache", bootstrap=image)
        segments = run_to_completion_without_suspending(storage.read(refs, 10, 20000))
        assert materialize(segments) == expected[10:20000]
        # The two device refs are adjacent in the device file: one segment.
        assert [type(s).__name__ for s in segments] == ["FileSlice", "bytes", "FileSlice"]
        metrics = storage.metrics
        assert (metrics.backend_requests, metrics.backend_errors) == (0, 0)
        assert not (tmp_path / "cache" / "device-a.blob.data").exists()
        with pytest.raises(ChunkRefError, match="outside the image"):
            await storage.read(
                [ChunkRef(0, IN_BOOTSTRAP, 16000, 4096, 0, 4096, False, None)], 0, 4096
            )
        await storage.aclose()

    run(scenario())


def test_without_a_cache_every_read_fetches(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir)

    async def scenario() -> None:
        storage, backend = make_storage(tmp_path, [blob], cache=False)
        for _ in range(2):
            segments = await storage.read(blob.refs, 0, len(blob.file_bytes))
            assert all(isinstance(s, bytes) for s in segments)
            assert materialize(segments) == blob.file_bytes
        assert len(backend.requests) == 2
        assert not (tmp_path / "cache").exists()
        await storage.aclose()

    run(scenario())


def test_sync_data_still_caches(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir)

    async def scenario() -> None:
        storage, _ = make_storage(tmp_path, [blob], sync_data=True)
        assert await read_all(storage, blob) == blob.file_bytes
        cache = storage._blobs[0].cache
        assert isinstance(cache, ChunkCache) and cache.ready_count() == 8
        await storage.aclose()

    run(scenario())


def test_device_ranges_through_a_remote_backend_are_read_as_asked(
    tmp_path: Path, blob_dir: Path
) -> None:
    (blob_dir / "dev").write_bytes(bytes(range(256)) * 256)
    device = BlobInfo(0, "dev", Compressor.NONE, None, 4096, 0, 65536, 65536, 0)
    ref = ChunkRef(0, 0, 8192, 32768, 8192, 32768, False, None)

    async def scenario() -> None:
        backend = RecordingBackend(LocalFsBackend(dir=blob_dir))  # offers no local files
        storage = ImageStorage([device], backend, work_dir=tmp_path / "cache")
        segments = await storage.read([ref], 100, 300)
        assert segments == [(bytes(range(256)) * 256)[8192 + 100 : 8192 + 300]]
        assert backend.requests == [("dev", 8192 + 100, 200)]
        await storage.aclose()

    run(scenario())


@types.coroutine
def _resume(coro: Coroutine[Any, Any, Any], suspended_on: Any) -> Generator[Any, Any, Any]:
    """Carry on a coroutine that already took its first step, as the dispatcher does."""
    yielded = suspended_on
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:
            try:
                yielded = coro.throw(exc)
            except StopIteration as done:
                return done.value
        else:
            try:
                yielded = coro.send(sent)
            except StopIteration as done:
                return done.value


def test_a_miss_started_outside_any_task_finishes_in_one(tmp_path: Path, blob_dir: Path) -> None:
    blob = build_blob(blob_dir)

    async def scenario() -> None:
        storage, _ = make_storage(tmp_path, [blob])
        loop = asyncio.get_running_loop()
        result: asyncio.Future[list[Segment]] = loop.create_future()

        def dispatch() -> None:  # a loop callback: no current task, like the vring handler
            assert asyncio.current_task() is None
            coro = storage.read(blob.refs[:2], 0, 2 * CHUNK)
            suspended_on = coro.send(None)
            task = loop.create_task(_resume(coro, suspended_on))
            task.add_done_callback(lambda t: result.set_result(t.result()))

        loop.call_soon(dispatch)
        assert materialize(await result) == blob.file_bytes[: 2 * CHUNK]
        await storage.aclose()

    run(scenario())


@pytest.mark.parametrize("digest_validate", [False, True])
def test_a_local_blob_stored_as_is_is_served_in_place_unless_verified(
    tmp_path: Path, blob_dir: Path, digest_validate: bool
) -> None:
    blob = build_blob(blob_dir, compressor=Compressor.NONE)

    async def scenario() -> None:
        storage = ImageStorage(
            [blob.info],
            LocalFsBackend(dir=blob_dir),
            work_dir=tmp_path / "cache",
            options=FetchOptions(digest_validate=digest_validate),
        )
        segments = await storage.read(refs_for(blob, 100, 5 * CHUNK), 100, 5 * CHUNK)
        assert materialize(segments) == blob.file_bytes[100 : 5 * CHUNK]
        in_blob = [
            isinstance(s, FileSlice) and os.path.samestat(os.fstat(s.fd), os.stat(blob.path))
            for s in segments
        ]
        cache_file = tmp_path / "cache" / f"{blob.blob_id}.blob.data"
        if digest_validate:
            # Checked once, then kept in our own cache: the blob file may change later.
            assert not any(in_blob)
            assert storage.metrics.backend_requests == 1
        else:
            assert all(in_blob)
            assert storage.metrics.backend_requests == 0
            assert not cache_file.exists() or cache_file.stat().st_blocks == 0
        await storage.aclose()

    run(scenario())


def test_a_chunk_stored_as_is_with_mismatched_sizes_is_refused(
    tmp_path: Path, blob_dir: Path
) -> None:
    blob = build_blob(blob_dir, compressor=Compressor.NONE)
    ref = dataclasses.replace(blob.refs[0], compressed_size=CHUNK - 512)

    async def scenario() -> None:
        storage = ImageStorage(
            [blob.info],
            LocalFsBackend(dir=blob_dir),
            work_dir=tmp_path / "cache",
            options=FetchOptions(digest_validate=False),
            log_failures=False,
        )
        with pytest.raises(StorageError):
            await storage.read([ref], 0, CHUNK)
        await storage.aclose()

    run(scenario())
