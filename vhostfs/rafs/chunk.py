"""Chunks: where a piece of a file lives, and turning its stored bytes back into file bytes.

A ChunkRef says where the bytes for one stretch of a file are: in a data blob (compressed or
not, with a digest to check), in the bootstrap file itself (plain EROFS layouts), or nowhere
(a hole that reads as zeros). Decompression is bounded by the size the bootstrap promises, so a
hostile blob cannot make us allocate more than one chunk.
"""

from __future__ import annotations

import enum
import hashlib
import zlib
from dataclasses import dataclass

import blake3
import zstandard

from vhostfs.rafs import lz4
from vhostfs.rafs.errors import BlobError, ChunkDigestError

# ChunkRef.blob_index values that do not name a blob.
IN_BOOTSTRAP = -1  # the bytes sit uncompressed in the bootstrap (image) file itself
ZERO_FILL = -2  # a hole: nothing is stored, the range reads as zeros


class Compressor(enum.Enum):
    NONE = "none"
    LZ4_BLOCK = "lz4_block"
    GZIP = "gzip"
    ZSTD = "zstd"


class Digester(enum.Enum):
    BLAKE3 = "blake3"
    SHA256 = "sha256"


# Numeric codes of the blob table and the blob meta header.
COMPRESSOR_BY_CODE = {
    0: Compressor.NONE,
    1: Compressor.LZ4_BLOCK,
    2: Compressor.GZIP,
    3: Compressor.ZSTD,
}
DIGESTER_BY_CODE = {0: Digester.BLAKE3, 1: Digester.SHA256}


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """The bytes of file range [file_offset, file_offset + uncompressed_size)."""

    file_offset: int
    blob_index: int  # index into the image's blobs, or IN_BOOTSTRAP / ZERO_FILL
    compressed_offset: int  # in the blob (or the bootstrap file)
    compressed_size: int
    uncompressed_offset: int  # in the blob's uncompressed address space
    uncompressed_size: int
    compressed: bool
    digest: bytes | None  # of the uncompressed bytes, when the image records one
    chunk_index: int | None = None  # entry in the blob's chunk-info array, for error messages

    @property
    def file_end(self) -> int:
        return self.file_offset + self.uncompressed_size

    def describe(self, blob_id: str) -> str:
        index = "" if self.chunk_index is None else f" chunk {self.chunk_index}"
        return (
            f"blob {blob_id or self.blob_index}{index} "
            f"(compressed {self.compressed_offset}+{self.compressed_size})"
        )


# Zstd frames may ask for a window up to 2 GiB; chunks are at most 16 MiB.
_ZSTD = zstandard.ZstdDecompressor(max_window_size=1 << 25)


def decompress(compressor: Compressor, stored: bytes, size: int, what: str) -> bytes:
    """The `size` bytes that `stored` decodes to, or BlobError naming `what`."""
    if compressor is Compressor.NONE:
        data = stored
    elif compressor is Compressor.LZ4_BLOCK:
        try:
            data = lz4.decompress_block(stored, size)
        except ValueError as e:
            raise BlobError(f"{what}: lz4 block: {e}") from None
    elif compressor is Compressor.ZSTD:
        data = _zstd_bounded(stored, size, what)
    else:
        data = _gzip_bounded(stored, size, what)
    if len(data) != size:
        raise BlobError(
            f"{what}: {compressor.value} data decodes to {len(data)} bytes, expected {size}"
        )
    return data


def _zstd_bounded(stored: bytes, size: int, what: str) -> bytes:
    # ZstdDecompressor.decompress trusts the frame's content size over max_output_size, so a
    # hostile frame could claim gigabytes. The stream reader stops where we tell it to.
    out = bytearray()
    try:
        with _ZSTD.stream_reader(stored, read_across_frames=False) as reader:
            while len(out) <= size:
                piece = reader.read(size + 1 - len(out))
                if not piece:
                    break
                out += piece
    except zstandard.ZstdError as e:
        raise BlobError(f"{what}: zstd: {e}") from None
    return bytes(out)


def _gzip_bounded(stored: bytes, size: int, what: str) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip member
    try:
        data = inflater.decompress(stored, size + 1)
    except zlib.error as e:
        raise BlobError(f"{what}: gzip: {e}") from None
    if not inflater.eof:
        raise BlobError(f"{what}: gzip member truncated or longer than {size} bytes")
    return data


def digest_of(digester: Digester, data: bytes) -> bytes:
    if digester is Digester.BLAKE3:
        return blake3.blake3(data).digest()
    return hashlib.sha256(data).digest()


def verify_digest(digester: Digester, data: bytes, expected: bytes, what: str) -> None:
    actual = digest_of(digester, data)
    if actual != expected:
        raise ChunkDigestError(
            f"{what}: {digester.value} digest {actual.hex()} differs from {expected.hex()} "
            f"recorded in the bootstrap"
        )
