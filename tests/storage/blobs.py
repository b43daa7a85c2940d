"""Blobs built by the tests: chunks compressed (zstd) or stored as they are, with digests, and
the ChunkRefs a reader would hand the storage for a file made of those chunks in order."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import uvloop
import zstandard

from vhostfs.segments import FileSlice, Segment
from vhostfs.storage.backend import BlobBackend
from vhostfs.storage.blob import BlobInfo, ChunkRef, Compressor, Digester
from vhostfs.storage.codec import digest_of

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run on uvloop, as the daemon does."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def chunk_content(seed: int, index: int, size: int) -> bytes:
    """Compressible but unique to (seed, index), so a chunk served in place of another shows."""
    noise = random.Random(seed * 1_000_003 + index).randbytes(max(size // 8, 16))
    text = f"seed {seed} chunk {index} ".encode() + noise
    return (text * (size // len(text) + 1))[:size]


@dataclass
class Blob:
    blob_id: str
    path: Path
    info: BlobInfo
    refs: list[ChunkRef]  # chunk i holds file bytes [i * chunk_size, ...)
    chunks: list[bytes]  # uncompressed
    stored: list[bytes] = field(default_factory=list)  # as in the blob file

    @property
    def file_bytes(self) -> bytes:
        return b"".join(self.chunks)

    def chunk_range(self, index: int) -> tuple[int, int]:
        ref = self.refs[index]
        return ref.file_offset, ref.file_end


def build_blob(
    directory: Path,
    *,
    chunk_count: int = 8,
    chunk_size: int = 16384,
    compressor: Compressor = Compressor.ZSTD,
    digester: Digester = Digester.BLAKE3,
    index: int = 0,
    seed: int = 0,
    last_size: int | None = None,
    gap: int = 0,
    write: bool = True,
) -> Blob:
    """A blob file in `directory`, named by its id. `gap` bytes of padding between stored chunks
    make them non-adjacent in compressed space. With `write` False, only describe the blob the
    same arguments built before."""
    chunks = [chunk_content(seed, i, chunk_size) for i in range(chunk_count)]
    if last_size is not None:
        chunks[-1] = chunks[-1][:last_size]
    compress = zstandard.ZstdCompressor(level=3).compress
    stored = [compress(c) if compressor is Compressor.ZSTD else c for c in chunks]
    aligned = -(-chunk_size // 4096) * 4096
    refs = []
    content = bytearray()
    for i, (chunk, piece) in enumerate(zip(chunks, stored, strict=True)):
        refs.append(
            ChunkRef(
                file_offset=i * chunk_size,
                blob_index=index,
                compressed_offset=len(content),
                compressed_size=len(piece),
                uncompressed_offset=i * aligned,
                uncompressed_size=len(chunk),
                compressed=compressor is not Compressor.NONE,
                digest=digest_of(digester, chunk),
                chunk_index=i,
            )
        )
        content += piece + bytes(gap)
    blob_id = hashlib.sha256(content).hexdigest()
    path = directory / blob_id
    if write:
        path.write_bytes(content)
    info = BlobInfo(
        index=index,
        blob_id=blob_id,
        compressor=compressor,
        digester=digester,
        chunk_size=chunk_size,
        chunk_count=chunk_count,
        compressed_size=len(content),
        uncompressed_size=chunk_count * aligned,
        features=0,
    )
    return Blob(blob_id, path, info, refs, chunks, stored)


def materialize(segments: Sequence[Segment]) -> bytes:
    """What the transport would copy into guest memory."""
    out = bytearray()
    for segment in segments:
        if isinstance(segment, FileSlice):
            piece = os.pread(segment.fd, segment.size, segment.pos)
            assert len(piece) == segment.size, "segment runs past the end of its file"
            out += piece
        else:
            out += segment
    return bytes(out)


def refs_for(blob: Blob, start: int, end: int) -> list[ChunkRef]:
    """The refs covering file bytes [start, end), as RafsImage.chunks() returns them."""
    return [ref for ref in blob.refs if ref.file_offset < end and ref.file_end > start]


def run_to_completion_without_suspending(coro: Coroutine[Any, Any, T]) -> T:
    """The result of a coroutine that must finish on its first step (as the dispatcher runs
    it), failing the test if it suspends."""
    try:
        suspended_on = coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise AssertionError(f"suspended on {suspended_on!r}")


class RecordingBackend:
    """Wraps a real backend: records every request (before any gate) and the bytes returned,
    and can hold requests at a gate."""

    def __init__(self, inner: BlobBackend) -> None:
        self.inner = inner
        self.requests: list[tuple[str, int, int]] = []
        self.returned_bytes = 0
        self.gate: Callable[[str, int, int], Awaitable[None]] | None = None

    async def read(self, blob_id: str, offset: int, size: int) -> bytes:
        self.requests.append((blob_id, offset, size))
        if self.gate is not None:
            await self.gate(blob_id, offset, size)
        data = await self.inner.read(blob_id, offset, size)
        self.returned_bytes += len(data)
        return data

    async def blob_size(self, blob_id: str) -> int:
        return await self.inner.blob_size(blob_id)

    async def aclose(self) -> None:
        await self.inner.aclose()


class Gate:
    """A backend gate: counts the requests that reach it and holds them until released.

    `await gate.reached(n)` returns once n requests have arrived, so a test waits for an event
    rather than for time to pass. Requests for which `holds` says False pass straight through
    (they are counted too)."""

    def __init__(self, holds: Callable[[str, int, int], bool] = lambda *_: True) -> None:
        self.holds = holds
        self.release = asyncio.Event()
        self.arrivals = 0
        self._arrived = asyncio.Condition()

    async def __call__(self, blob_id: str, offset: int, size: int) -> None:
        async with self._arrived:
            self.arrivals += 1
            self._arrived.notify_all()
        if self.holds(blob_id, offset, size):
            await self.release.wait()

    async def reached(self, count: int) -> None:
        async with self._arrived:
            await self._arrived.wait_for(lambda: self.arrivals >= count)


class VirtualClock:
    """Time that passes only when someone sleeps on it: for TokenBucket(clock=, sleep=)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.slept = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.now += seconds
        self.slept += seconds
        self.sleeps += 1
        await asyncio.sleep(0)  # still a suspension point, as the real sleep is


async def yield_to_loop(times: int = 50) -> None:
    """Let every ready callback and task run several steps, without letting time matter."""
    for _ in range(times):
        await asyncio.sleep(0)
