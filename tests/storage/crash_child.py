"""Run by test_crash_safety: fetch chunks of a blob into a cache until killed.

    python -m tests.storage.crash_child BLOB_DIR WORK_DIR CHUNK_COUNT CHUNK_SIZE SEED

Reads runs of 1 to 4 chunks in a random order, several at once, with a random amplify_io, so
that a kill lands anywhere: mid backend read, mid decompression, mid cache write, between a
write and its mark. Prints "go" once the storage is open, "full" once every chunk is cached.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
from pathlib import Path

from tests.storage.blobs import build_blob, run
from vhostfs.storage.image_storage import FetchOptions, ImageStorage
from vhostfs.storage.localfs import LocalFsBackend


async def fetch_forever(blob_dir: Path, work_dir: Path, count: int, size: int, seed: int) -> None:
    blob = build_blob(blob_dir, chunk_count=count, chunk_size=size, seed=seed, write=False)
    rng = random.Random(os.getpid())
    storage = ImageStorage(
        [blob.info],
        LocalFsBackend(dir=blob_dir),
        work_dir=work_dir,
        options=FetchOptions(amplify_io=rng.choice([1, 20000, 1 << 20])),
    )
    print("go", flush=True)
    starts = list(range(count))
    rng.shuffle(starts)

    async def reader(mine: list[int]) -> None:
        for first in mine:
            last = min(first + rng.randint(1, 4), count)
            refs = blob.refs[first:last]
            await storage.read(refs, refs[0].file_offset, refs[-1].file_end)

    await asyncio.gather(*(reader(starts[i::4]) for i in range(4)))
    print("full", flush=True)
    await asyncio.sleep(3600)


if __name__ == "__main__":
    blob_dir, work_dir, count, size, seed = sys.argv[1:]
    run(fetch_forever(Path(blob_dir), Path(work_dir), int(count), int(size), int(seed)))
