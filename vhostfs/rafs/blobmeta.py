"""What a RAFS v6 data blob says about itself: its table of contents, chunk-info array and
chunk digest array.

A blob built by nydus v2.2+ ends with a ToC: 128-byte entries naming each part of the blob
(image.blob, blob.meta, blob.digest...), followed by a 512-byte tar header. The chunk-info (CI)
array sits at the offset the bootstrap's blob table gives, optionally compressed, followed by a
4 KiB header that must agree with the blob table. Everything read here comes from the blob, so
a mismatch is a BlobError; sizes that come from the bootstrap are checked where they are used.
The bytes are read through the storage layer's facade (vhostfs.storage.sync), from whatever
backend serves the image; bytes that cannot be fetched or decoded are StorageErrors.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass

from vhostfs.rafs import layout as L
from vhostfs.rafs.errors import BlobError, UnsupportedError
from vhostfs.storage.blob import COMPRESSOR_BY_CODE, BlobInfo, BlobMetaLocation, Compressor
from vhostfs.storage.codec import decompress
from vhostfs.storage.sync import SyncStorage

_TOC_COMPRESSORS = {
    L.TOC_COMPRESSION_NONE: Compressor.NONE,
    L.TOC_COMPRESSION_ZSTD: Compressor.ZSTD,
    L.TOC_COMPRESSION_LZ4: Compressor.LZ4_BLOCK,
}
_MAX_TOC_PART = 1 << 30  # parts are decompressed in memory
_DIGEST_SIZE = 32


@dataclass(frozen=True, slots=True)
class TocEntry:
    name: str
    compressor: Compressor
    digest: bytes  # sha256 of the uncompressed content
    compressed_offset: int
    compressed_size: int
    uncompressed_size: int


@dataclass(frozen=True, slots=True)
class BlobChunkInfo:
    """One entry of a blob's chunk-info array."""

    index: int
    uncompressed_offset: int
    uncompressed_size: int
    compressed_offset: int
    compressed_size: int
    compressed: bool


def _meta(blob: BlobInfo) -> BlobMetaLocation:
    if blob.meta is None:
        raise UnsupportedError(f"blob {blob.blob_id}: the image records no blob meta for it")
    return blob.meta


def read_toc(store: SyncStorage, blob: BlobInfo) -> list[TocEntry]:
    """The blob's table of contents, checked against the digest in the blob table."""
    meta = _meta(blob)
    what = f"blob {blob.blob_id} ToC"
    if meta.toc_size == 0:
        raise UnsupportedError(f"{what}: the blob has no table of contents")
    entries_size = meta.toc_size - L.TAR_HEADER_SIZE
    if not 0 < entries_size <= L.TOC_MAX_SIZE or entries_size % L.TOC_ENTRY.size:
        raise BlobError(f"{what}: size {meta.toc_size} in the blob table")
    blob_size = store.blob_size(blob)
    toc_start = blob_size - meta.toc_size
    if toc_start < 0:
        raise BlobError(f"{what}: {meta.toc_size} bytes in a blob of {blob_size}")
    raw = store.read_blob(blob, toc_start, meta.toc_size)
    if meta.toc_digest != bytes(_DIGEST_SIZE) and hashlib.sha256(raw).digest() != meta.toc_digest:
        raise BlobError(f"{what}: sha256 differs from the blob table's toc digest")
    _check_tar_header(raw[entries_size:], L.TOC_NAME, entries_size, what)
    return [_toc_entry(fields, what) for fields in L.TOC_ENTRY.iter_unpack(raw[:entries_size])]


def _toc_entry(fields: tuple[int, bytes, bytes, int, int, int], what: str) -> TocEntry:
    # Offsets are checked when a part is read: builders write a bogus offset for image.blob
    # (its size, not 0), and nothing reads that part through the ToC.
    flags, raw_name, digest, compressed_offset, compressed_size, uncompressed_size = fields
    name = raw_name.rstrip(b"\0")
    if not name or not all(0x20 < byte < 0x7F for byte in name):
        raise BlobError(f"{what}: entry name {raw_name!r}")
    compressor = _TOC_COMPRESSORS.get(flags)
    if compressor is None:
        raise BlobError(f"{what} entry {name.decode()}: flags {flags:#x}")
    return TocEntry(
        name.decode(), compressor, digest, compressed_offset, compressed_size, uncompressed_size
    )


def _check_tar_header(header: bytes, name: bytes, size: int, what: str) -> None:
    """The ustar header nydus puts after each part: its name, size and checksum must match."""
    stored_name = header[:100].split(b"\0", 1)[0]
    if stored_name != name:
        raise BlobError(f"{what}: tar header names {stored_name!r}, expected {name!r}")
    if _octal(header[124:136], what) != size:
        raise BlobError(f"{what}: tar header size {header[124:136]!r}, expected {size}")
    # The checksum counts the checksum field itself as eight spaces.
    expected = _octal(header[148:156], what)
    actual = sum(header[:148]) + 8 * ord(" ") + sum(header[156:])
    if actual != expected:
        raise BlobError(f"{what}: tar header checksum {expected}, computed {actual}")


def _octal(field: bytes, what: str) -> int:
    digits = field.strip(b"\0 ")
    try:
        return int(digits, 8)
    except ValueError:
        raise BlobError(f"{what}: tar header number {field!r}") from None


def read_toc_part(store: SyncStorage, blob: BlobInfo, entry: TocEntry) -> bytes:
    """A part the ToC names, decompressed and checked against its sha256."""
    what = f"blob {blob.blob_id} ToC entry {entry.name}"
    toc_start = store.blob_size(blob) - _meta(blob).toc_size
    if entry.compressed_offset + entry.compressed_size > toc_start:
        raise BlobError(f"{what}: {entry.compressed_size} bytes at {entry.compressed_offset}")
    if entry.uncompressed_size > _MAX_TOC_PART:
        raise BlobError(f"{what}: {entry.uncompressed_size} bytes uncompressed")
    stored = store.read_blob(blob, entry.compressed_offset, entry.compressed_size)
    if entry.compressor is Compressor.NONE and entry.compressed_size != entry.uncompressed_size:
        raise BlobError(f"{what}: stored uncompressed, but sizes differ")
    data = decompress(entry.compressor, stored, entry.uncompressed_size, what)
    if hashlib.sha256(data).digest() != entry.digest:
        raise BlobError(f"{what}: sha256 differs from the ToC")
    return data


def read_chunk_digests(store: SyncStorage, blob: BlobInfo) -> list[bytes]:
    """The blob.digest part: one digest per chunk, by chunk index."""
    for entry in read_toc(store, blob):
        if entry.name == "blob.digest":
            data = read_toc_part(store, blob, entry)
            if len(data) != blob.chunk_count * _DIGEST_SIZE:
                raise BlobError(
                    f"blob {blob.blob_id}: blob.digest holds {len(data)} bytes for "
                    f"{blob.chunk_count} chunks"
                )
            return [data[i : i + _DIGEST_SIZE] for i in range(0, len(data), _DIGEST_SIZE)]
    raise UnsupportedError(f"blob {blob.blob_id}: no blob.digest in its ToC")


class ChunkInfoArray:
    """A blob's chunk-info array, decoded entry by entry on access."""

    def __init__(self, blob: BlobInfo, data: bytes, v2: bool) -> None:
        self._blob = blob
        self._data = data
        self._entry = L.CI_ENTRY_V2 if v2 else L.CI_ENTRY_V1
        self._v2 = v2

    def __len__(self) -> int:
        return len(self._data) // self._entry.size

    def __iter__(self) -> Iterator[BlobChunkInfo]:
        return (self[i] for i in range(len(self)))

    def __getitem__(self, index: int) -> BlobChunkInfo:
        if not 0 <= index < len(self):
            raise IndexError(index)
        fields = self._entry.unpack_from(self._data, index * self._entry.size)
        return self._decode_v2(index, *fields) if self._v2 else self._decode_v1(index, *fields)

    @staticmethod
    def _decode_v1(index: int, uncompressed: int, compressed: int) -> BlobChunkInfo:
        # Sizes are stored minus one, split in a low 20-bit and a high 4-bit part.
        uncompressed_size = ((uncompressed >> 44) | ((uncompressed >> 8) & 0xF) << 20) + 1
        compressed_size = ((compressed >> 44) | ((compressed >> 40) & 0xF) << 20) + 1
        return BlobChunkInfo(
            index=index,
            uncompressed_offset=uncompressed & 0xFFF_FFFF_F000,
            uncompressed_size=uncompressed_size,
            compressed_offset=compressed & ((1 << 40) - 1),
            compressed_size=compressed_size,
            compressed=compressed_size != uncompressed_size,
        )

    def _decode_v2(
        self, index: int, uncompressed: int, compressed: int, _data: int
    ) -> BlobChunkInfo:
        flags = uncompressed >> 56
        if flags & (L.CI_V2_ZRAN | L.CI_V2_BATCH | L.CI_V2_ENCRYPTED):
            raise UnsupportedError(
                f"blob {self._blob.blob_id} chunk {index}: ZRan, batch or encrypted (flags "
                f"{flags:#x})"
            )
        return BlobChunkInfo(
            index=index,
            uncompressed_offset=(uncompressed & 0xFFFF_FFFF) << 12,
            uncompressed_size=((uncompressed >> 32) & 0xFF_FFFF) + 1,
            compressed_offset=compressed & ((1 << 40) - 1),
            compressed_size=compressed >> 40,
            compressed=bool(flags & L.CI_V2_COMPRESSED),
        )


def read_chunk_infos(store: SyncStorage, blob: BlobInfo) -> ChunkInfoArray:
    """The blob's chunk-info array, once its header agrees with the bootstrap's blob table."""
    meta = _meta(blob)
    what = f"blob {blob.blob_id} meta"
    raw = store.read_blob(blob, meta.ci_offset, meta.ci_compressed_size + L.BLOB_META_HEADER_SIZE)
    header = raw[meta.ci_compressed_size :]
    magic, features, ci_compressor, entries, ci_offset, ci_compressed, ci_uncompressed = (
        L.BLOB_META_HEADER.unpack_from(header)
    )
    magic2 = int.from_bytes(header[L.BLOB_META_MAGIC2_OFFSET :], "little")
    if magic != L.BLOB_META_MAGIC or magic2 != L.BLOB_META_MAGIC:
        raise BlobError(f"{what}: header magic {magic:#x}/{magic2:#x}")
    expected = {
        "ci_entries": (entries, blob.chunk_count),
        "ci_compressor": (COMPRESSOR_BY_CODE.get(ci_compressor), meta.ci_compressor),
        "ci_offset": (ci_offset, meta.ci_offset),
        "ci_compressed_size": (ci_compressed, meta.ci_compressed_size),
        "ci_uncompressed_size": (ci_uncompressed, meta.ci_uncompressed_size),
        "CHUNK_INFO_V2": (bool(features & L.BLOB_CHUNK_INFO_V2), meta.chunk_info_v2),
    }
    for field, (in_blob, in_bootstrap) in expected.items():
        if in_blob != in_bootstrap:
            raise BlobError(f"{what}: header {field} {in_blob}, the blob table says {in_bootstrap}")
    data = decompress(
        meta.ci_compressor,
        raw[: meta.ci_compressed_size],
        meta.ci_uncompressed_size,
        f"{what} chunk-info array",
    )
    return ChunkInfoArray(blob, data, meta.chunk_info_v2)
