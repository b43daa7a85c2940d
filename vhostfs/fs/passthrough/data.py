"""Writing: SETATTR, WRITE, FSYNC, FALLOCATE, COPY_FILE_RANGE and friends.

Small writes go straight from guest memory to the file on the event loop (one pwritev, no
copy); writes of _OFFLOAD_BYTES or more, and everything that may block for long (fsync,
fallocate, copy_file_range, syncfs), run on the worker threads so they never stall the other
requests. A handle stays open while a worker uses it (handles.py).

Set-id bits and file capabilities: the daemon runs as root, and root's writes never lose
set-id bits on the host. When the guest says the writer was unprivileged
(FUSE_WRITE_KILL_SUIDGID, FATTR_KILL_SUIDGID, and FUSE_OPEN_KILL_SUIDGID in core.py's open)
the daemon clears them as the kernel would for that writer (PassthroughCore.kill_privileges):
S_ISUID always, S_ISGID when group-executable. The host kernel removes security.capability on
every write, truncate and chown by itself; where an xattr map stores the guest's under another
name, which the host does not know to remove, the daemon removes that name on the same
changes. Without killpriv_v2 the guest kernel sends the chmod itself.

Symlinks: SETATTR acts on the link itself. chown and utimes go through /proc/self/fd/N, which
reaches the link's own inode; chmod and truncate of a symlink are refused as Linux refuses
them. Truncating without a handle reopens only a regular file.
"""

from __future__ import annotations

import errno
import os
import stat
import time
from typing import Final

from vhostfs.fs.inodes import Inode
from vhostfs.fs.passthrough import syscalls
from vhostfs.fs.passthrough.core import OFFSET_MAX, PassthroughCore, proc_path
from vhostfs.fs.passthrough.handles import NO_HANDLE
from vhostfs.fuse.ops import (
    Attr,
    AttrOut,
    FileHandle,
    FuseError,
    NodeId,
    RequestContext,
    SetattrChanges,
    WriteData,
)

WRITE_KILL_SUIDGID: Final = 1 << 2  # fuse_write_in.write_flags
# A write handed to a worker costs a thread switch and a wake-up of the loop, about as much
# CPU as copying 128 KiB into the host's page cache (bench-daemon: WRITE 128K went from 0.33x
# virtiofsd's ops/s offloaded to 0.72x inline). So writes up to half the 1 MiB max_write stay
# on the loop, and the bigger ones, whose copy alone would hold other requests up, go.
_OFFLOAD_BYTES: Final = 512 * 1024


def _check_range(offset: int, length: int) -> None:
    if offset < 0 or length < 0:
        raise FuseError(errno.EINVAL)
    if offset + length > OFFSET_MAX:
        raise FuseError(errno.EFBIG)


class DataOps(PassthroughCore):
    # Attributes.

    async def setattr(
        self,
        node: NodeId,
        fh: FileHandle | None,
        changes: SetattrChanges,
        ctx: RequestContext,
    ) -> AttrOut:
        self.check_writable()
        inode = self.inodes.get(node)
        # Size, then owner (chown drops set-id bits), then the mode the guest computed, which
        # the guest sends with the set-id bits already cleared when it wants them gone.
        if changes.size is not None:
            self._truncate(inode, fh, changes.size)
        if changes.uid is not None or changes.gid is not None:
            uid = -1 if changes.uid is None else changes.uid
            gid = -1 if changes.gid is None else changes.gid
            os.chown(proc_path(inode.fd), uid, gid)
        if changes.size is not None or changes.uid is not None or changes.gid is not None:
            self.drop_mapped_capability(inode)
        if changes.mode is not None:
            if stat.S_ISLNK(inode.mode):
                raise FuseError(errno.EOPNOTSUPP)
            os.chmod(proc_path(inode.fd), changes.mode & 0o7777)
        elif changes.kill_suidgid:
            self.kill_privileges(inode)
        times = (changes.atime_ns, changes.mtime_ns)
        if times != (None, None) or changes.atime_now or changes.mtime_now:
            self._set_times(inode, changes)
        return AttrOut(Attr.from_stat(os.fstat(inode.fd)), self.timeout)

    def _truncate(self, inode: Inode, fh: FileHandle | None, size: int) -> None:
        _check_range(size, 0)
        if fh is not None:
            with self.handles.using(self.handles.writable_file(fh, inode.node_id)) as fd:
                os.ftruncate(fd, size)
            return
        if not stat.S_ISREG(inode.mode):
            raise FuseError(errno.EISDIR if stat.S_ISDIR(inode.mode) else errno.EINVAL)
        flags = os.O_WRONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
        fd = os.open(proc_path(inode.fd), flags)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)

    @staticmethod
    def _set_times(inode: Inode, changes: SetattrChanges) -> None:
        # os.utime has no UTIME_OMIT: a time left unchanged is written back as it is.
        st = os.fstat(inode.fd)
        now = time.time_ns()
        atime = now if changes.atime_now else changes.atime_ns
        mtime = now if changes.mtime_now else changes.mtime_ns
        os.utime(
            proc_path(inode.fd),
            ns=(
                st.st_atime_ns if atime is None else atime,
                st.st_mtime_ns if mtime is None else mtime,
            ),
        )

    # Data.

    async def write(
        self,
        node: NodeId,
        fh: FileHandle,
        offset: int,
        data: WriteData,
        flags: int,
        ctx: RequestContext,
    ) -> int:
        self.check_writable()
        handle = self.handles.writable_file(fh, node)
        size = len(data)
        _check_range(offset, size)
        if size < _OFFLOAD_BYTES:
            # No await until it is written: no RELEASE can close the fd meanwhile.
            written = data.to_file(handle.fd, offset)
        else:
            with self.handles.using(handle) as fd:
                written = await self.offload(lambda: data.to_file(fd, offset))
        if flags & WRITE_KILL_SUIDGID:
            self.kill_privileges(self.inodes.get(node))
        return written

    async def flush(self, node: NodeId, fh: FileHandle, lock_owner: int) -> None:
        self.handles.file(fh, node)  # nothing buffered here: each WRITE reached the file

    async def fsync(self, node: NodeId, fh: FileHandle, datasync: bool) -> None:
        sync = os.fdatasync if datasync else os.fsync
        with self.handles.using(self.handles.file(fh, node)) as fd:
            await self.offload(lambda: sync(fd))

    async def fsyncdir(self, node: NodeId, fh: FileHandle, datasync: bool) -> None:
        if fh == NO_HANDLE:  # a directory the guest opened without OPENDIR
            fd = self.open_directory(self.directory(node))
        else:
            fd = os.dup(self.handles.dir(fh, node).fd)  # ours until the worker is done with it
        try:
            await self.offload(lambda: os.fsync(fd))
        finally:
            os.close(fd)

    async def syncfs(self, node: NodeId) -> None:
        # syncfs refuses O_PATH descriptors: open the directory itself for it.
        self.inodes.get(node)
        fd = self.open_directory(self.inodes.root)
        try:
            await self.offload(lambda: syscalls.syncfs(fd))
        finally:
            os.close(fd)

    async def fallocate(
        self, node: NodeId, fh: FileHandle, offset: int, length: int, mode: int
    ) -> None:
        self.check_writable()
        handle = self.handles.writable_file(fh, node)
        if length == 0:
            raise FuseError(errno.EINVAL)
        _check_range(offset, length)
        with self.handles.using(handle) as fd:
            await self.offload(lambda: syscalls.fallocate(fd, mode, offset, length))

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
        self.check_writable()
        if flags:
            raise FuseError(errno.EINVAL)
        source = self.handles.file(fh_in, node_in)
        target = self.handles.writable_file(fh_out, node_out)
        _check_range(offset_in, 0)
        _check_range(offset_out, 0)
        with self.handles.using(source) as fd_in, self.handles.using(target) as fd_out:
            return await self.offload(
                lambda: os.copy_file_range(fd_in, fd_out, length, offset_in, offset_out)
            )

