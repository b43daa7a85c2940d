"""What every image format offers: the inode API, and a tree walk built on top of it.

Inode numbers are the format's own (EROFS nid for RAFS v6 and plain EROFS, the inode number for
RAFS v5), as nydusd exposes them. Readers decode inodes on demand from the mapped bootstrap and
keep no per-inode state beyond a small cache, so opening an image costs the same whatever its
size.
"""

from __future__ import annotations

import stat
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from types import TracebackType
from typing import NamedTuple

from vhostfs.rafs.errors import CorruptError
from vhostfs.rafs.mapped import MappedFile
from vhostfs.storage.blob import BlobInfo, ChunkRef

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
    # The superblock's HAS_XATTR flag: nydusd serves xattrs then even if the config does not
    # enable them.
    has_xattr_flag: bool = False

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

    def blob_chunks(self, blob_index: int, first: int, count: int) -> list[ChunkRef]:
        """Refs of chunks first, first + 1, ... (up to count, fewer at the blob's end) of a
        blob, in the blob's order, as whole chunks (file_offset 0): what a read of one chunk
        may fetch along with it. Empty for formats that cannot say (the default)."""
        return []

    def prefetch_table(self) -> list[int]:
        """Inodes the image asks to have read ahead at mount (unchecked: getattr each)."""
        return []

    # --- Built on the API ------------------------------------------------------------------

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
