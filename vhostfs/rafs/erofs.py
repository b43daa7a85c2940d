"""EROFS images: the superblock, inodes, directories, xattrs and uncompressed data layouts.

This reads images made by mkfs.erofs (FLAT_PLAIN, FLAT_INLINE and CHUNK_BASED files, with or
without extra blob devices) and is the base of RAFS v6, which v6.py builds on. Compressed
inodes keep their metadata, but reading their data is refused. Directory blocks and xattr
areas are decoded by dirent.py and xattr.py.

Inode numbers are nids: the inode lives at meta_blkaddr * block_size + nid * 32. Directory
blocks hold a sorted dirent array followed by the names; blocks are sorted among themselves,
which makes lookup a binary search over blocks and then within one block.
"""

from __future__ import annotations

import bisect
import functools
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass

from vhostfs.rafs import layout as L
from vhostfs.rafs.base import DirEntry, InodeAttr, RafsImage, StatFs
from vhostfs.rafs.checksum import crc32c
from vhostfs.rafs.dirent import DirentBlock, decode_block, first_name
from vhostfs.rafs.errors import (
    CorruptError,
    InodeTypeError,
    NotDirectoryError,
    UnsupportedError,
)
from vhostfs.rafs.mapped import MappedFile
from vhostfs.rafs.xattr import xattr_entries
from vhostfs.storage.blob import IN_BOOTSTRAP, ZERO_FILL, BlobInfo, ChunkRef, Compressor

INODE_CACHE_SIZE = 4096
DIRENT_BLOCK_CACHE_SIZE = 256
FIRST_NAME_CACHE_SIZE = 8192
SYMLINK_MAX = 4095  # PATH_MAX without the NUL
# readdir offsets are (block << 16) | entry; a block holds at most 64 KiB / 12 entries.
_ENTRY_BITS = 16

_COMPRESSED_LAYOUTS = (L.LAYOUT_COMPRESSED_FULL, L.LAYOUT_COMPRESSED_COMPACT)
_KNOWN_LAYOUTS = (
    L.LAYOUT_FLAT_PLAIN,
    L.LAYOUT_COMPRESSED_FULL,
    L.LAYOUT_FLAT_INLINE,
    L.LAYOUT_COMPRESSED_COMPACT,
    L.LAYOUT_CHUNK_BASED,
)


@dataclass(frozen=True, slots=True)
class ErofsSuper:
    feature_compat: int
    block_size_bits: int
    root_nid: int
    inode_count: int
    build_time: int
    build_time_nsec: int
    blocks: int
    meta_blkaddr: int
    xattr_blkaddr: int
    feature_incompat: int
    extra_devices: int
    devt_slotoff: int


def read_super(mapped: MappedFile) -> ErofsSuper:
    (
        magic,
        _checksum,
        compat,
        blkszbits,
        _extslots,
        root_nid,
        inos,
        build_time,
        build_time_nsec,
        blocks,
        meta_blkaddr,
        xattr_blkaddr,
        _uuid,
        _volume_name,
        incompat,
        _compression,
        extra_devices,
        devt_slotoff,
    ) = mapped.unpack(L.EROFS_SUPER, L.EROFS_SUPER_OFFSET, "EROFS superblock")
    if magic != L.EROFS_MAGIC:
        raise CorruptError(f"EROFS superblock: magic {magic:#x}, expected {L.EROFS_MAGIC:#x}")
    if not 9 <= blkszbits <= 16:
        raise CorruptError(f"EROFS superblock: blkszbits {blkszbits} not in 9..16")
    if compat & L.COMPAT_SB_CHKSUM:
        _verify_checksum(mapped, 1 << blkszbits)
    if incompat & ~L.INCOMPAT_UNDERSTOOD:
        unknown = incompat & ~L.INCOMPAT_UNDERSTOOD
        raise UnsupportedError(f"EROFS superblock: feature_incompat bits {unknown:#x}")
    return ErofsSuper(
        compat,
        blkszbits,
        root_nid,
        inos,
        build_time,
        build_time_nsec,
        blocks,
        meta_blkaddr,
        xattr_blkaddr,
        incompat,
        extra_devices,
        devt_slotoff,
    )


def _verify_checksum(mapped: MappedFile, block_size: int) -> None:
    # crc32c of the superblock's block from offset 1024 on, with the checksum field as zero.
    length = block_size - L.EROFS_SUPER_OFFSET if block_size > L.EROFS_SUPER_OFFSET else block_size
    block = bytearray(mapped.read(L.EROFS_SUPER_OFFSET, length, "EROFS superblock block"))
    expected = int.from_bytes(block[4:8], "little")
    block[4:8] = bytes(4)
    actual = crc32c(block)
    if actual != expected:
        raise CorruptError(f"EROFS superblock: checksum {expected:#x}, computed {actual:#x}")


@dataclass(frozen=True, slots=True)
class ErofsInode:
    nid: int
    offset: int
    data_layout: int
    inode_size: int
    xattr_size: int
    mode: int
    nlink: int
    size: int
    i_u: int  # data block address, rdev or chunk format, depending on the inode
    uid: int
    gid: int
    mtime: int
    mtime_nsec: int

    @property
    def tail_offset(self) -> int:
        """Where inline data or the chunk index array starts: after the inode and its xattrs."""
        return self.offset + self.inode_size + self.xattr_size

    @property
    def kind(self) -> int:
        return stat.S_IFMT(self.mode)


class ErofsImage(RafsImage):
    format = "erofs"
    explicit_uid_gid = True

    def __init__(self, mapped: MappedFile) -> None:
        super().__init__(mapped)
        self.super = sb = read_super(mapped)
        self._check_super(sb)
        self.block_size = 1 << sb.block_size_bits
        self._meta_base = sb.meta_blkaddr * self.block_size
        if self._meta_base >= mapped.size:
            raise CorruptError(
                f"EROFS superblock: meta_blkaddr {sb.meta_blkaddr} lies beyond the image"
            )
        # Device ids in chunk indexes are masked to the bits needed for the device count.
        self._device_id_mask = (1 << sb.extra_devices.bit_length()) - 1
        self.blobs = self._read_blobs()
        self.root_ino = sb.root_nid
        self._inode = functools.lru_cache(maxsize=INODE_CACHE_SIZE)(self._decode_inode)
        self._dirent_block = functools.lru_cache(maxsize=DIRENT_BLOCK_CACHE_SIZE)(
            self._decode_dirent_block
        )
        # Lookups binary-search a directory's blocks by their first names; remembering those
        # spares re-reading the same few probe blocks for every name in a big directory.
        self._block_first_name = functools.lru_cache(maxsize=FIRST_NAME_CACHE_SIZE)(
            self._first_name
        )
        if self._inode(self.root_ino).kind != stat.S_IFDIR:
            raise CorruptError(f"EROFS superblock: root nid {self.root_ino} is not a directory")

    def _check_super(self, sb: ErofsSuper) -> None:
        """Format-specific superblock rules, checked before anything else is read."""

    # --- Blobs: the extra devices -----------------------------------------------------------

    def _device_slots(self) -> list[tuple[bytes, int, int]]:
        """(tag, blocks, mapped_blkaddr) of each extra device."""
        sb = self.super
        start = sb.devt_slotoff * L.DEVICE_SLOT.size
        if sb.extra_devices and start < L.EROFS_SUPER_OFFSET + L.EROFS_SUPER.size:
            raise CorruptError(
                f"EROFS superblock: devt_slotoff {sb.devt_slotoff} puts the device table "
                f"inside the superblock"
            )
        return [
            self._mapped.unpack(L.DEVICE_SLOT, start + i * L.DEVICE_SLOT.size, f"device slot {i}")
            for i in range(sb.extra_devices)
        ]

    def _read_blobs(self) -> tuple[BlobInfo, ...]:
        blobs = []
        for index, (tag, blocks, _mapped_blkaddr) in enumerate(self._device_slots()):
            size = blocks * self.block_size or None
            blobs.append(
                BlobInfo(
                    index=index,
                    blob_id=_device_name(tag),
                    compressor=Compressor.NONE,
                    digester=None,
                    chunk_size=self.block_size,
                    chunk_count=0,
                    compressed_size=size,
                    uncompressed_size=size,
                    features=0,
                )
            )
        return tuple(blobs)

    # --- Inodes ----------------------------------------------------------------------------

    def _decode_inode(self, nid: int) -> ErofsInode:
        what = f"inode {nid}"
        if nid < 0:
            raise CorruptError(f"{what}: negative nid")
        offset = self._meta_base + nid * L.INODE_SLOT_SIZE
        (i_format,) = self._mapped.unpack(L.I_FORMAT, offset, what)
        if i_format & ~L.I_FORMAT_KNOWN_BITS:
            raise CorruptError(f"{what}: i_format {i_format:#x} has unknown bits")
        data_layout = i_format >> 1
        if data_layout not in _KNOWN_LAYOUTS:
            raise CorruptError(f"{what}: i_format {i_format:#x}: unknown data layout")
        if i_format & L.I_VERSION_EXTENDED:
            (
                _,
                xattr_icount,
                mode,
                size,
                i_u,
                _ino,
                uid,
                gid,
                mtime,
                mtime_nsec,
                nlink,
            ) = self._mapped.unpack(L.INODE_EXTENDED, offset, what)
            inode_size = L.INODE_EXTENDED.size
        else:
            (
                _,
                xattr_icount,
                mode,
                nlink,
                size,
                relative_mtime,
                i_u,
                _ino,
                uid,
                gid,
            ) = self._mapped.unpack(L.INODE_COMPACT, offset, what)
            inode_size = L.INODE_COMPACT.size
            # Compact inodes store mtime relative to the build time (0 in older images).
            mtime = self.super.build_time + relative_mtime
            mtime_nsec = self.super.build_time_nsec
        xattr_size = 0 if xattr_icount == 0 else 12 + (xattr_icount - 1) * 4
        self._mapped.check_range(offset, inode_size + xattr_size, f"{what} and its xattrs")
        inode = ErofsInode(
            nid,
            offset,
            data_layout,
            inode_size,
            xattr_size,
            mode,
            nlink,
            size,
            i_u,
            uid,
            gid,
            mtime,
            mtime_nsec,
        )
        self._check_inode(inode)
        return inode

    def _check_inode(self, inode: ErofsInode) -> None:
        what = f"inode {inode.nid}"
        kind = inode.kind
        if kind not in L.FILE_TYPES:
            raise CorruptError(f"{what}: mode {inode.mode:o} has no valid file type")
        if kind in (stat.S_IFDIR, stat.S_IFLNK) and inode.data_layout == L.LAYOUT_CHUNK_BASED:
            raise CorruptError(f"{what}: a directory or symlink with chunk-based data")
        if kind == stat.S_IFLNK and not 0 < inode.size <= SYMLINK_MAX:
            raise CorruptError(f"{what}: symlink target of {inode.size} bytes")
        if kind == stat.S_IFDIR and inode.size < 2 * L.DIRENT.size:
            raise CorruptError(f"{what}: directory of {inode.size} bytes cannot hold . and ..")
        if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
            return  # device nodes, fifos and sockets have no data; i_u holds rdev
        if inode.data_layout in _COMPRESSED_LAYOUTS:
            return  # metadata is still served; reading the data is refused
        if inode.data_layout == L.LAYOUT_CHUNK_BASED:
            self._check_chunk_array(inode)
            return
        block_size = self.block_size
        full_blocks = (
            inode.size // block_size
            if inode.data_layout == L.LAYOUT_FLAT_INLINE
            else -(-inode.size // block_size)
        )
        if full_blocks:
            self._mapped.check_range(
                inode.i_u * block_size, full_blocks * block_size, f"{what}: data blocks"
            )
        tail = inode.size - full_blocks * block_size
        if inode.data_layout == L.LAYOUT_FLAT_INLINE and tail > 0:
            start = inode.tail_offset
            if start % block_size + tail > block_size:
                raise CorruptError(f"{what}: inline tail of {tail} bytes crosses a block end")
            self._mapped.check_range(start, tail, f"{what}: inline tail")

    def _chunk_format(self, inode: ErofsInode) -> tuple[int, int, int]:
        """(chunk size, entry size, array offset) of a chunk-based inode."""
        what = f"inode {inode.nid}"
        chunk_format = inode.i_u
        if chunk_format & ~(L.CHUNK_FORMAT_BLKBITS_MASK | L.CHUNK_FORMAT_INDEXES):
            raise CorruptError(f"{what}: chunk format {chunk_format:#x} has unknown bits")
        chunk_size = self._chunk_size_of(inode)
        entry_size = (
            L.CHUNK_INDEX.size if chunk_format & L.CHUNK_FORMAT_INDEXES else L.BLOCK_MAP_ENTRY.size
        )
        array_offset = -(-inode.tail_offset // entry_size) * entry_size
        return chunk_size, entry_size, array_offset

    def _chunk_size_of(self, inode: ErofsInode) -> int:
        return self.block_size << (inode.i_u & L.CHUNK_FORMAT_BLKBITS_MASK)

    def _check_chunk_array(self, inode: ErofsInode) -> None:
        chunk_size, entry_size, array_offset = self._chunk_format(inode)
        count = -(-inode.size // chunk_size)
        self._mapped.check_range(
            array_offset, count * entry_size, f"inode {inode.nid}: {count} chunk entries"
        )

    def _directory(self, ino: int) -> ErofsInode:
        inode = self._inode(ino)
        if inode.kind != stat.S_IFDIR:
            raise NotDirectoryError(f"inode {ino}: not a directory")
        return inode

    def getattr(self, ino: int) -> InodeAttr:
        inode = self._inode(ino)
        rdev = 0
        if inode.kind in (stat.S_IFCHR, stat.S_IFBLK):
            rdev = _decode_rdev(inode.i_u)
        return InodeAttr(
            ino=ino,
            mode=inode.mode,
            nlink=inode.nlink,
            uid=inode.uid,
            gid=inode.gid,
            size=inode.size,
            blocks=-(-inode.size // 512),
            rdev=rdev,
            mtime=inode.mtime,
            mtime_nsec=inode.mtime_nsec,
            blksize=self.block_size,
        )

    def statfs(self) -> StatFs:
        return StatFs(
            block_size=self.block_size,
            blocks=self.super.blocks,
            files=self.super.inode_count,
            name_max=L.NAME_MAX,
        )

    # --- Flat data (directories, symlinks, FLAT_* files) ----------------------------------

    def _flat_extents(self, inode: ErofsInode) -> list[tuple[int, int, int]]:
        """(file offset, image offset, length) of each contiguous stretch of a flat inode."""
        _refuse_compressed(inode)
        block_size = self.block_size
        if inode.data_layout == L.LAYOUT_FLAT_PLAIN:
            return [(0, inode.i_u * block_size, inode.size)] if inode.size else []
        full = inode.size // block_size * block_size
        extents = [(0, inode.i_u * block_size, full)] if full else []
        if inode.size > full:
            extents.append((full, inode.tail_offset, inode.size - full))
        return extents

    def _flat_read(self, inode: ErofsInode, offset: int, length: int) -> bytes:
        out = bytearray()
        end = min(offset + length, inode.size)
        for file_offset, image_offset, extent_length in self._flat_extents(inode):
            start = max(offset, file_offset)
            stop = min(end, file_offset + extent_length)
            if start < stop:
                out += self._mapped.read(
                    image_offset + start - file_offset, stop - start, f"inode {inode.nid} data"
                )
        return bytes(out)

    # --- Directories -----------------------------------------------------------------------

    def _dirent_block_count(self, directory: ErofsInode) -> int:
        return -(-directory.size // self.block_size)

    def _dirent_block_bytes(self, directory: ErofsInode, block: int) -> bytes:
        start = block * self.block_size
        return self._flat_read(directory, start, min(self.block_size, directory.size - start))

    def _decode_dirent_block(self, nid: int, block: int) -> DirentBlock:
        data = self._dirent_block_bytes(self._inode(nid), block)
        return decode_block(data, f"directory {nid} block {block}")

    def _first_name(self, nid: int, block: int) -> bytes:
        data = self._dirent_block_bytes(self._inode(nid), block)
        return first_name(data, f"directory {nid} block {block}")

    def _find(self, directory: ErofsInode, name: bytes) -> int | None:
        # The entry is in the last block whose first name is <= name.
        low, high = 0, self._dirent_block_count(directory) - 1
        candidate = -1
        while low <= high:
            middle = (low + high) // 2
            if self._block_first_name(directory.nid, middle) <= name:
                candidate, low = middle, middle + 1
            else:
                high = middle - 1
        if candidate < 0:
            return None
        block = self._dirent_block(directory.nid, candidate)
        i = bisect.bisect_left(block.names, name)
        if i < len(block.names) and block.names[i] == name:
            return block.nids[i]
        return None

    def lookup(self, parent_ino: int, name: bytes) -> int | None:
        directory = self._directory(parent_ino)
        if not 0 < len(name) <= L.NAME_MAX or b"/" in name:
            return None
        child = self._find(directory, name)
        if child is None or name in (b".", b".."):
            return child
        if child == parent_ino:
            raise CorruptError(f"directory {parent_ino}: entry {name!r} is the directory itself")
        if self._inode(child).kind == stat.S_IFDIR:
            self._check_parent_link(parent_ino, name, child)
        return child

    def _check_parent_link(self, parent_ino: int, name: bytes, child: int) -> None:
        # Each directory names its one parent in "..". Insisting that a directory is reached
        # only from that parent makes the tree a tree: no loops, no linked directories.
        back = self._find(self._inode(child), b"..")
        if back != parent_ino:
            raise CorruptError(
                f"directory {parent_ino}: entry {name!r} is directory {child}, whose '..' is "
                f"{back}: a loop or a hard-linked directory"
            )

    def readdir(self, ino: int, offset: int = 0) -> Iterator[DirEntry]:
        if offset < 0:
            raise ValueError(f"readdir offset {offset}")
        return self._entries(self._directory(ino), offset)

    def _entries(self, directory: ErofsInode, offset: int) -> Iterator[DirEntry]:
        block, index = offset >> _ENTRY_BITS, offset & ((1 << _ENTRY_BITS) - 1)
        for block_number in range(block, self._dirent_block_count(directory)):
            decoded = self._dirent_block(directory.nid, block_number)
            count = len(decoded.names)
            for i in range(index if block_number == block else 0, count):
                following = (
                    (block_number << _ENTRY_BITS) | (i + 1)
                    if i + 1 < count
                    else (block_number + 1) << _ENTRY_BITS
                )
                yield DirEntry(
                    decoded.names[i],
                    decoded.nids[i],
                    L.FILE_TYPE_TO_DT[decoded.file_types[i]],
                    following,
                )

    # --- Symlinks and xattrs ---------------------------------------------------------------

    def readlink(self, ino: int) -> bytes:
        inode = self._inode(ino)
        if inode.kind != stat.S_IFLNK:
            raise InodeTypeError(f"inode {ino}: not a symlink")
        return self._flat_read(inode, 0, inode.size)

    def _xattrs(self, inode: ErofsInode) -> Iterator[tuple[bytes, int, int]]:
        return xattr_entries(
            self._mapped,
            inode.offset + inode.inode_size,
            inode.xattr_size,
            self.super.xattr_blkaddr * self.block_size,
            f"inode {inode.nid} xattrs",
        )

    def listxattr(self, ino: int) -> list[bytes]:
        return [name for name, _, _ in self._xattrs(self._inode(ino))]

    def getxattr(self, ino: int, name: bytes) -> bytes | None:
        for candidate, value_offset, value_size in self._xattrs(self._inode(ino)):
            if candidate == name:
                return self._mapped.read(value_offset, value_size, f"inode {ino} xattr value")
        return None

    # --- File data -------------------------------------------------------------------------

    def chunks(self, ino: int, offset: int, size: int) -> list[ChunkRef]:
        if offset < 0 or size < 0:
            raise ValueError(f"file range {offset}+{size}")
        inode = self._inode(ino)
        if inode.kind != stat.S_IFREG:
            raise InodeTypeError(f"inode {ino}: not a regular file")
        end = min(offset + size, inode.size)
        if offset >= end:
            return []
        _refuse_compressed(inode)
        if inode.data_layout != L.LAYOUT_CHUNK_BASED:
            return [
                _bootstrap_ref(file_offset, image_offset, length)
                for file_offset, image_offset, length in self._flat_extents(inode)
                if file_offset < end and offset < file_offset + length
            ]
        chunk_size, entry_size, array_offset = self._chunk_format(inode)
        refs = []
        for number in range(offset // chunk_size, (end - 1) // chunk_size + 1):
            entry_offset = array_offset + number * entry_size
            what = f"inode {ino} chunk {number}"
            if entry_size == L.CHUNK_INDEX.size:
                advise, device_id, blkaddr = self._mapped.unpack(L.CHUNK_INDEX, entry_offset, what)
            else:
                advise, device_id = 0, 0
                (blkaddr,) = self._mapped.unpack(L.BLOCK_MAP_ENTRY, entry_offset, what)
            file_offset = number * chunk_size
            length = min(chunk_size, inode.size - file_offset)
            refs.append(self._chunk_ref(what, file_offset, length, advise, device_id, blkaddr))
        return refs

    def _chunk_ref(
        self, what: str, file_offset: int, length: int, advise: int, device_id: int, blkaddr: int
    ) -> ChunkRef:
        """Where one chunk of a plain EROFS file lives: the image, an extra device or nowhere."""
        if blkaddr == L.NULL_ADDR:
            return ChunkRef(file_offset, ZERO_FILL, 0, 0, 0, length, False, None)
        device = device_id & self._device_id_mask
        start = blkaddr * self.block_size
        if device == 0:
            self._mapped.check_range(start, length, f"{what}: data")
            return _bootstrap_ref(file_offset, start, length)
        if device > len(self.blobs):
            raise CorruptError(f"{what}: device {device} of {len(self.blobs)}")
        blob = self.blobs[device - 1]
        if blob.uncompressed_size is not None and start + length > blob.uncompressed_size:
            raise CorruptError(f"{what}: block {blkaddr} beyond device {device}")
        return ChunkRef(file_offset, device - 1, start, length, start, length, False, None)


def _refuse_compressed(inode: ErofsInode) -> None:
    if inode.data_layout in _COMPRESSED_LAYOUTS:
        raise UnsupportedError(
            f"inode {inode.nid}: compressed data (layout {inode.data_layout}) is not supported"
        )


def _bootstrap_ref(file_offset: int, image_offset: int, length: int) -> ChunkRef:
    return ChunkRef(
        file_offset, IN_BOOTSTRAP, image_offset, length, image_offset, length, False, None
    )


def _decode_rdev(encoded: int) -> int:
    # Linux's "new" 32-bit dev_t encoding, as mkfs.erofs stores st_rdev.
    major = (encoded & 0xFFF00) >> 8
    minor = (encoded & 0xFF) | ((encoded >> 12) & 0xFFF00)
    return os.makedev(major, minor)


def _device_name(tag: bytes) -> str:
    """A device slot's tag as a blob id: the text nydus puts there, else hex, else empty."""
    tag = tag.rstrip(b"\0")
    if tag and all(0x21 <= byte < 0x7F for byte in tag):
        return tag.decode("ascii")
    return tag.hex()
