"""Decoding a fetched run of chunks and writing them to the cache, on a pool thread.

Each chunk of the run is decoded (vhostfs.storage.codec.decode_chunk, the one decode path) and,
when its blob keeps chunks, written to the cache file. The write comes first and the mark
later, back on the event loop (ChunkCache's crash-safety rule), so a result only says whether
the chunk may be marked. A cache that refuses writes (a full disk) costs only caching: the
chunk is still served from memory, and the failure is logged once per blob.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from vhostfs.storage.blob import ChunkRef
from vhostfs.storage.codec import decode_chunk
from vhostfs.storage.errors import StorageError
from vhostfs.storage.plan import OpenBlob

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Decoded:
    data: bytes
    cached: bool  # written to the cache file, may be marked ready


def decode_run(blob: OpenBlob, run: list[ChunkRef], stored: bytes) -> list[Decoded | StorageError]:
    """Decode, verify and cache each chunk of a run fetched as one backend read."""
    base = run[0].compressed_offset
    results: list[Decoded | StorageError] = []
    for ref in run:
        start = ref.compressed_offset - base
        piece = stored if len(run) == 1 else stored[start : start + ref.compressed_size]
        try:
            data = decode_chunk(blob.info, ref, piece, verify=blob.verify, name=blob.name)
        except StorageError as e:
            results.append(e)
            continue
        results.append(Decoded(data, _write_to_cache(blob, ref, data)))
    if any(isinstance(result, Decoded) and result.cached for result in results):
        try:
            blob.cache.flush()
        except OSError as e:
            _log_write_failure(blob, e)
            results = [Decoded(r.data, False) if isinstance(r, Decoded) else r for r in results]
    return results


def _write_to_cache(blob: OpenBlob, ref: ChunkRef, data: bytes) -> bool:
    if not blob.cache.keeps_chunks or ref.chunk_index is None:
        return False
    try:
        blob.cache.write(ref.uncompressed_offset, data)
    except OSError as e:
        _log_write_failure(blob, e)
        return False
    return True


def _log_write_failure(blob: OpenBlob, error: OSError) -> None:
    # The chunk is still served from memory; a full disk must not flood the log.
    if not blob.write_failure_logged:
        blob.write_failure_logged = True
        log.warning("%s: cannot cache chunks: %s", blob.cache.data_path, error.strerror)
