"""The file-system side of the FUSE protocol: typed operations and their results.

A file system subclasses `Operations` and overrides what it supports. Every method is a
coroutine; the dispatcher runs it inline and only involves the event loop when the method really
suspends, so a method that never awaits anything costs no more than a plain call. Until a method's
first suspension it runs outside any asyncio Task, so it must not use Task-bound helpers such as
`asyncio.timeout()` before it has awaited something.

Errors travel as exceptions: raise `FuseError(errno)` (or let an `OSError` escape) and the guest
gets -errno. Anything else becomes EIO and is logged.

Lookup counts: every reply that hands the guest an entry with a non-zero node id (lookup, mknod,
mkdir, symlink, link, create, and each READDIRPLUS entry, which the dispatcher obtains by calling
`lookup`) adds one to that node's lookup count. `forget` subtracts. A node must stay valid until
its count drops to zero; the root node (1) is never forgotten.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NewType, Protocol, TypeAlias

from vhostfs.segments import FileSlice as FileSlice  # re-exported: READ results
from vhostfs.segments import Segment

NodeId = NewType("NodeId", int)
FileHandle = NewType("FileHandle", int)

ROOT_ID = NodeId(1)


class FuseError(Exception):
    """Fail the current request with the given errno."""

    def __init__(self, errno_: int) -> None:
        super().__init__(errno_, os.strerror(errno_))
        self.errno = errno_


@dataclass(frozen=True, slots=True)
class RequestContext:
    """Who asked, as the guest kernel reports it (ids are guest ids, not host ids)."""

    uid: int
    gid: int
    pid: int


@dataclass(frozen=True, slots=True)
class ConnInfo:
    """The connection being set up by FUSE_INIT, as offered to `Operations.init`.

    `flags` is what the dispatcher is about to enable (abi.InitFlag bits). `init` may return a
    changed copy (`dataclasses.replace`), e.g. clear DO_READDIRPLUS or add CACHE_SYMLINKS; the
    dispatcher then keeps only bits the kernel offered and that it knows how to serve.
    """

    major: int
    minor: int
    kernel_flags: int
    flags: int
    max_readahead: int
    max_write: int
    max_pages: int


@dataclass(slots=True)
class Attr:
    """What the guest sees from stat(2). Times are nanoseconds since the epoch."""

    st_ino: int
    st_mode: int
    st_nlink: int = 1
    st_uid: int = 0
    st_gid: int = 0
    st_rdev: int = 0
    st_size: int = 0
    st_blocks: int = 0
    st_blksize: int = 4096
    st_atime_ns: int = 0
    st_mtime_ns: int = 0
    st_ctime_ns: int = 0
    flags: int = 0  # abi.ATTR_SUBMOUNT / abi.ATTR_DAX

    @classmethod
    def from_stat(cls, st: os.stat_result) -> Attr:
        # Positional, in field order: a keyword call costs about twice as much, on every
        # LOOKUP and GETATTR.
        return cls(
            st.st_ino,
            st.st_mode,
            st.st_nlink,
            st.st_uid,
            st.st_gid,
            st.st_rdev,
            st.st_size,
            st.st_blocks,
            st.st_blksize,
            st.st_atime_ns,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )


@dataclass(slots=True)
class EntryOut:
    """A name resolved to a node. node_id 0 is a negative entry: the guest caches "no such name"
    for entry_timeout seconds and counts no lookup."""

    node_id: NodeId
    attr: Attr
    entry_timeout: float = 0.0
    attr_timeout: float = 0.0
    generation: int = 0


@dataclass(slots=True)
class AttrOut:
    attr: Attr
    timeout: float = 0.0


@dataclass(frozen=True, slots=True)
class OpenOut:
    """A new file or directory handle; flags are abi.OpenReplyFlag bits (caching hints)."""

    fh: FileHandle
    flags: int = 0


@dataclass(frozen=True, slots=True)
class StatFs:
    """statfs(2) for the export. Block counts are in frsize units."""

    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int


@dataclass(frozen=True, slots=True)
class DirEntry:
    """One directory entry. next_offset is the cookie the guest passes back to continue right
    after this entry; kind is the DT_* type (st_mode >> 12)."""

    name: bytes
    next_offset: int
    ino: int
    kind: int


# A file system whose data sits in several host files (or partly in memory) answers with the
# pieces in order; the transport copies each straight into guest memory.
ReadPieces: TypeAlias = list[Segment]
ReadResult: TypeAlias = bytes | FileSlice | ReadPieces


@dataclass(frozen=True, slots=True)
class DirectSpan:
    """A stretch of a file whose READs may be answered without asking the file system again:
    file bytes [file_start, file_end) are fd's bytes from pos on, for as long as the handle
    stays open and the fd with it. eof is the file's size, where reads stop (-1: the file may
    grow; a read past its end comes back short). The stretch must lie within one window of the
    transport's (DIRECT_WINDOW bytes, aligned)."""

    file_start: int
    file_end: int
    eof: int
    fd: int
    pos: int
    tag: int = 0  # whose account the transport counts these reads in (the VFS: the mount's)


# The transport keeps direct spans per aligned window of this many bytes (csrc/vring.h's
# VQ_DIRECT_WINDOW_SHIFT; tests/vhost checks they agree).
DIRECT_WINDOW = 1 << 24


@dataclass(frozen=True, slots=True)
class SetattrChanges:
    """The fields a SETATTR asks to change; None means unchanged."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None
    ctime_ns: int | None = None
    atime_now: bool = False
    mtime_now: bool = False
    kill_suidgid: bool = False


class WriteData(Protocol):
    """The payload of a WRITE, still in guest memory until asked for."""

    def __len__(self) -> int: ...

    def to_bytes(self) -> bytes:
        """Copy the whole payload out."""

    def to_file(self, fd: int, pos: int) -> int:
        """pwritev the payload to fd at pos without an intermediate copy. Returns bytes written."""


def _unsupported() -> FuseError:
    return FuseError(errno.ENOSYS)


class Operations:
    """Base file system: everything answers ENOSYS, forget does nothing.

    For most operations ENOSYS is final for the session: the kernel stops sending that opcode.
    A read-only file system should override the mutating methods to raise EROFS instead.
    """

    # Session.

    async def init(self, conn: ConnInfo) -> ConnInfo:
        """FUSE_INIT. Also sent again, without DESTROY, after a guest reboot: drop every node
        except the root and every handle. Return conn, possibly with adjusted flags."""
        return conn

    async def destroy(self) -> None:
        """The guest unmounted; the same cleanup as a new init is due."""

    # Names and attributes.

    async def lookup(self, parent: NodeId, name: bytes, ctx: RequestContext) -> EntryOut:
        """Resolve name in directory parent and count one lookup of the result (unless it is a
        negative entry). The kernel does not send "." or ".." (export support is never offered),
        but a hostile guest may: they must not lead out of the export."""
        raise _unsupported()

    async def forget(self, batch: Sequence[tuple[NodeId, int]]) -> None:
        """Drop nlookup lookups from each node. Must never raise: the guest gets no reply."""

    async def getattr(self, node: NodeId, fh: FileHandle | None, ctx: RequestContext) -> AttrOut:
        """stat of a node; fh is set when the guest asks through an open handle (fstat)."""
        raise _unsupported()

    async def setattr(
        self,
        node: NodeId,
        fh: FileHandle | None,
        changes: SetattrChanges,
        ctx: RequestContext,
    ) -> AttrOut:
        """chmod/chown/truncate/utimens; returns the attributes after the change."""
        raise _unsupported()

    async def readlink(self, node: NodeId, ctx: RequestContext) -> bytes:
        """Target of a symlink."""
        raise _unsupported()

    async def statfs(self, node: NodeId, ctx: RequestContext) -> StatFs:
        raise _unsupported()

    async def access(self, node: NodeId, mask: int, ctx: RequestContext) -> None:
        """access(2) check for mask (R_OK/W_OK/X_OK, 0 = existence). ENOSYS is final: the
        kernel then decides from the mode bits itself."""
        raise _unsupported()

    # Creating and removing names. Each successful entry result counts one lookup.

    async def mknod(
        self, parent: NodeId, name: bytes, mode: int, rdev: int, umask: int, ctx: RequestContext
    ) -> EntryOut:
        raise _unsupported()

    async def mkdir(
        self, parent: NodeId, name: bytes, mode: int, umask: int, ctx: RequestContext
    ) -> EntryOut:
        raise _unsupported()

    async def symlink(
        self, parent: NodeId, name: bytes, target: bytes, ctx: RequestContext
    ) -> EntryOut:
        raise _unsupported()

    async def link(
        self, node: NodeId, new_parent: NodeId, new_name: bytes, ctx: RequestContext
    ) -> EntryOut:
        raise _unsupported()

    async def unlink(self, parent: NodeId, name: bytes, ctx: RequestContext) -> None:
        raise _unsupported()

    async def rmdir(self, parent: NodeId, name: bytes, ctx: RequestContext) -> None:
        raise _unsupported()

    async def rename(
        self,
        parent: NodeId,
        name: bytes,
        new_parent: NodeId,
        new_name: bytes,
        flags: int,
        ctx: RequestContext,
    ) -> None:
        """RENAME and RENAME2; flags are RENAME_NOREPLACE/EXCHANGE/WHITEOUT (0 for RENAME)."""
        raise _unsupported()

    # Files.

    async def open(
        self, node: NodeId, flags: int, ctx: RequestContext, *, kill_suidgid: bool = False
    ) -> OpenOut:
        """Open a regular file; flags are the guest's open(2) flags without O_CREAT/O_EXCL.
        kill_suidgid (killpriv_v2): an O_TRUNC open by a caller the guest kernel would not let
        keep set-id bits, which the file system clears as that truncate would."""
        raise _unsupported()

    async def create(
        self,
        parent: NodeId,
        name: bytes,
        mode: int,
        flags: int,
        umask: int,
        ctx: RequestContext,
    ) -> tuple[EntryOut, OpenOut]:
        """Atomic create-and-open. ENOSYS makes the kernel fall back to mknod + open."""
        raise _unsupported()

    async def tmpfile(
        self, parent: NodeId, mode: int, flags: int, umask: int, ctx: RequestContext
    ) -> tuple[EntryOut, OpenOut]:
        """O_TMPFILE: an unnamed file in parent."""
        raise _unsupported()

    async def read(
        self, node: NodeId, fh: FileHandle, offset: int, size: int, ctx: RequestContext
    ) -> ReadResult:
        """At most size bytes from offset; fewer only at end of file. Return a FileSlice when the
        data sits in a host file, so the transport can copy it without passing through Python."""
        raise _unsupported()

    def idle_range(self, node: NodeId) -> tuple[int, int] | None:
        """The node ids (lo, hi, both included) around node for which FLUSH and RELEASE have
        nothing to do, whatever the handle, for as long as they are mounted: the transport may
        answer those itself. None by default."""
        return None

    def constant_replies(self, node: NodeId) -> bool:
        """Whether GETATTR, OPEN (with the same access flags), FLUSH and RELEASE of node always
        get the reply they got once, whatever the handle, for as long as the node is mounted;
        the transport may then answer them by itself. False by default."""
        return False

    def direct_span(self, node: NodeId, fh: FileHandle, offset: int) -> DirectSpan | None:
        """After a READ at offset was served: the window around it that later READs of this
        handle may take straight from a host file, or None (the default: always ask). Only
        for data that stays the same for the handle's life, or that the fd itself shows as it
        changes (a passthrough file)."""
        return None

    async def write(
        self,
        node: NodeId,
        fh: FileHandle,
        offset: int,
        data: WriteData,
        flags: int,
        ctx: RequestContext,
    ) -> int:
        """Write data at offset; returns the bytes written."""
        raise _unsupported()

    async def flush(self, node: NodeId, fh: FileHandle, lock_owner: int) -> None:
        """close(2) on one of the guest's file descriptors; may come several times per handle."""
        raise _unsupported()

    async def release(self, node: NodeId, fh: FileHandle, flags: int) -> None:
        """The last reference to the handle is gone; no more requests will use it. Errors are
        ignored by the guest."""
        raise _unsupported()

    async def fsync(self, node: NodeId, fh: FileHandle, datasync: bool) -> None:
        raise _unsupported()

    async def fallocate(
        self, node: NodeId, fh: FileHandle, offset: int, length: int, mode: int
    ) -> None:
        raise _unsupported()

    async def lseek(self, node: NodeId, fh: FileHandle, offset: int, whence: int) -> int:
        """The kernel only asks for SEEK_DATA and SEEK_HOLE; others are handled in the guest."""
        raise _unsupported()

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
        """Returns the bytes copied. ENOSYS makes the kernel copy through read and write."""
        raise _unsupported()

    # Directories.

    async def opendir(self, node: NodeId, flags: int, ctx: RequestContext) -> OpenOut:
        raise _unsupported()

    async def readdir(
        self, node: NodeId, fh: FileHandle, offset: int, ctx: RequestContext
    ) -> Iterable[DirEntry]:
        """Entries after cookie offset (0 = from the start, including "." and "..").

        The dispatcher consumes the iterable lazily and stops as soon as the reply is full, so
        producing entries must have no side effects. READDIRPLUS uses the same entries and calls
        `lookup` for each one that fits into the reply (never for "." and "..")."""
        raise _unsupported()

    async def releasedir(self, node: NodeId, fh: FileHandle) -> None:
        raise _unsupported()

    async def fsyncdir(self, node: NodeId, fh: FileHandle, datasync: bool) -> None:
        raise _unsupported()

    async def syncfs(self, node: NodeId) -> None:
        raise _unsupported()

    # Extended attributes.

    async def getxattr(self, node: NodeId, name: bytes, ctx: RequestContext) -> bytes:
        """The whole value; the dispatcher answers size probes and ERANGE."""
        raise _unsupported()

    async def listxattr(self, node: NodeId, ctx: RequestContext) -> Sequence[bytes]:
        """All attribute names, without terminators."""
        raise _unsupported()

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
        """flags are XATTR_CREATE/XATTR_REPLACE. kill_sgid (SETXATTR_EXT's ACL_KILL_SGID): the
        caller sets an ACL but may not keep the file's S_ISGID, which must go with it."""
        raise _unsupported()

    async def removexattr(self, node: NodeId, name: bytes, ctx: RequestContext) -> None:
        raise _unsupported()
