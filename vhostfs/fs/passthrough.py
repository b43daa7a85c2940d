"""Read-only export of a host directory.

Containment: no path is ever built from a guest name. Every name is resolved one component at a
time relative to the parent's O_PATH descriptor with O_NOFOLLOW, so a symlink is an inode of its
own (READLINK returns its target, the guest resolves it on its side) and never a way out. Files
and directories are opened by re-opening the node's own descriptor through /proc/self/fd/N,
which reaches exactly the inode that descriptor names. Name rules:
- "/" in a name: EINVAL (the dispatcher already refuses it; checked again here).
- ".": the directory itself.
- "..": the root's parent is the root itself; elsewhere the host parent is accepted only if the
  guest already holds it (it must, as the kernel keeps a directory's parent looked up), so ".."
  can never introduce an inode the guest could not reach by walking down from the root.
Limits: a directory moved out of the export on the host stays reachable through descriptors the
guest already holds, as with virtiofsd without its sandbox.

Cache policy, as virtiofsd: "never" (timeouts 0, direct I/O, no READDIRPLUS), "auto" (1 s,
page cache dropped on open), "always" (a day, page cache and directory cache kept, cached
symlinks).
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal

from vhostfs.fs.inodes import Inode, InodeTable
from vhostfs.fs.readonly import ReadOnlyOperations, check_access
from vhostfs.fuse.abi import InitFlag, OpenReplyFlag
from vhostfs.fuse.ops import (
    ROOT_ID,
    Attr,
    AttrOut,
    ConnInfo,
    DirEntry,
    EntryOut,
    FileHandle,
    FileSlice,
    FuseError,
    NodeId,
    OpenOut,
    ReadResult,
    RequestContext,
    StatFs,
)

log = logging.getLogger(__name__)

CachePolicy = Literal["auto", "always", "never"]

_TIMEOUTS: Final[dict[str, float]] = {"never": 0.0, "auto": 1.0, "always": 86400.0}
_FILE_FLAGS: Final[dict[str, int]] = {
    "never": OpenReplyFlag.DIRECT_IO,
    "auto": 0,
    "always": OpenReplyFlag.KEEP_CACHE,
}
_DIR_FLAGS: Final[dict[str, int]] = {
    "never": 0,
    "auto": 0,
    "always": OpenReplyFlag.KEEP_CACHE | OpenReplyFlag.CACHE_DIR,
}
_O_LOOKUP: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_SEEK_WHENCES: Final = frozenset(
    {os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE}
)
_DT_DIR: Final = stat.S_IFDIR >> 12


def _erofs() -> FuseError:
    return FuseError(errno.EROFS)


def _proc_path(fd: int) -> str:
    # Built from our own descriptor number, never from guest input.
    return f"/proc/self/fd/{fd}"


@dataclass(slots=True)
class _DirHandle:
    node: NodeId
    fd: int
    # Snapshot taken at offset 0, so offsets (index + 1) stay stable while the guest pages.
    listing: list[DirEntry] | None = None


class Passthrough(ReadOnlyOperations):
    """Serve the directory tree at root, read-only, to one guest.

    root is opened once here (following symlinks in the operator's path); close() releases
    every descriptor. xattr=False answers ENOSYS to xattr requests; readdirplus=False keeps the
    guest on plain READDIR."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        cache: CachePolicy = "auto",
        xattr: bool = True,
        readdirplus: bool = True,
    ) -> None:
        if cache not in _TIMEOUTS:
            raise ValueError(f"cache must be auto, always or never, not {cache!r}")
        self.cache = cache
        self.timeout = _TIMEOUTS[cache]
        self.xattr = xattr
        self.readdirplus = readdirplus and cache != "never"
        self.inodes = InodeTable(os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        self._files: dict[FileHandle, int] = {}
        self._dirs: dict[FileHandle, _DirHandle] = {}
        self._next_fh = itertools.count(1)

    def close(self) -> None:
        self._drop_handles()
        self.inodes.close()

    def _drop_handles(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        for handle in self._dirs.values():
            os.close(handle.fd)
        self._files.clear()
        self._dirs.clear()

    # Session.

    async def init(self, conn: ConnInfo) -> ConnInfo:
        self._drop_handles()
        self.inodes.reset()
        flags = conn.flags
        if not self.readdirplus:
            flags &= ~(InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO)
        if self.cache == "always":
            flags |= InitFlag.CACHE_SYMLINKS
        return replace(conn, flags=flags)

    async def destroy(self) -> None:
        self._drop_handles()
        self.inodes.reset()

    # Names and attributes.

    def _entry(self, inode: Inode, st: os.stat_result) -> EntryOut:
        return EntryOut(inode.node_id, Attr.from_stat(st), self.timeout, self.timeout)

    async def lookup(self, parent: NodeId, name: bytes, ctx: RequestContext) -> EntryOut:
        directory = self.inodes.get(parent)
        if not stat.S_ISDIR(directory.mode):
            raise FuseError(errno.ENOTDIR)
        if b"/" in name or b"\0" in name or not name:
            raise FuseError(errno.EINVAL)
        if name == b"." or (name == b".." and directory.node_id == ROOT_ID):
            return self._entry(self.inodes.recount(directory), os.fstat(directory.fd))
        if name == b"..":
            st = os.stat(b"..", dir_fd=directory.fd, follow_symlinks=False)
            known = self.inodes.find((st.st_dev, st.st_ino))
            if known is None:
                raise FuseError(errno.EACCES)
            return self._entry(self.inodes.recount(known), st)
        try:
            # The guest mostly looks up names it has seen before: an lstat finds an inode we
            # already pin without opening (and closing) a descriptor. That inode cannot have
            # been replaced by another with the same number: our O_PATH descriptor holds it.
            st = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
            known = self.inodes.find((st.st_dev, st.st_ino))
            if known is not None:
                return self._entry(self.inodes.recount(known), st)
            fd = os.open(name, _O_LOOKUP, dir_fd=directory.fd)
        except FileNotFoundError:
            if self.timeout == 0:
                raise
            # A negative entry lets the guest cache the miss for as long as a hit.
            return EntryOut(NodeId(0), Attr(st_ino=0, st_mode=0), self.timeout, 0.0)
        try:
            st = os.fstat(fd)  # the name may have changed since the lstat: trust the descriptor
        except OSError:
            os.close(fd)
            raise
        return self._entry(self.inodes.count_lookup(fd, st), st)

    async def forget(self, batch: Sequence[tuple[NodeId, int]]) -> None:
        for node, nlookup in batch:
            self.inodes.forget(node, nlookup)

    async def getattr(self, node: NodeId, fh: FileHandle | None, ctx: RequestContext) -> AttrOut:
        st = os.fstat(self.inodes.get(node).fd)
        return AttrOut(Attr.from_stat(st), self.timeout)

    async def readlink(self, node: NodeId, ctx: RequestContext) -> bytes:
        inode = self.inodes.get(node)
        if not stat.S_ISLNK(inode.mode):
            raise FuseError(errno.EINVAL)
        # readlinkat(fd, "") reads the link the O_PATH descriptor names (Linux >= 2.6.39).
        return os.readlink(b"", dir_fd=inode.fd)

    async def statfs(self, node: NodeId, ctx: RequestContext) -> StatFs:
        st = os.fstatvfs(self.inodes.get(node).fd)
        return StatFs(
            blocks=st.f_blocks,
            bfree=st.f_bfree,
            bavail=st.f_bavail,
            files=st.f_files,
            ffree=st.f_ffree,
            bsize=st.f_bsize,
            namelen=st.f_namemax,
            frsize=st.f_frsize,
        )

    async def access(self, node: NodeId, mask: int, ctx: RequestContext) -> None:
        inode = self.inodes.get(node)
        if mask & os.W_OK:
            raise _erofs()
        if mask & (os.R_OK | os.X_OK):
            st = os.fstat(inode.fd)
            check_access(st.st_mode, st.st_uid, st.st_gid, mask, ctx)

    # Files.

    async def open(self, node: NodeId, flags: int, ctx: RequestContext) -> OpenOut:
        inode = self.inodes.get(node)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise _erofs()
        if not stat.S_ISREG(inode.mode):
            # The guest handles devices, fifos and sockets itself; reopening one here would
            # reach the host's device, so only regular files are ever opened.
            raise FuseError(errno.EISDIR if stat.S_ISDIR(inode.mode) else errno.EACCES)
        fd = os.open(_proc_path(inode.fd), os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        fh = FileHandle(next(self._next_fh))
        self._files[fh] = fd
        return OpenOut(fh, _FILE_FLAGS[self.cache])

    def _file(self, fh: FileHandle) -> int:
        fd = self._files.get(fh)
        if fd is None:
            raise FuseError(errno.EBADF)
        return fd

    async def read(
        self, node: NodeId, fh: FileHandle, offset: int, size: int, ctx: RequestContext
    ) -> ReadResult:
        return FileSlice(self._file(fh), offset, size)

    async def flush(self, node: NodeId, fh: FileHandle, lock_owner: int) -> None:
        self._file(fh)

    async def fsync(self, node: NodeId, fh: FileHandle, datasync: bool) -> None:
        self._file(fh)

    async def release(self, node: NodeId, fh: FileHandle, flags: int) -> None:
        os.close(self._file(fh))
        del self._files[fh]

    async def lseek(self, node: NodeId, fh: FileHandle, offset: int, whence: int) -> int:
        if whence not in _SEEK_WHENCES:
            raise FuseError(errno.EINVAL)
        return os.lseek(self._file(fh), offset, whence)

    # Directories.

    async def opendir(self, node: NodeId, flags: int, ctx: RequestContext) -> OpenOut:
        inode = self.inodes.get(node)
        if not stat.S_ISDIR(inode.mode):
            raise FuseError(errno.ENOTDIR)
        fd = os.open(_proc_path(inode.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        fh = FileHandle(next(self._next_fh))
        self._dirs[fh] = _DirHandle(node, fd)
        return OpenOut(fh, _DIR_FLAGS[self.cache])

    def _dir(self, fh: FileHandle) -> _DirHandle:
        handle = self._dirs.get(fh)
        if handle is None:
            raise FuseError(errno.EBADF)
        return handle

    async def readdir(
        self, node: NodeId, fh: FileHandle, offset: int, ctx: RequestContext
    ) -> Iterable[DirEntry]:
        handle = self._dir(fh)
        if offset == 0 or handle.listing is None:
            handle.listing = self._snapshot(handle)
        # Cookies are ours (index + 1); anything past the end is simply the end.
        return itertools.islice(handle.listing, min(offset, len(handle.listing)), None)

    def _snapshot(self, handle: _DirHandle) -> list[DirEntry]:
        inode = self.inodes.get(handle.node)
        own = os.fstat(handle.fd)
        parent_ino = own.st_ino
        if inode is not self.inodes.root:  # the root's parent is outside the export: not shown
            with contextlib.suppress(OSError):
                parent_ino = os.stat(b"..", dir_fd=inode.fd, follow_symlinks=False).st_ino
        names: list[tuple[bytes, int, int]] = [
            (b".", own.st_ino, _DT_DIR),
            (b"..", parent_ino, _DT_DIR),
        ]
        os.lseek(handle.fd, 0, os.SEEK_SET)
        with os.scandir(handle.fd) as entries:
            for entry in entries:
                try:
                    kind = _dirent_kind(entry)
                except FileNotFoundError:
                    continue
                names.append((os.fsencode(entry.name), entry.inode(), kind))
        return [
            DirEntry(name, index + 1, ino, kind) for index, (name, ino, kind) in enumerate(names)
        ]

    async def releasedir(self, node: NodeId, fh: FileHandle) -> None:
        handle = self._dir(fh)
        del self._dirs[fh]
        os.close(handle.fd)

    async def fsyncdir(self, node: NodeId, fh: FileHandle, datasync: bool) -> None:
        self._dir(fh)

    async def syncfs(self, node: NodeId) -> None:
        pass

    # Extended attributes. Read through /proc/self/fd/N because f*xattr refuses O_PATH
    # descriptors; following that magic link stops at the inode itself, symlinks included.

    async def getxattr(self, node: NodeId, name: bytes, ctx: RequestContext) -> bytes:
        if not self.xattr:
            raise FuseError(errno.ENOSYS)
        return os.getxattr(_proc_path(self.inodes.get(node).fd), name)

    async def listxattr(self, node: NodeId, ctx: RequestContext) -> Sequence[bytes]:
        if not self.xattr:
            raise FuseError(errno.ENOSYS)
        return [os.fsencode(name) for name in os.listxattr(_proc_path(self.inodes.get(node).fd))]


def _dirent_kind(entry: os.DirEntry[str]) -> int:
    """DT_* type, from the d_type the kernel gave when it did (no extra stat)."""
    if entry.is_symlink():
        return stat.S_IFLNK >> 12
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR >> 12
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG >> 12
    return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode) >> 12
