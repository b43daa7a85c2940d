"""The passthrough's core: nodes, handles and everything that only reads.

Containment: no path is ever built from a guest name. Every name is resolved one component at a
time relative to the parent's O_PATH descriptor with O_NOFOLLOW, so a symlink is an inode of its
own (READLINK returns its target, the guest resolves it on its side) and never a way out. Only
regular files and directories are ever opened on the host, by re-opening the node's own O_PATH
descriptor through /proc/self/fd/N, which reaches exactly the inode that descriptor names (the
inode's type was fixed when it was looked up and never changes). Devices, FIFOs, sockets and
symlinks are only ever reached through O_PATH. Name rules (names.py):
- "/" or NUL in a name, or an empty one: EINVAL.
- ".": the directory itself.
- "..": the root's parent is the root itself; elsewhere the host parent is accepted only if the
  guest already holds it (it must, as the kernel keeps a directory's parent looked up), so ".."
  can never introduce an inode the guest could not reach by walking down from the root. A
  directory the host moves out of the export therefore gets EACCES for "..".
In the daemon's namespace sandbox (vhostfs.daemon.sandbox) no absolute path leads out of the
share, so /proc/self/fd/N is reached as the relative name "N" (the working directory is the
fd directory; `use_fd_directory_cwd`).
Limits: a directory moved out of the export on the host stays reachable, through descriptors
the guest already holds, for the names below it, as with virtiofsd without its sandbox.

Cache policy, as virtiofsd: "never" (timeouts 0, direct I/O, no READDIRPLUS), "auto" (1 s,
page cache dropped on open), "always" (a day, page cache and directory cache kept, cached
symlinks).

Directories without handles: unless cache is "never", the session asks for
NO_OPENDIR_SUPPORT and answers OPENDIR with ENOSYS, after which the kernel sends no OPENDIR or
RELEASEDIR for the rest of the session (two round trips less per directory read) and reads
directories with fh 0, listed here by inode. The kernel then keeps the listings in its page
cache (it opens such directories KEEP_CACHE | CACHE_DIR) and drops them when it sees the
directory's mtime change, which with "auto" it checks once the 1 s attribute timeout has run
out; "never" promises no guest caching at all, so it keeps OPENDIR.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
from array import array
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Final, Literal, TypeVar

from vhostfs.fs.inodes import FdQuota, Inode, InodeTable, guest_fd_limit
from vhostfs.fs.passthrough import creds
from vhostfs.fs.passthrough.handles import NO_HANDLE, Handles, Listing, Listings
from vhostfs.fs.passthrough.names import checked_lookup_name
from vhostfs.fs.passthrough.xattrmap import XattrMap
from vhostfs.fuse.abi import ATTR_SUBMOUNT, InitFlag, OpenReplyFlag
from vhostfs.fuse.negotiate import granted
from vhostfs.fuse.ops import (
    DIRECT_WINDOW,
    ROOT_ID,
    Attr,
    AttrOut,
    ConnInfo,
    DirectSpan,
    DirEntry,
    EntryOut,
    FileHandle,
    FileSlice,
    FuseError,
    NodeId,
    OpenOut,
    Operations,
    ReadResult,
    RequestContext,
    StatFs,
)

log = logging.getLogger(__name__)

CachePolicy = Literal["auto", "always", "never"]
T = TypeVar("T")

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
O_LOOKUP: Final = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC
_SEEK_WHENCES: Final = frozenset(
    {os.SEEK_SET, os.SEEK_CUR, os.SEEK_END, os.SEEK_DATA, os.SEEK_HOLE}
)
_DT_DIR: Final = stat.S_IFDIR >> 12
# Guest open flags the host open may carry. Everything else (O_CREAT, O_EXCL, O_NOFOLLOW,
# O_PATH, O_TMPFILE, O_DIRECTORY, O_NOCTTY, O_DIRECT with its alignment rules) is ours to set.
_PASSED_OPEN_FLAGS: Final = (
    os.O_ACCMODE | os.O_TRUNC | os.O_APPEND | os.O_NONBLOCK | os.O_SYNC | os.O_DSYNC | os.O_NOATIME
)
OFFSET_MAX: Final = (1 << 63) - 1


def erofs() -> FuseError:
    return FuseError(errno.EROFS)


class _ProcAccess:
    """How the daemon reaches its own /proc/self/fd and /proc/self/status: by those absolute
    paths, or (in the namespace sandbox, where no absolute path leaves the share) by relative
    names, the process's working directory being its /proc/self/fd, and a status descriptor
    opened before the sandbox closed."""

    fd_prefix = "/proc/self/fd/"
    status_fd: int | None = None


def use_fd_directory_cwd(status_fd: int) -> None:
    """Switch to relative /proc access: the caller has made the process's working directory
    its /proc/self/fd (process-wide, so every thread resolves "N" there) and hands over a
    descriptor of /proc/self/status. Called once, by the sandbox, before any mount opens."""
    _ProcAccess.fd_prefix = ""
    _ProcAccess.status_fd = status_fd


def proc_path(fd: int) -> str:
    # Built from our own descriptor number, never from guest input.
    return f"{_ProcAccess.fd_prefix}{fd}"


class PassthroughCore(Operations):
    """Serve the directory tree at root to one guest: nodes, handles and the reading ops.

    root is opened once here (following symlinks in the operator's path); close() releases
    every descriptor and the worker threads. xattr=False answers ENOSYS to xattr requests;
    readdirplus=False keeps the guest on plain READDIR; readonly=True answers EROFS to every
    change; writeback=True lets the guest's page cache hold writes (FUSE writeback cache);
    killpriv_v2=True leaves clearing set-id bits on write, truncate and chown to the daemon
    (HANDLE_KILLPRIV_V2, as nydusd), instead of the guest sending the chmod itself; fd_limit
    caps the nodes and handles the guest may hold (default: below RLIMIT_NOFILE, inodes.py),
    beyond which its lookups, opens and creates get ENFILE; xattrmap renames the guest's xattr
    names on the host (xattrmap.py); announce_submounts marks directories on another host
    file system than their parent ATTR_SUBMOUNT (virtiofsd's --announce-submounts), so the
    guest gives them a superblock of their own and their inode numbers never meet the
    parent's."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        cache: CachePolicy = "auto",
        xattr: bool = True,
        readdirplus: bool = True,
        readonly: bool = False,
        writeback: bool = False,
        allow_devices: bool = False,
        killpriv_v2: bool = True,
        fd_limit: int | None = None,
        announce_submounts: bool = False,
        workers: int = 4,
        xattrmap: XattrMap | None = None,
    ) -> None:
        if cache not in _TIMEOUTS:
            raise ValueError(f"cache must be auto, always or never, not {cache!r}")
        self.cache = cache
        self.timeout = _TIMEOUTS[cache]
        self.xattr = xattr
        self.xattrmap = xattrmap
        # The host names a file's capabilities may be under: its own, and where the map puts
        # the guest's (the host kernel removes only the former on writes and chown).
        mapped_capability = xattrmap.host_capability_name() if xattrmap else None
        self.capability_names: tuple[bytes, ...] = (b"security.capability",) + (
            (mapped_capability,) if mapped_capability else ()
        )
        self.readdirplus = readdirplus and cache != "never"
        self.readonly = readonly
        self.writeback = writeback and not readonly
        self.allow_devices = allow_devices
        self.killpriv_v2 = killpriv_v2 and not readonly
        self.announce_submounts = announce_submounts
        self.submounts = False  # the session runs with SUBMOUNTS
        self.switch_creds = not readonly and creds.can_switch()
        if self.switch_creds:
            creds.drop_supplementary_groups()
        # The guest kernel already applied the caller's umask to the modes it sends; the
        # daemon's own umask (0 under `vhostfs serve`) must not take more bits away.
        self.umask = current_umask()
        # One quota for nodes and handles: both are descriptors the guest makes us hold.
        self.fd_quota = FdQuota(guest_fd_limit() if fd_limit is None else fd_limit)
        root_fd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        self.inodes = InodeTable(root_fd, self.fd_quota)
        self.handles = Handles(self.fd_quota)
        self.listings = Listings()  # directories read without a handle
        self.no_opendir = False  # the session runs with NO_OPENDIR_SUPPORT
        self._workers = workers
        self._pool: ThreadPoolExecutor | None = None

    def close(self) -> None:
        self.handles.clear()
        self.listings.clear()
        self.inodes.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    async def offload(self, work: Callable[[], T]) -> T:
        """Run blocking work (fsync, big writes, fallocate, copies) on a worker thread, so the
        event loop keeps serving other requests meanwhile."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # driven without a loop (tools, tests): nothing else to stall
            return work()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="passthrough")
        return await loop.run_in_executor(self._pool, work)

    def restore_masked_bits(self, fd: int, mode: int) -> None:
        """Give back the permission bits of mode that the daemon's umask removed from the new
        inode fd names (never set-id bits: those are the kernel's call)."""
        lost = mode & self.umask & 0o777
        if lost:
            st = os.fstat(fd)
            os.chmod(proc_path(fd), stat.S_IMODE(st.st_mode) | lost)

    def check_writable(self) -> None:
        if self.readonly:
            raise erofs()

    def drop_mapped_capability(self, inode: Inode) -> None:
        """Remove the guest's security.capability from a regular file where the xattr map put
        it under another name, as the host kernel removes its own on a write, truncate or
        chown (CVE-2021-20263: a remapped capability must not outlive the change)."""
        if len(self.capability_names) > 1 and stat.S_ISREG(inode.mode):
            remove_xattrs(inode, self.capability_names[1:])

    def kill_privileges(self, inode: Inode) -> None:
        """What the kernel does to a file an unprivileged caller writes, truncates or chowns:
        S_ISUID goes, S_ISGID too when group-executable. security.capability itself the host
        kernel has removed already (it does on every write, truncate and chown, whoever the
        writer); only a name the xattr map chose is ours to drop. Under killpriv_v2 every
        write of an unprivileged caller comes here, so no syscall is spent on the rest."""
        self.clear_setid_bits(inode)
        self.drop_mapped_capability(inode)

    @staticmethod
    def clear_setid_bits(inode: Inode) -> None:
        if not stat.S_ISREG(inode.mode):
            return
        mode = os.fstat(inode.fd).st_mode
        kill = stat.S_ISUID
        if mode & stat.S_IXGRP:
            kill |= stat.S_ISGID
        if mode & kill:
            os.chmod(proc_path(inode.fd), stat.S_IMODE(mode) & ~kill)

    # Session.

    async def init(self, conn: ConnInfo) -> ConnInfo:
        self.handles.clear()
        self.listings.clear()
        self.inodes.reset()
        flags = conn.flags
        if not self.readdirplus:
            flags &= ~(InitFlag.DO_READDIRPLUS | InitFlag.READDIRPLUS_AUTO)
        if self.cache == "always":
            flags |= InitFlag.CACHE_SYMLINKS
        if self.writeback:
            flags |= InitFlag.WRITEBACK_CACHE
        if self.killpriv_v2:
            flags |= InitFlag.HANDLE_KILLPRIV_V2
        if self.announce_submounts:
            flags |= InitFlag.SUBMOUNTS
        if self.xattr and not self.readonly:
            flags |= InitFlag.SETXATTR_EXT  # ACL_KILL_SGID reaches setxattr
        if self.cache != "never":
            flags |= InitFlag.NO_OPENDIR_SUPPORT
        session = granted(conn.kernel_flags, flags)
        self.no_opendir = bool(session & InitFlag.NO_OPENDIR_SUPPORT)
        self.submounts = bool(session & InitFlag.SUBMOUNTS)
        return replace(conn, flags=flags)

    async def destroy(self) -> None:
        self.handles.clear()
        self.listings.clear()
        self.inodes.reset()
        self.no_opendir = False

    # Names and attributes.

    def entry(self, inode: Inode, st: os.stat_result) -> EntryOut:
        return EntryOut(inode.node_id, Attr.from_stat(st), self.timeout, self.timeout)

    def directory(self, node: NodeId) -> Inode:
        inode = self.inodes.get(node)
        if not stat.S_ISDIR(inode.mode):
            raise FuseError(errno.ENOTDIR)
        return inode

    def adopt(self, fd: int) -> EntryOut:
        """Count one lookup of the inode an O_PATH descriptor names; takes ownership of fd."""
        try:
            st = os.fstat(fd)
        except OSError:
            os.close(fd)
            raise
        return self.entry(self.inodes.count_lookup(fd, st), st)

    def adopt_name(self, directory: Inode, name: bytes) -> EntryOut:
        """Look up a name just created in directory, as LOOKUP would."""
        return self.adopt(os.open(name, O_LOOKUP, dir_fd=directory.fd))

    async def lookup(self, parent: NodeId, name: bytes, ctx: RequestContext) -> EntryOut:
        entry = self._lookup(parent, name)
        if self.submounts and self._mounted_below(parent, name, entry):
            entry.attr.flags |= ATTR_SUBMOUNT
        return entry

    def _mounted_below(self, parent: NodeId, name: bytes, entry: EntryOut) -> bool:
        """Another st_dev than its parent's: a file system mounted there on the host."""
        if not stat.S_ISDIR(entry.attr.st_mode) or name in (b".", b".."):
            return False
        return self.inodes.get(entry.node_id).key[0] != self.inodes.get(parent).key[0]

    def _lookup(self, parent: NodeId, name: bytes) -> EntryOut:
        directory = self.directory(parent)
        name = checked_lookup_name(name)
        if name == b"." or (name == b".." and directory.node_id == ROOT_ID):
            return self.entry(self.inodes.recount(directory), os.fstat(directory.fd))
        if name == b"..":
            st = os.stat(b"..", dir_fd=directory.fd, follow_symlinks=False)
            known = self.inodes.find((st.st_dev, st.st_ino))
            if known is None:
                raise FuseError(errno.EACCES)
            return self.entry(self.inodes.recount(known), st)
        try:
            # The guest mostly looks up names it has seen before: an lstat finds an inode we
            # already pin without opening (and closing) a descriptor. That inode cannot have
            # been replaced by another with the same number: our O_PATH descriptor holds it.
            st = os.stat(name, dir_fd=directory.fd, follow_symlinks=False)
            known = self.inodes.find((st.st_dev, st.st_ino))
            if known is not None:
                return self.entry(self.inodes.recount(known), st)
            fd = os.open(name, O_LOOKUP, dir_fd=directory.fd)
        except FileNotFoundError:
            if self.timeout == 0:
                raise
            # A negative entry lets the guest cache the miss for as long as a hit.
            return EntryOut(NodeId(0), Attr(st_ino=0, st_mode=0), self.timeout, 0.0)
        return self.adopt(fd)  # the name may have changed since the lstat: trust the fd

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
            self.check_writable()
        st = os.fstat(inode.fd)
        check_mode_access(st.st_mode, st.st_uid, st.st_gid, mask, ctx)

    # Files.

    async def open(
        self, node: NodeId, flags: int, ctx: RequestContext, *, kill_suidgid: bool = False
    ) -> OpenOut:
        inode = self.inodes.get(node)
        access = flags & os.O_ACCMODE
        if access not in (os.O_RDONLY, os.O_WRONLY, os.O_RDWR):
            raise FuseError(errno.EINVAL)
        writes = access != os.O_RDONLY or bool(flags & os.O_TRUNC)
        if writes:
            self.check_writable()
        if not stat.S_ISREG(inode.mode):
            # The guest handles devices, fifos and sockets itself; reopening one here would
            # reach the host's device, so only regular files are ever opened.
            raise FuseError(errno.EISDIR if stat.S_ISDIR(inode.mode) else errno.EACCES)
        self.fd_quota.check()
        fd = os.open(proc_path(inode.fd), self.host_open_flags(flags))
        if flags & os.O_TRUNC:
            self.drop_mapped_capability(inode)
            if kill_suidgid:
                # The host truncated as root, who keeps set-id bits; the guest's caller may not.
                self.clear_setid_bits(inode)
        return self.file_opened(self.handles.add_file(node, fd, access != os.O_RDONLY))

    def file_opened(self, fh: FileHandle) -> OpenOut:
        return OpenOut(fh, _FILE_FLAGS[self.cache])

    def host_open_flags(self, flags: int) -> int:
        host = (flags & _PASSED_OPEN_FLAGS) | os.O_CLOEXEC | os.O_NOCTTY
        if self.writeback:
            # The guest's page cache reads around partial writes and appends itself, so a
            # write-only handle must also read, and O_APPEND would misplace its writes.
            host &= ~os.O_APPEND
            if host & os.O_ACCMODE == os.O_WRONLY:
                host = (host & ~os.O_ACCMODE) | os.O_RDWR
        return host

    async def read(
        self, node: NodeId, fh: FileHandle, offset: int, size: int, ctx: RequestContext
    ) -> ReadResult:
        return FileSlice(self.handles.file(fh, node).fd, offset, size)

    def direct_span(self, node: NodeId, fh: FileHandle, offset: int) -> DirectSpan | None:
        """A read handle's file is its fd, whatever happens to the file meanwhile: the window
        around offset can be read straight from it until the handle is released."""
        try:
            fd = self.handles.file(fh, node).fd
        except FuseError:
            return None
        start = offset - offset % DIRECT_WINDOW
        return DirectSpan(start, start + DIRECT_WINDOW, -1, fd, start)

    async def release(self, node: NodeId, fh: FileHandle, flags: int) -> None:
        self.handles.release_file(fh, node)

    async def lseek(self, node: NodeId, fh: FileHandle, offset: int, whence: int) -> int:
        if whence not in _SEEK_WHENCES or not 0 <= offset <= OFFSET_MAX:
            raise FuseError(errno.EINVAL)
        return os.lseek(self.handles.file(fh, node).fd, offset, whence)

    # Directories.

    def open_directory(self, inode: Inode) -> int:
        """A new descriptor to read the directory inode (the caller closes it)."""
        return os.open(proc_path(inode.fd), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)

    async def opendir(self, node: NodeId, flags: int, ctx: RequestContext) -> OpenOut:
        if self.no_opendir:
            # The kernel's cue to stop sending OPENDIR and RELEASEDIR for this session; it
            # reads directories with fh 0 from now on.
            raise FuseError(errno.ENOSYS)
        self.fd_quota.check()
        fd = self.open_directory(self.directory(node))
        return OpenOut(self.handles.add_dir(node, fd), _DIR_FLAGS[self.cache])

    async def readdir(
        self, node: NodeId, fh: FileHandle, offset: int, ctx: RequestContext
    ) -> Iterable[DirEntry]:
        if fh == NO_HANDLE:
            inode = self.directory(node)
            return self.listings.page(node, offset, lambda: self._snapshot_unopened(inode))
        handle = self.handles.dir(fh, node)
        if offset == 0 or handle.listing is None:
            handle.listing = self._snapshot(self.inodes.get(handle.node), handle.fd)
        # Cookies are ours (index + 1); anything past the end is simply the end.
        return handle.listing.entries(min(offset, len(handle.listing)))

    def _snapshot_unopened(self, inode: Inode) -> Listing:
        fd = self.open_directory(inode)
        try:
            return self._snapshot(inode, fd)
        finally:
            os.close(fd)

    def _snapshot(self, inode: Inode, fd: int) -> Listing:
        """Every entry of the directory inode, read through fd (opened on it)."""
        own = os.fstat(fd)
        parent_ino = own.st_ino
        if inode is not self.inodes.root:  # the root's parent is outside the export: not shown
            with contextlib.suppress(OSError):
                parent_ino = os.stat(b"..", dir_fd=inode.fd, follow_symlinks=False).st_ino
        names = [b".", b".."]
        inos = array("Q", (own.st_ino, parent_ino))
        kinds = bytearray((_DT_DIR, _DT_DIR))
        os.lseek(fd, 0, os.SEEK_SET)
        with os.scandir(fd) as entries:
            for entry in entries:
                try:
                    kind = _dirent_kind(entry)
                except FileNotFoundError:
                    continue
                names.append(os.fsencode(entry.name))
                inos.append(entry.inode())
                kinds.append(kind)
        return Listing(names, inos, kinds)

    async def releasedir(self, node: NodeId, fh: FileHandle) -> None:
        if fh != NO_HANDLE:  # fh 0 was opened without a handle: nothing to release
            self.handles.release_dir(fh, node)

    # Extended attributes. Read through /proc/self/fd/N because f*xattr refuses O_PATH
    # descriptors; following that magic link stops at the inode itself, symlinks included.

    def check_xattr(self) -> None:
        if not self.xattr:
            raise FuseError(errno.ENOSYS)

    def host_xattr_name(self, name: bytes) -> bytes:
        """The host name for an xattr name the guest sends (the map's refusals raise)."""
        return name if self.xattrmap is None else self.xattrmap.host_name(name)

    async def getxattr(self, node: NodeId, name: bytes, ctx: RequestContext) -> bytes:
        self.check_xattr()
        name = self.host_xattr_name(name)
        return os.getxattr(proc_path(self.inodes.get(node).fd), name)

    async def listxattr(self, node: NodeId, ctx: RequestContext) -> Sequence[bytes]:
        self.check_xattr()
        names = [os.fsencode(name) for name in os.listxattr(proc_path(self.inodes.get(node).fd))]
        # Sizes (0 asks for it, ERANGE when short) are the dispatcher's, on what we return.
        return names if self.xattrmap is None else self.xattrmap.guest_names(names)


def remove_xattrs(inode: Inode, names: Iterable[bytes]) -> None:
    """Remove the names from inode, those it does not have (ENODATA) or cannot have (ENOTSUP)
    being no error."""
    for name in names:
        with contextlib.suppress(OSError):
            os.removexattr(proc_path(inode.fd), name)


def current_umask() -> int:
    """The process umask, read without changing it (which would race with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        if _ProcAccess.status_fd is not None:
            text = os.pread(_ProcAccess.status_fd, 1 << 16, 0).decode()
        else:
            with open("/proc/self/status") as status:
                text = status.read()
        for line in text.splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    return 0o022


def check_mode_access(mode: int, uid: int, gid: int, mask: int, ctx: RequestContext) -> None:
    """access(2) from the mode bits alone: root may read and write anything and execute what
    anyone may execute (and search any directory)."""
    wanted = mask & (os.R_OK | os.W_OK | os.X_OK)
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


def _dirent_kind(entry: os.DirEntry[str]) -> int:
    """DT_* type, from the d_type the kernel gave when it did (no extra stat)."""
    if entry.is_symlink():
        return stat.S_IFLNK >> 12
    if entry.is_dir(follow_symlinks=False):
        return stat.S_IFDIR >> 12
    if entry.is_file(follow_symlinks=False):
        return stat.S_IFREG >> 12
    return stat.S_IFMT(entry.stat(follow_symlinks=False).st_mode) >> 12
