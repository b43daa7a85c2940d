"""EROFS extended attributes: an inline area after the inode, which may also list ids of
shared entries kept once for the whole image.

The inline area is a 12-byte header (name filter, shared count), `shared count` u32 ids, then
entries. An entry is name length, name prefix index, value size, the name suffix and the value,
padded to 4 bytes. A shared id points at an entry at xattr_blkaddr * block size + id * 4.
"""

from __future__ import annotations

from collections.abc import Iterator

from vhostfs.rafs import layout as L
from vhostfs.rafs.errors import CorruptError, UnsupportedError
from vhostfs.rafs.mapped import MappedFile


def xattr_entries(
    mapped: MappedFile, area: int, area_size: int, shared_base: int, what: str
) -> Iterator[tuple[bytes, int, int]]:
    """(full name, value offset, value size) of each xattr, shared ones first."""
    if not area_size:
        return
    end = area + area_size
    _name_filter, shared_count = mapped.unpack(L.XATTR_IBODY_HEADER, area, what)
    ids = area + L.XATTR_IBODY_HEADER.size
    entries = ids + shared_count * L.XATTR_SHARED_ID.size
    if entries > end:
        raise CorruptError(f"{what}: {shared_count} shared ids overflow the xattr area")
    for k in range(shared_count):
        (shared_id,) = mapped.unpack(L.XATTR_SHARED_ID, ids + k * L.XATTR_SHARED_ID.size, what)
        name, value_offset, value_size, _ = _entry(
            mapped, shared_base + shared_id * 4, mapped.size, f"{what}: shared xattr {k}"
        )
        yield name, value_offset, value_size
    position = entries
    while position < end:
        name, value_offset, value_size, entry_size = _entry(mapped, position, end, what)
        yield name, value_offset, value_size
        position += entry_size


def _entry(mapped: MappedFile, offset: int, limit: int, what: str) -> tuple[bytes, int, int, int]:
    name_len, name_index, value_size = mapped.unpack(L.XATTR_ENTRY, offset, what)
    if name_index & L.XATTR_LONG_PREFIX_FLAG:
        raise UnsupportedError(f"{what}: long xattr name prefixes")
    prefix = L.XATTR_PREFIXES.get(name_index)
    if prefix is None:
        raise CorruptError(f"{what}: xattr name index {name_index}")
    entry_size = -(-(L.XATTR_ENTRY.size + name_len + value_size) // 4) * 4
    if offset + entry_size > limit:
        raise CorruptError(f"{what}: xattr entry at {offset} runs past its area")
    name_offset = offset + L.XATTR_ENTRY.size
    name = prefix + mapped.read(name_offset, name_len, what)
    return name, name_offset + name_len, value_size, entry_size
