"""The RAFS v6 fixture (nydus builder 2.2) end to end, and what a damaged copy of it raises.

The image holds a root directory and two Rust sources whose zstd chunks live in the blob next
to it. Damaged copies are the fixture with a few bytes overwritten at offsets taken from the
notes' worked example: ext superblock at 1152, blob table at 4096, root inode (nid 128) at
12288 with its dirents inline after it, /lib.rs (nid 133) at 12448, chunk table at 16384.
"""

from __future__ import annotations

import struct
from pathlib import Path

import blake3
import pytest

from tests.rafs.images import (
    V6_BLOB_ID,
    V6_BOOTSTRAP,
    V6_DIR,
    open_blobs,
    patched,
    read_file,
    resolve,
)
from vhostfs.rafs import CorruptError, RafsError, UnsupportedError, open_image
from vhostfs.storage.blob import Compressor, Digester
from vhostfs.storage.errors import BackendError, ChunkDecodeError, ChunkDigestError

FLAGS = 1152  # ext superblock s_flags
BLOB_ENTRY = 4096
ROOT_INODE = 12288
ROOT_DIRENTS = ROOT_INODE + 64
LIB_RS_INODE = 12448
CHUNK_TABLE = 16384
LIB_RS_RECORD = CHUNK_TABLE + 80  # the table is sorted by digest: lib.rs's chunk is second
ORIGINAL_FLAGS = 0x194


def test_superblock_and_blob() -> None:
    with open_image(V6_BOOTSTRAP) as image:
        assert image.format == "rafs-v6"
        assert image.root_ino == 128
        assert image.explicit_uid_gid
        (blob,) = image.blobs
        assert blob.blob_id == V6_BLOB_ID
        assert (blob.compressor, blob.digester) == (Compressor.ZSTD, Digester.BLAKE3)
        assert (blob.chunk_count, blob.compressed_size, blob.uncompressed_size) == (
            2,
            14554,
            36864,
        )
        assert blob.meta is not None
        assert (blob.meta.ci_offset, blob.meta.ci_compressed_size, blob.meta.toc_size) == (
            8314,
            32,
            1024,
        )
        assert image.statfs().files == 3


def test_listing() -> None:
    with open_image(V6_BOOTSTRAP) as image:
        entries = list(image.readdir(image.root_ino))
        assert [(e.name, e.ino) for e in entries] == [
            (b".", 128),
            (b"..", 128),
            (b"lib.rs", 133),
            (b"sync_io.rs", 136),
        ]
        assert [path for path, _, _ in image.walk()] == [b"/", b"/lib.rs", b"/sync_io.rs"]
        assert image.lookup(128, b"..") == 128
        assert image.getattr(128).mode == 0o40755


@pytest.mark.parametrize(
    ("name", "size", "chunk"),
    [
        (b"lib.rs", 16931, (0, 0, 4828, 0)),
        (b"sync_io.rs", 13400, (1, 4828, 2974, 20480)),
    ],
)
def test_rust_sources_read_and_verify(
    name: bytes, size: int, chunk: tuple[int, int, int, int]
) -> None:
    with open_image(V6_BOOTSTRAP) as image, open_blobs(image, V6_DIR) as blobs:
        ino = resolve(image, b"/" + name)
        attr = image.getattr(ino)
        assert attr.size == size and attr.mode == 0o100644
        (ref,) = image.chunks(ino, 0, size)
        assert (
            ref.chunk_index,
            ref.compressed_offset,
            ref.compressed_size,
            ref.uncompressed_offset,
        ) == chunk
        assert ref.compressed and ref.uncompressed_size == size and ref.blob_index == 0
        data = read_file(image, ino, 0, size, blobs)
        assert len(data) == size
        assert blake3.blake3(data).digest() == ref.digest
        text = data.decode("utf-8")
        assert text.startswith("// Copyright") and "fn " in text and "use " in text
        assert read_file(image, ino, 100, 50, blobs) == data[100:150]


def test_damaged_chunk_digest(tmp_path: Path) -> None:
    copy = patched(V6_BOOTSTRAP, tmp_path / "boot", {LIB_RS_RECORD: b"\xff"})
    with (
        open_image(copy) as image,
        pytest.raises(ChunkDigestError, match=rf"blob {V6_BLOB_ID} chunk 0"),
    ):
        read_file(image, 133, 0, 100, V6_DIR)


def test_damaged_blob(tmp_path: Path) -> None:
    blob = (V6_DIR / V6_BLOB_ID).read_bytes()
    for position in (0, 100, 4000):
        damaged = bytearray(blob)
        damaged[position] ^= 0x55
        (tmp_path / V6_BLOB_ID).write_bytes(bytes(damaged))
        with open_image(V6_BOOTSTRAP) as image, pytest.raises(ChunkDecodeError):
            read_file(image, 133, 0, 100, tmp_path)


def test_short_blob(tmp_path: Path) -> None:
    (tmp_path / V6_BLOB_ID).write_bytes((V6_DIR / V6_BLOB_ID).read_bytes()[:5000])
    with open_image(V6_BOOTSTRAP) as image:
        read_file(image, 133, 0, 100, tmp_path)  # chunk 0 ends at 4828
        with pytest.raises(BackendError, match="past the end of the blob file"):
            read_file(image, 136, 0, 100, tmp_path)


def flags(value: int) -> dict[int, bytes]:
    return {FLAGS: struct.pack("<Q", value)}


def u32(offset: int, value: int) -> dict[int, bytes]:
    return {offset: struct.pack("<I", value)}


def u16(offset: int, value: int) -> dict[int, bytes]:
    return {offset: struct.pack("<H", value)}


@pytest.mark.parametrize(
    ("patches", "error", "message"),
    [
        (flags(ORIGINAL_FLAGS | 0x2), CorruptError, "one compressor"),
        (flags(ORIGINAL_FLAGS & ~0x80), CorruptError, "one compressor"),
        (flags(ORIGINAL_FLAGS | 0x8), CorruptError, "one digester"),
        (flags(ORIGINAL_FLAGS | 0x1000), CorruptError, "unknown bits"),
        (flags(ORIGINAL_FLAGS | 0x200), UnsupportedError, "tarfs"),
        (flags(ORIGINAL_FLAGS | 0x0200_0000), UnsupportedError, "encrypted"),
        (u32(1172, 3000), CorruptError, "s_chunk_size"),
        (u32(1168, 300), CorruptError, "s_blob_table_size"),
        (u32(1184, 90), CorruptError, "s_chunk_table_size"),
        ({1176: struct.pack("<Q", 4096)}, CorruptError, "blob table overlaps the chunk table"),
        ({1176: struct.pack("<Q", 1 << 40)}, CorruptError, "chunk table"),
        (u32(BLOB_ENTRY + 84, 0x70000021 | 0x8), UnsupportedError, "ZRan"),
        (u32(BLOB_ENTRY + 84, 0x70000021 | 0x80), UnsupportedError, "batch"),
        (u32(BLOB_ENTRY + 84, 0x70000021 | 0x100), UnsupportedError, "encryption"),
        (u32(BLOB_ENTRY + 84, 0x70000021 | 0x8000), UnsupportedError, "unknown blob features"),
        (u32(BLOB_ENTRY + 84, 0x70000020), CorruptError, "ALIGNED"),
        (u32(BLOB_ENTRY + 64, 1), CorruptError, "blob_index 1"),
        (u32(BLOB_ENTRY + 68, 4096), CorruptError, "chunk_size"),
        (u32(BLOB_ENTRY + 76, 9), CorruptError, "compression 9"),
        (u32(BLOB_ENTRY + 128, 48), CorruptError, "ci_uncompressed_size"),
        (u32(BLOB_ENTRY + 216, 1), UnsupportedError, "cipher"),
        ({BLOB_ENTRY: b"../../etc/passwd"}, CorruptError, "blob id"),
        ({1408: b"0" * 64}, CorruptError, "device slot 0"),
        (u16(1110, 2), CorruptError, "2 extra devices"),
        (u16(1038, 133), CorruptError, "not a directory"),
        (u32(1024, 0xE0F5E1E3), CorruptError, "neither"),
        ({1036: bytes([13])}, CorruptError, "blkszbits"),
        (u32(1104, 0x0C | 0x100), UnsupportedError, "feature_incompat"),
    ],
)
def test_damaged_superblocks_are_refused_at_open(
    tmp_path: Path, patches: dict[int, bytes], error: type[RafsError], message: str
) -> None:
    copy = patched(V6_BOOTSTRAP, tmp_path / "boot", patches)
    with pytest.raises(error, match=message):
        open_image(copy)


def test_truncated_bootstraps(tmp_path: Path) -> None:
    data = V6_BOOTSTRAP.read_bytes()
    for size in (0, 100, 1100, 4096, 16384, 20000):
        (tmp_path / "boot").write_bytes(data[:size])
        with pytest.raises(CorruptError):
            open_image(tmp_path / "boot")


@pytest.mark.parametrize(
    ("patches", "operation", "error", "message"),
    [
        (u16(LIB_RS_INODE, 0x9 | 0x10), "getattr", CorruptError, "inode 133: i_format 0x19"),
        (u16(LIB_RS_INODE, 0xD), "getattr", CorruptError, "unknown data layout"),
        (u16(LIB_RS_INODE, 0x3), "read", UnsupportedError, "compressed"),
        (u16(LIB_RS_INODE, 0x5), "getattr", CorruptError, "data blocks"),
        (u16(LIB_RS_INODE + 4, 0o170644), "getattr", CorruptError, "no valid file type"),
        (u16(LIB_RS_INODE + 2, 0xFFFF), "getattr", CorruptError, "and its xattrs"),
        ({LIB_RS_INODE + 8: struct.pack("<Q", 1 << 40)}, "getattr", CorruptError, "chunk entries"),
        (u32(LIB_RS_INODE + 16, 0x08), "read", CorruptError, "without chunk indexes"),
        (u16(LIB_RS_INODE + 64, 5), "read", CorruptError, "chunk 5 not in chunk table"),
        (u16(LIB_RS_INODE + 66, 0x0001 | 0x0100), "read", CorruptError, "not in chunk table"),
        (u16(LIB_RS_INODE + 66, 0x0002), "read", CorruptError, "blob 1 of 1"),
        (u16(LIB_RS_INODE + 66, 0x0000), "read", CorruptError, "names no blob"),
        (u32(LIB_RS_INODE + 68, 7), "read", CorruptError, "blkaddr 7 differs"),
        (u32(LIB_RS_RECORD + 36, 0x4), "read", UnsupportedError, "encrypted or batch"),
        (u32(LIB_RS_RECORD + 36, 0x40), "read", CorruptError, "chunk flags"),
        (u32(LIB_RS_RECORD + 44, 100), "read", CorruptError, "100 bytes for 16931"),
        (u32(LIB_RS_RECORD + 48, 20000), "read", CorruptError, "past the blob"),
        (u32(LIB_RS_RECORD + 72, 1), "read", CorruptError, "describe the same chunk"),
        (u32(LIB_RS_RECORD + 32, 3), "read", CorruptError, "chunk table record"),
        ({ROOT_DIRENTS + 24: struct.pack("<Q", 128)}, "lookup", CorruptError, "itself"),
        ({ROOT_DIRENTS + 24: struct.pack("<Q", 1 << 50)}, "getattr", CorruptError, "outside"),
        (u16(ROOT_DIRENTS + 8, 50), "readdir", CorruptError, "first nameoff 50"),
        (u16(ROOT_DIRENTS + 32, 60), "readdir", CorruptError, "entry 2: nameoff 60"),
        ({ROOT_DIRENTS + 51: b"z"}, "readdir", CorruptError, "not sorted"),
        ({ROOT_DIRENTS + 51: b"a/"}, "readdir", CorruptError, "bad name"),
        ({ROOT_DIRENTS + 34: b"\x09"}, "readdir", CorruptError, "file type 9"),
    ],
)
def test_damaged_inodes_fail_their_operation(
    tmp_path: Path,
    patches: dict[int, bytes],
    operation: str,
    error: type[RafsError],
    message: str,
) -> None:
    copy = patched(V6_BOOTSTRAP, tmp_path / "boot", patches)
    with open_image(copy) as image, open_blobs(image, V6_DIR) as blobs:
        with pytest.raises(error, match=message):
            if operation == "getattr":
                image.getattr(image.lookup(128, b"lib.rs") or 133)
            elif operation == "read":
                read_file(image, 133, 0, 20000, blobs)
            elif operation == "lookup":
                image.lookup(128, b"lib.rs")
            else:
                list(image.readdir(128))
        with pytest.raises(RafsError):
            list(image.walk())
            read_file(image, 133, 0, 20000, blobs)


def test_prefetch_table(tmp_path: Path) -> None:
    with open_image(V6_BOOTSTRAP) as image:
        assert image.prefetch_table() == []
    # Put a two-entry table in the zeros after the blob table.
    table = {
        1192: struct.pack("<Q", 4352),
        1200: struct.pack("<I", 8),
        4352: b"\x85\0\0\0\x88\0\0\0",
    }
    with open_image(patched(V6_BOOTSTRAP, tmp_path / "boot", table)) as image:
        assert image.prefetch_table() == [133, 136]
    overlapping = {**table, 1192: struct.pack("<Q", 4096)}
    with pytest.raises(CorruptError, match="blob table overlaps the prefetch table"):
        open_image(patched(V6_BOOTSTRAP, tmp_path / "bad", overlapping))
