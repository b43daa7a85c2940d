"""Turning a chunk's stored bytes back into file bytes: bounded decompression and digests.

Every path that reads chunk data (guest reads, prefetch, `vhostfs check` / `unpack`, the blob
meta reader) decodes through `decode_chunk` or, for blob parts that are not chunks,
`decompress`. Decompression is bounded by the size the bootstrap promises, so a hostile blob
cannot make us allocate more than one chunk.
"""

from __future__ import annotations

import hashlib
import threading
import zlib
from typing import Final

import blake3
import zstandard

from vhostfs._vring import ffi, lib
from vhostfs.storage.blob import BlobInfo, ChunkRef, Compressor, Digester
from vhostfs.storage.errors import ChunkDecodeError, ChunkDigestError

# A decompressor serves one thread at a time (python-zstandard shares its context between the
# streams it makes), and chunks are decoded on a pool: one per thread.
_zstd_local = threading.local()

# The raw LZ4 block decoder is csrc/lz4_block.c, built into the _vring extension.
_LZ4_REASONS: Final = {
    lib.LZ4B_ERR_TRUNCATED: "input ends inside a sequence",
    lib.LZ4B_ERR_OUTPUT_FULL: "decodes to more bytes than expected",
    lib.LZ4B_ERR_OFFSET: "match offset points before the start of the output",
    lib.LZ4B_ERR_EMPTY: "empty input",
}


def decode_chunk(
    blob: BlobInfo, ref: ChunkRef, stored: bytes, *, verify: bool = True, name: str = ""
) -> bytes:
    """The chunk's file bytes from its stored bytes: decompressed, and checked against the
    ref's digest when `verify` is set and the image records one. `name` is what the blob is
    called in messages (its id by default). ChunkDecodeError / ChunkDigestError otherwise."""
    what = ref.describe(name or blob.blob_id)
    compressor = blob.compressor if ref.compressed else Compressor.NONE
    data = decompress(compressor, stored, ref.uncompressed_size, what)
    if verify and blob.digester is not None and ref.digest is not None:
        verify_digest(blob.digester, data, ref.digest, what)
    return data


def decompress(compressor: Compressor, stored: bytes, size: int, what: str) -> bytes:
    """The `size` bytes that `stored` decodes to, or ChunkDecodeError naming `what`."""
    if compressor is Compressor.NONE:
        data = stored
    elif compressor is Compressor.LZ4_BLOCK:
        try:
            data = decompress_lz4_block(stored, size)
        except ValueError as e:
            raise ChunkDecodeError(f"{what}: lz4 block: {e}") from None
    elif compressor is Compressor.ZSTD:
        data = _zstd_bounded(stored, size, what)
    else:
        data = _gzip_bounded(stored, size, what)
    if len(data) != size:
        raise ChunkDecodeError(
            f"{what}: {compressor.value} data decodes to {len(data)} bytes, expected {size}"
        )
    return data


def decompress_lz4_block(block: bytes, size: int) -> bytes:
    """Decode one raw LZ4 block that must yield exactly `size` bytes; ValueError otherwise."""
    out = bytearray(size)
    written = int(lib.lz4_block_decompress(block, len(block), ffi.from_buffer(out), size))
    if written < 0:
        raise ValueError(_LZ4_REASONS.get(written, f"decoder error {written}"))
    if written != size:
        raise ValueError(f"decodes to {written} bytes, expected {size}")
    return bytes(out)


def _zstd_decompressor() -> zstandard.ZstdDecompressor:
    decompressor: zstandard.ZstdDecompressor | None = getattr(_zstd_local, "zstd", None)
    if decompressor is None:
        # Zstd frames may ask for a window up to 2 GiB; chunks are at most 16 MiB.
        decompressor = _zstd_local.zstd = zstandard.ZstdDecompressor(max_window_size=1 << 25)
    return decompressor


def _zstd_bounded(stored: bytes, size: int, what: str) -> bytes:
    # ZstdDecompressor.decompress trusts the frame's content size over max_output_size, so a
    # hostile frame could claim gigabytes. The stream reader stops where we tell it to.
    out = bytearray()
    try:
        with _zstd_decompressor().stream_reader(stored, read_across_frames=False) as reader:
            while len(out) <= size:
                piece = reader.read(size + 1 - len(out))
                if not piece:
                    break
                out += piece
    except zstandard.ZstdError as e:
        raise ChunkDecodeError(f"{what}: zstd: {e}") from None
    return bytes(out)


def _gzip_bounded(stored: bytes, size: int, what: str) -> bytes:
    inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # gzip member
    try:
        data = inflater.decompress(stored, size + 1)
    except zlib.error as e:
        raise ChunkDecodeError(f"{what}: gzip: {e}") from None
    if not inflater.eof:
        raise ChunkDecodeError(f"{what}: gzip member truncated or longer than {size} bytes")
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
