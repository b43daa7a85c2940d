"""Open file and directory handles, each tied to the node it was opened on.

A handle is only good for its own node: a request naming another node with it is EBADF, so a
guest cannot use the descriptor of one file to act on another. A handle some request is still
using on a worker thread is closed only when that request is done, so RELEASE racing an
offloaded WRITE can never let the write land in whatever file next reuses the descriptor
number.

Directories can also be read without a handle (fh 0, which no handle ever is): the guest sends
that once OPENDIR answered ENOSYS under NO_OPENDIR_SUPPORT. `Listings` keeps those snapshots so
that a listing paged over several READDIRs stays one listing.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Final

from vhostfs.fs.inodes import FdQuota, guest_fd_limit
from vhostfs.fuse.ops import DirEntry, FileHandle, FuseError, NodeId

log = logging.getLogger(__name__)

NO_HANDLE: Final = FileHandle(0)  # handle numbers start at 1


@dataclass(slots=True)
class Listing:
    """One snapshot of a directory, in order: names with their inode numbers and DT_* types.

    Kept as columns (about 70 bytes an entry against some 200 as DirEntry objects); a reply
    builds DirEntry objects only for the entries it takes."""

    names: list[bytes]
    inos: array[int]  # typecode "Q"
    kinds: bytearray

    def __len__(self) -> int:
        return len(self.names)

    def entries(self, start: int, cookie_base: int = 0) -> Iterator[DirEntry]:
        """The entries from index start on; the cookie after entry i is cookie_base | i + 1."""
        names, inos, kinds = self.names, self.inos, self.kinds
        for i in range(start, len(names)):
            yield DirEntry(names[i], cookie_base | (i + 1), inos[i], kinds[i])


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
    listing: Listing | None = field(default=None)


class Handles:
    """File handle → OpenFile / OpenDir. Handle numbers never repeat within a process."""

    def __init__(self, quota: FdQuota | None = None) -> None:
        self.quota = quota or FdQuota(guest_fd_limit())
        self._files: dict[FileHandle, OpenFile] = {}
        self._dirs: dict[FileHandle, OpenDir] = {}
        self._next = itertools.count(1)

    def __len__(self) -> int:
        return len(self._files) + len(self._dirs)

    def add_file(self, node: NodeId, fd: int, writable: bool) -> FileHandle:
        """Takes ownership of fd (closed again if the quota is full: ENFILE)."""
        self.quota.take(fd)
        fh = FileHandle(next(self._next))
        self._files[fh] = OpenFile(node, fd, writable)
        return fh

    def add_dir(self, node: NodeId, fd: int) -> FileHandle:
        self.quota.take(fd)
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
        self.quota.give_back()
        handle.released = True
        if handle.busy == 0:
            _close_quietly(handle.fd)

    def release_dir(self, fh: FileHandle, node: NodeId) -> None:
        handle = self.dir(fh, node)
        del self._dirs[fh]
        self.quota.give_back()
        _close_quietly(handle.fd)

    def clear(self) -> None:
        self.quota.give_back(len(self))
        for fh in list(self._files):
            handle = self._files.pop(fh)
            handle.released = True
            if handle.busy == 0:
                _close_quietly(handle.fd)
        for handle_dir in self._dirs.values():
            _close_quietly(handle_dir.fd)
        self._dirs.clear()


class Listings:
    """Snapshots of directories read without a handle, so that READDIRs at offset > 0 continue
    the listing the one at offset 0 started (a new snapshot each time would skip or repeat
    entries whenever the directory changed in between).

    Each snapshot has an id, carried in the upper half of its cookies (id << 32 | index + 1),
    so two guest processes listing one directory at once each continue their own. A cookie
    whose snapshot is gone (evicted, of another node, made up by the guest) gets a fresh
    snapshot continued at the cookie's index: the best a directory that changed can do, and
    never another node's entries; one no snapshot could have made (id 2^31 or more) is the
    end, as any offset past the end is. Bounded: at most `kept` snapshots and `kept_entries`
    entries in all (the newest stays whatever its size), least recently used out first; a
    snapshot read to its end is dropped at once."""

    _INDEX_BITS: Final = 32
    _INDEX_MASK: Final = (1 << _INDEX_BITS) - 1
    _ID_LIMIT: Final = 1 << 31  # ids stay below it, so cookies stay below 2^63 (loff_t)

    def __init__(self, kept: int = 64, kept_entries: int = 1 << 19) -> None:
        self._kept = kept
        self._kept_entries = kept_entries
        self._by_id: OrderedDict[int, tuple[NodeId, Listing]] = OrderedDict()
        self._entries = 0
        self._next_id = 1

    def __len__(self) -> int:
        return len(self._by_id)

    @property
    def entries(self) -> int:
        """Entries held in all snapshots."""
        return self._entries

    def page(
        self, node: NodeId, offset: int, snapshot: Callable[[], Listing]
    ) -> Iterator[DirEntry]:
        """node's entries after cookie offset (0: from the start, in a new snapshot taken with
        snapshot())."""
        index = offset & self._INDEX_MASK
        listing_id = offset >> self._INDEX_BITS
        if listing_id >= self._ID_LIMIT:
            return iter(())
        kept = self._by_id.get(listing_id) if offset else None
        if kept is not None and kept[0] == node:
            listing = kept[1]
            self._by_id.move_to_end(listing_id)
        else:
            listing = snapshot()
            if index >= len(listing):
                return iter(())
            listing_id = self._add(node, listing)
        if index >= len(listing):
            self._drop(listing_id)  # the guest has read it all
            return iter(())
        return listing.entries(index, listing_id << self._INDEX_BITS)

    def _add(self, node: NodeId, listing: Listing) -> int:
        listing_id = self._next_id
        self._next_id = listing_id + 1 if listing_id + 1 < self._ID_LIMIT else 1
        self._drop(listing_id)  # a wrapped id still in use: that listing is very old
        self._by_id[listing_id] = (node, listing)
        self._entries += len(listing)
        while len(self._by_id) > 1 and (
            len(self._by_id) > self._kept or self._entries > self._kept_entries
        ):
            self._drop(next(iter(self._by_id)))
        return listing_id

    def _drop(self, listing_id: int) -> None:
        kept = self._by_id.pop(listing_id, None)
        if kept is not None:
            self._entries -= len(kept[1])

    def clear(self) -> None:
        self._by_id.clear()
        self._entries = 0


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        log.warning("closing fd %d failed", fd, exc_info=True)
