"""kill -9 a process that is filling the cache, many times, at random moments; after each kill a
fresh storage on the same work directory must serve every chunk marked ready with the right
bytes and without fetching it again."""

from __future__ import annotations

import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.storage.blobs import (
    Blob,
    RecordingBackend,
    build_blob,
    materialize,
    run,
    run_to_completion_without_suspending,
)
from vhostfs.storage.cache import ChunkCache
from vhostfs.storage.image_storage import ImageStorage
from vhostfs.storage.localfs import LocalFsBackend

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 30
CHUNKS = 1024
CHUNK_SIZE = 8192
SEED = 7


def start_child(blob_dir: Path, work_dir: Path) -> subprocess.Popen[str]:
    arguments = [blob_dir, work_dir, CHUNKS, CHUNK_SIZE, SEED]
    return subprocess.Popen(
        [sys.executable, "-m", "tests.storage.crash_child", *map(str, arguments)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


def wait_for_line(child: subprocess.Popen[str], expected: str, timeout: float) -> None:
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    assert ready, f"child did not say {expected!r} within {timeout} s"
    assert child.stdout.readline().strip() == expected


def test_kill_9_never_leaves_a_wrong_ready_chunk(tmp_path: Path) -> None:
    blob_dir = tmp_path / "blobs"
    blob_dir.mkdir()
    blob = build_blob(blob_dir, chunk_count=CHUNKS, chunk_size=CHUNK_SIZE, seed=SEED)
    rng = random.Random(1234)
    generation = 0
    checked_ready = 0
    for _ in range(ROUNDS):
        work_dir = tmp_path / f"cache-{generation}"
        child = start_child(blob_dir, work_dir)
        try:
            wait_for_line(child, "go", timeout=20)
            time.sleep(rng.uniform(0, 0.1))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            assert child.stdout is not None
            child.stdout.close()
        ready = run(check_cache(blob_dir, work_dir, blob))
        checked_ready += ready
        if ready == CHUNKS:
            generation += 1  # full: start over so that later kills still land mid-fetch
    assert checked_ready > 0


async def check_cache(blob_dir: Path, work_dir: Path, blob: Blob) -> int:
    backend = RecordingBackend(LocalFsBackend(dir=blob_dir))
    storage = ImageStorage([blob.info], backend, work_dir=work_dir)
    cache = storage._blobs[0].cache
    assert isinstance(cache, ChunkCache)
    # The map is replaced atomically: after a kill it is either valid or not there yet.
    assert cache.discarded_reason in (None, "missing", "new data file")
    ready = [i for i in range(CHUNKS) if cache.is_ready(i)]
    for index in ready:
        ref = blob.refs[index]
        segments = run_to_completion_without_suspending(
            storage.read([ref], ref.file_offset, ref.file_end)
        )
        assert materialize(segments) == blob.chunks[index], f"chunk {index} is wrong"
    assert len(backend.requests) == 0, "a chunk marked ready was fetched again"
    # Chunks that were not marked are fetched and served correctly.
    missing = [i for i in range(CHUNKS) if not cache.is_ready(i)][:3]
    for index in missing:
        ref = blob.refs[index]
        segments = await storage.read([ref], ref.file_offset, ref.file_end)
        assert materialize(segments) == blob.chunks[index]
    await storage.aclose()
    return len(ready)
