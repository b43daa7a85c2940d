"""Compressing chunks, and the numeric codes the blob table and blob meta use for algorithms.

compress() is called from worker threads: zstd releases the GIL while it works, and each thread
keeps its own compressor because one zstd context cannot serve two threads at once.
"""

from __future__ import annotations

import threading

import zstandard

from vhostfs.rafs.build import lz4block
from vhostfs.storage.blob import COMPRESSOR_BY_CODE, DIGESTER_BY_CODE, Compressor

COMPRESSOR_CODE = {compressor: code for code, compressor in COMPRESSOR_BY_CODE.items()}
DIGESTER_CODE = {digester: code for code, digester in DIGESTER_BY_CODE.items()}
BUILD_COMPRESSORS = (Compressor.ZSTD, Compressor.NONE, Compressor.LZ4_BLOCK)
ZSTD_LEVEL = 3  # zstd's default, which nydus-image uses too

_local = threading.local()


def compress(compressor: Compressor, data: bytes) -> bytes | None:
    """`data` compressed, or None when that would not make it smaller (it is then stored as
    is, as nydus does)."""
    if compressor is Compressor.ZSTD:
        zstd: zstandard.ZstdCompressor | None = getattr(_local, "zstd", None)
        if zstd is None:
            zstd = _local.zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL)
        stored = zstd.compress(data)
    elif compressor is Compressor.LZ4_BLOCK:
        stored = lz4block.compress_block(data)
    elif compressor is Compressor.NONE:
        return None
    else:
        raise ValueError(f"cannot compress with {compressor.value}")
    return stored if len(stored) < len(data) else None
