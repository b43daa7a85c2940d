"""EROFS directory blocks: a sorted array of 12-byte dirents, then the names they point at.

The entry count is the first dirent's name offset / 12. Each name runs to the next entry's
name offset; the last runs to the end of the block (or of the directory), NUL-padded. Names
are sorted within a block, and blocks are sorted among themselves.
"""

from __future__ import annotations

from dataclasses import dataclass

from vhostfs.rafs import layout as L
from vhostfs.rafs.errors import CorruptError


@dataclass(frozen=True, slots=True)
class DirentBlock:
    names: tuple[bytes, ...]
    nids: tuple[int, ...]
    file_types: tuple[int, ...]


def decode_block(data: bytes, what: str) -> DirentBlock:
    """Every entry of a block, after checking offsets, names, order and file types."""
    count = _entry_count(data, what)
    dirents = [L.DIRENT.unpack_from(data, i * L.DIRENT.size) for i in range(count)]
    names: list[bytes] = []
    for i, (_, nameoff, file_type) in enumerate(dirents):
        last = i + 1 == count
        end = len(data) if last else dirents[i + 1][1]
        if not count * L.DIRENT.size <= nameoff < end <= len(data):
            raise CorruptError(f"{what}: entry {i}: nameoff {nameoff} out of order")
        name = data[nameoff:end]
        if last:
            name = name.split(b"\0", 1)[0]
        if not 0 < len(name) <= L.NAME_MAX or b"/" in name or b"\0" in name:
            raise CorruptError(f"{what}: entry {i}: bad name {name[:64]!r}")
        if names and name <= names[-1]:
            raise CorruptError(f"{what}: entry {i}: {name!r} is not sorted after the last")
        if file_type not in L.FILE_TYPE_TO_DT:
            raise CorruptError(f"{what}: entry {i}: file type {file_type}")
        names.append(name)
    return DirentBlock(
        tuple(names),
        tuple(nid for nid, _, _ in dirents),
        tuple(file_type for _, _, file_type in dirents),
    )


def first_name(data: bytes, what: str) -> bytes:
    """The first name of a block, without decoding the rest (for the binary search)."""
    count = _entry_count(data, what)
    start = count * L.DIRENT.size
    end = L.DIRENT.unpack_from(data, L.DIRENT.size)[1] if count > 1 else len(data)
    if not start < end <= len(data):
        raise CorruptError(f"{what}: entry 1: nameoff {end} out of order")
    return data[start:end].split(b"\0", 1)[0]


def _entry_count(data: bytes, what: str) -> int:
    if len(data) < L.DIRENT.size:
        raise CorruptError(f"{what}: {len(data)} bytes cannot hold a dirent")
    first_nameoff = L.DIRENT.unpack_from(data, 0)[1]
    if first_nameoff % L.DIRENT.size or not L.DIRENT.size <= first_nameoff < len(data):
        raise CorruptError(f"{what}: first nameoff {first_nameoff}")
    return int(first_nameoff // L.DIRENT.size)
