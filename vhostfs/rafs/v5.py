"""RAFS v5: nydus' original bootstrap format.

An 8 KiB superblock, then a table mapping inode-table indexes (1-based) to inode offsets / 8.
Each 128-byte inode is followed by its name, its symlink target, its xattrs and, for regular
files, one 80-byte chunk record per chunk. A directory's children occupy table indexes
child_index .. child_index + child_count - 1, sorted by name. Every directory and every inode
with one link sits at the table index equal to its inode number; the extra names of a hard-linked
file are further entries whose record carries the shared inode number.

Inode numbers are those on-disk inode numbers, as nydusd reports them; the root is 1.
"""

from __future__ import annotations

import functools
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from vhostfs.rafs import layout as L
from vhostfs.rafs.base import DirEntry, InodeAttr, RafsImage, StatFs
from vhostfs.rafs.chunkinfo import ChunkRecord, read_record, record_to_ref
from vhostfs.rafs.errors import CorruptError, InodeTypeError, NotDirectoryError
from vhostfs.rafs.mapped import MappedFile
from vhostfs.storage.blob import ZERO_FILL, BlobInfo, ChunkRef, Compressor, Digester

INODE_CACHE_SIZE = 4096
ATTR_BLOCK_SIZE = 4096
_NAME_SIZE_MAX = L.NAME_MAX + 1  # nydusd's bound; names are at most 255 bytes in practice
_MAX_INODE_OFFSET = 1 << 32  # table entries are u32 offsets / 8

_COMPRESSOR_BY_FLAG = {
    L.FLAG_COMPRESSION_NONE: Compressor.NONE,
    L.FLAG_COMPRESSION_LZ4: Compressor.LZ4_BLOCK,
    L.FLAG_COMPRESSION_GZIP: Compressor.GZIP,
    L.FLAG_COMPRESSION_ZSTD: Compressor.ZSTD,
}
_DIGESTER_BY_FLAG = {L.FLAG_HASH_BLAKE3: Digester.BLAKE3, L.FLAG_HASH_SHA256: Digester.SHA256}


@dataclass(frozen=True, slots=True)
class RafsV5Super:
    magic: int
    version: int
    sb_size: int
    chunk_size: int  # "block_size" on disk
    flags: int
    inodes_count: int
    inode_table_offset: int
    prefetch_table_offset: int
    blob_table_offset: int
    inode_table_entries: int
    prefetch_table_entries: int
    blob_table_size: int
    extended_blob_table_entries: int
    extended_blob_table_offset: int


@dataclass(frozen=True, slots=True)
class V5Inode:
    index: int  # the inode-table entry it was read through
    offset: int
    parent: int
    ino: int
    uid: int
    gid: int
    mode: int
    size: int
    blocks: int
    flags: int
    nlink: int
    child_index: int
    child_count: int  # children of a directory, chunks of a file
    symlink_size: int
    rdev: int
    mtime_nsec: int
    mtime: int
    name: bytes
    symlink_offset: int
    xattr_offset: int  # the xattr area's content (after its u64 size)
    xattr_size: int
    chunks_offset: int

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)


def _align8(value: int) -> int:
    return (value + L.RAFS_V5_ALIGNMENT - 1) & ~(L.RAFS_V5_ALIGNMENT - 1)


def read_super(mapped: MappedFile) -> RafsV5Super:
    what = "RAFS v5 superblock"
    sb = RafsV5Super(*mapped.unpack(L.RAFS_V5_SUPER, 0, what))
    if sb.sb_size != L.RAFS_V5_SUPER_SIZE:
        raise CorruptError(f"{what}: sb_size {sb.sb_size}")
    if mapped.size <= L.RAFS_V5_SUPER_SIZE or mapped.size % L.RAFS_V5_ALIGNMENT:
        raise CorruptError(f"{what}: bootstrap size {mapped.size}")
    size = sb.chunk_size
    if size & (size - 1) or not L.MIN_CHUNK_SIZE <= size <= L.MAX_CHUNK_SIZE:
        raise CorruptError(f"{what}: block_size {size:#x}")
    if sb.flags & ~L.FLAGS_KNOWN:
        raise CorruptError(f"{what}: flags {sb.flags:#x} has unknown bits")
    if sb.inode_table_entries == 0 or sb.inodes_count > sb.inode_table_entries:
        raise CorruptError(
            f"{what}: {sb.inodes_count} inodes in an inode table of {sb.inode_table_entries}"
        )
    tables = [
        ("inode table", sb.inode_table_offset, sb.inode_table_entries * 4),
        ("blob table", sb.blob_table_offset, sb.blob_table_size),
        ("prefetch table", sb.prefetch_table_offset, sb.prefetch_table_entries * 4),
        (
            "extended blob table",
            sb.extended_blob_table_offset,
            sb.extended_blob_table_entries * L.RAFS_V5_EXT_BLOB_ENTRY.size,
        ),
    ]
    for name, offset, length in tables:
        if length and (offset % L.RAFS_V5_ALIGNMENT or offset < L.RAFS_V5_SUPER_SIZE):
            raise CorruptError(f"{what}: {name} offset {offset}")
    mapped.check_regions(tables, what)
    return sb


def _one_flag(
    flags: int, choices: dict[int, Compressor] | dict[int, Digester], default: int
) -> int:
    chosen = [bit for bit in choices if flags & bit]
    if len(chosen) > 1:
        raise CorruptError(f"RAFS v5 superblock: flags {flags:#x} name several algorithms")
    return chosen[0] if chosen else default  # nydusd's defaults when no bit is set


class RafsV5Image(RafsImage):
    format = "rafs-v5"
    root_ino = L.RAFS_V5_ROOT_INO

    def __init__(self, mapped: MappedFile) -> None:
        super().__init__(mapped)
        self.super = sb = read_super(mapped)
        self.chunk_size = sb.chunk_size
        self.explicit_uid_gid = bool(sb.flags & L.FLAG_EXPLICIT_UID_GID)
        self.has_xattr_flag = bool(sb.flags & L.FLAG_HAS_XATTR)
        self.compressor = _COMPRESSOR_BY_FLAG[
            _one_flag(sb.flags, _COMPRESSOR_BY_FLAG, L.FLAG_COMPRESSION_LZ4)
        ]
        self.digester = _DIGESTER_BY_FLAG[
            _one_flag(sb.flags, _DIGESTER_BY_FLAG, L.FLAG_HASH_BLAKE3)
        ]
        self.blobs = self._read_blobs()
        self._entry = functools.lru_cache(maxsize=INODE_CACHE_SIZE)(self._decode_entry)
        if self._inode(self.root_ino).kind != stat.S_IFDIR:
            raise CorruptError("RAFS v5: inode 1 is not a directory")

    def prefetch_table(self) -> list[int]:
        sb = self.super
        table = self._mapped.read(
            sb.prefetch_table_offset, sb.prefetch_table_entries * 4, "RAFS v5 prefetch table"
        )
        return [ino for (ino,) in L.PREFETCH_ENTRY.iter_unpack(table)]

    # --- Blobs ------------------------------------------------------------------------------

    def _read_blobs(self) -> tuple[BlobInfo, ...]:
        sb = self.super
        table = self._mapped.read(sb.blob_table_offset, sb.blob_table_size, "RAFS v5 blob table")
        extended = [
            self._mapped.unpack(
                L.RAFS_V5_EXT_BLOB_ENTRY,
                sb.extended_blob_table_offset + i * L.RAFS_V5_EXT_BLOB_ENTRY.size,
                f"RAFS v5 extended blob table entry {i}",
            )
            for i in range(sb.extended_blob_table_entries)
        ]
        blobs: list[BlobInfo] = []
        rest = table
        # Entries: u32 readahead offset, u32 readahead size, id; NUL between entries, padding
        # to 8 bytes after the last.
        while len(rest) > L.RAFS_V5_BLOB_ENTRY_HEAD.size:
            index = len(blobs)
            raw_id, _, rest = rest[L.RAFS_V5_BLOB_ENTRY_HEAD.size :].partition(b"\0")
            if not raw_id or not all(0x21 <= byte < 0x7F and byte != 0x2F for byte in raw_id):
                raise CorruptError(f"RAFS v5 blob table entry {index}: id {raw_id[:64]!r}")
            if extended and index >= len(extended):
                raise CorruptError("RAFS v5 extended blob table is shorter than the blob table")
            chunk_count, uncompressed_size, compressed_size = (
                extended[index] if extended else (0, None, None)
            )
            blobs.append(
                BlobInfo(
                    index=index,
                    blob_id=raw_id.decode("ascii"),
                    compressor=self.compressor,
                    digester=self.digester,
                    chunk_size=sb.chunk_size,
                    chunk_count=chunk_count,
                    compressed_size=compressed_size,
                    uncompressed_size=uncompressed_size,
                    features=0 if extended else L.BLOB_V5_NO_EXT_TABLE,
                )
            )
        return tuple(blobs)

    # --- Inodes ----------------------------------------------------------------------------

    def _decode_entry(self, index: int) -> V5Inode:
        sb = self.super
        what = f"inode table entry {index}"
        if not 1 <= index <= sb.inode_table_entries:
            raise CorruptError(f"{what}: outside the table of {sb.inode_table_entries}")
        (slot,) = self._mapped.unpack(
            L.RAFS_V5_INODE_TABLE_ENTRY, sb.inode_table_offset + (index - 1) * 4, what
        )
        offset = slot << 3
        if offset <= L.RAFS_V5_SUPER_SIZE:
            raise CorruptError(f"{what}: inode offset {offset} inside the superblock")
        (
            _digest,
            parent,
            ino,
            uid,
            gid,
            _projid,
            mode,
            size,
            blocks,
            flags,
            nlink,
            child_index,
            child_count,
            name_size,
            symlink_size,
            rdev,
            mtime_nsec,
            mtime,
        ) = self._mapped.unpack(L.RAFS_V5_INODE, offset, what)
        what = f"inode {ino} (table entry {index})"
        if not 1 <= ino <= sb.inode_table_entries:
            raise CorruptError(f"{what}: inode number out of the table")
        if not 0 < name_size <= _NAME_SIZE_MAX:
            raise CorruptError(f"{what}: name_size {name_size}")
        if flags & ~L.RAFS_V5_INODE_FLAGS_KNOWN:
            raise CorruptError(f"{what}: flags {flags:#x}")
        if nlink == 0:
            raise CorruptError(f"{what}: nlink 0")
        if ino != L.RAFS_V5_ROOT_INO and not 1 <= parent <= sb.inode_table_entries:
            raise CorruptError(f"{what}: parent {parent}")
        name_offset = offset + L.RAFS_V5_INODE.size
        name = self._mapped.read(name_offset, name_size, f"{what}: name")
        symlink_offset = name_offset + _align8(name_size)
        xattr_offset = symlink_offset + _align8(symlink_size)
        xattr_size = 0
        if flags & L.RAFS_V5_INODE_XATTR:
            (xattr_size,) = self._mapped.unpack(L.RAFS_V5_XATTR_SIZE, xattr_offset, what)
            xattr_offset += L.RAFS_V5_XATTR_SIZE.size
            self._mapped.check_range(xattr_offset, xattr_size, f"{what}: xattrs")
        inode = V5Inode(
            index=index,
            offset=offset,
            parent=parent,
            ino=ino,
            uid=uid,
            gid=gid,
            mode=mode,
            size=size,
            blocks=blocks,
            flags=flags,
            nlink=nlink,
            child_index=child_index,
            child_count=child_count,
            symlink_size=symlink_size,
            rdev=rdev,
            mtime_nsec=mtime_nsec,
            mtime=mtime,
            name=name,
            symlink_offset=symlink_offset,
            xattr_offset=xattr_offset,
            xattr_size=xattr_size,
            chunks_offset=xattr_offset + _align8(xattr_size),
        )
        self._check_inode(inode, what)
        return inode

    def _check_inode(self, inode: V5Inode, what: str) -> None:
        kind = inode.kind
        if kind not in L.FILE_TYPES:
            raise CorruptError(f"{what}: mode {inode.mode:o} has no valid file type")
        if inode.ino != L.RAFS_V5_ROOT_INO and (
            b"/" in inode.name or b"\0" in inode.name or inode.name in (b".", b"..")
        ):
            raise CorruptError(f"{what}: name {inode.name[:64]!r}")
        if kind == stat.S_IFDIR:
            # A directory is never a hard link, and its children come after it in the table:
            # descending the tree always moves forward, so the tree cannot loop.
            if inode.ino != inode.index:
                raise CorruptError(f"{what}: a directory reached as a hard link")
            last_child = inode.child_index + inode.child_count - 1
            if inode.child_count and not (
                inode.index < inode.child_index and last_child <= self.super.inode_table_entries
            ):
                raise CorruptError(
                    f"{what}: children {inode.child_index}..{last_child} out of order or range"
                )
        elif kind == stat.S_IFLNK:
            if not 0 < inode.symlink_size == inode.size:
                raise CorruptError(
                    f"{what}: symlink of {inode.symlink_size} bytes, size {inode.size}"
                )
            self._mapped.check_range(inode.symlink_offset, inode.symlink_size, f"{what}: target")
        elif kind == stat.S_IFREG:
            if not inode.flags & L.RAFS_V5_INODE_HAS_HOLE:
                expected = -(-inode.size // self.chunk_size)
                if inode.child_count != expected:
                    raise CorruptError(f"{what}: {inode.child_count} chunks for {inode.size} bytes")
            self._mapped.check_range(
                inode.chunks_offset, inode.child_count * L.CHUNK_INFO.size, f"{what}: chunks"
            )

    def _inode(self, ino: int) -> V5Inode:
        inode = self._entry(ino)
        if inode.ino != ino:
            raise CorruptError(f"inode table entry {ino} holds inode {inode.ino}")
        return inode

    def _directory(self, ino: int) -> V5Inode:
        inode = self._inode(ino)
        if inode.kind != stat.S_IFDIR:
            raise NotDirectoryError(f"inode {ino}: not a directory")
        return inode

    def _child(self, directory: V5Inode, position: int) -> V5Inode:
        child = self._entry(directory.child_index + position)
        if child.kind == stat.S_IFDIR and child.parent != directory.ino:
            raise CorruptError(
                f"directory {directory.ino}: child {child.ino} names {child.parent} as parent"
            )
        return child

    def getattr(self, ino: int) -> InodeAttr:
        inode = self._inode(ino)
        return InodeAttr(
            ino=ino,
            mode=inode.mode,
            nlink=inode.nlink,
            uid=inode.uid,
            gid=inode.gid,
            size=inode.size,
            blocks=inode.blocks,
            rdev=inode.rdev,
            mtime=inode.mtime,
            mtime_nsec=inode.mtime_nsec,
            blksize=ATTR_BLOCK_SIZE,
        )

    def statfs(self) -> StatFs:
        data = sum(blob.uncompressed_size or 0 for blob in self.blobs)
        return StatFs(
            block_size=ATTR_BLOCK_SIZE,
            blocks=-(-data // ATTR_BLOCK_SIZE),
            files=self.super.inodes_count,
            name_max=L.NAME_MAX,
        )

    # --- Directories -----------------------------------------------------------------------

    def _parent_of(self, directory: V5Inode) -> int:
        return directory.ino if directory.ino == self.root_ino else directory.parent

    def lookup(self, parent_ino: int, name: bytes) -> int | None:
        directory = self._directory(parent_ino)
        if name == b".":
            return directory.ino
        if name == b"..":
            return self._parent_of(directory)
        low, high = 0, directory.child_count - 1
        while low <= high:
            middle = (low + high) // 2
            child = self._child(directory, middle)
            if child.name == name:
                return child.ino
            if child.name < name:
                low = middle + 1
            else:
                high = middle - 1
        return None

    def readdir(self, ino: int, offset: int = 0) -> Iterator[DirEntry]:
        if offset < 0:
            raise ValueError(f"readdir offset {offset}")
        return self._entries(self._directory(ino), offset)

    def _entries(self, directory: V5Inode, offset: int) -> Iterator[DirEntry]:
        # Offsets: 0 is ".", 1 is "..", 2 + i is child i.
        if offset == 0:
            yield DirEntry(b".", directory.ino, stat.S_IFDIR >> 12, 1)
        if offset <= 1:
            yield DirEntry(b"..", self._parent_of(directory), stat.S_IFDIR >> 12, 2)
        previous = None
        for position in range(max(offset - 2, 0), directory.child_count):
            child = self._child(directory, position)
            if previous is not None and child.name <= previous:
                raise CorruptError(
                    f"directory {directory.ino}: child {child.name!r} is not sorted after "
                    f"{previous!r}"
                )
            previous = child.name
            yield DirEntry(child.name, child.ino, child.kind >> 12, position + 3)

    # --- Symlinks and xattrs ---------------------------------------------------------------

    def readlink(self, ino: int) -> bytes:
        inode = self._inode(ino)
        if inode.kind != stat.S_IFLNK:
            raise InodeTypeError(f"inode {ino}: not a symlink")
        return self._mapped.read(inode.symlink_offset, inode.symlink_size, f"inode {ino} target")

    def _xattrs(self, inode: V5Inode) -> Iterator[tuple[bytes, bytes]]:
        what = f"inode {inode.ino} xattrs"
        data = self._mapped.read(inode.xattr_offset, inode.xattr_size, what)
        position = 0
        while position < len(data):
            if position + L.RAFS_V5_XATTR_PAIR_SIZE.size > len(data):
                raise CorruptError(f"{what}: pair size cut off at {position}")
            (pair_size,) = L.RAFS_V5_XATTR_PAIR_SIZE.unpack_from(data, position)
            position += L.RAFS_V5_XATTR_PAIR_SIZE.size
            pair = data[position : position + pair_size]
            if len(pair) != pair_size or b"\0" not in pair:
                raise CorruptError(f"{what}: pair of {pair_size} bytes at {position}")
            name, _, value = pair.partition(b"\0")
            yield name, value
            position += pair_size

    def listxattr(self, ino: int) -> list[bytes]:
        return [name for name, _ in self._xattrs(self._inode(ino))]

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        for candidate, value in self._xattrs(self._inode(ino)):
            if candidate == name:
                return value
        return None

    # --- File data -------------------------------------------------------------------------

    def _record(self, inode: V5Inode, number: int) -> ChunkRecord:
        return read_record(
            self._mapped,
            inode.chunks_offset + number * L.CHUNK_INFO.size,
            f"inode {inode.ino} chunk {number}",
        )

    def _ref(self, inode: V5Inode, number: int, record: ChunkRecord, length: int) -> ChunkRef:
        what = f"inode {inode.ino} chunk {number}"
        if record.blob_index >= len(self.blobs):
            raise CorruptError(f"{what}: blob {record.blob_index} of {len(self.blobs)}")
        return record_to_ref(
            record, self.blobs[record.blob_index], record.file_offset, length, what
        )

    def chunks(self, ino: int, offset: int, size: int) -> list[ChunkRef]:
        if offset < 0 or size < 0:
            raise ValueError(f"file range {offset}+{size}")
        inode = self._inode(ino)
        if inode.kind != stat.S_IFREG:
            raise InodeTypeError(f"inode {ino}: not a regular file")
        end = min(offset + size, inode.size)
        if offset >= end:
            return []
        if inode.flags & L.RAFS_V5_INODE_HAS_HOLE:
            return self._sparse_chunks(inode, offset, end)
        refs = []
        chunk_size = self.chunk_size
        for number in range(offset // chunk_size, (end - 1) // chunk_size + 1):
            record = self._record(inode, number)
            file_offset = number * chunk_size
            if record.file_offset != file_offset:
                raise CorruptError(
                    f"inode {ino} chunk {number}: file_offset {record.file_offset}, "
                    f"expected {file_offset}"
                )
            length = min(chunk_size, inode.size - file_offset)
            refs.append(self._ref(inode, number, record, length))
        return refs

    def _sparse_chunks(self, inode: V5Inode, offset: int, end: int) -> list[ChunkRef]:
        """Chunks of a file with holes: records sorted by file offset, zeros in the gaps."""
        # Find the first record that ends after `offset`.
        low, high = 0, inode.child_count
        while low < high:
            middle = (low + high) // 2
            record = self._record(inode, middle)
            if record.file_offset + record.uncompressed_size <= offset:
                low = middle + 1
            else:
                high = middle
        refs: list[ChunkRef] = []
        position = offset
        for number in range(low, inode.child_count):
            record = self._record(inode, number)
            if record.file_offset >= end:
                break
            what = f"inode {inode.ino} chunk {number}"
            length = record.uncompressed_size
            if record.file_offset < (refs[-1].file_end if refs else 0):
                raise CorruptError(f"{what}: overlaps or precedes the chunk before it")
            if not 0 < length <= self.chunk_size or record.file_offset + length > inode.size:
                raise CorruptError(f"{what}: {length} bytes at file offset {record.file_offset}")
            if record.file_offset > position:
                gap = record.file_offset - position
                refs.append(ChunkRef(position, ZERO_FILL, 0, 0, 0, gap, False, None))
            refs.append(self._ref(inode, number, record, length))
            position = record.file_offset + length
        if position < end:
            refs.append(ChunkRef(position, ZERO_FILL, 0, 0, 0, end - position, False, None))
        return refs
