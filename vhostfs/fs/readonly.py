"""A base for file systems the guest may only read: every mutation answers EROFS.

ENOSYS would be wrong here: for several opcodes the kernel takes ENOSYS as "not implemented,
emulate it" (CREATE becomes MKNOD + OPEN, COPY_FILE_RANGE becomes READ + WRITE) and would just
try again another way, while EROFS tells the application the truth at once.
"""

from __future__ import annotations

import errno
import os
import stat

from vhostfs.fuse.ops import (
    AttrOut,
    EntryOut,
    FileHandle,
    FuseError,
    NodeId,
    OpenOut,
    Operations,
    RequestContext,
    SetattrChanges,
    WriteData,
)


def _read_only() -> FuseError:
    return FuseError(errno.EROFS)


class ReadOnlyOperations(Operations):
    """Operations with every mutating method refusing with EROFS."""

    async def setattr(
        self,
        node: NodeId,
        fh: FileHandle | None,
        changes: SetattrChanges,
        ctx: RequestContext,
    ) -> AttrOut:
        raise _read_only()

    async def mknod(
        self, parent: NodeId, name: bytes, mode: int, rdev: int, umask: int, ctx: RequestContext
    ) -> EntryOut:
        raise _read_only()

    async def mkdir(
        self, parent: NodeId, name: bytes, mode: int, umask: int, ctx: RequestContext
    ) -> EntryOut:
        raise _read_only()

    async def symlink(
        self, parent: NodeId, name: bytes, target: bytes, ctx: RequestContext
    ) -> EntryOut:
        raise _read_only()

    async def link(
        self, node: NodeId, new_parent: NodeId, new_name: bytes, ctx: RequestContext
    ) -> EntryOut:
        raise _read_only()

    async def unlink(self, parent: NodeId, name: bytes, ctx: RequestContext) -> None:
        raise _read_only()

    async def rmdir(self, parent: NodeId, name: bytes, ctx: RequestContext) -> None:
        raise _read_only()

    async def rename(
        self,
        parent: NodeId,
        name: bytes,
        new_parent: NodeId,
        new_name: bytes,
        flags: int,
        ctx: RequestContext,
    ) -> None:
        raise _read_only()

    async def create(
        self,
        parent: NodeId,
        name: bytes,
        mode: int,
        flags: int,
        umask: int,
        ctx: RequestContext,
    ) -> tuple[EntryOut, OpenOut]:
        raise _read_only()

    async def tmpfile(
        self, parent: NodeId, mode: int, flags: int, umask: int, ctx: RequestContext
    ) -> tuple[EntryOut, OpenOut]:
        raise _read_only()

    async def write(
        self,
        node: NodeId,
        fh: FileHandle,
        offset: int,
        data: WriteData,
        flags: int,
        ctx: RequestContext,
    ) -> int:
        raise _read_only()

    async def fallocate(
        self, node: NodeId, fh: FileHandle, offset: int, length: int, mode: int
    ) -> None:
        raise _read_only()

    async def copy_file_range(
        self,
        node_in: NodeId,
        fh_in: FileHandle,
        offset_in: int,
        node_out: NodeId,
        fh_out: FileHandle,
        offset_out: int,
        length: int,
        flags: int,
    ) -> int:
        raise _read_only()

    async def setxattr(
        self,
        node: NodeId,
        name: bytes,
        value: bytes,
        flags: int,
        ctx: RequestContext,
        *,
        kill_sgid: bool = False,
    ) -> None:
        raise _read_only()

    async def removexattr(self, node: NodeId, name: bytes, ctx: RequestContext) -> None:
        raise _read_only()


def check_access(mode: int, uid: int, gid: int, mask: int, ctx: RequestContext) -> None:
    """access(2) for a read-only file system, from the mode bits alone.

    W_OK is EROFS whatever the bits say; root may read anything and execute what anyone may
    execute (and search any directory)."""
    if mask & os.W_OK:
        raise _read_only()
    wanted = mask & (os.R_OK | os.X_OK)
    if not wanted:
        return
    if ctx.uid == 0:
        if mask & os.X_OK and not (mode & 0o111 or stat.S_ISDIR(mode)):
            raise FuseError(errno.EACCES)
        return
    if ctx.uid == uid:
        granted = (mode >> 6) & 7
    elif ctx.gid == gid:
        granted = (mode >> 3) & 7
    else:
        granted = mode & 7
    if granted & wanted != wanted:
        raise FuseError(errno.EACCES)
