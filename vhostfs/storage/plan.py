"""Planning a read: the pieces of a reply, and the blobs they come from.

`ImageStorage.read` walks the refs covering a file range and appends one segment per piece:
a FileSlice when the bytes sit in a file (the chunk cache, the bootstrap, a local blob), bytes
for holes, or an empty placeholder listed as Pending when the chunk must be fetched first. Once
the fetches are done, `fill_pending` puts each fetched piece in its place and neighbouring file
slices are merged, so the transport issues as few preadv calls as it can.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from vhostfs.segments import FileSlice, Segment
from vhostfs.storage.blob import BlobInfo, ChunkRef
from vhostfs.storage.defaults import MAX_CHUNK_SIZE
from vhostfs.storage.errors import ChunkRefError
from vhostfs.storage.null_cache import BlobCache


@dataclass(slots=True)
class OpenBlob:
    """One blob of the image, as the read path uses it."""

    info: BlobInfo
    name: str  # what the backend fetches it by
    cache: BlobCache
    verify: bool  # check chunk digests (the image records them and the config asks to)
    write_failure_logged: bool = False


@dataclass(slots=True)
class Pending:
    """A piece of the reply that waits for a fetch."""

    slot: int  # index in the segment list
    blob: OpenBlob
    ref: ChunkRef
    chunk_skip: int  # where the piece starts in its chunk
    size: int
    future: asyncio.Future[bytes] | None  # None until the fetches start
    # Where the piece starts in what the future yields: chunk_skip for a whole decoded chunk,
    # 0 for a raw range read of just this piece.
    data_start: int
    whole_chunk: bool  # the future yields the whole chunk, so the cache may hold it


def fill_pending(segments: list[Segment], pending: list[Pending]) -> list[Segment]:
    """The reply once every pending piece's fetch is done (the first failed chunk, in file
    order, fails the read)."""
    for piece in pending:
        assert piece.future is not None
        data = piece.future.result()
        cache = piece.blob.cache
        index = piece.ref.chunk_index
        if piece.whole_chunk and index is not None and cache.is_ready(index):
            offset = piece.ref.uncompressed_offset + piece.chunk_skip
            segments[piece.slot] = FileSlice(cache.data_fd, offset, piece.size)
            continue
        segments[piece.slot] = data[piece.data_start : piece.data_start + piece.size]
    return coalesce(segments)


def append_file(segments: list[Segment], fd: int, pos: int, size: int) -> None:
    """Add a file slice, merged into the previous one when it continues it."""
    if segments:
        last = segments[-1]
        if isinstance(last, FileSlice) and last.fd == fd and last.pos + last.size == pos:
            segments[-1] = FileSlice(fd, last.pos, last.size + size)
            return
    segments.append(FileSlice(fd, pos, size))


def coalesce(segments: list[Segment]) -> list[Segment]:
    merged: list[Segment] = []
    for segment in segments:
        if isinstance(segment, FileSlice):
            append_file(merged, segment.fd, segment.pos, segment.size)
        elif segment:
            merged.append(segment)
    return merged


def sizes_error(ref: ChunkRef) -> str | None:
    """Why the ref's sizes cannot be fetched, or None."""
    for name in ("compressed_size", "uncompressed_size"):
        if not 0 < getattr(ref, name) <= MAX_CHUNK_SIZE:
            return f"{name} {getattr(ref, name)} out of range"
    if ref.compressed_offset < 0 or ref.uncompressed_offset < 0:
        return "negative offset"
    return None


def check_sizes(ref: ChunkRef, blob_name: str) -> None:
    error = sizes_error(ref)
    if error is not None:
        raise ChunkRefError(f"{ref.describe(blob_name)}: {error}")
