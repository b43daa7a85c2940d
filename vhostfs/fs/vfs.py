"""The VFS: one guest-visible tree made of a pseudo root and the file systems mounted in it.

This is nydusd's layout (reference §2.4-2.5), which Kata expects: the guest mounts one
virtio-fs tag and finds `/containers` (a passthrough) and `/rafs/<cid>/lowerdir` (images) in
it, each added and removed at runtime.

Node ids: guest node = index << 56 | inner. Index 0 is the pseudo tree; indexes 1..255 are
mounts, whose inner ids are the mounted file system's own (its root is ROOT_ID). Every reply
that hands out an entry counts one lookup for its index, every FORGET takes them back, so the
VFS knows when the guest holds nothing of a mount any more.

Unmounting removes the mountpoint at once; nodes the guest still holds answer ESTALE, and the
index is not given to another mount until the guest has forgotten all of them, so a stale node
can never reach the wrong file system. The caller closes the file system itself.

Answers that would be final for the whole session are kept local: ENOSYS from one mount (xattrs
turned off on an image, say) must not make the kernel stop asking every other mount, so it
becomes EOPNOTSUPP (ENODATA for getxattr, an empty list for listxattr). Requests that would
join two mounts (rename, link, copy_file_range) get EXDEV. st_ino gets the index in its top
bits, so no two mounts show the same inode number.

OPENDIR is the one ENOSYS meant for the whole session. The pseudo tree lists its directories
without handles and asks for NO_OPENDIR_SUPPORT; the session keeps it if every mount does too,
and then the VFS itself answers every OPENDIR with ENOSYS, so the kernel stops sending OPENDIR
and RELEASEDIR and reads every directory, in every mount, with fh 0 (which every file system
here can list). Without it, OPENDIR goes to the mount, and a mount's ENOSYS (it wanted the
flag, another mount kept it off) becomes a handle-less open: fh 0 with the flags the kernel
itself would use.
"""

from __future__ import annotations

import errno
import logging
import stat
from collections.abc import Iterable, Sequence
from dataclasses import replace
from typing import Final

from vhostfs.fs.pseudo import ROOT_INO, PathError, PseudoDir, PseudoTree
from vhostfs.fuse.abi import InitFlag, OpenReplyFlag
from vhostfs.fuse.negotiate import granted
from vhostfs.fuse.ops import (
    ROOT_ID,
    Attr,
    AttrOut,
    ConnInfo,
    DirectSpan,
    DirEntry,
    EntryOut,
    FileHandle,
    FuseError,
    NodeId,
    OpenOut,
    Operations,
    ReadResult,
    RequestContext,
    SetattrChanges,
    StatFs,
    WriteData,
)

log = logging.getLogger(__name__)

INDEX_SHIFT: Final = 56
INNER_MASK: Final = (1 << INDEX_SHIFT) - 1
PSEUDO: Final = 0
MAX_MOUNTS: Final = 255
PSEUDO_TIMEOUT: Final = 1.0  # pseudo directories change when mounts come and go
# How the kernel opens a directory without OPENDIR (fs/fuse/file.c, fuse_file_open).
_HANDLELESS_DIR: Final = OpenOut(FileHandle(0), OpenReplyFlag.KEEP_CACHE | OpenReplyFlag.CACHE_DIR)


class MountTableFull(Exception):
    """All 255 indexes are mounted or still held by the guest."""


class _Retired:
    """An unmounted index the guest still holds nodes of."""


_RETIRED: Final = _Retired()


def _split(node: int) -> tuple[int, int]:
    return node >> INDEX_SHIFT, node & INNER_MASK


def _node(index: int, inner: int) -> NodeId:
    if inner > INNER_MASK:
        raise FuseError(errno.EOVERFLOW)  # the mounted fs broke the 56-bit contract
    return NodeId(index << INDEX_SHIFT | inner)


class Vfs(Operations):
    def __init__(self) -> None:
        self._tree = PseudoTree()
        self._slots: list[Operations | _Retired | None] = [None] * (MAX_MOUNTS + 1)
        self._lookups = [0] * (MAX_MOUNTS + 1)  # entries handed out minus forgotten, by index
        self._conn: ConnInfo | None = None
        self._no_opendir = False  # the session runs with NO_OPENDIR_SUPPORT

    # --- The mount table -------------------------------------------------------------------

    async def mount(self, path: str, fs: Operations) -> int:
        """Put `fs` at `path`; returns its index. Raises PathError or MountTableFull. A fs
        mounted after the guest's INIT is initialised with the negotiated connection."""
        index = next((i for i in range(1, MAX_MOUNTS + 1) if self._slots[i] is None), None)
        if index is None:
            raise MountTableFull(f"{path}: {MAX_MOUNTS} file systems are mounted or held")
        self._tree.add_mount(path, index)
        self._slots[index] = fs
        if self._conn is not None:
            try:
                await self._init_one(fs, self._conn)
            except BaseException:
                self._tree.remove_mount(path)
                self._slots[index] = None
                raise
        return index

    def umount(self, path: str) -> Operations:
        """Take the fs at `path` out of the tree; returns it, for the caller to close."""
        index = self._tree.remove_mount(path)
        fs = self._slots[index]
        assert isinstance(fs, Operations)
        self._slots[index] = _RETIRED if self._lookups[index] else None
        return fs

    def mounted(self, index: int) -> Operations | None:
        fs = self._slots[index] if 0 < index <= MAX_MOUNTS else None
        return fs if isinstance(fs, Operations) else None

    def _fs(self, index: int) -> Operations:
        fs = self._slots[index] if index <= MAX_MOUNTS else None
        if isinstance(fs, Operations):
            return fs
        raise FuseError(errno.ESTALE)

    def _counted(self, index: int, entry: EntryOut) -> EntryOut:
        if not entry.node_id:
            return entry  # negative entries count nothing
        self._lookups[index] += 1
        return EntryOut(
            _node(index, entry.node_id),
            _with_ino(entry.attr, _fold(index, entry.attr.st_ino)),
            entry.entry_timeout,
            entry.attr_timeout,
            entry.generation,
        )

    def _attr_out(self, index: int, out: AttrOut) -> AttrOut:
        return AttrOut(_with_ino(out.attr, _fold(index, out.attr.st_ino)), out.timeout)

    # --- Session ---------------------------------------------------------------------------

    async def init(self, conn: ConnInfo) -> ConnInfo:
        # A feature offered stays on only if every mount keeps it; one a mount adds (the
        # passthrough's writeback cache or killpriv_v2) is on for the session, which the
        # read-only mounts never notice. NO_OPENDIR_SUPPORT, which the pseudo tree itself
        # wants, changes how every mount reads directories, so every mount must ask for it.
        removed = added = 0
        every = InitFlag.NO_OPENDIR_SUPPORT
        for fs in self._mounted():
            wanted = (await fs.init(conn)).flags
            removed |= conn.flags & ~wanted
            added |= wanted & ~conn.flags
            every &= wanted
        flags = (conn.flags & ~removed) | (added & ~InitFlag.NO_OPENDIR_SUPPORT) | every
        negotiated = replace(conn, flags=flags)
        self._conn = negotiated
        self._no_opendir = bool(
            granted(conn.kernel_flags, negotiated.flags) & InitFlag.NO_OPENDIR_SUPPORT
        )
        return negotiated

    async def _init_one(self, fs: Operations, conn: ConnInfo) -> None:
        wanted = await fs.init(conn)
        if conn.flags & ~wanted.flags:
            log.warning(
                "a mount added after INIT wants flags %#x off; the session keeps them",
                conn.flags & ~wanted.flags,
            )

    async def destroy(self) -> None:
        self._conn = None
        self._no_opendir = False
        for fs in self._mounted():
            await fs.destroy()

    def _mounted(self) -> list[Operations]:
        return [fs for fs in self._slots if isinstance(fs, Operations)]

    # --- Names and attributes --------------------------------------------------------------

    async def lookup(self, parent: NodeId, name: bytes, ctx: RequestContext) -> EntryOut:
        index, inner = _split(parent)
        if index != PSEUDO:
            return self._counted(index, await self._fs(index).lookup(NodeId(inner), name, ctx))
        directory = self._pseudo_dir(inner)
        if name in (b".", b".."):
            target = directory.ino if name == b"." else directory.parent
            return self._pseudo_entry(self._pseudo_dir(target))
        child = directory.dirs.get(name)
        if child is not None:
            return self._pseudo_entry(self._pseudo_dir(child))
        mount_index = directory.mounts.get(name)
        if mount_index is None:
            return EntryOut(NodeId(0), Attr(0, 0), PSEUDO_TIMEOUT, PSEUDO_TIMEOUT)
        root = await self._fs(mount_index).getattr(ROOT_ID, None, ctx)
        # Not marked ATTR_SUBMOUNT: the guest kernel would make it an automount point, and
        # overlayfs refuses one as its lowerdir, which is how Kata uses /rafs/<cid>/lowerdir.
        entry = EntryOut(ROOT_ID, root.attr, root.timeout, root.timeout)
        return self._counted(mount_index, entry)

    async def forget(self, batch: Sequence[tuple[NodeId, int]]) -> None:
        by_index: dict[int, list[tuple[NodeId, int]]] = {}
        for node, count in batch:
            index, inner = _split(node)
            if index == PSEUDO or index > MAX_MOUNTS:
                continue  # pseudo directories are never freed one by one
            self._lookups[index] = max(self._lookups[index] - count, 0)
            forgotten = by_index.setdefault(index, [])
            if inner != ROOT_ID:  # a mount's root stays valid for as long as it is mounted
                forgotten.append((NodeId(inner), count))
        for index, forgotten in by_index.items():
            fs = self._slots[index]
            if isinstance(fs, Operations):
                if forgotten:
                    await fs.forget(forgotten)
            elif fs is _RETIRED and not self._lookups[index]:
                self._slots[index] = None  # the guest holds nothing of it: free for reuse

    async def getattr(self, node: NodeId, fh: FileHandle | None, ctx: RequestContext) -> AttrOut:
        index, inner = _split(node)
        if index == PSEUDO:
            return AttrOut(self._pseudo_attr(self._pseudo_dir(inner)), PSEUDO_TIMEOUT)
        return self._attr_out(index, await self._fs(index).getattr(NodeId(inner), fh, ctx))

    async def setattr(
        self, node: NodeId, fh: FileHandle | None, changes: SetattrChanges, ctx: RequestContext
    ) -> AttrOut:
        index, inner = self._in_mount(node)
        out = await self._fs(index).setattr(NodeId(inner), fh, changes, ctx)
        return self._attr_out(index, out)

    async def readlink(self, node: NodeId, ctx: RequestContext) -> bytes:
        index, inner = self._in_mount(node, errno.EINVAL)
        return await self._fs(index).readlink(NodeId(inner), ctx)

    async def statfs(self, node: NodeId, ctx: RequestContext) -> StatFs:
        index, inner = _split(node)
        if index == PSEUDO:
            return StatFs(0, 0, 0, 0, 0, 4096, 255, 4096)
        return await self._fs(index).statfs(NodeId(inner), ctx)

    async def access(self, node: NodeId, mask: int, ctx: RequestContext) -> None:
        index, inner = _split(node)
        if index == PSEUDO:
            self._pseudo_dir(inner)
            return  # mode 0777: everyone may do everything the pseudo tree allows
        await self._local(self._fs(index).access(NodeId(inner), mask, ctx))

    # --- Creating and removing names -------------------------------------------------------

    async def mknod(
        self, parent: NodeId, name: bytes, mode: int, rdev: int, umask: int, ctx: RequestContext
    ) -> EntryOut:
        index, inner = self._in_mount(parent)
        entry = await self._fs(index).mknod(NodeId(inner), name, mode, rdev, umask, ctx)
        return self._counted(index, entry)

    async def mkdir(
        self, parent: NodeId, name: bytes, mode: int, umask: int, ctx: RequestContext
    ) -> EntryOut:
        index, inner = self._in_mount(parent)
        entry = await self._fs(index).mkdir(NodeId(inner), name, mode, umask, ctx)
        return self._counted(index, entry)

    async def symlink(
        self, parent: NodeId, name: bytes, target: bytes, ctx: RequestContext
    ) -> EntryOut:
        index, inner = self._in_mount(parent)
        entry = await self._fs(index).symlink(NodeId(inner), name, target, ctx)
        return self._counted(index, entry)

    async def link(
        self, node: NodeId, new_parent: NodeId, new_name: bytes, ctx: RequestContext
    ) -> EntryOut:
        index, inner = self._in_mount(node)
        parent_index, parent_inner = self._in_mount(new_parent, errno.EXDEV)
        if parent_index != index:
            raise FuseError(errno.EXDEV)
        entry = await self._fs(index).link(NodeId(inner), NodeId(parent_inner), new_name, ctx)
        return self._counted(index, entry)

    async def unlink(self, parent: NodeId, name: bytes, ctx: RequestContext) -> None:
        index, inner = self._in_mount(parent)
        await self._fs(index).unlink(NodeId(inner), name, ctx)

    async def rmdir(self, parent: NodeId, name: bytes, ctx: RequestContext) -> None:
        index, inner = self._in_mount(parent)
        await self._fs(index).rmdir(NodeId(inner), name, ctx)

    async def rename(
        self,
        parent: NodeId,
        name: bytes,
        new_parent: NodeId,
        new_name: bytes,
        flags: int,
        ctx: RequestContext,
    ) -> None:
        index, inner = self._in_mount(parent)
        new_index, new_inner = self._in_mount(new_parent, errno.EXDEV)
        if new_index != index:
            raise FuseError(errno.EXDEV)
        fs = self._fs(index)
        await fs.rename(NodeId(inner), name, NodeId(new_inner), new_name, flags, ctx)

    # --- Files -----------------------------------------------------------------------------

    async def open(
        self, node: NodeId, flags: int, ctx: RequestContext, *, kill_suidgid: bool = False
    ) -> OpenOut:
        index, inner = self._in_mount(node, errno.EISDIR)
        fs = self._fs(index)
        return await fs.open(NodeId(inner), flags, ctx, kill_suidgid=kill_suidgid)

    async def create(
        self, parent: NodeId, name: bytes, mode: int, flags: int, umask: int, ctx: RequestContext
    ) -> tuple[EntryOut, OpenOut]:
        index, inner = self._in_mount(parent)
        entry, handle = await self._fs(index).create(NodeId(inner), name, mode, flags, umask, ctx)
        return self._counted(index, entry), handle

    async def tmpfile(
        self, parent: NodeId, mode: int, flags: int, umask: int, ctx: RequestContext
    ) -> tuple[EntryOut, OpenOut]:
        index, inner = self._in_mount(parent)
        entry, handle = await self._fs(index).tmpfile(NodeId(inner), mode, flags, umask, ctx)
        return self._counted(index, entry), handle

    async def read(
        self, node: NodeId, fh: FileHandle, offset: int, size: int, ctx: RequestContext
    ) -> ReadResult:
        index, inner = self._in_mount(node, errno.EISDIR)
        return await self._fs(index).read(NodeId(inner), fh, offset, size, ctx)

    def idle_range(self, node: NodeId) -> tuple[int, int] | None:
        index, inner = _split(node)
        fs = self.mounted(index)
        nodes = None if fs is None else fs.idle_range(NodeId(inner))
        if nodes is None:
            return None
        base = index << INDEX_SHIFT
        return base | min(nodes[0], INNER_MASK), base | min(nodes[1], INNER_MASK)

    def constant_replies(self, node: NodeId) -> bool:
        index, inner = _split(node)
        fs = self.mounted(index)  # pseudo directories change as mounts come and go
        return fs is not None and fs.constant_replies(NodeId(inner))

    def direct_span(self, node: NodeId, fh: FileHandle, offset: int) -> DirectSpan | None:
        index, inner = _split(node)
        fs = self.mounted(index)
        span = None if fs is None else fs.direct_span(NodeId(inner), fh, offset)
        return None if span is None else replace(span, tag=index)

    async def write(
        self,
        node: NodeId,
        fh: FileHandle,
        offset: int,
        data: WriteData,
        flags: int,
        ctx: RequestContext,
    ) -> int:
        index, inner = self._in_mount(node, errno.EISDIR)
        return await self._fs(index).write(NodeId(inner), fh, offset, data, flags, ctx)

    async def flush(self, node: NodeId, fh: FileHandle, lock_owner: int) -> None:
        index, inner = self._in_mount(node, errno.EBADF)
        await self._fs(index).flush(NodeId(inner), fh, lock_owner)

    async def release(self, node: NodeId, fh: FileHandle, flags: int) -> None:
        index, inner = _split(node)
        fs = self.mounted(index)
        if fs is not None:  # a handle of an unmounted fs died with it
            await fs.release(NodeId(inner), fh, flags)

    async def fsync(self, node: NodeId, fh: FileHandle, datasync: bool) -> None:
        index, inner = self._in_mount(node, errno.EBADF)
        await self._fs(index).fsync(NodeId(inner), fh, datasync)

    async def fallocate(
        self, node: NodeId, fh: FileHandle, offset: int, length: int, mode: int
    ) -> None:
        index, inner = self._in_mount(node, errno.EBADF)
        await self._fs(index).fallocate(NodeId(inner), fh, offset, length, mode)

    async def lseek(self, node: NodeId, fh: FileHandle, offset: int, whence: int) -> int:
        index, inner = self._in_mount(node, errno.EBADF)
        return await self._fs(index).lseek(NodeId(inner), fh, offset, whence)

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
        index, inner_in = self._in_mount(node_in, errno.EBADF)
        out_index, inner_out = self._in_mount(node_out, errno.EBADF)
        if out_index != index:
            raise FuseError(errno.EXDEV)  # the kernel then copies through read and write
        return await self._fs(index).copy_file_range(
            NodeId(inner_in), fh_in, offset_in, NodeId(inner_out), fh_out, offset_out, length, flags
        )

    # --- Directories -----------------------------------------------------------------------

    async def opendir(self, node: NodeId, flags: int, ctx: RequestContext) -> OpenOut:
        if self._no_opendir:
            # Answered here, not by a mount: this ENOSYS is meant to end OPENDIR for the whole
            # session, and must not become the EOPNOTSUPP of _local.
            raise FuseError(errno.ENOSYS)
        index, inner = _split(node)
        if index == PSEUDO:
            self._pseudo_dir(inner)
            return OpenOut(FileHandle(0))
        try:
            return await self._fs(index).opendir(NodeId(inner), flags, ctx)
        except FuseError as e:
            if e.errno != errno.ENOSYS:
                raise
            return _HANDLELESS_DIR  # a mount that lists with fh 0 and wanted the flag

    async def readdir(
        self, node: NodeId, fh: FileHandle, offset: int, ctx: RequestContext
    ) -> Iterable[DirEntry]:
        index, inner = _split(node)
        if index == PSEUDO:
            return self._pseudo_entries(self._pseudo_dir(inner), offset)
        entries = await self._fs(index).readdir(NodeId(inner), fh, offset, ctx)
        return (replace(e, ino=_fold(index, e.ino)) for e in entries)

    async def releasedir(self, node: NodeId, fh: FileHandle) -> None:
        index, inner = _split(node)
        fs = self.mounted(index)
        if fs is not None:
            await fs.releasedir(NodeId(inner), fh)

    async def fsyncdir(self, node: NodeId, fh: FileHandle, datasync: bool) -> None:
        index, inner = _split(node)
        if index != PSEUDO:
            await self._local(self._fs(index).fsyncdir(NodeId(inner), fh, datasync))

    async def syncfs(self, node: NodeId) -> None:
        for fs in self._mounted():
            try:
                await fs.syncfs(ROOT_ID)
            except FuseError as e:
                if e.errno not in (errno.ENOSYS, errno.EROFS):
                    raise

    # --- Extended attributes ---------------------------------------------------------------

    async def getxattr(self, node: NodeId, name: bytes, ctx: RequestContext) -> bytes:
        index, inner = _split(node)
        if index == PSEUDO:
            raise FuseError(errno.ENODATA)
        try:
            return await self._fs(index).getxattr(NodeId(inner), name, ctx)
        except FuseError as e:
            raise FuseError(errno.ENODATA if e.errno == errno.ENOSYS else e.errno) from None

    async def listxattr(self, node: NodeId, ctx: RequestContext) -> Sequence[bytes]:
        index, inner = _split(node)
        if index == PSEUDO:
            return []
        try:
            return await self._fs(index).listxattr(NodeId(inner), ctx)
        except FuseError as e:
            if e.errno == errno.ENOSYS:
                return []
            raise

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
        index, inner = self._in_mount(node)
        fs = self._fs(index)
        await self._local(
            fs.setxattr(NodeId(inner), name, value, flags, ctx, kill_sgid=kill_sgid)
        )

    async def removexattr(self, node: NodeId, name: bytes, ctx: RequestContext) -> None:
        index, inner = self._in_mount(node)
        await self._local(self._fs(index).removexattr(NodeId(inner), name, ctx))

    # --- Helpers ---------------------------------------------------------------------------

    def _in_mount(self, node: NodeId, pseudo_errno: int = errno.EROFS) -> tuple[int, int]:
        """(index, inner) of a node that must belong to a mount; the pseudo tree answers
        `pseudo_errno` (it takes no changes, and holds no files)."""
        index, inner = _split(node)
        if index == PSEUDO:
            self._pseudo_dir(inner)
            raise FuseError(pseudo_errno)
        return index, inner

    @staticmethod
    async def _local(call: object) -> None:
        """Await a mount's answer, keeping an ENOSYS from ending that opcode for all mounts."""
        try:
            await call  # type: ignore[misc]
        except FuseError as e:
            raise FuseError(errno.EOPNOTSUPP if e.errno == errno.ENOSYS else e.errno) from None

    def _pseudo_dir(self, ino: int) -> PseudoDir:
        directory = self._tree.dir(ino)
        if directory is None:
            raise FuseError(errno.ENOENT)  # a pseudo directory removed by an unmount
        return directory

    def _pseudo_attr(self, directory: PseudoDir) -> Attr:
        mtime = directory.mtime_ns
        return Attr(
            directory.ino,
            PseudoDir.MODE,
            st_nlink=2 + len(directory.dirs),
            st_atime_ns=mtime,
            st_mtime_ns=mtime,
            st_ctime_ns=mtime,
        )

    def _pseudo_entry(self, directory: PseudoDir) -> EntryOut:
        node = NodeId(directory.ino)  # index 0: the node id is the pseudo inode itself
        return EntryOut(node, self._pseudo_attr(directory), PSEUDO_TIMEOUT, PSEUDO_TIMEOUT)

    def _pseudo_entries(self, directory: PseudoDir, offset: int) -> list[DirEntry]:
        dt_dir = stat.S_IFDIR >> 12
        names: list[tuple[bytes, int]] = [(b".", directory.ino), (b"..", directory.parent)]
        names += sorted(directory.dirs.items())
        names += [
            (name, _fold(index, ROOT_INO)) for name, index in sorted(directory.mounts.items())
        ]
        return [
            DirEntry(name, position + 1, ino, dt_dir)
            for position, (name, ino) in enumerate(names)
            if position >= offset
        ]


def _with_ino(a: Attr, st_ino: int) -> Attr:
    # A new Attr (the mounted fs may cache its own), built positionally: dataclasses.replace
    # costs several times as much, on every LOOKUP and GETATTR.
    return Attr(
        st_ino,
        a.st_mode,
        a.st_nlink,
        a.st_uid,
        a.st_gid,
        a.st_rdev,
        a.st_size,
        a.st_blocks,
        a.st_blksize,
        a.st_atime_ns,
        a.st_mtime_ns,
        a.st_ctime_ns,
        a.flags,
    )


def _fold(index: int, st_ino: int) -> int:
    """A guest-visible inode number unique across mounts."""
    return st_ino if index == PSEUDO else index << INDEX_SHIFT | (st_ino & INNER_MASK)


__all__ = ["MAX_MOUNTS", "MountTableFull", "PathError", "Vfs"]
