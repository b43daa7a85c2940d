"""A RAFS (or plain EROFS) image as a read-only FUSE file system.

Metadata comes from the mapped bootstrap through vhostfs.rafs; file data comes through the
storage layer, which fetches, verifies and caches chunks and hands back pieces of host files
that the transport copies straight into guest memory.

The image never changes, so the guest may cache everything for as long as it likes: long entry
and attribute timeouts, KEEP_CACHE on files, CACHE_DIR on directories, CACHE_SYMLINKS. The file
system keeps no per-inode state, so FORGET has nothing to release, and directories need no
handles: it asks for NO_OPENDIR_SUPPORT and answers OPENDIR with ENOSYS, so the kernel stops
sending OPENDIR and RELEASEDIR for the session and lists directories with fh 0 (readdir never
looks at fh: the offsets are positions in the image).
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from typing import Protocol

from vhostfs.fs.file_maps import FileMaps
from vhostfs.fs.readahead import Readahead
from vhostfs.fs.readonly import ReadOnlyOperations, check_access
from vhostfs.fuse.abi import InitFlag, OpenReplyFlag
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
    ReadResult,
    RequestContext,
    StatFs,
)
from vhostfs.rafs.base import InodeAttr, RafsImage
from vhostfs.rafs.errors import RafsError
from vhostfs.storage.blob import ChunkRef
from vhostfs.storage.config import RafsConfig
from vhostfs.storage.errors import ChunkRefError, StorageError

log = logging.getLogger(__name__)

# A day, as virtiofsd's cache=always: nothing in the image can change under the guest.
TIMEOUT = 86400.0
# Node ids are the inode number plus NODE_OFFSET, so that no inode (nid 0 and nid 1 exist in
# RAFS v6) can take the root's ROOT_ID or the negative entry's 0; they stay below 2^56, the
# inner ids the VFS can carry (nydusd's VFS numbers a mount's inodes the same way).
NODE_OFFSET = 2
INO_LIMIT = (1 << 56) - NODE_OFFSET
ATTR_CACHE_SIZE = 8192
# The most chunks one miss fetches along with it (small files: one chunk each).
AMPLIFY_CHUNKS = 64


class DataSource(Protocol):
    """Where file bytes come from: the storage layer (chunk fetch, verify, cache), that is
    vhostfs.storage.ImageStorage (open_storage builds it); tests may pass their own."""

    @property
    def config(self) -> RafsConfig | None:
        """The mount's config, when the data source was opened from one."""

    async def read(
        self, chunks: Sequence[ChunkRef], start: int, end: int
    ) -> list[FileSlice | bytes]:
        """File bytes [start, end) as host-file slices or literal bytes, in order."""

    def read_ahead(self, chunks: Sequence[ChunkRef]) -> None:
        """Start fetching those of these chunks that are not cached yet; returns at once."""

    @property
    def amplify_io(self) -> int:
        """Backend bytes a guest miss may fetch in one go (nydusd's amplify_io)."""

    def wants_prefetch(self, ref: ChunkRef) -> bool:
        """Whether fetching ref would bring something into the cache."""

    def direct_place(self, chunks: Sequence[ChunkRef], start: int, end: int) -> FileSlice | None:
        """Where file bytes [start, end) lie back to back in one host file, every chunk ready
        (cached, or stored as is in a local blob), or None."""


class RafsFs(ReadOnlyOperations):
    """`enable_xattr` None takes the setting from the data source's config (on when there is
    none, as for the CLI flags)."""

    def __init__(
        self, image: RafsImage, data: DataSource, *, enable_xattr: bool | None = None
    ) -> None:
        self.image = image
        self.data = data
        if enable_xattr is None:
            enable_xattr = data.config.enable_xattr if data.config is not None else True
        # As nydusd: the image's HAS_XATTR flag serves xattrs whatever the config says.
        self.serves_xattrs = enable_xattr or image.has_xattr_flag
        # The image never changes, so an inode's FUSE attributes can be built once and reused
        # for every LOOKUP and GETATTR (the dispatcher only reads them).
        self._guest_attr = functools.lru_cache(maxsize=ATTR_CACHE_SIZE)(self._build_guest_attr)
        self._readahead = Readahead()
        self._file_maps = FileMaps(image.chunks)
        self.no_opendir = False  # the session runs with NO_OPENDIR_SUPPORT

    # Node ids ------------------------------------------------------------------------------------

    def _ino(self, node: NodeId) -> int:
        if node == ROOT_ID:
            return self.image.root_ino
        if not NODE_OFFSET <= node < INO_LIMIT + NODE_OFFSET:
            raise FuseError(errno.ESTALE)
        return node - NODE_OFFSET

    def _node(self, ino: int) -> NodeId:
        if ino == self.image.root_ino:
            return ROOT_ID
        if not 0 <= ino < INO_LIMIT:
            raise FuseError(errno.EOVERFLOW)
        return NodeId(ino + NODE_OFFSET)

    def _build_guest_attr(self, ino: int) -> Attr:
        return _fuse_attr(self._attr(ino))

    def _attr(self, ino: int) -> InodeAttr:
        try:
            return self.image.getattr(ino)
        except RafsError as exc:
            raise _fuse_error(exc) from None

    # Prefetch ------------------------------------------------------------------------------------

    def prefetch_refs(
        self, paths: Sequence[bytes] = (), everything: bool = False
    ) -> Iterator[ChunkRef]:
        """Chunks worth warming, in order: the image's prefetch table, then `paths` (absolute
        paths in the image; a directory means everything below it), or every file.

        Lazy, so the prefetcher pulls as it goes. Names that do not resolve are logged and
        skipped: a stale prefetch list must not stop the mount."""
        try:
            if everything:
                yield from self._file_chunks(ino for _, ino, _ in self.image.walk())
                return
            yield from self._tree_chunks(self.image.prefetch_table())
            for path in paths:
                ino = self._resolve(path)
                if ino is None:
                    log.warning("prefetch: %r is not in the image", path)
                else:
                    yield from self._tree_chunks([ino])
        except RafsError as exc:
            log.warning("prefetch stopped, bad image: %s", exc)

    def _resolve(self, path: bytes) -> int | None:
        ino: int | None = self.image.root_ino
        for name in path.split(b"/"):
            if name and ino is not None:
                ino = self.image.lookup(ino, name)
        return ino

    def _tree_chunks(self, inos: Iterable[int]) -> Iterator[ChunkRef]:
        for ino in inos:
            if stat.S_ISDIR(self.image.getattr(ino).mode):
                yield from self._file_chunks(self._below(ino))
            else:
                yield from self._file_chunks([ino])

    def _below(self, directory: int) -> Iterator[int]:
        pending, seen = [directory], {directory}
        while pending:
            for entry in self.image.readdir(pending.pop()):
                if entry.name in (b".", b"..") or entry.ino in seen:
                    continue
                seen.add(entry.ino)
                if entry.dtype == stat.S_IFDIR >> 12:
                    pending.append(entry.ino)
                else:
                    yield entry.ino

    def _file_chunks(self, inos: Iterable[int]) -> Iterator[ChunkRef]:
        for ino in inos:
            attr = self.image.getattr(ino)
            if stat.S_ISREG(attr.mode) and attr.size:
                yield from self.image.chunks(ino, 0, attr.size)

    # Session -------------------------------------------------------------------------------------

    async def init(self, conn: ConnInfo) -> ConnInfo:
        flags = conn.flags | InitFlag.CACHE_SYMLINKS | InitFlag.NO_OPENDIR_SUPPORT
        self.no_opendir = bool(granted(conn.kernel_flags, flags) & InitFlag.NO_OPENDIR_SUPPORT)
        return replace(conn, flags=flags)

    async def destroy(self) -> None:
        self.no_opendir = False

    # Names and attributes ------------------------------------------------------------------------

    async def lookup(self, parent: NodeId, name: bytes, ctx: RequestContext) -> EntryOut:
        try:
            ino = self.image.lookup(self._ino(parent), name)
        except RafsError as exc:
            raise _fuse_error(exc) from None
        if ino is None:
            # A negative entry the guest may keep: the name will never appear.
            return EntryOut(NodeId(0), Attr(st_ino=0, st_mode=0), entry_timeout=TIMEOUT)
        return EntryOut(self._node(ino), self._guest_attr(ino), TIMEOUT, TIMEOUT)

    async def forget(self, batch: Sequence[tuple[NodeId, int]]) -> None:
        """Nothing to release: inodes are decoded from the image on demand."""

    async def getattr(self, node: NodeId, fh: FileHandle | None, ctx: RequestContext) -> AttrOut:
        return AttrOut(self._guest_attr(self._ino(node)), TIMEOUT)

    async def readlink(self, node: NodeId, ctx: RequestContext) -> bytes:
        ino = self._ino(node)
        if not stat.S_ISLNK(self._attr(ino).mode):
            raise FuseError(errno.EINVAL)
        try:
            return self.image.readlink(ino)
        except RafsError as exc:
            raise _fuse_error(exc) from None

    async def statfs(self, node: NodeId, ctx: RequestContext) -> StatFs:
        info = self.image.statfs()
        return StatFs(
            blocks=info.blocks,
            bfree=0,
            bavail=0,
            files=info.files,
            ffree=0,
            bsize=info.block_size,
            namelen=info.name_max,
            frsize=info.block_size,
        )

    async def access(self, node: NodeId, mask: int, ctx: RequestContext) -> None:
        attr = self._attr(self._ino(node))
        check_access(attr.mode, attr.uid, attr.gid, mask, ctx)

    # Files ---------------------------------------------------------------------------------------

    async def open(
        self, node: NodeId, flags: int, ctx: RequestContext, *, kill_suidgid: bool = False
    ) -> OpenOut:
        mode = self._attr(self._ino(node)).mode
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise FuseError(errno.EROFS)
        if stat.S_ISDIR(mode):
            raise FuseError(errno.EISDIR)
        if not stat.S_ISREG(mode):
            raise FuseError(errno.EACCES)
        return OpenOut(FileHandle(0), OpenReplyFlag.KEEP_CACHE)

    async def read(
        self, node: NodeId, fh: FileHandle, offset: int, size: int, ctx: RequestContext
    ) -> ReadResult:
        ino = self._ino(node)
        attr = self._guest_attr(ino)
        if not stat.S_ISREG(attr.st_mode):
            raise FuseError(errno.EISDIR if stat.S_ISDIR(attr.st_mode) else errno.EINVAL)
        end = min(offset + size, attr.st_size)
        if offset >= end:
            return b""
        try:
            chunks = self._file_maps.chunks(ino, offset, end - offset)
            missing = chunks[-1] if chunks and self.data.wants_prefetch(chunks[-1]) else None
            segments = await self.data.read(chunks, offset, end)
            if missing is not None:
                self._amplify(missing)
            ahead = self._readahead.after_read(ino, offset, end, attr.st_size)
            if ahead is not None:
                lo, hi = ahead
                self.data.read_ahead(self.image.chunks(ino, lo, hi - lo))
            return segments
        except (RafsError, StorageError) as exc:
            raise _fuse_error(exc) from None

    def idle_range(self, node: NodeId) -> tuple[int, int] | None:
        """flush and release do nothing, for any node."""
        return 0, (1 << 64) - 1

    def constant_replies(self, node: NodeId) -> bool:
        """The image never changes and no reply depends on the handle."""
        return True

    def direct_span(self, node: NodeId, fh: FileHandle, offset: int) -> DirectSpan | None:
        """The image never changes and ready chunks stay where they are, so a window whose
        chunks all sit back to back in one host file can be read from it directly."""
        try:
            ino = self._ino(node)
            attr = self._guest_attr(ino)
        except FuseError:
            return None
        if not stat.S_ISREG(attr.st_mode):
            return None
        start = offset - offset % DIRECT_WINDOW
        end = min(start + DIRECT_WINDOW, attr.st_size)
        if start >= end:
            return None
        try:
            chunks = self._file_maps.chunks(ino, start, end - start)
            place = self.data.direct_place(chunks, start, end)
        except (RafsError, StorageError):
            return None
        if place is None:
            return None
        return DirectSpan(start, end, attr.st_size, place.fd, place.pos)

    def _amplify(self, missed: ChunkRef) -> None:
        """A read missed `missed`: fetch the chunks after it in its blob too, up to the
        amplification budget, as nydusd amplifies user reads. The builder writes a directory's
        files one after another, so a guest reading through a tree (tar, an interpreter's
        imports) finds the next files' chunks on their way."""
        if missed.chunk_index is None:
            return
        budget = self.data.amplify_io - missed.compressed_size
        following = []
        try:
            after = self.image.blob_chunks(
                missed.blob_index, missed.chunk_index + 1, AMPLIFY_CHUNKS
            )
        except RafsError:
            return  # a bad record further on is that chunk's reader's error, not this one's
        for ref in after:
            budget -= ref.compressed_size
            if budget < 0:
                break
            following.append(ref)
        if following:
            self.data.read_ahead(following)

    async def flush(self, node: NodeId, fh: FileHandle, lock_owner: int) -> None:
        return None

    async def release(self, node: NodeId, fh: FileHandle, flags: int) -> None:
        return None

    async def lseek(self, node: NodeId, fh: FileHandle, offset: int, whence: int) -> int:
        """An image file has no holes the guest could skip: all of it is data."""
        size = self._attr(self._ino(node)).size
        if offset >= size:
            raise FuseError(errno.ENXIO)
        if whence == os.SEEK_DATA:
            return offset
        if whence == os.SEEK_HOLE:
            return size
        raise FuseError(errno.EINVAL)

    # Directories ---------------------------------------------------------------------------------

    async def opendir(self, node: NodeId, flags: int, ctx: RequestContext) -> OpenOut:
        if self.no_opendir:
            raise FuseError(errno.ENOSYS)  # from now on the kernel reads directories with fh 0
        if not stat.S_ISDIR(self._attr(self._ino(node)).mode):
            raise FuseError(errno.ENOTDIR)
        return OpenOut(FileHandle(0), OpenReplyFlag.KEEP_CACHE | OpenReplyFlag.CACHE_DIR)

    async def readdir(
        self, node: NodeId, fh: FileHandle, offset: int, ctx: RequestContext
    ) -> Iterable[DirEntry]:
        return self._entries(self._ino(node), offset)

    def _entries(self, ino: int, offset: int) -> Iterator[DirEntry]:
        try:
            for entry in self.image.readdir(ino, offset):
                yield DirEntry(entry.name, entry.next_offset, entry.ino, entry.dtype)
        except RafsError as exc:
            raise _fuse_error(exc) from None

    async def releasedir(self, node: NodeId, fh: FileHandle) -> None:
        return None

    # Extended attributes -------------------------------------------------------------------------
    # With xattrs disabled nydusd answers ENOSYS to both getxattr and listxattr (not ENODATA /
    # an empty list): the guest kernel then stops asking for the rest of the session, and
    # userspace sees EOPNOTSUPP, "this file system has no xattrs".

    async def getxattr(self, node: NodeId, name: bytes, ctx: RequestContext) -> bytes:
        if not self.serves_xattrs:
            raise FuseError(errno.ENOSYS)
        try:
            value = self.image.getxattr(self._ino(node), name)
        except RafsError as exc:
            raise _fuse_error(exc) from None
        if value is None:
            raise FuseError(errno.ENODATA)
        return value

    async def listxattr(self, node: NodeId, ctx: RequestContext) -> Sequence[bytes]:
        if not self.serves_xattrs:
            raise FuseError(errno.ENOSYS)
        try:
            return self.image.listxattr(self._ino(node))
        except RafsError as exc:
            raise _fuse_error(exc) from None


def _fuse_attr(attr: InodeAttr) -> Attr:
    mtime_ns = attr.mtime * 1_000_000_000 + attr.mtime_nsec
    return Attr(
        st_ino=attr.ino,
        st_mode=attr.mode,
        st_nlink=attr.nlink,
        st_uid=attr.uid,
        st_gid=attr.gid,
        st_rdev=attr.rdev,
        st_size=attr.size,
        st_blocks=attr.blocks,
        st_blksize=attr.blksize,
        st_atime_ns=mtime_ns,
        st_mtime_ns=mtime_ns,
        st_ctime_ns=mtime_ns,
    )


def _fuse_error(exc: RafsError | StorageError) -> FuseError:
    """The one place where the image's and the storage's errors become the guest's errno.

    A damaged image (EIO) is logged here, naming the field. Failed fetches are not: the storage
    layer logs each failed chunk once, however many reads wait for it. ENOTDIR, EINVAL and
    EOPNOTSUPP are answers, not problems."""
    if exc.errno == errno.EIO and isinstance(exc, RafsError | ChunkRefError):
        log.warning("bad image: %s", exc)
    return FuseError(exc.errno)
