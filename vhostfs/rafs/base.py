"""What every image format offers: the inode API, and file reading built on top of it.

Inode numbers are the format's own (EROFS nid for RAFS v6 and plain EROFS, the inode number for
RAFS v5), as nydusd exposes them. Readers decode inodes on demand from the mapped bootstrap and
keep no per-inode state beyond a small cache, so opening an image costs the same whatever its
size.
"""

from __future__ import annotations

import os
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple

from vhostfs.rafs.blob import BlobInfo, BlobStore
from vhostfs.rafs.chunk import IN_BOOTSTRAP, ZERO_FILL, ChunkRef, decompress, verify_digest
from vhostfs.rafs.errors import BlobError, CorruptError, InodeTypeError
from vhostfs.rafs.mapped import MappedFile

DT_UNKNOWN = 0


@dataclass(frozen=True, slots=True)
class InodeAttr:
    ino: int
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    blocks: int  # in 512-byte units
    rdev: int  # encoded as os.makedev() does
    mtime: int
    mtime_nsec: int
    blksize: int


class DirEntry(NamedTuple):
    name: bytes
    ino: int
    dtype: int  # DT_* (the file type bits of st_mode >> 12), DT_UNKNOWN if the image omits it
    next_offset: int  # pass to readdir() to continue after this entry


@dataclass(frozen=True, slots=True)
class StatFs:
    block_size: int
    blocks: int
    files: int
    name_max: int


class RafsImage(ABC):
    """An opened bootstrap. Methods raise RafsError when the image cannot answer."""

    format: str  # "rafs-v5", "rafs-v6" or "erofs"
    root_ino: int
    blobs: tuple[BlobInfo, ...]
    explicit_uid_gid: bool  # False: nydusd reports its own uid/gid for every inode

    def __init__(self, mapped: MappedFile) -> None:
        self._mapped = mapped

    @property
    def path(self) -> str:
        return self._mapped.path

    def close(self) -> None:
        self._mapped.close()

    def __enter__(self) -> RafsImage:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- The inode API, per format ---------------------------------------------------------

    @abstractmethod
    def lookup(self, parent_ino: int, name: bytes) -> int | None:
        """The inode `name` names in directory `parent_ino`, or None if there is no such entry."""

    @abstractmethod
    def getattr(self, ino: int) -> InodeAttr: ...

    @abstractmethod
    def readdir(self, ino: int, offset: int = 0) -> Iterator[DirEntry]:
        """Entries from `offset` on (0: the start), "." and ".." included."""

    @abstractmethod
    def readlink(self, ino: int) -> bytes: ...

    @abstractmethod
    def listxattr(self, ino: int) -> list[bytes]: ...

    @abstractmethod
    def getxattr(self, ino: int, name: bytes) -> bytes | None: ...

    @abstractmethod
    def statfs(self) -> StatFs: ...

    @abstractmethod
    def chunks(self, ino: int, offset: int, size: int) -> list[ChunkRef]:
        """Refs covering file range [offset, offset + size) clipped to the file size, in order.

        Each ref describes a whole stored unit (a chunk, or a contiguous stretch of the image
        for plain EROFS layouts), so the first and last may start before and end after the
        range.
        """

    def prefetch_table(self) -> list[int]:
        """Inodes the image asks to have read ahead at mount (unchecked: getattr each)."""
        return []

    # --- Built on the API ------------------------------------------------------------------

    def read_file(
        self,
        ino: int,
        offset: int,
        size: int,
        blobs: BlobStore | str | os.PathLike[str] | None = None,
        *,
        verify: bool = True,
    ) -> bytes:
        """File bytes [offset, offset + size), clipped at the end of the file.

        `blobs` is a BlobStore or a directory holding blobs named by their ids. Chunks are
        decompressed and, when `verify` is set and the image records digests, checked.
        """
        if isinstance(blobs, BlobStore) or blobs is None:
            return self._read_file(ino, offset, size, blobs, verify)
        with BlobStore(blob_dir=blobs) as store:
            return self._read_file(ino, offset, size, store, verify)

    def _read_file(
        self, ino: int, offset: int, size: int, store: BlobStore | None, verify: bool
    ) -> bytes:
        attr = self.getattr(ino)
        if not stat.S_ISREG(attr.mode):
            raise InodeTypeError(f"inode {ino}: not a regular file (mode {attr.mode:o})")
        end = min(offset + size, attr.size)
        out = bytearray()
        position = offset
        for ref in self.chunks(ino, offset, size):
            if not ref.file_offset <= position < ref.file_end:
                raise CorruptError(
                    f"inode {ino}: chunk for file bytes {ref.file_offset}..{ref.file_end} "
                    f"does not continue at byte {position}"
                )
            stop = min(end, ref.file_end)
            out += self._chunk_bytes(ref, position, stop, store, verify)
            position = stop
        if position < end:
            raise CorruptError(f"inode {ino}: chunks stop at byte {position} of {attr.size}")
        return bytes(out)

    def _chunk_bytes(
        self, ref: ChunkRef, start: int, stop: int, store: BlobStore | None, verify: bool
    ) -> bytes:
        """File bytes [start, stop), which lie inside ref."""
        skip = start - ref.file_offset
        if ref.blob_index == ZERO_FILL:
            return bytes(stop - start)
        if ref.blob_index == IN_BOOTSTRAP:
            return self._mapped.read(ref.compressed_offset + skip, stop - start, "file data")
        blob = self.blobs[ref.blob_index]
        what = ref.describe(blob.blob_id)
        if store is None:
            raise BlobError(f"{what}: no blob store given to read it from")
        check = verify and blob.digester is not None and ref.digest is not None
        if not ref.compressed and not check:
            return store.pread(blob, ref.compressed_offset + skip, stop - start, what)
        stored = store.pread(blob, ref.compressed_offset, ref.compressed_size, what)
        if ref.compressed:
            data = decompress(blob.compressor, stored, ref.uncompressed_size, what)
        elif len(stored) != ref.uncompressed_size:
            raise BlobError(f"{what}: stored uncompressed, but sizes differ")
        else:
            data = stored
        if check:
            assert blob.digester is not None and ref.digest is not None
            verify_digest(blob.digester, data, ref.digest, what)
        return data[skip : stop - ref.file_offset]

    def walk(self) -> Iterator[tuple[bytes, int, InodeAttr]]:
        """(path, ino, attr) for the root and everything below it, each directory before its
        entries. A directory met twice (a loop or a hard-linked directory) raises CorruptError,
        so a walk always ends.
        """
        root = self.getattr(self.root_ino)
        yield b"/", self.root_ino, root
        seen_directories = {self.root_ino}
        stack: list[tuple[bytes, int, Iterator[DirEntry]]] = [
            (b"", self.root_ino, self.readdir(self.root_ino))
        ]
        while stack:
            prefix, directory, entries = stack[-1]
            entry = next(entries, None)
            if entry is None:
                stack.pop()
                continue
            if entry.name in (b".", b".."):
                continue
            attr = self.getattr(entry.ino)
            if entry.dtype != DT_UNKNOWN and entry.dtype != stat.S_IFMT(attr.mode) >> 12:
                raise CorruptError(
                    f"directory {directory}: entry {entry.name!r} says type {entry.dtype} but "
                    f"inode {entry.ino} has mode {attr.mode:o}"
                )
            path = prefix + b"/" + entry.name
            yield path, entry.ino, attr
            if stat.S_ISDIR(attr.mode):
                if entry.ino in seen_directories:
                    raise CorruptError(
                        f"directory {directory}: entry {entry.name!r} leads to directory "
                        f"{entry.ino} again (a loop or a hard-linked directory)"
                    )
                seen_directories.add(entry.ino)
                stack.append((path, entry.ino, self.readdir(entry.ino)))
