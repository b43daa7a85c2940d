"""Creating, linking, renaming and removing names.

Every name passes names.checked_name first and only ever meets *at() calls beside the parent's
O_PATH descriptor, which never follow a symlink in the last component: mkdirat, mknodat and
symlinkat over an existing symlink give EEXIST, and CREATE is always O_EXCL on the host. New
objects are made under the caller's fsuid/fsgid (creds.py). LINK links the inode our
descriptor pins, through /proc/self/fd, so a link to a symlink is a second name for the
symlink, never for its target.

Device nodes: block and character devices are refused (EPERM) unless allow_devices, except
char 0:0, the whiteout that overlayfs in the guest creates.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Final

from vhostfs.fs.inodes import Inode
from vhostfs.fs.passthrough import syscalls
from vhostfs.fs.passthrough.core import O_LOOKUP, PassthroughCore, proc_path
from vhostfs.fs.passthrough.creds import as_caller
from vhostfs.fs.passthrough.names import checked_name
from vhostfs.fuse.ops import EntryOut, FuseError, NodeId, OpenOut, RequestContext

_RENAME_FLAGS: Final = (
    syscalls.RENAME_NOREPLACE | syscalls.RENAME_EXCHANGE | syscalls.RENAME_WHITEOUT
)
_MKNOD_TYPES: Final = frozenset(
    {stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK, stat.S_IFCHR, stat.S_IFBLK}
)
_CREATE_FLAGS: Final = os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW


class NamespaceOps(PassthroughCore):
    async def mknod(
        self, parent: NodeId, name: bytes, mode: int, rdev: int, umask: int, ctx: RequestContext
    ) -> EntryOut:
        self.check_writable()
        directory = self.directory(parent)
        name = checked_name(name)
        kind = stat.S_IFMT(mode)
        if kind not in _MKNOD_TYPES:
            raise FuseError(errno.EINVAL)
        device = kind in (stat.S_IFCHR, stat.S_IFBLK)
        whiteout = kind == stat.S_IFCHR and rdev == 0
        if device and not whiteout and not self.allow_devices:
            raise FuseError(errno.EPERM)
        self.fd_quota.check()
        with as_caller(ctx, self.switch_creds):
            os.mknod(name, kind | (mode & 0o7777), rdev if device else 0, dir_fd=directory.fd)
        return self._adopt_new(directory, name, mode)

    async def mkdir(
        self, parent: NodeId, name: bytes, mode: int, umask: int, ctx: RequestContext
    ) -> EntryOut:
        self.check_writable()
        directory = self.directory(parent)
        name = checked_name(name)
        self.fd_quota.check()
        with as_caller(ctx, self.switch_creds):
            os.mkdir(name, mode & 0o7777, dir_fd=directory.fd)
        return self._adopt_new(directory, name, mode)

    async def symlink(
        self, parent: NodeId, name: bytes, target: bytes, ctx: RequestContext
    ) -> EntryOut:
        self.check_writable()
        directory = self.directory(parent)
        name = checked_name(name)
        if b"\0" in target:
            raise FuseError(errno.EINVAL)
        # The target is stored as the guest wrote it and never followed on the host.
        self.fd_quota.check()
        with as_caller(ctx, self.switch_creds):
            os.symlink(target, name, dir_fd=directory.fd)
        return self.adopt_name(directory, name)

    async def link(
        self, node: NodeId, new_parent: NodeId, new_name: bytes, ctx: RequestContext
    ) -> EntryOut:
        self.check_writable()
        inode = self.inodes.get(node)
        directory = self.directory(new_parent)
        new_name = checked_name(new_name)
        if stat.S_ISDIR(inode.mode):
            raise FuseError(errno.EPERM)
        # Following the /proc magic link lands on the inode itself, whatever its type.
        os.link(proc_path(inode.fd), new_name, dst_dir_fd=directory.fd, follow_symlinks=True)
        return self.entry(self.inodes.recount(inode), os.fstat(inode.fd))

    async def unlink(self, parent: NodeId, name: bytes, ctx: RequestContext) -> None:
        self.check_writable()
        os.unlink(checked_name(name), dir_fd=self.directory(parent).fd)

    async def rmdir(self, parent: NodeId, name: bytes, ctx: RequestContext) -> None:
        self.check_writable()
        os.rmdir(checked_name(name), dir_fd=self.directory(parent).fd)

    async def rename(
        self,
        parent: NodeId,
        name: bytes,
        new_parent: NodeId,
        new_name: bytes,
        flags: int,
        ctx: RequestContext,
    ) -> None:
        self.check_writable()
        if flags & ~_RENAME_FLAGS:
            raise FuseError(errno.EINVAL)
        old_dir, new_dir = self.directory(parent).fd, self.directory(new_parent).fd
        name, new_name = checked_name(name), checked_name(new_name)
        if flags:
            # WHITEOUT leaves a char 0:0 node behind: it needs CAP_MKNOD on older kernels, so
            # it runs with the daemon's own credentials like the rest of RENAME.
            syscalls.renameat2(old_dir, name, new_dir, new_name, flags)
        else:
            os.rename(name, new_name, src_dir_fd=old_dir, dst_dir_fd=new_dir)

    async def create(
        self,
        parent: NodeId,
        name: bytes,
        mode: int,
        flags: int,
        umask: int,
        ctx: RequestContext,
    ) -> tuple[EntryOut, OpenOut]:
        self.check_writable()
        directory = self.directory(parent)
        name = checked_name(name)
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise FuseError(errno.EINVAL)
        host_flags = self.host_open_flags(flags) | _CREATE_FLAGS
        self.fd_quota.check(2)  # the node and its handle
        with as_caller(ctx, self.switch_creds):
            fd = os.open(name, host_flags, mode & 0o7777, dir_fd=directory.fd)
        return self._adopt_open(fd, flags, mode)

    async def tmpfile(
        self, parent: NodeId, mode: int, flags: int, umask: int, ctx: RequestContext
    ) -> tuple[EntryOut, OpenOut]:
        self.check_writable()
        directory = self.directory(parent)
        if flags & os.O_ACCMODE not in (os.O_WRONLY, os.O_RDWR):
            raise FuseError(errno.EINVAL)
        host_flags = self.host_open_flags(flags) | os.O_TMPFILE
        self.fd_quota.check(2)
        with as_caller(ctx, self.switch_creds):
            fd = os.open(b".", host_flags, mode & 0o7777, dir_fd=directory.fd)
        return self._adopt_open(fd, flags, mode)

    def _adopt_new(self, directory: Inode, name: bytes, mode: int) -> EntryOut:
        path_fd = os.open(name, O_LOOKUP, dir_fd=directory.fd)
        try:
            self.restore_masked_bits(path_fd, mode)
        except OSError:
            os.close(path_fd)
            raise
        return self.adopt(path_fd)

    def _adopt_open(self, fd: int, flags: int, mode: int) -> tuple[EntryOut, OpenOut]:
        """The node and a handle for a file we just created and opened as fd."""
        try:
            path_fd = os.open(proc_path(fd), O_LOOKUP & ~os.O_NOFOLLOW)
        except OSError:
            os.close(fd)
            raise
        try:
            self.restore_masked_bits(path_fd, mode)
        except OSError:
            os.close(fd)
            os.close(path_fd)
            raise
        try:
            entry = self.adopt(path_fd)
        except BaseException:
            os.close(fd)
            raise
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        return entry, self.file_opened(self.handles.add_file(entry.node_id, fd, writable))
