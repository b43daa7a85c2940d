"""The data blobs an image refers to, and reading them from local files.

BlobInfo is one row of the image's blob table (RAFS v6 blob table, RAFS v5 blob table plus its
extended table, or an EROFS extra device). BlobStore finds each blob's file, either given
explicitly or as <blob_dir>/<blob_id>, and reads byte ranges of it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import TracebackType

from vhostfs.rafs.chunk import Compressor, Digester
from vhostfs.rafs.errors import BlobError


@dataclass(frozen=True, slots=True)
class BlobMetaLocation:
    """Where a RAFS v6 blob keeps its chunk-info array and table of contents."""

    ci_compressor: Compressor
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    chunk_info_v2: bool
    toc_size: int  # ToC entries plus their tar header; 0 when the blob has no ToC
    toc_digest: bytes  # sha256 of those bytes


@dataclass(frozen=True, slots=True)
class BlobInfo:
    index: int
    blob_id: str  # the name to fetch it by; empty for an anonymous EROFS device
    compressor: Compressor
    digester: Digester | None  # None: the image records no chunk digests (plain EROFS)
    chunk_size: int
    chunk_count: int
    compressed_size: int | None  # None when the image does not say
    uncompressed_size: int | None
    features: int
    meta: BlobMetaLocation | None = None


_MAX_FILE_OFFSET = (1 << 63) - 1

BlobFiles = Mapping[str | int, str | os.PathLike[str]]


class BlobStore:
    """Blob files on the local file system, opened on first use and kept open until close().

    `files` maps a blob id or a blob index to a path and wins over `blob_dir`, where a blob is
    looked up by its id.
    """

    def __init__(
        self,
        blob_dir: str | os.PathLike[str] | None = None,
        files: BlobFiles | None = None,
    ) -> None:
        self._blob_dir = None if blob_dir is None else os.fspath(blob_dir)
        self._files = dict(files or {})
        self._fds: dict[int, int] = {}

    def __enter__(self) -> BlobStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)

    def path_of(self, blob: BlobInfo) -> str:
        for key in (blob.blob_id, blob.index):
            if key in self._files and key != "":
                return os.fspath(self._files[key])
        if self._blob_dir is None:
            raise BlobError(f"blob {blob.index} ({blob.blob_id!r}): no file given for it")
        # The id comes from the image: never let it name a path outside blob_dir.
        if blob.blob_id in ("", ".", "..") or "/" in blob.blob_id or "\0" in blob.blob_id:
            raise BlobError(f"blob {blob.index}: id {blob.blob_id!r} is not a file name")
        return os.path.join(self._blob_dir, blob.blob_id)

    def _fd(self, blob: BlobInfo) -> int:
        fd = self._fds.get(blob.index)
        if fd is None:
            path = self.path_of(blob)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise BlobError(f"blob {blob.blob_id or blob.index}: {path}: {e.strerror}") from e
            self._fds[blob.index] = fd
        return fd

    def size(self, blob: BlobInfo) -> int:
        return os.fstat(self._fd(blob)).st_size

    def pread(self, blob: BlobInfo, offset: int, length: int, what: str) -> bytes:
        """Exactly `length` bytes at `offset`, or BlobError naming `what`."""
        if offset < 0 or length < 0 or offset + length > _MAX_FILE_OFFSET:
            raise BlobError(f"{what}: range {offset}+{length} is not a file range")
        fd = self._fd(blob)
        data = bytearray()
        while len(data) < length:
            try:
                piece = os.pread(fd, length - len(data), offset + len(data))
            except OSError as e:
                raise BlobError(f"{what}: {e.strerror}") from e
            if not piece:
                raise BlobError(
                    f"{what}: bytes {offset}..{offset + length} run past the end of the blob "
                    f"file ({self.size(blob)} bytes)"
                )
            data += piece
        return bytes(data)
