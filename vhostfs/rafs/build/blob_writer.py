"""Writing the data blob: chunk data, then its blob meta, chunk digests and table of contents.

The layout is the one nydus-image v2.2+ writes, each part followed by a 512-byte tar header
naming it (so a reader can walk the file backwards from its end):

    image.blob     chunk data
    blob.meta      chunk-info array (v1, 16 bytes per chunk), then its 4 KiB header
    blob.digest    one 32-byte digest per chunk, by chunk index
    rafs.blob.toc  128-byte entries locating each part above

Uncompressed blobs are written in their uncompressed layout: each chunk at its 4 KiB-aligned
uncompressed offset, zero padding between chunks and up to the end of the last block. That makes
the data part usable as a raw EROFS extra device by the kernel, which reads chunk index blkaddr
straight off the device. Compressed chunks are packed back to back, as nydus does.

The blob id is the sha256 of the whole file, computed as it is written.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vhostfs.rafs import layout as L
from vhostfs.rafs.build.compression import COMPRESSOR_CODE, compress
from vhostfs.rafs.build.errors import BuildError
from vhostfs.storage.blob import Compressor

BLOCK_SIZE = L.RAFS_V6_BLOCK_SIZE
BLOB_FEATURES = (
    L.BLOB_ALIGNED
    | L.BLOB_INLINED_CHUNK_DIGEST
    | L.BLOB_HAS_TAR_HEADER
    | L.BLOB_HAS_TOC
    | L.BLOB_CAP_TAR_TOC
)
_TOC_FLAGS = {
    Compressor.NONE: L.TOC_COMPRESSION_NONE,
    Compressor.ZSTD: L.TOC_COMPRESSION_ZSTD,
    Compressor.LZ4_BLOCK: L.TOC_COMPRESSION_LZ4,
}
_MAX_COMPRESSED_OFFSET = 1 << 40  # chunk-info v1 keeps 40 bits
_MAX_UNCOMPRESSED_OFFSET = 1 << 44  # and 44 (a 4 KiB-aligned 32-bit block number)
_TAR_OCTAL_LIMIT = 8**11  # larger sizes need the GNU base-256 form
_BLOB_MODE = 0o644  # like the bootstrap; the temporary file was made private


@dataclass(slots=True)
class Chunk:
    """One unique chunk of a blob; its compressed place is known once it is written."""

    index: int  # in its blob's chunk-info array
    digest: bytes
    uncompressed_offset: int
    uncompressed_size: int
    compressed_offset: int = -1
    compressed_size: int = 0
    compressed: bool = False
    blob_index: int = 0  # in the image's blob table


@dataclass(frozen=True, slots=True)
class BlobSummary:
    """What the bootstrap's blob table and device slot say about the blob."""

    blob_id: str
    path: Path
    chunk_count: int
    compressed_size: int  # the blob file's size
    uncompressed_size: int
    features: int
    ci_compressor: Compressor
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    toc_size: int
    toc_digest: bytes


def aligned(size: int) -> int:
    return -(-size // BLOCK_SIZE) * BLOCK_SIZE


class _Sink:
    """The blob file and the sha256 of everything written to it, both fed on a thread of
    their own (file writes and hashlib release the GIL), so that hashing a large blob overlaps
    with reading and compressing instead of following them. At most `backlog` writes wait."""

    def __init__(self, directory: Path, backlog: int = 8) -> None:
        self.file = tempfile.NamedTemporaryFile(  # noqa: SIM115 (renamed or removed later)
            prefix=".blob-", dir=directory, delete=False
        )
        self._sha256 = hashlib.sha256()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="blob-write")
        self._pending: deque[Future[None]] = deque()
        self._backlog = backlog

    def write(self, data: bytes) -> None:
        self._pending.append(self._thread.submit(self._write_and_hash, data))
        while len(self._pending) > self._backlog:
            self._pending.popleft().result()

    def _write_and_hash(self, data: bytes) -> None:
        self.file.write(data)
        self._sha256.update(data)

    def sha256(self) -> bytes:
        """The sha256 of everything written so far (writing may go on)."""
        while self._pending:
            self._pending.popleft().result()
        return self._sha256.copy().digest()

    def close(self) -> None:
        self._thread.shutdown(cancel_futures=True)
        self.file.close()


class BlobWriter:
    """Writes one blob into `directory`, under a temporary name until finish() names it."""

    def __init__(self, directory: Path, compressor: Compressor, uncompressed_layout: bool) -> None:
        self._directory = directory
        self._compressor = compressor
        self._uncompressed_layout = uncompressed_layout
        self._sink = _Sink(directory)
        self.position = 0

    def write_chunk(self, chunk: Chunk, stored: bytes, compressed: bool) -> None:
        if self._uncompressed_layout:
            self._pad_to(chunk.uncompressed_offset)
        if self.position + len(stored) > _MAX_COMPRESSED_OFFSET:
            raise BuildError("blob larger than 1 TiB: chunk-info v1 cannot address it")
        chunk.compressed_offset = self.position
        chunk.compressed_size = len(stored)
        chunk.compressed = compressed
        self._write(stored)

    def finish(self, chunks: Sequence[Chunk], uncompressed_size: int) -> BlobSummary:
        """Write the meta parts and the ToC, close, and rename the file to its blob id."""
        if uncompressed_size > _MAX_UNCOMPRESSED_OFFSET:
            raise BuildError("more than 16 TiB of chunk data: chunk-info v1 cannot address it")
        if self._uncompressed_layout:
            self._pad_to(uncompressed_size)
        toc = [self._close_data_part(uncompressed_size)]

        ci_array = b"".join(chunk_info_v1(chunk) for chunk in chunks)
        ci_compressor, ci_stored = self._compress_ci(ci_array)
        ci_offset = self.position
        header = ci_header(ci_compressor, len(chunks), ci_offset, len(ci_stored), len(ci_array))
        self._write(ci_stored)
        self._write(header)
        toc.append(_toc_entry(b"blob.meta", ci_compressor, ci_array, ci_offset, len(ci_stored)))
        toc.append(
            _toc_entry(b"blob.meta.header", Compressor.NONE, header, ci_offset + len(ci_stored))
        )
        self._write(tar_header(b"blob.meta", len(ci_stored) + len(header)))

        digests = b"".join(chunk.digest for chunk in chunks)
        digests_offset = self.position
        self._write(digests)
        self._write(tar_header(b"blob.digest", len(digests)))
        toc.append(_toc_entry(b"blob.digest", Compressor.NONE, digests, digests_offset))

        toc_bytes = b"".join(toc)
        toc_part = toc_bytes + tar_header(L.TOC_NAME, len(toc_bytes))
        self._write(toc_part)
        blob_id, path = self._name_file()
        return BlobSummary(
            blob_id=blob_id,
            path=path,
            chunk_count=len(chunks),
            compressed_size=self.position,
            uncompressed_size=uncompressed_size,
            features=BLOB_FEATURES,
            ci_compressor=ci_compressor,
            ci_offset=ci_offset,
            ci_compressed_size=len(ci_stored),
            ci_uncompressed_size=len(ci_array),
            toc_size=len(toc_part),
            toc_digest=hashlib.sha256(toc_part).digest(),
        )

    def discard(self) -> None:
        self._sink.close()
        Path(self._sink.file.name).unlink(missing_ok=True)

    def _write(self, data: bytes) -> None:
        self._sink.write(data)
        self.position += len(data)

    def _pad_to(self, offset: int) -> None:
        assert offset >= self.position, "chunks are written in offset order"
        gap = offset - self.position
        while gap:
            piece = min(gap, 1 << 20)
            self._write(bytes(piece))
            gap -= piece

    def _close_data_part(self, uncompressed_size: int) -> bytes:
        """Ends the chunk data (everything written so far) with its tar header; returns its
        ToC entry. Unlike nydus, which records the part's size as its offset and hashes the tar
        header too, the entry gives the data's real offset (0) and sha256."""
        size = self.position
        entry = L.TOC_ENTRY.pack(
            L.TOC_COMPRESSION_NONE,
            b"image.blob",
            self._sink.sha256(),
            0,
            size,
            uncompressed_size,
        )
        self._write(tar_header(b"image.blob", size))
        return entry

    def _compress_ci(self, ci_array: bytes) -> tuple[Compressor, bytes]:
        # nydusd insists the stored array is no larger than the plain one.
        if self._compressor is not Compressor.NONE and ci_array:
            stored = compress(self._compressor, ci_array)
            if stored is not None:
                return self._compressor, stored
        return Compressor.NONE, ci_array

    def _name_file(self) -> tuple[str, Path]:
        blob_id = self._sink.sha256().hex()
        self._sink.close()
        path = self._directory / blob_id
        os.chmod(self._sink.file.name, _BLOB_MODE)
        os.replace(self._sink.file.name, path)
        return blob_id, path


def chunk_info_v1(chunk: Chunk) -> bytes:
    """The 16-byte v1 entry: offsets in place, sizes minus one split into 20 + 4 bits."""
    usize = chunk.uncompressed_size - 1
    csize = chunk.compressed_size - 1
    uncompressed = (
        (chunk.uncompressed_offset & 0xFFF_FFFF_F000)
        | (usize & 0xFFFFF) << 44
        | (usize >> 20 & 0xF) << 8
    )
    compressed = (
        (chunk.compressed_offset & ((1 << 40) - 1))
        | (csize & 0xFFFFF) << 44
        | (csize >> 20 & 0xF) << 40
    )
    return L.CI_ENTRY_V1.pack(uncompressed, compressed)


def ci_header(
    ci_compressor: Compressor, entries: int, ci_offset: int, stored_size: int, plain_size: int
) -> bytes:
    header = bytearray(L.BLOB_META_HEADER_SIZE)
    L.BLOB_META_HEADER.pack_into(
        header,
        0,
        L.BLOB_META_MAGIC,
        BLOB_FEATURES,
        COMPRESSOR_CODE[ci_compressor],
        entries,
        ci_offset,
        stored_size,
        plain_size,
    )
    header[L.BLOB_META_MAGIC2_OFFSET :] = L.BLOB_META_MAGIC.to_bytes(4, "little")
    return bytes(header)


def _toc_entry(
    name: bytes, compressor: Compressor, content: bytes, offset: int, stored_size: int = -1
) -> bytes:
    """A ToC entry for `content` (uncompressed), stored as `stored_size` bytes at `offset`."""
    return L.TOC_ENTRY.pack(
        _TOC_FLAGS[compressor],
        name,
        hashlib.sha256(content).digest(),
        offset,
        len(content) if stored_size < 0 else stored_size,
        len(content),
    )


def tar_header(name: bytes, size: int) -> bytes:
    """A GNU tar header for a regular file, as nydus writes them: name, size, checksum and
    magic set; mode, owner and time zero."""
    header = bytearray(L.TAR_HEADER_SIZE)
    header[: len(name)] = name
    if size < _TAR_OCTAL_LIMIT:
        header[124:136] = b"%011o\0" % size
    else:
        header[124:136] = (size | 1 << 95).to_bytes(12, "big")  # GNU base-256, top bit set
    header[136:148] = b"%011o\0" % 0
    header[156:157] = b"0"
    header[257:265] = b"ustar  \0"
    header[148:156] = b" " * 8  # the checksum counts its own field as spaces
    header[148:156] = b"%07o\0" % sum(header)
    return bytes(header)
