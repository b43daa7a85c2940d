"""The guest side of FUSE, for tests: request builders, reply parsers, a buffer-backed request.

Deliberately independent of vhostfs: the layouts below are written out again from the kernel
ABI, so a mistake in vhostfs.fuse.abi shows up as a test failure instead of cancelling out.
Builders return the readable bytes of one request; parsers take reply payload bytes (after
fuse_out_header). `BufferRequest` implements vhostfs.fuse.transport.GuestRequest over plain
bytearrays, its send_* methods built from write_reply/reply_from_file (which tests may spy on);
`exchange` runs one request through any `handle(req)` callable.
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from vhostfs.fuse.transport import DirectReads
from vhostfs.segments import FileSlice  # the transport's data type, not an ABI layout

# Opcodes (include/uapi/linux/fuse.h).
LOOKUP = 1
FORGET = 2
GETATTR = 3
SETATTR = 4
READLINK = 5
SYMLINK = 6
MKNOD = 8
MKDIR = 9
UNLINK = 10
RMDIR = 11
RENAME = 12
LINK = 13
OPEN = 14
READ = 15
WRITE = 16
STATFS = 17
RELEASE = 18
FSYNC = 20
SETXATTR = 21
GETXATTR = 22
LISTXATTR = 23
REMOVEXATTR = 24
FLUSH = 25
INIT = 26
OPENDIR = 27
READDIR = 28
RELEASEDIR = 29
FSYNCDIR = 30
GETLK = 31
ACCESS = 34
CREATE = 35
INTERRUPT = 36
DESTROY = 38
IOCTL = 39
BATCH_FORGET = 42
FALLOCATE = 43
READDIRPLUS = 44
RENAME2 = 45
LSEEK = 46
COPY_FILE_RANGE = 47
SETUPMAPPING = 48
SYNCFS = 50
TMPFILE = 51
STATX = 52

ROOT = 1
IN_HEADER_SIZE = 40
OUT_HEADER_SIZE = 16

# INIT flag bits used by tests.
ASYNC_READ = 1 << 0
POSIX_LOCKS = 1 << 1
ATOMIC_O_TRUNC = 1 << 3
BIG_WRITES = 1 << 5
AUTO_INVAL_DATA = 1 << 12
DO_READDIRPLUS = 1 << 13
READDIRPLUS_AUTO = 1 << 14
WRITEBACK_CACHE = 1 << 16
PARALLEL_DIROPS = 1 << 18
MAX_PAGES = 1 << 22
CACHE_SYMLINKS = 1 << 23
NO_OPENDIR_SUPPORT = 1 << 24
MAP_ALIGNMENT = 1 << 26
SUBMOUNTS = 1 << 27
HANDLE_KILLPRIV_V2 = 1 << 28
SETXATTR_EXT = 1 << 29
INIT_EXT = 1 << 30
SECURITY_CTX = 1 << 32
HAS_INODE_DAX = 1 << 33
ALL_FLAGS = (1 << 43) - 1

ATTR_SUBMOUNT = 1 << 0  # fuse_attr.flags

# FOPEN_* bits.
FOPEN_DIRECT_IO = 1 << 0
FOPEN_KEEP_CACHE = 1 << 1
FOPEN_CACHE_DIR = 1 << 3

_unique = itertools.count(1)


def request(
    opcode: int,
    nodeid: int = 0,
    args: bytes = b"",
    *,
    unique: int | None = None,
    uid: int = 0,
    gid: int = 0,
    pid: int = 0,
    total_extlen: int = 0,
    length: int | None = None,
) -> bytes:
    """fuse_in_header + args. length overrides the header's len field (to forge mismatches)."""
    if unique is None:
        unique = next(_unique)
    real = IN_HEADER_SIZE + len(args)
    header = struct.pack(
        "<IIQQIIIHH",
        real if length is None else length,
        opcode,
        unique,
        nodeid,
        uid,
        gid,
        pid,
        total_extlen,
        0,
    )
    return header + args


def _z(name: bytes) -> bytes:
    return name + b"\0"


def init(
    major: int = 7,
    minor: int = 38,
    max_readahead: int = 128 * 1024,
    flags: int = ALL_FLAGS,
    *,
    ext: bool = True,
    **kw: Any,
) -> bytes:
    """FUSE_INIT; ext=True sends the 64-byte INIT_EXT form with flags2."""
    low = flags & 0xFFFF_FFFF
    if ext:
        low |= INIT_EXT
        body = struct.pack("<IIIII44x", major, minor, max_readahead, low, flags >> 32)
    else:
        body = struct.pack("<IIII", major, minor, max_readahead, low & ~INIT_EXT)
    return request(INIT, 0, body, **kw)


def lookup(parent: int, name: bytes, **kw: Any) -> bytes:
    return request(LOOKUP, parent, _z(name), **kw)


def forget(node: int, nlookup: int, **kw: Any) -> bytes:
    return request(FORGET, node, struct.pack("<Q", nlookup), **kw)


def batch_forget(pairs: Iterable[tuple[int, int]], *, count: int | None = None) -> bytes:
    items = list(pairs)
    body = struct.pack("<II", len(items) if count is None else count, 0)
    body += b"".join(struct.pack("<QQ", node, n) for node, n in items)
    return request(BATCH_FORGET, 0, body)


def getattr_(node: int, fh: int | None = None, **kw: Any) -> bytes:
    body = struct.pack("<IIQ", 0 if fh is None else 1, 0, fh or 0)
    return request(GETATTR, node, body, **kw)


def setattr_(
    node: int,
    valid: int = 1,
    mode: int = 0o644,
    size: int = 0,
    *,
    fh: int = 0,
    uid: int = 0,
    gid: int = 0,
    atime: int = 0,
    mtime: int = 0,
    **kw: Any,
) -> bytes:
    """valid is FATTR_* bits; uid/gid are the new owner (the caller's ids go in kw)."""
    body = struct.pack(
        "<IIQQQqqqIIIIIIII", valid, 0, fh, size, 0, atime, mtime, 0, 0, 0, 0, mode, 0, uid, gid, 0
    )
    return request(SETATTR, node, body, **kw)


def readlink(node: int) -> bytes:
    return request(READLINK, node)


def symlink(parent: int, name: bytes, target: bytes, **kw: Any) -> bytes:
    return request(SYMLINK, parent, _z(name) + _z(target), **kw)


def mknod(
    parent: int, name: bytes, mode: int = 0o100644, rdev: int = 0, **kw: Any
) -> bytes:
    return request(MKNOD, parent, struct.pack("<IIII", mode, rdev, 0o022, 0) + _z(name), **kw)


def mkdir(parent: int, name: bytes, mode: int = 0o755, **kw: Any) -> bytes:
    return request(MKDIR, parent, struct.pack("<II", mode, 0o022) + _z(name), **kw)


def unlink(parent: int, name: bytes) -> bytes:
    return request(UNLINK, parent, _z(name))


def rmdir(parent: int, name: bytes) -> bytes:
    return request(RMDIR, parent, _z(name))


def rename(parent: int, name: bytes, new_parent: int, new_name: bytes) -> bytes:
    return request(RENAME, parent, struct.pack("<Q", new_parent) + _z(name) + _z(new_name))


def rename2(parent: int, name: bytes, new_parent: int, new_name: bytes, flags: int = 0) -> bytes:
    body = struct.pack("<QII", new_parent, flags, 0) + _z(name) + _z(new_name)
    return request(RENAME2, parent, body)


def link(node: int, new_parent: int, new_name: bytes) -> bytes:
    return request(LINK, new_parent, struct.pack("<Q", node) + _z(new_name))


def open_(node: int, flags: int = os.O_RDONLY, *, open_flags: int = 0, **kw: Any) -> bytes:
    """open_flags: fuse_open_in's own (bit 0, KILL_SUIDGID, under killpriv_v2)."""
    return request(OPEN, node, struct.pack("<II", flags, open_flags), **kw)


def opendir(node: int, flags: int = os.O_RDONLY | os.O_DIRECTORY) -> bytes:
    return request(OPENDIR, node, struct.pack("<II", flags, 0))


def _read_in(fh: int, offset: int, size: int) -> bytes:
    return struct.pack("<QQIIQII", fh, offset, size, 0, 0, 0, 0)


def read(node: int, fh: int, offset: int, size: int) -> bytes:
    return request(READ, node, _read_in(fh, offset, size))


def readdir(node: int, fh: int, offset: int = 0, size: int = 4096) -> bytes:
    return request(READDIR, node, _read_in(fh, offset, size))


def readdirplus(node: int, fh: int, offset: int = 0, size: int = 4096) -> bytes:
    return request(READDIRPLUS, node, _read_in(fh, offset, size))


def write(
    node: int,
    fh: int,
    offset: int,
    data: bytes,
    *,
    size: int | None = None,
    write_flags: int = 0,
    **kw: Any,
) -> bytes:
    length = len(data) if size is None else size
    body = struct.pack("<QQIIQII", fh, offset, length, write_flags, 0, 0, 0)
    return request(WRITE, node, body + data, **kw)


def statfs(node: int = ROOT) -> bytes:
    return request(STATFS, node)


def release(node: int, fh: int) -> bytes:
    return request(RELEASE, node, struct.pack("<QIIQ", fh, 0, 0, 0))


def releasedir(node: int, fh: int) -> bytes:
    return request(RELEASEDIR, node, struct.pack("<QIIQ", fh, 0, 0, 0))


def flush(node: int, fh: int) -> bytes:
    return request(FLUSH, node, struct.pack("<QIIQ", fh, 0, 0, 0))


def fsync(node: int, fh: int, datasync: bool = False) -> bytes:
    return request(FSYNC, node, struct.pack("<QII", fh, int(datasync), 0))


def fsyncdir(node: int, fh: int) -> bytes:
    return request(FSYNCDIR, node, struct.pack("<QII", fh, 0, 0))


def setxattr(
    node: int, name: bytes, value: bytes, flags: int = 0, *, setxattr_flags: int | None = None
) -> bytes:
    """The 8-byte setxattr_in, or with setxattr_flags the 16-byte one of SETXATTR_EXT."""
    head = struct.pack("<II", len(value), flags)
    if setxattr_flags is not None:
        head += struct.pack("<II", setxattr_flags, 0)
    return request(SETXATTR, node, head + _z(name) + value)


def getxattr(node: int, name: bytes, size: int) -> bytes:
    return request(GETXATTR, node, struct.pack("<II", size, 0) + _z(name))


def listxattr(node: int, size: int) -> bytes:
    return request(LISTXATTR, node, struct.pack("<II", size, 0))


def removexattr(node: int, name: bytes) -> bytes:
    return request(REMOVEXATTR, node, _z(name))


def access(node: int, mask: int, **kw: Any) -> bytes:
    return request(ACCESS, node, struct.pack("<II", mask, 0), **kw)


def create(
    parent: int,
    name: bytes,
    flags: int = os.O_WRONLY | os.O_CREAT,
    mode: int = 0o644,
    **kw: Any,
) -> bytes:
    return request(CREATE, parent, struct.pack("<IIII", flags, mode, 0o022, 0) + _z(name), **kw)


def tmpfile(parent: int, flags: int = os.O_RDWR, mode: int = 0o600) -> bytes:
    return request(TMPFILE, parent, struct.pack("<IIII", flags, mode, 0o022, 0) + _z(b"/"))


def interrupt(unique: int) -> bytes:
    return request(INTERRUPT, 0, struct.pack("<Q", unique))


def destroy() -> bytes:
    return request(DESTROY)


def fallocate(node: int, fh: int, offset: int = 0, length: int = 4096, mode: int = 0) -> bytes:
    return request(FALLOCATE, node, struct.pack("<QQQII", fh, offset, length, mode, 0))


def lseek(node: int, fh: int, offset: int, whence: int) -> bytes:
    return request(LSEEK, node, struct.pack("<QqII", fh, offset, whence, 0))


def copy_file_range(
    node: int,
    fh_in: int,
    node_out: int,
    fh_out: int,
    length: int,
    *,
    off_in: int = 0,
    off_out: int = 0,
    flags: int = 0,
) -> bytes:
    body = struct.pack("<QQQQQQQ", fh_in, off_in, node_out, fh_out, off_out, length, flags)
    return request(COPY_FILE_RANGE, node, body)


def syncfs(node: int = ROOT) -> bytes:
    return request(SYNCFS, node, struct.pack("<Q", 0))


# Reply parsing.


@dataclass(frozen=True)
class OutHeader:
    len: int
    error: int
    unique: int


@dataclass(frozen=True)
class FuseAttr:
    ino: int
    size: int
    blocks: int
    atime: int
    mtime: int
    ctime: int
    atimensec: int
    mtimensec: int
    ctimensec: int
    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    blksize: int
    flags: int


_ATTR = "QQQqqqIIIIIIIIII"


@dataclass(frozen=True)
class EntryOut:
    nodeid: int
    generation: int
    entry_valid: int
    attr_valid: int
    entry_valid_nsec: int
    attr_valid_nsec: int
    attr: FuseAttr


@dataclass(frozen=True)
class AttrOut:
    attr_valid: int
    attr_valid_nsec: int
    attr: FuseAttr


@dataclass(frozen=True)
class InitOut:
    major: int
    minor: int
    max_readahead: int
    flags: int
    max_background: int
    congestion_threshold: int
    max_write: int
    time_gran: int
    max_pages: int
    map_alignment: int
    flags2: int


@dataclass(frozen=True)
class StatfsOut:
    blocks: int
    bfree: int
    bavail: int
    files: int
    ffree: int
    bsize: int
    namelen: int
    frsize: int


@dataclass(frozen=True)
class Dirent:
    ino: int
    off: int
    type: int
    name: bytes


def parse_out_header(reply: bytes) -> OutHeader:
    return OutHeader(*struct.unpack_from("<IiQ", reply))


def parse_attr(raw: bytes, offset: int = 0) -> FuseAttr:
    return FuseAttr(*struct.unpack_from("<" + _ATTR, raw, offset))


def parse_entry_out(raw: bytes, offset: int = 0) -> EntryOut:
    nodeid, generation, entry_valid, attr_valid, entry_nsec, attr_nsec = struct.unpack_from(
        "<QQQQII", raw, offset
    )
    attr = parse_attr(raw, offset + 40)
    return EntryOut(nodeid, generation, entry_valid, attr_valid, entry_nsec, attr_nsec, attr)


def parse_attr_out(raw: bytes) -> AttrOut:
    valid, nsec, _ = struct.unpack_from("<QII", raw)
    return AttrOut(valid, nsec, parse_attr(raw, 16))


def parse_open_out(raw: bytes, offset: int = 0) -> tuple[int, int]:
    fh, flags, _ = struct.unpack_from("<QII", raw, offset)
    return fh, flags


def parse_init_out(raw: bytes) -> InitOut:
    assert len(raw) == 64, len(raw)
    return InitOut(*struct.unpack_from("<IIIIHHIIHHI", raw))


def parse_statfs(raw: bytes) -> StatfsOut:
    assert len(raw) == 80, len(raw)
    return StatfsOut(*struct.unpack_from("<QQQQQIII", raw))


def parse_u32_size(raw: bytes) -> int:
    """getxattr_out / write_out: the size field."""
    assert len(raw) == 8, len(raw)
    return int(struct.unpack_from("<I", raw)[0])


def parse_lseek_out(raw: bytes) -> int:
    assert len(raw) == 8, len(raw)
    return int(struct.unpack_from("<Q", raw)[0])


def _dirent_at(raw: bytes, pos: int) -> tuple[Dirent, int]:
    ino, off, namelen, kind = struct.unpack_from("<QQII", raw, pos)
    name = raw[pos + 24 : pos + 24 + namelen]
    assert len(name) == namelen
    record = (24 + namelen + 7) & ~7
    assert raw[pos + 24 + namelen : pos + record] == bytes(record - 24 - namelen), "padding"
    return Dirent(ino, off, kind, name), pos + record


def parse_dirents(raw: bytes) -> list[Dirent]:
    out = []
    pos = 0
    while pos < len(raw):
        entry, pos = _dirent_at(raw, pos)
        out.append(entry)
    assert pos == len(raw)
    return out


def parse_direntplus(raw: bytes) -> list[tuple[EntryOut, Dirent]]:
    out = []
    pos = 0
    while pos < len(raw):
        entry = parse_entry_out(raw, pos)
        dirent, pos = _dirent_at(raw, pos + 128)
        out.append((entry, dirent))
    assert pos == len(raw)
    return out


# A GuestRequest over plain buffers.


class BufferRequest:
    """One request: readable bytes in, a writable bytearray for the reply.

    data_limit mimics the transport copying only the first bytes of the readable part."""

    def __init__(self, readable: bytes, writable_len: int = 1 << 17, data_limit: int = 8192):
        self._readable = bytes(readable)
        self._data = memoryview(self._readable[:data_limit])
        self.out = bytearray(writable_len)
        self.written: int | None = None

    @property
    def data(self) -> memoryview:
        return self._data

    @property
    def direct(self) -> DirectReads | None:
        return None  # plain buffers have no ring to answer READs by itself

    @property
    def readable_len(self) -> int:
        return len(self._readable)

    @property
    def writable_len(self) -> int:
        return len(self.out)

    def read(self, offset: int, length: int) -> bytes:
        return self._readable[offset : offset + length]

    def read_to_file(self, offset: int, fd: int, pos: int, length: int) -> int:
        return os.pwrite(fd, self._readable[offset : offset + length], pos)

    def write_reply(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        if offset < 0 or offset + len(data) > len(self.out):
            raise ValueError("reply does not fit")
        self.out[offset : offset + len(data)] = data

    def reply_from_file(self, offset: int, fd: int, pos: int, length: int) -> int:
        if offset < 0 or offset + length > len(self.out):
            raise ValueError("reply does not fit")
        return os.preadv(fd, [memoryview(self.out)[offset : offset + length]], pos)

    def complete(self, written: int) -> None:
        assert self.written is None, "completed twice"
        assert 0 <= written <= len(self.out), written
        self.written = written

    def send_reply(self, data: bytes) -> None:
        self.write_reply(0, data)
        self.complete(len(data))

    def send_file_reply(self, unique: int, fd: int, pos: int, size: int) -> None:
        got = self.reply_from_file(OUT_HEADER_SIZE, fd, pos, size) if size > 0 else 0
        self._send_header(unique, OUT_HEADER_SIZE + min(got, size))

    def send_pieces(self, unique: int, pieces: Sequence[FileSlice | bytes]) -> None:
        offset = OUT_HEADER_SIZE
        for piece in pieces:
            if isinstance(piece, FileSlice):
                got = self.reply_from_file(offset, piece.fd, piece.pos, piece.size)
                offset += got
                if got < piece.size:
                    break
            else:
                self.write_reply(offset, piece)
                offset += len(piece)
        self._send_header(unique, offset)

    def _send_header(self, unique: int, total: int) -> None:
        self.write_reply(0, struct.pack("<IiQ", total, 0, unique))
        self.complete(total)

    @property
    def completed(self) -> bool:
        return self.written is not None

    @property
    def reply(self) -> bytes:
        assert self.written is not None, "not completed"
        return bytes(self.out[: self.written])

    @property
    def header(self) -> OutHeader:
        header = parse_out_header(self.reply)
        assert header.len == self.written, (header, self.written)
        return header

    @property
    def error(self) -> int:
        """errno of the reply (0 on success)."""
        return -self.header.error

    @property
    def payload(self) -> bytes:
        assert self.header.error == 0, f"errno {-self.header.error}"
        return self.reply[OUT_HEADER_SIZE:]


def handshake(handle: Callable[[BufferRequest], None], **init_kw: Any) -> InitOut:
    """Send FUSE_INIT and return the negotiated init_out; fails the test if INIT is refused."""
    req = exchange(handle, init(**init_kw))
    return parse_init_out(req.payload)


def exchange(
    handle: Callable[[BufferRequest], None],
    readable: bytes,
    writable_len: int = 1 << 17,
    data_limit: int = 8192,
) -> BufferRequest:
    """Send one request through handle and return it (completed or still in flight)."""
    req = BufferRequest(readable, writable_len, data_limit)
    handle(req)
    return req
