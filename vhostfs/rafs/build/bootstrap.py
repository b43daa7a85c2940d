"""Writing the RAFS v6 bootstrap: an EROFS image whose file data lives in the blob.

    0       1024        1152          1408            4096         8192
    | zeros | EROFS sb  | RAFS ext sb | device table  | blob table | inodes ... | directory
      and symlink blocks | chunk table | padding to 4 KiB

Inodes come in tree.number_inodes() order, packed at 32-byte slots, each followed by its inline
xattrs and then either its chunk indexes (regular files) or, when it fits in the same block,
the tail of its directory or symlink data (FLAT_INLINE). What does not fit inline goes to whole
blocks after the inodes (FLAT_PLAIN, or the full blocks of a FLAT_INLINE inode). The layout
is computed first from sizes alone, so every nid is known before any directory is written.

The metadata area starts one block before the first inode, so the root (the first inode) gets
nid 128 rather than 0, which readdir would take for a deleted entry; nydus does the same.
"""

from __future__ import annotations

import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vhostfs.rafs import layout as L
from vhostfs.rafs.build.blob_writer import BlobSummary, Chunk, aligned
from vhostfs.rafs.build.compression import COMPRESSOR_CODE, DIGESTER_CODE
from vhostfs.rafs.build.errors import BuildError
from vhostfs.rafs.build.inodes import (
    FILE_TYPES,
    chunk_format,
    chunk_index,
    directory_data,
    directory_size,
    encode_rdev,
    fits_compact,
    inode_bytes,
    xattr_area,
    xattr_icount,
)
from vhostfs.rafs.build.tree import Inode, Node, display
from vhostfs.storage.blob import Compressor, Digester

BLOCK_SIZE = L.RAFS_V6_BLOCK_SIZE
DEVICE_TABLE_OFFSET = L.RAFS_V6_SUPERBLOCKS_END
MAPPED_BLKADDR_ALIGNMENT = 0x8_0000  # where nydus puts each blob in the flat address space
_COMPRESSION_FLAGS = {
    Compressor.NONE: L.FLAG_COMPRESSION_NONE,
    Compressor.LZ4_BLOCK: L.FLAG_COMPRESSION_LZ4,
    Compressor.GZIP: L.FLAG_COMPRESSION_GZIP,
    Compressor.ZSTD: L.FLAG_COMPRESSION_ZSTD,
}
_DIGEST_FLAGS = {Digester.BLAKE3: L.FLAG_HASH_BLAKE3, Digester.SHA256: L.FLAG_HASH_SHA256}
_ROOT_NID_MAX = 0xFFFF  # the superblock keeps the root nid in 16 bits


@dataclass(frozen=True, slots=True)
class ImageSettings:
    chunk_size: int
    compressor: Compressor
    digester: Digester


@dataclass(slots=True)
class _Placement:
    """Where one inode and its data go, decided before anything is written."""

    inode: Inode
    offset: int
    compact: bool
    xattrs: bytes
    data_layout: int
    size: int  # i_size
    inline_size: int  # bytes of data right after the inode and its xattrs
    data_blocks: int  # whole blocks in the data area
    blkaddr: int = 0  # first of them

    @property
    def header_size(self) -> int:
        """Inode plus inline xattrs: where its inline data or chunk indexes begin."""
        inode = L.INODE_COMPACT.size if self.compact else L.INODE_EXTENDED.size
        return inode + len(self.xattrs)


def write_bootstrap(
    path: Path,
    inodes: Sequence[Inode],
    file_chunks: dict[Node, list[Chunk]],
    chunks: Sequence[Chunk],
    blobs: Sequence[BlobSummary],
    settings: ImageSettings,
    prefetch: Sequence[Node] = (),
) -> int:
    """Write the bootstrap to `path`; returns its size. `blobs` are in blob-table order, and
    each chunk's blob_index points into them. `prefetch` lists the files and directories the
    prefetch table names (nydusd warms them first), in order."""
    blob_count = len(blobs)
    if blob_count > L.RAFS_V6_MAX_BLOBS:
        raise BuildError(f"{blob_count} blobs: a RAFS v6 image holds at most {L.RAFS_V6_MAX_BLOBS}")
    blob_table_offset = aligned(DEVICE_TABLE_OFFSET + L.DEVICE_SLOT.size * blob_count)
    blob_table_size = L.RAFS_V6_BLOB_ENTRY.size * blob_count
    inodes_start = aligned(blob_table_offset + blob_table_size)
    meta_base = inodes_start - BLOCK_SIZE

    placements, inodes_end = _place_inodes(inodes, file_chunks, inodes_start)
    data_end = _place_data_blocks(placements, aligned(inodes_end))
    chunk_table_offset = data_end
    chunk_table = b"".join(_chunk_record(chunk) for chunk in sorted(chunks, key=_by_digest))
    nids = {p.inode.node: (p.offset - meta_base) // L.INODE_SLOT_SIZE for p in placements}
    prefetch_table = b"".join(L.PREFETCH_ENTRY.pack(nids[node]) for node in prefetch)
    prefetch_table_offset = chunk_table_offset + len(chunk_table) if prefetch_table else 0
    size = aligned(chunk_table_offset + len(chunk_table) + len(prefetch_table))

    image = bytearray(size)
    for placement in placements:
        _write_inode(image, placement, nids, file_chunks, settings)
    image[chunk_table_offset : chunk_table_offset + len(chunk_table)] = chunk_table
    if prefetch_table:
        end = prefetch_table_offset + len(prefetch_table)
        image[prefetch_table_offset:end] = prefetch_table

    root_nid = nids[inodes[0].node]
    if root_nid > _ROOT_NID_MAX:
        raise BuildError(f"root nid {root_nid} does not fit the superblock")
    flags = (
        _COMPRESSION_FLAGS[settings.compressor]
        | _DIGEST_FLAGS[settings.digester]
        | L.FLAG_EXPLICIT_UID_GID
    )
    if any(p.xattrs for p in placements):
        flags |= L.FLAG_HAS_XATTR
    if blobs:
        flags |= L.FLAG_INLINED_CHUNK_DIGEST  # each blob carries its blob.digest
    blob_blocks = sum(blob.uncompressed_size // BLOCK_SIZE for blob in blobs)
    L.EROFS_SUPER.pack_into(
        image,
        L.EROFS_SUPER_OFFSET,
        L.EROFS_MAGIC,
        0,  # no checksum: nydusd refuses one
        L.COMPAT_RAFS_V6,
        BLOCK_SIZE.bit_length() - 1,
        0,
        root_nid,
        len(inodes),
        0,  # build time: compact inodes take theirs from here, and they all have mtime 0
        0,
        blob_blocks,
        meta_base // BLOCK_SIZE,
        0,  # no shared xattrs
        bytes(16),
        bytes(16),
        L.INCOMPAT_CHUNKED_FILE | L.INCOMPAT_DEVICE_TABLE,
        0,
        blob_count,
        DEVICE_TABLE_OFFSET // L.DEVICE_SLOT.size,
    )
    L.RAFS_V6_EXT_SUPER.pack_into(
        image,
        L.RAFS_V6_EXT_SUPER_OFFSET,
        flags,
        blob_table_offset,
        blob_table_size,
        settings.chunk_size,
        chunk_table_offset,
        len(chunk_table),
        prefetch_table_offset,
        len(prefetch_table),
    )
    mapped = size  # each blob's place in the flat address space, after the bootstrap's
    for index, blob in enumerate(blobs):
        mapped = -(-mapped // MAPPED_BLKADDR_ALIGNMENT) * MAPPED_BLKADDR_ALIGNMENT
        blocks = blob.uncompressed_size // BLOCK_SIZE
        L.DEVICE_SLOT.pack_into(
            image,
            DEVICE_TABLE_OFFSET + L.DEVICE_SLOT.size * index,
            blob.blob_id.encode(),
            blocks,
            mapped // BLOCK_SIZE,
        )
        entry_at = blob_table_offset + L.RAFS_V6_BLOB_ENTRY.size * index
        image[entry_at : entry_at + L.RAFS_V6_BLOB_ENTRY.size] = _blob_entry(blob, index, settings)
        mapped += blocks * BLOCK_SIZE
    path.write_bytes(image)
    return size


def _by_digest(chunk: Chunk) -> bytes:
    # nydus keeps the chunk table in (digest, blob) order.
    return chunk.digest


# --- Layout --------------------------------------------------------------------------------


def _place_inodes(
    inodes: Sequence[Inode], file_chunks: dict[Node, list[Chunk]], start: int
) -> tuple[list[_Placement], int]:
    placements = []
    cursor = start
    for inode in inodes:
        placement = _plan(inode)
        header = placement.header_size
        if placement.data_layout == L.LAYOUT_CHUNK_BASED:
            footprint = -(-header // L.CHUNK_INDEX.size) * L.CHUNK_INDEX.size
            footprint += L.CHUNK_INDEX.size * len(file_chunks.get(inode.node, ()))
        else:
            footprint = header + placement.inline_size
        # Inline data must sit in the inode's block (the kernel reads it from there); keep
        # every inode header inside one block too, as mkfs.erofs does.
        keep_together = header + placement.inline_size
        if cursor % BLOCK_SIZE + keep_together > BLOCK_SIZE:
            cursor = aligned(cursor)
        placement.offset = cursor
        cursor += -(-footprint // L.INODE_SLOT_SIZE) * L.INODE_SLOT_SIZE
        placements.append(placement)
    return placements, cursor


def _plan(inode: Inode) -> _Placement:
    node = inode.node
    kind = node.kind
    if kind == stat.S_IFDIR:
        for name in node.entries:
            if len(name) > L.NAME_MAX:
                raise BuildError(
                    f"{display((*inode.path, name[:40]))}...: name longer than 255 bytes"
                )
        size = directory_size(_directory_names(node))
    elif kind == stat.S_IFLNK:
        size = len(node.target)
        if not 0 < size < BLOCK_SIZE:
            raise BuildError(
                f"{display(inode.path)}: symlink target of {size} bytes (1..4095 allowed)"
            )
    else:
        size = node.size
    compact = fits_compact(
        node.mode, inode.nlink, size, node.uid, node.gid, node.mtime, node.mtime_nsec
    )
    if max(node.uid, node.gid, inode.nlink) > 0xFFFF_FFFF:
        raise BuildError(f"{display(inode.path)}: uid, gid or link count does not fit 32 bits")
    placement = _Placement(
        inode=inode,
        offset=0,
        compact=compact,
        xattrs=xattr_area(node.xattrs, display(inode.path)) if node.xattrs else b"",
        data_layout=L.LAYOUT_FLAT_PLAIN,
        size=size,
        inline_size=0,
        data_blocks=0,
    )
    if kind == stat.S_IFREG:
        placement.data_layout = L.LAYOUT_CHUNK_BASED
    elif kind in (stat.S_IFDIR, stat.S_IFLNK):
        tail = size % BLOCK_SIZE
        if tail and placement.header_size + tail <= BLOCK_SIZE:
            placement.data_layout = L.LAYOUT_FLAT_INLINE
            placement.inline_size = tail
            placement.data_blocks = size // BLOCK_SIZE
        else:
            placement.data_blocks = -(-size // BLOCK_SIZE)
    return placement


def _place_data_blocks(placements: list[_Placement], start: int) -> int:
    cursor = start
    for placement in placements:
        if placement.data_blocks:
            placement.blkaddr = cursor // BLOCK_SIZE
            cursor += placement.data_blocks * BLOCK_SIZE
    return cursor


def _directory_names(node: Node) -> list[bytes]:
    return sorted([b".", b"..", *node.entries])


# --- Serialising ---------------------------------------------------------------------------


def _write_inode(
    image: bytearray,
    placement: _Placement,
    nids: dict[Node, int],
    file_chunks: dict[Node, list[Chunk]],
    settings: ImageSettings,
) -> None:
    inode = placement.inode
    node = inode.node
    kind = node.kind
    i_u = placement.blkaddr
    data = b""
    if kind == stat.S_IFREG:
        i_u = chunk_format(settings.chunk_size)
    elif kind in (stat.S_IFCHR, stat.S_IFBLK):
        i_u = encode_rdev(node.rdev)
    elif kind == stat.S_IFDIR:
        data = directory_data(_directory_entries(inode, nids))
    elif kind == stat.S_IFLNK:
        data = node.target
    header = (
        inode_bytes(
            compact=placement.compact,
            data_layout=placement.data_layout,
            xattr_icount=xattr_icount(len(placement.xattrs)),
            mode=node.mode,
            nlink=inode.nlink,
            size=placement.size,
            i_u=i_u,
            ino=inode.number + 1,
            uid=node.uid,
            gid=node.gid,
            mtime=node.mtime,
            mtime_nsec=node.mtime_nsec,
        )
        + placement.xattrs
    )
    start = placement.offset
    image[start : start + len(header)] = header
    after = start + len(header)
    if kind == stat.S_IFREG:
        indexes = b"".join(
            chunk_index(chunk.blob_index, chunk.index, chunk.uncompressed_offset)
            for chunk in file_chunks.get(node, ())
        )
        at = -(-after // L.CHUNK_INDEX.size) * L.CHUNK_INDEX.size
        image[at : at + len(indexes)] = indexes
        return
    blocks_bytes = placement.data_blocks * BLOCK_SIZE
    in_blocks = data[:blocks_bytes]
    block_start = placement.blkaddr * BLOCK_SIZE
    image[block_start : block_start + len(in_blocks)] = in_blocks
    inline = data[blocks_bytes:] if placement.inline_size else b""
    image[after : after + len(inline)] = inline


def _directory_entries(inode: Inode, nids: dict[Node, int]) -> list[tuple[bytes, int, int]]:
    node = inode.node
    entries = [
        (b".", nids[node], FILE_TYPES[stat.S_IFDIR]),
        (b"..", nids[inode.parent], FILE_TYPES[stat.S_IFDIR]),
    ]
    entries += [(name, nids[child], FILE_TYPES[child.kind]) for name, child in node.entries.items()]
    entries.sort()
    return entries


def _chunk_record(chunk: Chunk) -> bytes:
    return L.CHUNK_INFO.pack(
        chunk.digest,
        chunk.blob_index,
        L.CHUNK_COMPRESSED if chunk.compressed else 0,
        chunk.compressed_size,
        chunk.uncompressed_size,
        chunk.compressed_offset,
        chunk.uncompressed_offset,
        0,  # file offset: records are shared between files
        chunk.index,
        0,
    )


def _blob_entry(blob: BlobSummary, index: int, settings: ImageSettings) -> bytes:
    return L.RAFS_V6_BLOB_ENTRY.pack(
        blob.blob_id.encode(),
        index,
        settings.chunk_size,
        blob.chunk_count,
        COMPRESSOR_CODE[settings.compressor],
        DIGESTER_CODE[settings.digester],
        blob.features,
        blob.compressed_size,
        blob.uncompressed_size,
        blob.toc_size,
        COMPRESSOR_CODE[blob.ci_compressor],
        blob.ci_offset,
        blob.ci_compressed_size,
        blob.ci_uncompressed_size,
        blob.toc_digest,
        bytes(32),
        0,
        bytes(8),
        L.CIPHER_NONE,
    )
