"""The per-blob cache files: ready bits persist, and a map we cannot vouch for is discarded."""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from vhostfs.storage.cache import MAP_HEADER, MAP_MAGIC, MAP_VERSION, ChunkCache
from vhostfs.storage.errors import CacheError

BLOB = "b" * 64
COUNT = 20


def open_cache(work_dir: Path, count: int = COUNT) -> ChunkCache:
    return ChunkCache(work_dir, BLOB, count, sync_data=False)


def warm(work_dir: Path, indexes: list[int]) -> None:
    cache = open_cache(work_dir)
    for index in indexes:
        cache.write(index * 4096, bytes([index]) * 4096)
        cache.mark_ready(index)
    cache.close()


def test_ready_bits_and_data_persist(tmp_path: Path) -> None:
    warm(tmp_path, [0, 7, 8, 19])
    cache = open_cache(tmp_path)
    assert cache.discarded_reason is None
    assert [i for i in range(COUNT) if cache.is_ready(i)] == [0, 7, 8, 19]
    assert cache.ready_count() == 4
    assert os.pread(cache.data_fd, 4096, 8 * 4096) == bytes([8]) * 4096
    cache.close()
    # Sparse: only the written chunks take space.
    data = tmp_path / f"{BLOB}.blob.data"
    assert data.stat().st_size == 20 * 4096
    assert data.stat().st_blocks * 512 < 20 * 4096


def test_a_new_cache_starts_empty(tmp_path: Path) -> None:
    cache = open_cache(tmp_path)
    assert cache.discarded_reason == "new data file"
    assert cache.ready_count() == 0
    assert (tmp_path / f"{BLOB}.chunk_map").stat().st_size == MAP_HEADER.size + 3
    cache.close()


def test_two_instances_see_each_others_bits(tmp_path: Path) -> None:
    first = open_cache(tmp_path)
    second = open_cache(tmp_path)
    first.write(0, b"x" * 10)
    first.mark_ready(5)
    assert second.is_ready(5)
    first.close()
    second.close()


def _patch_header(**fields: int | bytes) -> Callable[[bytearray], None]:
    def patch(content: bytearray) -> None:
        magic, version, count, ino = MAP_HEADER.unpack_from(content)
        values = {"magic": magic, "version": version, "count": count, "ino": ino, **fields}
        MAP_HEADER.pack_into(
            content, 0, values["magic"], values["version"], values["count"], values["ino"]
        )

    return patch


CORRUPTIONS: dict[str, tuple[Callable[[bytearray], None], str]] = {
    "magic": (_patch_header(magic=b"NYDUSMAP"), "bad magic"),
    "version": (_patch_header(version=MAP_VERSION + 1), "version"),
    "count": (_patch_header(count=COUNT + 1), "made for 21 chunks"),
    "inode": (_patch_header(ino=12345), "another data file"),
    "truncated": (lambda c: c.__delitem__(slice(-1, None)), "bytes, expected"),
    "extended": (lambda c: c.extend(b"\xff"), "bytes, expected"),
    "garbage": (lambda c: c.__setitem__(slice(0, None), os.urandom(len(c))), "bad magic"),
    "spare bits": (lambda c: c.__setitem__(-1, c[-1] | 0x80), "past the last chunk"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_map_that_does_not_check_out_is_discarded(
    tmp_path: Path, corruption: str, caplog: pytest.LogCaptureFixture
) -> None:
    warm(tmp_path, list(range(COUNT)))
    map_path = tmp_path / f"{BLOB}.chunk_map"
    content = bytearray(map_path.read_bytes())
    damage, reason = CORRUPTIONS[corruption]
    damage(content)
    map_path.write_bytes(content)

    caplog.set_level(logging.WARNING, logger="vhostfs.storage")
    cache = open_cache(tmp_path)
    assert cache.discarded_reason is not None and reason in cache.discarded_reason
    assert cache.ready_count() == 0
    assert len(caplog.records) == 1 and "discarding" in caplog.records[0].getMessage()
    cache.mark_ready(3)
    cache.close()
    # The replacement is a valid map.
    cache = open_cache(tmp_path)
    assert cache.discarded_reason is None and cache.ready_count() == 1
    cache.close()


def test_a_deleted_data_file_invalidates_the_map(tmp_path: Path) -> None:
    warm(tmp_path, [1, 2, 3])
    (tmp_path / f"{BLOB}.blob.data").unlink()
    cache = open_cache(tmp_path)
    assert cache.discarded_reason == "new data file"
    assert cache.ready_count() == 0
    cache.close()


def test_a_map_for_another_chunk_count_is_discarded(tmp_path: Path) -> None:
    warm(tmp_path, [1])
    cache = open_cache(tmp_path, count=COUNT + 8)
    assert cache.discarded_reason is not None and "made for 20 chunks" in cache.discarded_reason
    cache.close()


def test_a_nydusd_map_is_not_trusted(tmp_path: Path) -> None:
    (tmp_path / f"{BLOB}.blob.data").write_bytes(b"")
    # Whatever nydusd's own layout: not ours, so everything is fetched again.
    (tmp_path / f"{BLOB}.chunk_map").write_bytes(struct.pack("<II", 0x434D4150, 1) + b"\xff" * 4088)
    cache = open_cache(tmp_path)
    assert cache.discarded_reason is not None and cache.ready_count() == 0
    cache.close()


@pytest.mark.parametrize("blob_id", ["", ".", "..", "a/b", "../x", "a\0b", "x" * 250])
def test_ids_that_cannot_name_a_file_are_refused(tmp_path: Path, blob_id: str) -> None:
    with pytest.raises(CacheError, match="cannot name a cache file"):
        ChunkCache(tmp_path, blob_id, 1, sync_data=False)
    assert list(tmp_path.iterdir()) == []


def test_magic_is_ours() -> None:
    assert MAP_MAGIC == b"vhfsCMAP"


def test_the_longest_id_that_fits(tmp_path: Path) -> None:
    blob_id = "x" * (255 - len(".blob.data"))
    cache = ChunkCache(tmp_path, blob_id, 3, sync_data=False)
    cache.mark_ready(2)
    cache.close()
    cache = ChunkCache(tmp_path, blob_id, 3, sync_data=False)
    assert cache.discarded_reason is None and cache.is_ready(2)
    cache.close()
