"""RAFS v6: an EROFS image plus nydus' extended superblock, blob table and chunk table.

Directories, symlinks and xattrs are plain EROFS (erofs.py). Regular files are chunk-based with
nydus' own reading of the 8-byte chunk index: device_id's low byte is blob index + 1, the
remaining bits (device_id's high byte, then `advise`) are the chunk's index in that blob's
chunk-info array, and blkaddr is its uncompressed offset in the blob / 4096. The chunk table at
the end of the bootstrap (80-byte records) supplies the sizes, offsets and digest of each chunk.
"""

from __future__ import annotations

import bisect
import itertools
from array import array
from dataclasses import dataclass

from vhostfs.rafs import layout as L
from vhostfs.rafs.chunkinfo import read_record, record_to_ref
from vhostfs.rafs.erofs import ErofsImage, ErofsInode, ErofsSuper
from vhostfs.rafs.errors import CorruptError, UnsupportedError
from vhostfs.rafs.mapped import MappedFile
from vhostfs.storage.blob import (
    COMPRESSOR_BY_CODE,
    DIGESTER_BY_CODE,
    ZERO_FILL,
    BlobInfo,
    BlobMetaLocation,
    ChunkRef,
)

_COMPRESSION_FLAGS = (
    L.FLAG_COMPRESSION_NONE
    | L.FLAG_COMPRESSION_LZ4
    | L.FLAG_COMPRESSION_GZIP
    | L.FLAG_COMPRESSION_ZSTD
)
_HASH_FLAGS = L.FLAG_HASH_BLAKE3 | L.FLAG_HASH_SHA256
_MAX_COMPRESSED_BLOB = 1 << 40
_MAX_UNCOMPRESSED_BLOB = 1 << 44
# The chunk table index packs (blob index, chunk index) above a 32-bit record number.
_RECORD_BITS = 32


@dataclass(frozen=True, slots=True)
class RafsV6ExtSuper:
    flags: int
    blob_table_offset: int
    blob_table_size: int
    chunk_size: int
    chunk_table_offset: int
    chunk_table_size: int
    prefetch_table_offset: int
    prefetch_table_size: int


def read_ext_super(mapped: MappedFile) -> RafsV6ExtSuper:
    ext = RafsV6ExtSuper(
        *mapped.unpack(L.RAFS_V6_EXT_SUPER, L.RAFS_V6_EXT_SUPER_OFFSET, "RAFS v6 superblock")
    )
    what = "RAFS v6 superblock"
    if ext.flags & ~L.FLAGS_KNOWN:
        raise CorruptError(f"{what}: s_flags {ext.flags:#x} has unknown bits")
    if (ext.flags & _COMPRESSION_FLAGS).bit_count() != 1:
        raise CorruptError(f"{what}: s_flags {ext.flags:#x}: not exactly one compressor bit")
    if (ext.flags & _HASH_FLAGS).bit_count() != 1:
        raise CorruptError(f"{what}: s_flags {ext.flags:#x}: not exactly one digester bit")
    if ext.flags & L.FLAG_TARFS_MODE:
        raise UnsupportedError(f"{what}: tarfs mode images")
    if ext.flags & L.FLAG_ENCRYPTION_AES_128_XTS:
        raise UnsupportedError(f"{what}: encrypted images")
    if not _is_power_of_two(ext.chunk_size) or not (
        L.MIN_CHUNK_SIZE <= ext.chunk_size <= L.MAX_CHUNK_SIZE
    ):
        raise CorruptError(f"{what}: s_chunk_size {ext.chunk_size:#x}")
    if ext.blob_table_size % L.RAFS_V6_BLOB_ENTRY.size:
        raise CorruptError(f"{what}: s_blob_table_size {ext.blob_table_size} not whole entries")
    if ext.blob_table_offset % L.RAFS_V6_BLOCK_SIZE:
        raise CorruptError(f"{what}: s_blob_table_offset {ext.blob_table_offset} not 4K aligned")
    if ext.chunk_table_size % L.CHUNK_INFO.size:
        raise CorruptError(f"{what}: s_chunk_table_size {ext.chunk_table_size} not whole records")
    if ext.chunk_table_size and ext.chunk_table_offset % L.RAFS_V6_BLOCK_SIZE:
        raise CorruptError(f"{what}: s_chunk_table_offset {ext.chunk_table_offset} not aligned")
    if ext.prefetch_table_offset and ext.prefetch_table_size % L.PREFETCH_ENTRY.size:
        raise CorruptError(f"{what}: s_prefetch_table_size {ext.prefetch_table_size}")
    return ext


class RafsV6Image(ErofsImage):
    format = "rafs-v6"

    def __init__(self, mapped: MappedFile) -> None:
        if mapped.size % L.RAFS_V6_BLOCK_SIZE:
            raise CorruptError(f"RAFS v6 bootstrap: size {mapped.size} not a multiple of 4096")
        self.ext = ext = read_ext_super(mapped)  # the blob table, read by ErofsImage, needs it
        self.chunk_size = ext.chunk_size
        self.explicit_uid_gid = bool(ext.flags & L.FLAG_EXPLICIT_UID_GID)
        self.has_xattr_flag = bool(ext.flags & L.FLAG_HAS_XATTR)
        self._chunk_index: array[int] | None = None
        super().__init__(mapped)
        self._check_tables_apart()

    def _check_super(self, sb: ErofsSuper) -> None:
        if sb.block_size_bits != 12:
            raise CorruptError(f"RAFS v6 superblock: blkszbits {sb.block_size_bits}, expected 12")
        if sb.feature_incompat & L.INCOMPAT_COMPRESSION_ONLY:
            raise CorruptError(f"RAFS v6 superblock: compression features {sb.feature_incompat:#x}")

    def _check_tables_apart(self) -> None:
        ext, sb = self.ext, self.super
        regions = [
            (
                "superblocks",
                L.EROFS_SUPER_OFFSET,
                L.RAFS_V6_SUPERBLOCKS_END - L.EROFS_SUPER_OFFSET,
            ),
            ("device table", sb.devt_slotoff * L.DEVICE_SLOT.size, 128 * sb.extra_devices),
            ("blob table", ext.blob_table_offset, ext.blob_table_size),
            ("chunk table", ext.chunk_table_offset, ext.chunk_table_size),
        ]
        if ext.prefetch_table_offset:
            regions.append(("prefetch table", ext.prefetch_table_offset, ext.prefetch_table_size))
        self._mapped.check_regions(regions, "RAFS v6")

    def prefetch_table(self) -> list[int]:
        ext = self.ext
        if not ext.prefetch_table_offset:
            return []  # legacy images may give a size without a table
        table = self._mapped.read(
            ext.prefetch_table_offset, ext.prefetch_table_size, "RAFS v6 prefetch table"
        )
        return [nid for (nid,) in L.PREFETCH_ENTRY.iter_unpack(table)]

    # --- Blob table ------------------------------------------------------------------------

    def _read_blobs(self) -> tuple[BlobInfo, ...]:
        ext = self.ext
        count = ext.blob_table_size // L.RAFS_V6_BLOB_ENTRY.size
        if count > L.RAFS_V6_MAX_BLOBS:
            raise CorruptError(f"RAFS v6 blob table: {count} blobs, at most 255 allowed")
        slots = self._device_slots()
        if len(slots) != count:
            raise CorruptError(
                f"RAFS v6 superblock: {len(slots)} extra devices but {count} blob table entries"
            )
        blobs = tuple(self._read_blob(index) for index in range(count))
        for blob, (tag, _, _) in zip(blobs, slots, strict=True):
            if tag.rstrip(b"\0") != blob.blob_id.encode():
                raise CorruptError(f"device slot {blob.index}: id differs from the blob table")
        if len({blob.blob_id for blob in blobs}) != count:
            raise CorruptError("RAFS v6 blob table: duplicate blob ids")
        return blobs

    def _read_blob(self, index: int) -> BlobInfo:
        what = f"RAFS v6 blob table entry {index}"
        (
            raw_id,
            blob_index,
            chunk_size,
            chunk_count,
            compression,
            digest,
            features,
            compressed_size,
            uncompressed_size,
            toc_size,
            ci_compression,
            ci_offset,
            ci_compressed_size,
            ci_uncompressed_size,
            toc_digest,
            _meta_digest,
            _meta_size,
            _iv,
            cipher,
        ) = self._mapped.unpack(
            L.RAFS_V6_BLOB_ENTRY,
            self.ext.blob_table_offset + index * L.RAFS_V6_BLOB_ENTRY.size,
            what,
        )
        blob_id = _blob_id(raw_id, what)
        what = f"blob {blob_id}"
        if blob_index != index:
            raise CorruptError(f"{what}: blob_index {blob_index} in table slot {index}")
        if chunk_size != self.ext.chunk_size:
            raise CorruptError(f"{what}: chunk_size {chunk_size:#x} differs from superblock")
        if chunk_count > L.MAX_CHUNKS_PER_BLOB:
            raise CorruptError(f"{what}: chunk_count {chunk_count}")
        if compression not in COMPRESSOR_BY_CODE or ci_compression not in COMPRESSOR_BY_CODE:
            raise CorruptError(f"{what}: compression {compression}/{ci_compression}")
        if digest not in DIGESTER_BY_CODE:
            raise CorruptError(f"{what}: digest_algo {digest}")
        _check_features(features, what)
        if cipher != L.CIPHER_NONE:
            raise UnsupportedError(f"{what}: cipher {cipher}")
        if compressed_size > _MAX_COMPRESSED_BLOB or uncompressed_size > _MAX_UNCOMPRESSED_BLOB:
            raise CorruptError(f"{what}: sizes {compressed_size}/{uncompressed_size}")
        chunk_info_v2 = bool(features & L.BLOB_CHUNK_INFO_V2)
        entry_size = L.CI_ENTRY_V2.size if chunk_info_v2 else L.CI_ENTRY_V1.size
        if ci_uncompressed_size != chunk_count * entry_size:
            raise CorruptError(
                f"{what}: ci_uncompressed_size {ci_uncompressed_size} for {chunk_count} chunks"
            )
        return BlobInfo(
            index=index,
            blob_id=blob_id,
            compressor=COMPRESSOR_BY_CODE[compression],
            digester=DIGESTER_BY_CODE[digest],
            chunk_size=chunk_size,
            chunk_count=chunk_count,
            compressed_size=compressed_size,
            uncompressed_size=uncompressed_size,
            features=features,
            meta=BlobMetaLocation(
                ci_compressor=COMPRESSOR_BY_CODE[ci_compression],
                ci_offset=ci_offset,
                ci_compressed_size=ci_compressed_size,
                ci_uncompressed_size=ci_uncompressed_size,
                chunk_info_v2=chunk_info_v2,
                toc_size=toc_size,
                toc_digest=toc_digest,
            ),
        )

    # --- Chunks ----------------------------------------------------------------------------

    def _chunk_size_of(self, inode: ErofsInode) -> int:
        # The per-inode chunk bits may be larger (a kernel hint); nydus indexes by this size.
        return self.chunk_size

    def _chunk_format(self, inode: ErofsInode) -> tuple[int, int, int]:
        if not inode.i_u & L.CHUNK_FORMAT_INDEXES:
            raise CorruptError(f"inode {inode.nid}: RAFS v6 file without chunk indexes")
        return super()._chunk_format(inode)

    def _chunk_ref(
        self, what: str, file_offset: int, length: int, advise: int, device_id: int, blkaddr: int
    ) -> ChunkRef:
        blob_number = device_id & 0xFF
        if blob_number == 0:
            if blkaddr == L.NULL_ADDR:
                return ChunkRef(file_offset, ZERO_FILL, 0, 0, 0, length, False, None)
            raise CorruptError(f"{what}: device_id {device_id:#x} names no blob")
        blob_index = blob_number - 1
        if blob_index >= len(self.blobs):
            raise CorruptError(f"{what}: blob {blob_index} of {len(self.blobs)}")
        blob = self.blobs[blob_index]
        chunk_index = (device_id >> 8) << 16 | advise
        record_offset = self._find_record(blob_index, chunk_index, what)
        record = read_record(self._mapped, record_offset, f"{what}: chunk table record")
        what = f"{what} (blob {blob.blob_id} chunk {chunk_index})"
        if record.uncompressed_offset != blkaddr * L.RAFS_V6_BLOCK_SIZE:
            raise CorruptError(f"{what}: blkaddr {blkaddr} differs from the chunk table")
        return record_to_ref(record, blob, file_offset, length, what)

    def blob_chunks(self, blob_index: int, first: int, count: int) -> list[ChunkRef]:
        if not 0 <= blob_index < len(self.blobs) or first < 0:
            return []
        blob = self.blobs[blob_index]
        refs = []
        for chunk_index in range(first, min(first + count, blob.chunk_count)):
            what = f"blob {blob.blob_id} chunk {chunk_index}"
            offset = self._find_record(blob_index, chunk_index, what)
            record = read_record(self._mapped, offset, what)
            refs.append(record_to_ref(record, blob, 0, record.uncompressed_size, what))
        return refs

    def _find_record(self, blob_index: int, chunk_index: int, what: str) -> int:
        """The file offset of the chunk table record for (blob, chunk index)."""
        table = self._chunk_table_index()
        key = (blob_index << 24 | chunk_index) << _RECORD_BITS
        position = bisect.bisect_left(table, key)
        if position == len(table) or table[position] >> _RECORD_BITS != key >> _RECORD_BITS:
            raise CorruptError(f"{what}: blob {blob_index} chunk {chunk_index} not in chunk table")
        record_number = table[position] & ((1 << _RECORD_BITS) - 1)
        return self.ext.chunk_table_offset + record_number * L.CHUNK_INFO.size

    def _chunk_table_index(self) -> array[int]:
        """Sorted (blob index, chunk index, record number) keys, built on the first read.

        The table is sorted by digest, not by position in a blob, so finding a chunk needs an
        index. Eight bytes per chunk keep it small for images with millions of chunks.
        """
        if self._chunk_index is not None:
            return self._chunk_index
        if not self.ext.chunk_table_size:
            raise UnsupportedError(
                "RAFS v6 bootstrap without a chunk table: chunk info lives only in the blobs"
            )
        table = self._mapped.read(
            self.ext.chunk_table_offset, self.ext.chunk_table_size, "RAFS v6 chunk table"
        )
        keys = []
        for number, (blob_index, chunk_index) in enumerate(L.CHUNK_TABLE_KEY.iter_unpack(table)):
            if blob_index >= len(self.blobs) or chunk_index >= self.blobs[blob_index].chunk_count:
                raise CorruptError(
                    f"RAFS v6 chunk table record {number}: blob {blob_index} chunk {chunk_index}"
                )
            keys.append((blob_index << 24 | chunk_index) << _RECORD_BITS | number)
        keys.sort()
        for previous, key in itertools.pairwise(keys):
            if previous >> _RECORD_BITS == key >> _RECORD_BITS:
                raise CorruptError(
                    f"RAFS v6 chunk table: records {previous & 0xFFFFFFFF} and "
                    f"{key & 0xFFFFFFFF} describe the same chunk"
                )
        self._chunk_index = array("Q", keys)
        return self._chunk_index


def _blob_id(raw: bytes, what: str) -> str:
    blob_id = raw.rstrip(b"\0")
    if not blob_id or not all(0x21 <= byte < 0x7F and byte != 0x2F for byte in blob_id):
        raise CorruptError(f"{what}: blob id {raw[:64]!r} is not printable ASCII")
    return blob_id.decode("ascii")


def _check_features(features: int, what: str) -> None:
    for bit, name in L.BLOB_FEATURES_REFUSED.items():
        if features & bit:
            raise UnsupportedError(f"{what}: {name} blobs are not supported")
    if features & ~L.BLOB_FEATURES_KNOWN:
        raise UnsupportedError(f"{what}: unknown blob features {features:#x}")
    if not features & L.BLOB_ALIGNED:
        raise CorruptError(f"{what}: features {features:#x} lack ALIGNED")


def _is_power_of_two(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0
