"""The bytes of one EROFS inode and what the bootstrap stores with it: inline xattrs, directory
blocks and chunk indexes.

Directory data is a run of 4 KiB blocks, each a sorted dirent array followed by the names it
points to; an entry never straddles two blocks. "." and ".." are ordinary entries sorted with
the rest (names below "." such as "-x" come first), which keeps the whole directory sorted for
binary search.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence

from vhostfs.rafs import layout as L
from vhostfs.rafs.build.errors import BuildError

BLOCK_SIZE = L.RAFS_V6_BLOCK_SIZE
FILE_TYPES = {
    stat.S_IFREG: 1,
    stat.S_IFDIR: 2,
    stat.S_IFCHR: 3,
    stat.S_IFBLK: 4,
    stat.S_IFIFO: 5,
    stat.S_IFSOCK: 6,
    stat.S_IFLNK: 7,
}
# Whole names first: the ACL names would otherwise match no prefix at all.
_XATTR_NAMES = {b"system.posix_acl_access": 2, b"system.posix_acl_default": 3}
_XATTR_PREFIXES = {b"user.": 1, b"trusted.": 4, b"security.": 6}
_MAX_XATTR_ICOUNT = 0xFFFF
_U16 = 0xFFFF
_U32 = 0xFFFF_FFFF


# --- Inodes --------------------------------------------------------------------------------


def fits_compact(
    mode: int, nlink: int, size: int, uid: int, gid: int, mtime: int, mtime_nsec: int
) -> bool:
    """Whether a 32-byte inode loses nothing. It has no mtime of its own (readers take the
    superblock's build time, 0) and nydusd ignores its rdev, so only inodes with mtime 0 and
    no device number qualify."""
    return (
        mtime == 0
        and mtime_nsec == 0
        and stat.S_IFMT(mode) not in (stat.S_IFCHR, stat.S_IFBLK)
        and max(uid, gid, nlink) <= _U16
        and size <= _U32
    )


def inode_bytes(
    *,
    compact: bool,
    data_layout: int,
    xattr_icount: int,
    mode: int,
    nlink: int,
    size: int,
    i_u: int,
    ino: int,
    uid: int,
    gid: int,
    mtime: int,
    mtime_nsec: int,
) -> bytes:
    if compact:
        return L.INODE_COMPACT.pack(
            data_layout << 1, xattr_icount, mode, nlink, size, 0, i_u, ino, uid, gid
        )
    return L.INODE_EXTENDED.pack(
        L.I_VERSION_EXTENDED | data_layout << 1,
        xattr_icount,
        mode,
        size,
        i_u,
        ino,
        uid,
        gid,
        max(mtime, 0),  # the on-disk field is unsigned: times before 1970 become 1970
        mtime_nsec,
        nlink,
    )


def encode_rdev(rdev: int) -> int:
    """Linux's 32-bit device number encoding, as EROFS keeps it in i_u."""
    major, minor = os.major(rdev), os.minor(rdev)
    return (minor & 0xFF) | (major & 0xFFF) << 8 | (minor & ~0xFF) << 12 & _U32


def chunk_format(chunk_size: int) -> int:
    """i_u of a chunk-based file: 8-byte chunk indexes of 2**(12 + n) bytes each."""
    return L.CHUNK_FORMAT_INDEXES | (chunk_size.bit_length() - 1 - 12)


def chunk_index(blob_index: int, chunk_number: int, uncompressed_offset: int) -> bytes:
    """nydus' reading of the EROFS chunk index: device_id's low byte is blob index + 1 (what
    the kernel uses, masked), its high byte and `advise` hold the 24-bit chunk-info index."""
    return L.CHUNK_INDEX.pack(
        chunk_number & 0xFFFF,
        (blob_index + 1) | (chunk_number >> 16) << 8,
        uncompressed_offset // BLOCK_SIZE,
    )


# --- Extended attributes -------------------------------------------------------------------


def xattr_area(xattrs: dict[bytes, bytes], where: str) -> bytes:
    """The inline xattr area (header and entries), empty when there are none."""
    if not xattrs:
        return b""
    area = bytearray(L.XATTR_IBODY_HEADER.pack(0, 0))
    for name, value in sorted(xattrs.items()):
        index, suffix = _xattr_name(name, where)
        if len(suffix) > 255:
            raise BuildError(f"{where}: xattr name {name[:40]!r}... longer than 255 bytes")
        if len(value) > _U16:
            raise BuildError(f"{where}: xattr {name!r} value of {len(value)} bytes (max 65535)")
        area += L.XATTR_ENTRY.pack(len(suffix), index, len(value)) + suffix + value
        area += bytes(-len(area) % 4)
    if xattr_icount(len(area)) > _MAX_XATTR_ICOUNT:
        raise BuildError(f"{where}: xattrs take {len(area)} bytes, more than an inode can hold")
    return bytes(area)


def xattr_icount(area_size: int) -> int:
    return 0 if area_size == 0 else (area_size - L.XATTR_IBODY_HEADER.size) // 4 + 1


def _xattr_name(name: bytes, where: str) -> tuple[int, bytes]:
    if name in _XATTR_NAMES:
        return _XATTR_NAMES[name], b""
    for prefix, index in _XATTR_PREFIXES.items():
        if name.startswith(prefix) and len(name) > len(prefix):
            return index, name[len(prefix) :]
    raise BuildError(
        f"{where}: xattr {name.decode(errors='replace')!r}: RAFS v6 keeps only user.*, "
        f"trusted.*, security.* and POSIX ACLs"
    )


# --- Directories ---------------------------------------------------------------------------


def directory_blocks(names: Sequence[bytes]) -> list[range]:
    """Which of the (sorted) names go in each directory block."""
    blocks = []
    start = 0
    used = 0
    for i, name in enumerate(names):
        need = L.DIRENT.size + len(name)
        if used + need > BLOCK_SIZE:
            blocks.append(range(start, i))
            start, used = i, 0
        used += need
    blocks.append(range(start, len(names)))
    return blocks


def directory_size(names: Sequence[bytes]) -> int:
    """i_size of a directory: whole blocks, then the bytes used in the last one."""
    blocks = directory_blocks(names)
    last = blocks[-1]
    used = sum(L.DIRENT.size + len(names[i]) for i in last)
    return (len(blocks) - 1) * BLOCK_SIZE + used


def directory_data(entries: Sequence[tuple[bytes, int, int]]) -> bytes:
    """The directory's data for sorted (name, nid, file type) entries; its length is the
    directory's i_size."""
    names = [name for name, _, _ in entries]
    out = bytearray()
    blocks = directory_blocks(names)
    for number, block in enumerate(blocks):
        nameoff = L.DIRENT.size * len(block)
        start = len(out)
        for i in block:
            name, nid, file_type = entries[i]
            out += L.DIRENT.pack(nid, nameoff, file_type)
            nameoff += len(name)
        for i in block:
            out += names[i]
        if number + 1 < len(blocks):
            out += bytes(BLOCK_SIZE - (len(out) - start))
    return bytes(out)
