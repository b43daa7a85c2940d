"""FUSE wire format: opcodes, flag bits, struct layouts and reply encoders.

Everything here is a fact of the Linux FUSE ABI (include/uapi/linux/fuse.h); nothing does I/O.
All structs are little-endian and packed exactly as the kernel lays them out, so every
`struct.Struct` below carries its size in a comment that the tests check.
"""

from __future__ import annotations

import enum
import struct
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from vhostfs.fuse.ops import AttrOut, EntryOut, StatFs

KERNEL_MAJOR: Final = 7
# Longest single name the kernel sends (FUSE_NAME_MAX); the host fs usually stops at 255.
NAME_MAX: Final = 1024
PATH_MAX: Final = 4096
XATTR_NAME_MAX: Final = 255
XATTR_SIZE_MAX: Final = 65536


class Opcode(enum.IntEnum):
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
    SETLK = 32
    SETLKW = 33
    ACCESS = 34
    CREATE = 35
    INTERRUPT = 36
    BMAP = 37
    DESTROY = 38
    IOCTL = 39
    POLL = 40
    NOTIFY_REPLY = 41
    BATCH_FORGET = 42
    FALLOCATE = 43
    READDIRPLUS = 44
    RENAME2 = 45
    LSEEK = 46
    COPY_FILE_RANGE = 47
    SETUPMAPPING = 48
    REMOVEMAPPING = 49
    SYNCFS = 50
    TMPFILE = 51
    STATX = 52
    COPY_FILE_RANGE_64 = 53


class InitFlag(enum.IntFlag):
    """FUSE_INIT capability bits; bits 32 and up travel in flags2 (needs INIT_EXT)."""

    ASYNC_READ = 1 << 0
    POSIX_LOCKS = 1 << 1
    FILE_OPS = 1 << 2
    ATOMIC_O_TRUNC = 1 << 3
    EXPORT_SUPPORT = 1 << 4
    BIG_WRITES = 1 << 5
    DONT_MASK = 1 << 6
    SPLICE_WRITE = 1 << 7
    SPLICE_MOVE = 1 << 8
    SPLICE_READ = 1 << 9
    FLOCK_LOCKS = 1 << 10
    HAS_IOCTL_DIR = 1 << 11
    AUTO_INVAL_DATA = 1 << 12
    DO_READDIRPLUS = 1 << 13
    READDIRPLUS_AUTO = 1 << 14
    ASYNC_DIO = 1 << 15
    WRITEBACK_CACHE = 1 << 16
    NO_OPEN_SUPPORT = 1 << 17
    PARALLEL_DIROPS = 1 << 18
    HANDLE_KILLPRIV = 1 << 19
    POSIX_ACL = 1 << 20
    ABORT_ERROR = 1 << 21
    MAX_PAGES = 1 << 22
    CACHE_SYMLINKS = 1 << 23
    NO_OPENDIR_SUPPORT = 1 << 24
    EXPLICIT_INVAL_DATA = 1 << 25
    MAP_ALIGNMENT = 1 << 26
    SUBMOUNTS = 1 << 27
    HANDLE_KILLPRIV_V2 = 1 << 28
    SETXATTR_EXT = 1 << 29
    INIT_EXT = 1 << 30
    INIT_RESERVED = 1 << 31
    SECURITY_CTX = 1 << 32
    HAS_INODE_DAX = 1 << 33
    CREATE_SUPP_GROUP = 1 << 34
    HAS_EXPIRE_ONLY = 1 << 35
    DIRECT_IO_ALLOW_MMAP = 1 << 36
    PASSTHROUGH = 1 << 37
    NO_EXPORT_SUPPORT = 1 << 38
    HAS_RESEND = 1 << 39
    ALLOW_IDMAP = 1 << 40
    OVER_IO_URING = 1 << 41
    REQUEST_TIMEOUT = 1 << 42


class OpenReplyFlag(enum.IntFlag):
    """FOPEN_* bits in open_out.open_flags: how the guest may cache the opened file."""

    DIRECT_IO = 1 << 0
    KEEP_CACHE = 1 << 1
    NONSEEKABLE = 1 << 2
    CACHE_DIR = 1 << 3
    STREAM = 1 << 4
    NOFLUSH = 1 << 5
    PARALLEL_DIRECT_WRITES = 1 << 6


class SetattrValid(enum.IntFlag):
    """FATTR_* bits in setattr_in.valid: which fields the guest wants changed."""

    MODE = 1 << 0
    UID = 1 << 1
    GID = 1 << 2
    SIZE = 1 << 3
    ATIME = 1 << 4
    MTIME = 1 << 5
    FH = 1 << 6
    ATIME_NOW = 1 << 7
    MTIME_NOW = 1 << 8
    LOCKOWNER = 1 << 9
    CTIME = 1 << 10
    KILL_SUIDGID = 1 << 11


GETATTR_FH: Final = 1 << 0
ATTR_SUBMOUNT: Final = 1 << 0
ATTR_DAX: Final = 1 << 1

# Headers.
# 40: len opcode unique nodeid uid gid pid total_extlen pad
IN_HEADER: Final = struct.Struct("<IIQQIIIHH")
OUT_HEADER: Final = struct.Struct("<IiQ")  # 16: len error unique

# Request arguments.
INIT_IN: Final = struct.Struct("<IIII")  # 16: major minor max_readahead flags
INIT_IN_FLAGS2: Final = struct.Struct("<I")  # flags2 at offset 16 of the 64-byte INIT_EXT form
FORGET_IN: Final = struct.Struct("<Q")  # 8: nlookup
BATCH_FORGET_IN: Final = struct.Struct("<II")  # 8: count dummy
FORGET_ONE: Final = struct.Struct("<QQ")  # 16: nodeid nlookup
GETATTR_IN: Final = struct.Struct("<IIQ")  # 16: getattr_flags dummy fh
# 88: valid pad fh size lock_owner atime mtime ctime atimensec mtimensec ctimensec mode
# unused uid gid unused
SETATTR_IN: Final = struct.Struct("<IIQQQqqqIIIIIIII")
MKNOD_IN: Final = struct.Struct("<IIII")  # 16: mode rdev umask pad
MKDIR_IN: Final = struct.Struct("<II")  # 8: mode umask
RENAME_IN: Final = struct.Struct("<Q")  # 8: newdir
RENAME2_IN: Final = struct.Struct("<QII")  # 16: newdir flags pad
LINK_IN: Final = struct.Struct("<Q")  # 8: oldnodeid
OPEN_IN: Final = struct.Struct("<II")  # 8: flags open_flags
CREATE_IN: Final = struct.Struct("<IIII")  # 16: flags mode umask open_flags
READ_IN: Final = struct.Struct("<QQIIQII")  # 40: fh offset size read_flags lock_owner flags pad
WRITE_IN: Final = struct.Struct("<QQIIQII")  # 40: fh offset size write_flags lock_owner flags pad
RELEASE_IN: Final = struct.Struct("<QIIQ")  # 24: fh flags release_flags lock_owner
FLUSH_IN: Final = struct.Struct("<QIIQ")  # 24: fh unused pad lock_owner
FSYNC_IN: Final = struct.Struct("<QII")  # 16: fh fsync_flags pad
SETXATTR_IN: Final = struct.Struct("<II")  # 8: size flags
# 16 under SETXATTR_EXT: size flags setxattr_flags pad
SETXATTR_IN_EXT: Final = struct.Struct("<IIII")
SETXATTR_ACL_KILL_SGID: Final = 1 << 0  # setxattr_flags: the caller may not keep S_ISGID
# open_in.open_flags under killpriv_v2: an O_TRUNC open by an unprivileged caller
OPEN_KILL_SUIDGID: Final = 1 << 0
GETXATTR_IN: Final = struct.Struct("<II")  # 8: size pad
ACCESS_IN: Final = struct.Struct("<II")  # 8: mask pad
INTERRUPT_IN: Final = struct.Struct("<Q")  # 8: unique
FALLOCATE_IN: Final = struct.Struct("<QQQII")  # 32: fh offset length mode pad
LSEEK_IN: Final = struct.Struct("<QqII")  # 24: fh offset whence pad
# 56: fh_in off_in nodeid_out fh_out off_out len flags
COPY_FILE_RANGE_IN: Final = struct.Struct("<QQQQQQQ")

# Replies.
# 64: major minor max_readahead flags max_background congestion_threshold max_write time_gran
# max_pages map_alignment flags2, then 28 reserved bytes
INIT_OUT: Final = struct.Struct("<IIIIHHIIHHI28x")
_ATTR_FIELDS: Final = "QQQqqqIIIIIIIIII"  # 88: ino size blocks a/m/ctime a/m/ctimensec mode ...
ATTR: Final = struct.Struct("<" + _ATTR_FIELDS)  # 88
ENTRY_OUT: Final = struct.Struct("<QQQQII" + _ATTR_FIELDS)  # 128: nodeid generation timeouts attr
ATTR_OUT: Final = struct.Struct("<QII" + _ATTR_FIELDS)  # 104: attr_valid nsec dummy attr
OPEN_OUT: Final = struct.Struct("<QII")  # 16: fh open_flags pad
WRITE_OUT: Final = struct.Struct("<II")  # 8: size pad
STATFS_OUT: Final = struct.Struct("<QQQQQIIII24x")  # 80: fuse_kstatfs
GETXATTR_OUT: Final = struct.Struct("<II")  # 8: size pad
LSEEK_OUT: Final = struct.Struct("<Q")  # 8: offset
DIRENT: Final = struct.Struct("<QQII")  # 24: ino off namelen type, then the name
DIRENTPLUS_HEADER_SIZE: Final = ENTRY_OUT.size + DIRENT.size  # 152

_NS_PER_S: Final = 1_000_000_000
_U32: Final = 0xFFFF_FFFF


def dirent_size(name_len: int) -> int:
    """Bytes one fuse_dirent record takes: header + name, padded to 8."""
    return (DIRENT.size + name_len + 7) & ~7


def direntplus_size(name_len: int) -> int:
    """Bytes one fuse_direntplus record takes: entry_out + dirent + name, padded to 8."""
    return (DIRENTPLUS_HEADER_SIZE + name_len + 7) & ~7


def _split_timeout(seconds: float) -> tuple[int, int]:
    # Negative or NaN timeouts make no sense to the kernel; treat them as "do not cache".
    if not seconds > 0:
        return 0, 0
    ns = int(seconds * _NS_PER_S)
    return ns // _NS_PER_S, ns % _NS_PER_S


# A file system uses a few timeouts over and over: split each once. (NaN never hits, being
# unequal to itself, and the table is bounded.)
_SPLIT_TIMEOUTS: Final[dict[float, tuple[int, int]]] = {}


def _timeout(seconds: float) -> tuple[int, int]:
    split = _SPLIT_TIMEOUTS.get(seconds)
    if split is None:
        split = _split_timeout(seconds)
        if len(_SPLIT_TIMEOUTS) < 64:
            _SPLIT_TIMEOUTS[seconds] = split
    return split


# The two encoders below run for every LOOKUP/GETATTR: each spells the fuse_attr fields out
# (no helper returning a tuple), which saves a call and a tuple per reply; keep them in step.


def pack_entry_out(entry: EntryOut) -> bytes:
    """fuse_entry_out (128 bytes)."""
    entry_s, entry_ns = _timeout(entry.entry_timeout)
    attr_s, attr_ns = _timeout(entry.attr_timeout)
    attr = entry.attr
    atime = attr.st_atime_ns
    mtime = attr.st_mtime_ns
    ctime = attr.st_ctime_ns
    return _pack_entry_out(
        entry.node_id,
        entry.generation,
        entry_s,
        attr_s,
        entry_ns,
        attr_ns,
        attr.st_ino,
        attr.st_size,
        attr.st_blocks,
        atime // _NS_PER_S,
        mtime // _NS_PER_S,
        ctime // _NS_PER_S,
        atime % _NS_PER_S,
        mtime % _NS_PER_S,
        ctime % _NS_PER_S,
        attr.st_mode & _U32,
        attr.st_nlink & _U32,
        attr.st_uid & _U32,
        attr.st_gid & _U32,
        attr.st_rdev & _U32,
        attr.st_blksize & _U32,
        attr.flags & _U32,
    )


def pack_attr_out(out: AttrOut) -> bytes:
    """fuse_attr_out (104 bytes)."""
    seconds, ns = _timeout(out.timeout)
    attr = out.attr
    atime = attr.st_atime_ns
    mtime = attr.st_mtime_ns
    ctime = attr.st_ctime_ns
    return _pack_attr_out(
        seconds,
        ns,
        0,
        attr.st_ino,
        attr.st_size,
        attr.st_blocks,
        atime // _NS_PER_S,
        mtime // _NS_PER_S,
        ctime // _NS_PER_S,
        atime % _NS_PER_S,
        mtime % _NS_PER_S,
        ctime % _NS_PER_S,
        attr.st_mode & _U32,
        attr.st_nlink & _U32,
        attr.st_uid & _U32,
        attr.st_gid & _U32,
        attr.st_rdev & _U32,
        attr.st_blksize & _U32,
        attr.flags & _U32,
    )


_pack_entry_out: Final = ENTRY_OUT.pack
_pack_attr_out: Final = ATTR_OUT.pack


def pack_statfs(st: StatFs) -> bytes:
    """fuse_statfs_out (80 bytes)."""
    return STATFS_OUT.pack(
        st.blocks,
        st.bfree,
        st.bavail,
        st.files,
        st.ffree,
        st.bsize & _U32,
        st.namelen & _U32,
        st.frsize & _U32,
        0,
    )


def pack_dirent(ino: int, next_offset: int, kind: int, name: bytes) -> bytes:
    """One fuse_dirent record with its name and zero padding."""
    size = dirent_size(len(name))
    header = DIRENT.pack(ino, next_offset, len(name), kind)
    return header + name + bytes(size - DIRENT.size - len(name))


def pack_direntplus(entry: bytes, ino: int, next_offset: int, kind: int, name: bytes) -> bytes:
    """One fuse_direntplus record: a packed entry_out followed by the dirent."""
    return entry + pack_dirent(ino, next_offset, kind, name)


def negative_entry_out(ino: int, kind: int) -> bytes:
    """entry_out with nodeid 0: the kernel shows the name but counts no lookup and caches nothing.

    Used for "." and ".." in READDIRPLUS. Only ino and the file type are filled in."""
    before_mode = (0,) * 8  # size blocks times nsecs
    after_mode = (0,) * 6  # nlink uid gid rdev blksize flags
    return ENTRY_OUT.pack(0, 0, 0, 0, 0, 0, ino, *before_mode, kind << 12, *after_mode)
