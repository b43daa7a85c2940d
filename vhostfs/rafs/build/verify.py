"""Checking an image end to end: every file read through, every chunk digest verified, and
each blob's own meta (ToC, chunk-info array, chunk digests) compared with the bootstrap.

The first problem stops the check with a CheckFailed that names the file and the chunk.
"""

from __future__ import annotations

import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from vhostfs.rafs.base import InodeAttr, RafsImage
from vhostfs.rafs.blobmeta import ChunkInfoArray, read_chunk_digests, read_chunk_infos
from vhostfs.rafs.errors import RafsError, UnsupportedError
from vhostfs.rafs.file_data import read_file
from vhostfs.storage.blob import IN_BOOTSTRAP, ZERO_FILL, BlobInfo, ChunkRef
from vhostfs.storage.errors import StorageError
from vhostfs.storage.sync import SyncStorage


class CheckFailed(Exception):
    """The image does not hold up; the message says where."""


@dataclass(slots=True)
class CheckReport:
    inodes: int = 0
    files: int = 0
    file_bytes: int = 0
    chunks_verified: int = 0  # distinct chunks whose digest was checked
    unverified_blobs: set[int] = field(default_factory=set)  # blobs without digests


@dataclass(slots=True)
class _BlobMeta:
    infos: ChunkInfoArray
    digests: list[bytes]


def check_image(
    image: RafsImage, store: SyncStorage, on_file: Callable[[int], None] | None = None
) -> CheckReport:
    """Read everything in the image; `on_file(size)` after each regular file."""
    report = CheckReport()
    checker = _Checker(image, store, report)
    for path, ino, attr in _walk(image):
        report.inodes += 1
        name = path.decode(errors="backslashreplace")
        try:
            if stat.S_ISLNK(attr.mode):
                image.readlink(ino)
            for xattr in image.listxattr(ino):
                image.getxattr(ino, xattr)
        except RafsError as e:
            raise CheckFailed(f"{name}: {e}") from None
        if stat.S_ISREG(attr.mode) and checker.first_visit(ino):
            checker.check_file(name, ino, attr.size)
            report.files += 1
            report.file_bytes += attr.size
            if on_file is not None:
                on_file(attr.size)
    return report


def _walk(image: RafsImage) -> Iterator[tuple[bytes, int, InodeAttr]]:
    entries = image.walk()
    while True:
        try:
            entry = next(entries)
        except StopIteration:
            return
        except RafsError as e:
            raise CheckFailed(f"directory tree: {e}") from None
        yield entry


class _Checker:
    def __init__(self, image: RafsImage, store: SyncStorage, report: CheckReport) -> None:
        self._image = image
        self._store = store
        self._report = report
        self._seen_inodes: set[int] = set()
        self._seen_chunks: set[tuple[int, int]] = set()
        self._blob_meta: dict[int, _BlobMeta | None] = {}

    def first_visit(self, ino: int) -> bool:
        if ino in self._seen_inodes:
            return False
        self._seen_inodes.add(ino)
        return True

    def check_file(self, name: str, ino: int, size: int) -> None:
        try:
            refs = self._image.chunks(ino, 0, size)
        except RafsError as e:
            raise CheckFailed(f"{name}: chunk map: {e}") from None
        position = 0
        for number, ref in enumerate(refs):
            where = f"{name}: chunk {number} (file bytes {ref.file_offset}..{ref.file_end})"
            end = min(ref.file_end, size)
            try:
                data = read_file(self._image, self._store, ino, position, end - position)
                self._check_blob_meta(ref)
            except (RafsError, StorageError) as e:
                raise CheckFailed(f"{where}: {e}") from None
            except CheckFailed as e:
                raise CheckFailed(f"{where}: {e}") from None
            if len(data) != end - position:
                raise CheckFailed(f"{where}: read {len(data)} bytes, expected {end - position}")
            position = end
        if position != size:
            raise CheckFailed(f"{name}: chunks cover {position} of {size} bytes")

    def _check_blob_meta(self, ref: ChunkRef) -> None:
        """The blob's chunk-info entry and inlined digest agree with the bootstrap's record."""
        if ref.blob_index in (IN_BOOTSTRAP, ZERO_FILL):
            return
        blob = self._image.blobs[ref.blob_index]
        if blob.digester is None or ref.digest is None:
            self._report.unverified_blobs.add(blob.index)
        key = (ref.blob_index, ref.chunk_index if ref.chunk_index is not None else -1)
        if ref.chunk_index is None or key in self._seen_chunks:
            return
        self._seen_chunks.add(key)
        if ref.digest is not None:
            self._report.chunks_verified += 1
        meta = self._meta(blob)
        if meta is None:
            return
        if ref.chunk_index >= len(meta.infos):
            raise CheckFailed(f"blob meta has {len(meta.infos)} chunks, not {ref.chunk_index}")
        info = meta.infos[ref.chunk_index]
        recorded = (
            info.compressed_offset,
            info.compressed_size,
            info.uncompressed_offset,
            info.uncompressed_size,
            info.compressed,
        )
        expected = (
            ref.compressed_offset,
            ref.compressed_size,
            ref.uncompressed_offset,
            ref.uncompressed_size,
            ref.compressed,
        )
        if recorded != expected:
            raise CheckFailed(
                f"blob meta entry {ref.chunk_index} says (compressed offset, size, uncompressed "
                f"offset, size, compressed) = {recorded}, the bootstrap says {expected}"
            )
        if ref.digest is not None and meta.digests[ref.chunk_index] != ref.digest:
            raise CheckFailed(
                f"blob.digest entry {ref.chunk_index} differs from the bootstrap's chunk digest"
            )

    def _meta(self, blob: BlobInfo) -> _BlobMeta | None:
        """The blob's own chunk table, or None when it has none (v5 blobs, plain EROFS)."""
        if blob.index not in self._blob_meta:
            meta = None
            if blob.meta is not None and blob.meta.toc_size:
                try:
                    meta = _BlobMeta(
                        read_chunk_infos(self._store, blob),
                        read_chunk_digests(self._store, blob),
                    )
                except UnsupportedError:
                    meta = None
            self._blob_meta[blob.index] = meta
        return self._blob_meta[blob.index]
