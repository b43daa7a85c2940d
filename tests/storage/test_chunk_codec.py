"""Chunk decoding: every compressor round-trips, sizes are exact, decoding never allocates more
than the chunk the bootstrap promises, and digests are checked.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import blake3
import pytest
import zstandard

from vhostfs.storage.blob import Compressor, Digester
from vhostfs.storage.codec import decompress, digest_of, verify_digest
from vhostfs.storage.errors import ChunkDecodeError, ChunkDigestError

DATA = b"the quick brown fox " * 500 + os.urandom(3000)


def literal_block(data: bytes) -> bytes:
    """data as one LZ4 block of literals only."""
    extra = len(data) - 15
    return b"\xf0" + b"\xff" * (extra // 255) + bytes([extra % 255]) + data


ENCODERS: dict[Compressor, Callable[[bytes], bytes]] = {
    Compressor.NONE: lambda data: data,
    Compressor.LZ4_BLOCK: literal_block,
    Compressor.ZSTD: lambda data: zstandard.ZstdCompressor().compress(data),
    Compressor.GZIP: gzip.compress,
}


@pytest.mark.parametrize("compressor", list(Compressor))
def test_round_trip(compressor: Compressor) -> None:
    stored = ENCODERS[compressor](DATA)
    assert decompress(compressor, stored, len(DATA), "chunk") == DATA


@pytest.mark.parametrize("compressor", list(Compressor))
@pytest.mark.parametrize("delta", [-1, 1])
def test_size_must_be_exact(compressor: Compressor, delta: int) -> None:
    stored = ENCODERS[compressor](DATA)
    with pytest.raises(ChunkDecodeError, match="blob x chunk 3"):
        decompress(compressor, stored, len(DATA) + delta, "blob x chunk 3")


@pytest.mark.parametrize("compressor", [Compressor.LZ4_BLOCK, Compressor.ZSTD, Compressor.GZIP])
def test_garbage_is_a_blob_error(compressor: Compressor) -> None:
    for stored in (b"", b"\x00" * 10, os.urandom(100), ENCODERS[compressor](DATA)[:-7]):
        with pytest.raises(ChunkDecodeError):
            decompress(compressor, stored, len(DATA), "chunk")


@pytest.mark.parametrize("compressor", [Compressor.ZSTD, Compressor.GZIP])
def test_bombs_are_stopped_at_the_promised_size(compressor: Compressor) -> None:
    # 64 MiB of zeros compress to well under a MiB; the bootstrap promises 4 KiB.
    zeros = bytes(64 << 20)
    stored = ENCODERS[compressor](zeros)
    del zeros
    tracemalloc.start()
    try:
        with pytest.raises(ChunkDecodeError):
            decompress(compressor, stored, 4096, "chunk")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_digests() -> None:
    assert digest_of(Digester.SHA256, DATA) == hashlib.sha256(DATA).digest()
    assert digest_of(Digester.BLAKE3, DATA) == blake3.blake3(DATA).digest()
    assert digest_of(Digester.BLAKE3, b"").hex().startswith("af1349b9f5f9a1a6")
    verify_digest(Digester.BLAKE3, DATA, blake3.blake3(DATA).digest(), "chunk")
    with pytest.raises(ChunkDigestError, match="blob b chunk 7: sha256 digest"):
        verify_digest(Digester.SHA256, DATA, bytes(32), "blob b chunk 7")


def test_zstd_chunks_decode_right_on_many_threads_at_once() -> None:
    """The chunk pool decodes concurrently (readahead keeps it busy): no decoder state may be
    shared between threads."""
    chunks = [b"".join(b"%08x chunk %d\n" % (i, n) for i in range(40_000)) for n in range(64)]
    stored = [zstandard.ZstdCompressor(level=3).compress(chunk) for chunk in chunks]

    def decode(n: int) -> bool:
        return decompress(Compressor.ZSTD, stored[n], len(chunks[n]), f"chunk {n}") == chunks[n]

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(decode, [n % 64 for n in range(512)]))
