"""The v6 fixture blob describes itself: its ToC, chunk-info array and digest array agree with
the bootstrap's blob table and chunk table.
"""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from tests.rafs.images import (
    V5_BOOTSTRAPS,
    V5_DIR,
    V6_BLOB_ID,
    V6_BOOTSTRAP,
    V6_DIR,
    open_blobs,
    patched,
)
from vhostfs.rafs import BlobError, UnsupportedError, open_image
from vhostfs.rafs.blobmeta import (
    ChunkInfoArray,
    read_chunk_digests,
    read_chunk_infos,
    read_toc,
    read_toc_part,
)
from vhostfs.storage.blob import BlobInfo, Compressor

BLOB = V6_DIR / V6_BLOB_ID
TOC_START = 14554 - 1024
CI_HEADER = 8346


def test_table_of_contents() -> None:
    with open_image(V6_BOOTSTRAP) as image, open_blobs(image, V6_DIR) as store:
        toc = read_toc(store, image.blobs[0])
        assert [entry.name for entry in toc] == [
            "image.blob",
            "blob.meta",
            "blob.meta.header",
            "blob.digest",
        ]
        assert all(entry.compressor is Compressor.NONE for entry in toc)
        header = read_toc_part(store, image.blobs[0], toc[2])
        assert len(header) == 4096 and header[:4] == bytes.fromhex("0bb10bb1")


def test_chunk_infos_agree_with_the_chunk_table() -> None:
    with open_image(V6_BOOTSTRAP) as image, open_blobs(image, V6_DIR) as store:
        infos = read_chunk_infos(store, image.blobs[0])
        assert len(infos) == 2
        for ino in (133, 136):
            (ref,) = image.chunks(ino, 0, 1 << 20)
            assert ref.chunk_index is not None
            info = infos[ref.chunk_index]
            assert (
                info.compressed_offset,
                info.compressed_size,
                info.uncompressed_offset,
                info.uncompressed_size,
                info.compressed,
            ) == (
                ref.compressed_offset,
                ref.compressed_size,
                ref.uncompressed_offset,
                ref.uncompressed_size,
                ref.compressed,
            )
        with pytest.raises(IndexError):
            infos[2]


def test_chunk_digests_agree_with_the_chunk_table() -> None:
    with open_image(V6_BOOTSTRAP) as image, open_blobs(image, V6_DIR) as store:
        digests = read_chunk_digests(store, image.blobs[0])
        for ino in (133, 136):
            (ref,) = image.chunks(ino, 0, 1 << 20)
            assert ref.chunk_index is not None
            assert digests[ref.chunk_index] == ref.digest


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (TOC_START + 8, b"IMAGE", "sha256 differs from the blob table"),
        (14554 - 512, b"other.name", "sha256 differs"),
    ],
)
def test_damaged_toc(tmp_path: Path, offset: int, value: bytes, message: str) -> None:
    patched(BLOB, tmp_path / V6_BLOB_ID, {offset: value})
    with (
        open_image(V6_BOOTSTRAP) as image,
        open_blobs(image, tmp_path) as store,
        pytest.raises(BlobError, match=message),
    ):
        read_toc(store, image.blobs[0])


@pytest.mark.parametrize(
    ("offset", "value", "message"),
    [
        (CI_HEADER, b"\0", "header magic"),
        (CI_HEADER + 4092, b"\0", "header magic"),
        (CI_HEADER + 12, b"\x03", "ci_entries 3"),
        (CI_HEADER + 8, b"\x01", "ci_compressor"),
        (CI_HEADER + 16, b"\x00", "ci_offset"),
        (CI_HEADER + 4, b"\x25", "CHUNK_INFO_V2"),
    ],
)
def test_damaged_chunk_info_header(tmp_path: Path, offset: int, value: bytes, message: str) -> None:
    patched(BLOB, tmp_path / V6_BLOB_ID, {offset: value})
    with (
        open_image(V6_BOOTSTRAP) as image,
        open_blobs(image, tmp_path) as store,
        pytest.raises(BlobError, match=message),
    ):
        read_chunk_infos(store, image.blobs[0])


def test_damaged_toc_part(tmp_path: Path) -> None:
    # blob.digest sits at 12954; its ToC entry carries its sha256.
    patched(BLOB, tmp_path / V6_BLOB_ID, {12954: b"\0\0\0\0"})
    with (
        open_image(V6_BOOTSTRAP) as image,
        open_blobs(image, tmp_path) as store,
        pytest.raises(BlobError, match=r"blob\.digest: sha256 differs"),
    ):
        read_chunk_digests(store, image.blobs[0])


def test_tar_header_is_checked(tmp_path: Path) -> None:
    # A ToC whose tar header is wrong but whose digest matches: change the bootstrap's digest.
    damaged = bytearray(BLOB.read_bytes())
    damaged[-512:-499] = b"rafs.blob.tod"
    (tmp_path / V6_BLOB_ID).write_bytes(bytes(damaged))
    digest = hashlib.sha256(bytes(damaged[TOC_START:])).digest()
    boot = patched(V6_BOOTSTRAP, tmp_path / "boot", {4096 + 136: digest})
    with (
        open_image(boot) as image,
        open_blobs(image, tmp_path) as store,
        pytest.raises(BlobError, match="tar header names"),
    ):
        read_toc(store, image.blobs[0])


def test_blobs_without_meta() -> None:
    with (
        open_image(V5_DIR / V5_BOOTSTRAPS[0]) as image,
        open_blobs(image) as store,
        pytest.raises(UnsupportedError, match="no blob meta"),
    ):
        read_toc(store, image.blobs[0])


def test_chunk_info_entry_layouts() -> None:
    """Both entry versions, with sizes that need the high bits of each field."""
    blob = BlobInfo(0, "b", Compressor.ZSTD, None, 1 << 24, 2, None, None, 0)
    uncompressed_size, compressed_size = (1 << 24) - 5, (1 << 21) + 3
    v1 = struct.pack(
        "<QQ",
        (0x1234_5000)
        | ((uncompressed_size - 1) & 0xFFFFF) << 44
        | ((uncompressed_size - 1) >> 20) << 8,
        0xAB_CDEF_0123
        | ((compressed_size - 1) & 0xFFFFF) << 44
        | ((compressed_size - 1) >> 20) << 40,
    )
    (entry,) = ChunkInfoArray(blob, v1, v2=False)
    assert (entry.uncompressed_offset, entry.uncompressed_size) == (0x1234_5000, uncompressed_size)
    assert (entry.compressed_offset, entry.compressed_size) == (0xAB_CDEF_0123, compressed_size)
    assert entry.compressed

    v2 = struct.pack(
        "<QQQ",
        0x12345 | (uncompressed_size - 1) << 32 | 0x01 << 56,
        0xAB_CDEF_0123 | compressed_size << 40,
        0,
    ) + struct.pack("<QQQ", 7 | 4095 << 32, 4096 | 4096 << 40, 0)
    first, second = ChunkInfoArray(blob, v2, v2=True)
    assert (first.uncompressed_offset, first.uncompressed_size) == (
        0x12345 << 12,
        uncompressed_size,
    )
    assert (first.compressed_offset, first.compressed_size, first.compressed) == (
        0xAB_CDEF_0123,
        compressed_size,
        True,
    )
    assert (second.uncompressed_offset, second.compressed_size, second.compressed) == (
        7 << 12,
        4096,
        False,
    )
    for flag in (0x02, 0x04, 0x08):
        refused = struct.pack("<QQQ", flag << 56, 0, 0)
        with pytest.raises(UnsupportedError, match="ZRan, batch or encrypted"):
            ChunkInfoArray(blob, refused, v2=True)[0]
