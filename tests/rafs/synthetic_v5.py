"""A minimal RAFS v5 writer, for what the nydus fixtures lack: xattrs, holes, compressed chunks.

Only what the tests need: a root directory whose children are given in name order, each a
regular file (content split into chunks, optionally with holes), a symlink or an empty
directory. The layout follows the fixtures byte for byte: superblock, inode table, blob table,
extended blob table, then the inodes with their names, targets, xattrs and chunk records.
"""

from __future__ import annotations

import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass, field

import blake3

SUPER_SIZE = 8192
CHUNK_SIZE = 4096
BLOB_ID = "ab" * 32
FLAG_XATTR = 0x4
FLAG_HAS_HOLE = 0x8


@dataclass
class Entry:
    name: bytes
    mode: int
    content: bytes = b""  # file data, or the symlink target
    xattrs: dict[bytes, bytes] = field(default_factory=dict)
    holes: set[int] = field(default_factory=set)  # chunk numbers left out (needs HAS_HOLE)


def _pad8(data: bytes) -> bytes:
    return data + bytes(-len(data) % 8)


def _xattr_area(xattrs: dict[bytes, bytes]) -> bytes:
    pairs = b"".join(
        struct.pack("<I", len(key) + 1 + len(value)) + key + b"\0" + value
        for key, value in xattrs.items()
    )
    return _pad8(struct.pack("<Q", len(pairs)) + pairs)


def _inode(
    ino: int, parent: int, entry: Entry, flags: int, child_index: int, child_count: int
) -> bytes:
    size = len(entry.content)
    return struct.pack(
        "<32sQQIIIIQQQIIIHHIIQ8x",
        bytes(32),
        parent,
        ino,
        0,
        0,
        0,
        entry.mode,
        size,
        -(-size // 512),
        flags,
        2 if stat.S_ISDIR(entry.mode) else 1,
        child_index,
        child_count,
        len(entry.name),
        len(entry.content) if stat.S_ISLNK(entry.mode) else 0,
        0,
        0,
        1_700_000_000,
    )


def write_v5(
    entries: list[Entry],
    compress: Callable[[bytes], bytes],
    compression_flag: int,
    compressed_chunk_flag: int = 0x1,
) -> tuple[bytes, bytes]:
    """(bootstrap, blob) for a root holding `entries`; chunks are stored as compress() makes
    them, flagged compressed with `compressed_chunk_flag`."""
    blob = bytearray()
    uncompressed_size = 0  # the blob's uncompressed address space, chunk after chunk
    records: list[list[bytes]] = []
    for entry in entries:
        chunk_records: list[bytes] = []
        if stat.S_ISREG(entry.mode):
            for number in range(-(-len(entry.content) // CHUNK_SIZE)):
                if number in entry.holes:
                    continue
                data = entry.content[number * CHUNK_SIZE : (number + 1) * CHUNK_SIZE]
                stored = compress(data)
                chunk_records.append(
                    struct.pack(
                        "<32sIIIIQQQII",
                        blake3.blake3(data).digest(),
                        0,
                        compressed_chunk_flag,
                        len(stored),
                        len(data),
                        len(blob),
                        uncompressed_size,
                        number * CHUNK_SIZE,
                        sum(len(r) for r in records) + len(chunk_records),
                        0,
                    )
                )
                blob += stored
                uncompressed_size += len(data)
        records.append(chunk_records)

    count = len(entries) + 1
    inode_table_offset = SUPER_SIZE
    blob_table_offset = inode_table_offset + _pad8_len(4 * count)
    blob_table = _pad8(struct.pack("<II", 0, 0) + BLOB_ID.encode())
    ext_table_offset = blob_table_offset + len(blob_table)
    chunk_count = sum(len(r) for r in records)
    ext_table = struct.pack("<I4xQQ40x", chunk_count, uncompressed_size, len(blob))
    inodes = bytearray()
    offsets = []
    inodes_start = ext_table_offset + len(ext_table)

    root = Entry(b"/", stat.S_IFDIR | 0o755)
    for ino, entry in enumerate([root, *entries], start=1):
        offsets.append(inodes_start + len(inodes))
        flags = FLAG_XATTR if entry.xattrs else 0
        if entry.holes:
            flags |= FLAG_HAS_HOLE
        if stat.S_ISLNK(entry.mode):
            flags |= 0x1
        chunks = records[ino - 2] if ino > 1 else []
        if ino == 1:
            child_index, child_count = 2, len(entries)
        elif stat.S_ISREG(entry.mode):
            child_index, child_count = 0, len(chunks)
        else:
            child_index, child_count = 0, 0
        inodes += _inode(ino, 0 if ino == 1 else 1, entry, flags, child_index, child_count)
        inodes += _pad8(entry.name)
        if stat.S_ISLNK(entry.mode):
            inodes += _pad8(entry.content)
        if entry.xattrs:
            inodes += _xattr_area(entry.xattrs)
        inodes += b"".join(chunks)

    superblock = struct.pack(
        "<IIIIQQQQQIIIIQ",
        0x52414653,
        0x500,
        SUPER_SIZE,
        CHUNK_SIZE,
        compression_flag | 0x4 | 0x10 | 0x20,  # blake3, explicit uid/gid, xattrs
        count,
        inode_table_offset,
        0,
        blob_table_offset,
        count,
        0,
        len(blob_table),
        1,
        ext_table_offset,
    ).ljust(SUPER_SIZE, b"\0")
    table = _pad8(b"".join(struct.pack("<I", offset >> 3) for offset in offsets))
    bootstrap = superblock + table + blob_table + ext_table + bytes(inodes)
    return bytes(bootstrap), bytes(blob)


def _pad8_len(length: int) -> int:
    return length + (-length % 8)
