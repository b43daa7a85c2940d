"""Readahead: when a file counts as read sequentially, and how far ahead it is fetched."""

from __future__ import annotations

import itertools

from vhostfs.fs.readahead import SLACK, Readahead

KiB = 1 << 10
MiB = 1 << 20
SIZE = 64 * MiB


def stream(
    ra: Readahead, ino: int, start: int, count: int, step: int = 128 * KiB
) -> list[tuple[int, int] | None]:
    starts = [start + i * step for i in range(count)]
    return [ra.after_read(ino, at, at + step, SIZE) for at in starts]


def test_a_first_read_and_a_random_one_fetch_nothing_ahead() -> None:
    ra = Readahead()
    assert ra.after_read(1, 0, 128 * KiB, SIZE) is None
    assert ra.after_read(1, 40 * MiB, 40 * MiB + 4 * KiB, SIZE) is None
    assert ra.after_read(1, 7 * MiB, 7 * MiB + 4 * KiB, SIZE) is None


def test_a_sequential_reader_gets_the_next_bytes_asked_for_once_each() -> None:
    ra = Readahead(first=1 * MiB, largest=4 * MiB)
    windows = [w for w in stream(ra, 1, 0, 64) if w is not None]
    # Nothing asked twice, nothing left out between the reader and the furthest byte asked.
    assert windows[0] == (256 * KiB, 256 * KiB + 1 * MiB)
    for (_, hi), (lo, _) in itertools.pairwise(windows):
        assert lo == hi
    reader_end = 64 * 128 * KiB
    assert windows[-1][1] > reader_end
    # The window grows to the largest and no further.
    assert windows[-1][1] - reader_end <= 4 * MiB


def test_readahead_stops_at_the_end_of_the_file() -> None:
    ra = Readahead(first=1 * MiB, largest=4 * MiB)
    size = 1 * MiB + 300 * KiB
    results = [ra.after_read(1, i * 128 * KiB, (i + 1) * 128 * KiB, size) for i in range(8)]
    asked = [w for w in results if w is not None]
    assert asked == [(256 * KiB, 256 * KiB + 1 * MiB), (256 * KiB + 1 * MiB, size)]


def test_reads_that_skip_cached_pages_still_count_as_sequential() -> None:
    ra = Readahead()
    ra.after_read(1, 0, 128 * KiB, SIZE)
    assert ra.after_read(1, 128 * KiB + SLACK, 256 * KiB + SLACK, SIZE) is not None


def test_files_are_tracked_apart_and_the_table_is_bounded() -> None:
    ra = Readahead(files=2)
    ra.after_read(1, 0, 128 * KiB, SIZE)
    ra.after_read(2, 0, 128 * KiB, SIZE)
    assert ra.after_read(1, 128 * KiB, 256 * KiB, SIZE) is not None
    ra.after_read(3, 0, 128 * KiB, SIZE)  # pushes out file 2, the least recently read
    assert ra.after_read(2, 128 * KiB, 256 * KiB, SIZE) is None
