"""The chunk-ref windows: the same refs a direct decode gives, decoded once, within budget."""

from __future__ import annotations

import random

from vhostfs.fs.file_maps import FileMaps
from vhostfs.storage.blob import ChunkRef

CHUNK = 4096
SIZES = {1: 10 * CHUNK + 100, 2: 3 * CHUNK, 3: 200 * CHUNK}


class Image:
    """Files of CHUNK-sized chunks; counts the decodes asked of it."""

    def __init__(self) -> None:
        self.decodes: list[tuple[int, int, int]] = []

    def chunks(self, ino: int, offset: int, size: int) -> list[ChunkRef]:
        self.decodes.append((ino, offset, size))
        end = min(offset + size, SIZES[ino])
        return [
            ChunkRef(n * CHUNK, 0, ino << 32 | n, CHUNK, n * CHUNK, CHUNK, False, None, n)
            for n in range(offset // CHUNK, (end - 1) // CHUNK + 1)
        ]


def test_every_range_gets_the_refs_a_direct_decode_gives() -> None:
    image = Image()
    maps = FileMaps(image.chunks, window=16 * CHUNK, budget=64)
    rng = random.Random(7)
    for _ in range(2000):
        ino = rng.choice(list(SIZES))
        offset = rng.randrange(SIZES[ino])
        length = rng.randrange(1, SIZES[ino] - offset + 1)
        assert list(maps.chunks(ino, offset, length)) == Image().chunks(ino, offset, length)


def test_a_window_is_decoded_once_while_it_is_kept() -> None:
    image = Image()
    maps = FileMaps(image.chunks, window=16 * CHUNK, budget=64)
    for offset in range(0, 16 * CHUNK, 1000):
        maps.chunks(3, offset, 500)
    assert image.decodes == [(3, 0, 16 * CHUNK)]


def test_the_budget_bounds_the_refs_kept_least_recent_first() -> None:
    image = Image()
    maps = FileMaps(image.chunks, window=16 * CHUNK, budget=32)
    maps.chunks(3, 0, 1)  # window 0: 16 refs
    maps.chunks(3, 16 * CHUNK, 1)  # window 1: 16 refs, the budget is full
    maps.chunks(3, 0, 1)  # window 0 again: kept, and now the most recent
    maps.chunks(3, 32 * CHUNK, 1)  # window 2 pushes out window 1
    image.decodes.clear()
    maps.chunks(3, 0, 1)
    maps.chunks(3, 32 * CHUNK, 1)
    assert image.decodes == []
    maps.chunks(3, 16 * CHUNK, 1)
    assert image.decodes == [(3, 16 * CHUNK, 16 * CHUNK)]


def test_a_read_across_two_windows_is_decoded_as_asked() -> None:
    image = Image()
    maps = FileMaps(image.chunks, window=16 * CHUNK, budget=64)
    assert [r.chunk_index for r in maps.chunks(3, 15 * CHUNK, 2 * CHUNK)] == [15, 16]
    assert image.decodes == [(3, 15 * CHUNK, 2 * CHUNK)]
