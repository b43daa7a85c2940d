"""The 80-byte chunk record: RAFS v5 keeps one per file chunk after each inode, RAFS v6 keeps
the unique ones in the chunk table at the end of the bootstrap.
"""

from __future__ import annotations

from typing import NamedTuple

from vhostfs.rafs import layout as L
from vhostfs.rafs.errors import CorruptError, UnsupportedError
from vhostfs.rafs.mapped import MappedFile
from vhostfs.storage.blob import ZERO_FILL, BlobInfo, ChunkRef


class ChunkRecord(NamedTuple):
    digest: bytes
    blob_index: int
    flags: int
    compressed_size: int
    uncompressed_size: int
    compressed_offset: int
    uncompressed_offset: int
    file_offset: int  # v5 only; 0 in the deduplicated v6 table
    chunk_index: int  # in the blob's chunk-info array
    crc32: int


def read_record(mapped: MappedFile, offset: int, what: str) -> ChunkRecord:
    return ChunkRecord(*mapped.unpack(L.CHUNK_INFO, offset, what))


def record_to_ref(
    record: ChunkRecord, blob: BlobInfo, file_offset: int, length: int, what: str
) -> ChunkRef:
    """The ChunkRef for `length` file bytes at `file_offset`, once the record checks out
    against its blob and against the file range it is supposed to cover."""
    flags = record.flags
    if flags & ~L.CHUNK_FLAGS_KNOWN:
        raise CorruptError(f"{what}: chunk flags {flags:#x}")
    if flags & (L.CHUNK_ENCRYPTED | L.CHUNK_BATCH):
        raise UnsupportedError(f"{what}: encrypted or batch chunk (flags {flags:#x})")
    if record.uncompressed_size != length:
        raise CorruptError(
            f"{what}: chunk of {record.uncompressed_size} bytes for {length} file bytes"
        )
    if flags & L.CHUNK_HOLE:
        return ChunkRef(file_offset, ZERO_FILL, 0, 0, 0, length, False, None, record.chunk_index)
    if record.chunk_index >= blob.chunk_count and blob.chunk_count:
        raise CorruptError(f"{what}: chunk index {record.chunk_index} of {blob.chunk_count}")
    compressed = bool(flags & L.CHUNK_COMPRESSED)
    if not compressed and record.compressed_size != length:
        raise CorruptError(
            f"{what}: stored uncompressed, yet {record.compressed_size} bytes for {length}"
        )
    if not 0 < record.compressed_size <= 2 * L.MAX_CHUNK_SIZE:
        raise CorruptError(f"{what}: compressed_size {record.compressed_size}")
    compressed_end = record.compressed_offset + record.compressed_size
    if blob.compressed_size is not None and compressed_end > blob.compressed_size:
        raise CorruptError(
            f"{what}: compressed bytes end at {compressed_end}, past the blob's "
            f"{blob.compressed_size}"
        )
    uncompressed_end = record.uncompressed_offset + length
    if blob.uncompressed_size is not None and uncompressed_end > blob.uncompressed_size:
        raise CorruptError(
            f"{what}: uncompressed bytes end at {uncompressed_end}, past the blob's "
            f"{blob.uncompressed_size}"
        )
    return ChunkRef(
        file_offset=file_offset,
        blob_index=blob.index,
        compressed_offset=record.compressed_offset,
        compressed_size=record.compressed_size,
        uncompressed_offset=record.uncompressed_offset,
        uncompressed_size=length,
        compressed=compressed,
        digest=record.digest,
        chunk_index=record.chunk_index,
    )
