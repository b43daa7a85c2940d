"""The blocking facade the offline tools read through: the daemon's storage, minus the cache."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.storage.blobs import build_blob
from vhostfs.storage import (
    ChunkDecodeError,
    ConfigError,
    RafsConfig,
    StorageClosedError,
    SyncStorage,
)


def test_reads_decode_and_verify_like_the_server(tmp_path: Path) -> None:
    blob = build_blob(tmp_path)
    config = RafsConfig.from_flags(blob_dir=tmp_path, cache_dir=tmp_path / "cache")
    with SyncStorage(config, [blob.info]) as storage:
        assert storage.read(blob.refs, 0, len(blob.file_bytes)) == blob.file_bytes
        start, end = 100, 3 * 16384 + 5
        assert storage.read(blob.refs[:4], start, end) == blob.file_bytes[start:end]
        assert storage.blob_size(blob.info) == blob.path.stat().st_size
        ref = blob.refs[2]
        stored = storage.read_blob(blob.info, ref.compressed_offset, ref.compressed_size)
        assert stored == blob.stored[2]
    assert not (tmp_path / "cache").exists()  # a tool reads each chunk once: no cache


def test_failures_are_raised_not_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    blob = build_blob(tmp_path)
    damaged = bytearray(blob.path.read_bytes())
    damaged[blob.refs[1].compressed_offset + 5] ^= 0x55
    blob.path.write_bytes(bytes(damaged))
    with (
        caplog.at_level(logging.DEBUG, logger="vhostfs.storage"),
        SyncStorage(RafsConfig.from_flags(blob_dir=tmp_path), [blob.info]) as storage,
    ):
        with pytest.raises(ChunkDecodeError, match="chunk 1"):
            storage.read(blob.refs[1:2], *blob.chunk_range(1))
        assert storage.read(blob.refs[:1], *blob.chunk_range(0)) == blob.chunks[0]
    assert caplog.records == []


def test_close_is_final_and_idempotent(tmp_path: Path) -> None:
    blob = build_blob(tmp_path)
    storage = SyncStorage(RafsConfig.from_flags(blob_dir=tmp_path), [blob.info])
    storage.close()
    storage.close()
    with pytest.raises(StorageClosedError, match="closed"):
        storage.read(blob.refs[:1], *blob.chunk_range(0))
    with pytest.raises(StorageClosedError, match="closed"):
        storage.blob_size(blob.info)


def test_a_refused_config_leaves_nothing_open(tmp_path: Path) -> None:
    blob = build_blob(tmp_path)
    config = RafsConfig.from_flags(blob_files=[blob.path, blob.path])
    with pytest.raises(ConfigError, match="--blob: 2 files given"):
        SyncStorage(config, [blob.info])
