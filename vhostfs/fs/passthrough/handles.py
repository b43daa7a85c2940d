"""Open file and directory handles, each tied to the node it was opened on.

A handle is only good for its own node: a request naming another node with it is EBADF, so a
guest cannot use the descriptor of one file to act on another. A handle some request is still
using on a worker thread is closed only when that request is done, so RELEASE racing an
offloaded WRITE can never let the write land in whatever file next reuses the descriptor
number.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from vhostfs.fuse.ops import DirEntry, FileHandle, FuseError, NodeId

log = logging.getLogger(__name__)


@dataclass(slots=True)
class OpenFile:
    node: NodeId
    fd: int
    writable: bool
    busy: int = 0  # requests using fd right now, off the event loop
    released: bool = False


@dataclass(slots=True)
class OpenDir:
    node: NodeId
    fd: int
    # Snapshot taken at offset 0, so offsets (index + 1) stay stable while the guest pages.
    listing: list[DirEntry] | None = field(default=None)


class Handles:
    """File handle → OpenFile / OpenDir. Handle numbers never repeat within a process."""

    def __init__(self) -> None:
        self._files: dict[FileHandle, OpenFile] = {}
        self._dirs: dict[FileHandle, OpenDir] = {}
        self._next = itertools.count(1)

    def __len__(self) -> int:
        return len(self._files) + len(self._dirs)

    def add_file(self, node: NodeId, fd: int, writable: bool) -> FileHandle:
        fh = FileHandle(next(self._next))
        self._files[fh] = OpenFile(node, fd, writable)
        return fh

    def add_dir(self, node: NodeId, fd: int) -> FileHandle:
        fh = FileHandle(next(self._next))
        self._dirs[fh] = OpenDir(node, fd)
        return fh

    def file(self, fh: FileHandle, node: NodeId) -> OpenFile:
        handle = self._files.get(fh)
        if handle is None or handle.node != node:
            raise FuseError(errno.EBADF)
        return handle

    def writable_file(self, fh: FileHandle, node: NodeId) -> OpenFile:
        handle = self.file(fh, node)
        if not handle.writable:
            raise FuseError(errno.EBADF)
        return handle

    def dir(self, fh: FileHandle, node: NodeId) -> OpenDir:
        handle = self._dirs.get(fh)
        if handle is None or handle.node != node:
            raise FuseError(errno.EBADF)
        return handle

    @contextmanager
    def using(self, handle: OpenFile) -> Iterator[int]:
        """Keep handle's descriptor open while the body runs, even across a RELEASE."""
        handle.busy += 1
        try:
            yield handle.fd
        finally:
            handle.busy -= 1
            if handle.released and handle.busy == 0:
                _close_quietly(handle.fd)

    def release_file(self, fh: FileHandle, node: NodeId) -> None:
        handle = self.file(fh, node)
        del self._files[fh]
        handle.released = True
        if handle.busy == 0:
            _close_quietly(handle.fd)

    def release_dir(self, fh: FileHandle, node: NodeId) -> None:
        handle = self.dir(fh, node)
        del self._dirs[fh]
        _close_quietly(handle.fd)

    def clear(self) -> None:
        for fh in list(self._files):
            handle = self._files.pop(fh)
            handle.released = True
            if handle.busy == 0:
                _close_quietly(handle.fd)
        for handle_dir in self._dirs.values():
            _close_quietly(handle_dir.fd)
        self._dirs.clear()


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        log.warning("closing fd %d failed", fd, exc_info=True)
