"""FUSE_INIT: which protocol version and capabilities the session runs with.

Rules, in the order they apply:
1. Kernel major < 7: refuse with EPROTO.
2. Kernel major > 7: answer with our version only and leave the session down; the kernel is
   expected to retry with major 7.
3. Same major: both sides speak min(kernel minor, ours); kernels below MIN_MINOR (virtio-fs
   appeared in 7.31) are refused with EPROTO.
4. Capabilities: we propose OFFERED, the file system may adjust the proposal in
   Operations.init, and the reply carries proposal ∩ ALLOWED ∩ what the kernel offered.
   Bits 32 and up exist only when both sides speak INIT_EXT.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Final

from vhostfs.fuse.abi import INIT_IN, INIT_IN_FLAGS2, INIT_OUT, KERNEL_MAJOR, InitFlag
from vhostfs.fuse.ops import ConnInfo, FuseError

OUR_MINOR: Final = 36
MIN_MINOR: Final = 31

PAGE_SIZE: Final = 4096
MAX_PAGES: Final = 256  # 1 MiB per READ/WRITE
MAX_WRITE: Final = MAX_PAGES * PAGE_SIZE
MAX_READAHEAD: Final = MAX_WRITE
# Background requests are readahead and async direct I/O; more than the ring holds only queues
# up in the guest, so stay within a typical 1024-entry queue.
MAX_BACKGROUND: Final = 256
CONGESTION_THRESHOLD: Final = MAX_BACKGROUND * 3 // 4
TIME_GRAN_NS: Final = 1

OFFERED: Final = (
    InitFlag.ASYNC_READ
    | InitFlag.ATOMIC_O_TRUNC
    | InitFlag.BIG_WRITES
    | InitFlag.AUTO_INVAL_DATA
    | InitFlag.DO_READDIRPLUS
    | InitFlag.READDIRPLUS_AUTO
    | InitFlag.PARALLEL_DIROPS
    | InitFlag.MAX_PAGES
    | InitFlag.INIT_EXT
)
# What a file system may add on top. Everything else (DAX map alignment, locks,
# security contexts, ...) needs support this dispatcher does not have.
ALLOWED: Final = (
    OFFERED
    | InitFlag.CACHE_SYMLINKS
    | InitFlag.EXPLICIT_INVAL_DATA
    | InitFlag.SUBMOUNTS
    | InitFlag.NO_OPENDIR_SUPPORT
    | InitFlag.WRITEBACK_CACHE  # the writable passthrough's --writeback
    | InitFlag.HANDLE_KILLPRIV_V2  # the writable passthrough clears set-id bits itself
    | InitFlag.SETXATTR_EXT  # setxattr_in grows to 16 bytes (the handler reads both)
)
_LOW32: Final = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class KernelInit:
    major: int
    minor: int
    max_readahead: int
    flags: int  # all 64 bits; the upper half only if the kernel sent INIT_EXT


def parse_init_in(args: bytes | memoryview) -> KernelInit:
    """Decode fuse_init_in (16 bytes, or 64 with INIT_EXT)."""
    if len(args) < INIT_IN.size:
        raise FuseError(errno.EINVAL)
    major, minor, max_readahead, flags = INIT_IN.unpack_from(args)
    if flags & InitFlag.INIT_EXT and len(args) >= INIT_IN.size + INIT_IN_FLAGS2.size:
        (flags2,) = INIT_IN_FLAGS2.unpack_from(args, INIT_IN.size)
        flags |= flags2 << 32
    return KernelInit(major, minor, max_readahead, flags)


def version_only_reply() -> bytes:
    """The answer to a kernel with a newer major: our version, nothing else."""
    return INIT_OUT.pack(KERNEL_MAJOR, OUR_MINOR, 0, 0, 0, 0, 0, 0, 0, 0, 0)


def propose(kernel: KernelInit) -> ConnInfo:
    """The connection we would run, before the file system has a say.

    Raises FuseError(EPROTO) for kernels we cannot talk to; callers handle major > 7 first."""
    if kernel.major != KERNEL_MAJOR or kernel.minor < MIN_MINOR:
        raise FuseError(errno.EPROTO)
    return ConnInfo(
        major=KERNEL_MAJOR,
        minor=min(kernel.minor, OUR_MINOR),
        kernel_flags=kernel.flags,
        flags=int(OFFERED),
        max_readahead=min(kernel.max_readahead, MAX_READAHEAD),
        max_write=MAX_WRITE,
        max_pages=MAX_PAGES,
    )


def granted(kernel_flags: int, wanted: int) -> int:
    """The flags a session runs with when the kernel offers kernel_flags and the file system
    returns wanted from init. A file system whose behaviour depends on a flag (answering
    OPENDIR with ENOSYS under NO_OPENDIR_SUPPORT, say) asks here rather than guessing."""
    flags = wanted & ALLOWED & kernel_flags
    if not flags & InitFlag.INIT_EXT:
        flags &= _LOW32
    return flags


def settle(kernel: KernelInit, conn: ConnInfo) -> ConnInfo:
    """Clamp what the file system returned from init to what both sides can do."""
    flags = granted(kernel.flags, conn.flags)
    max_pages = max(1, min(conn.max_pages, MAX_PAGES))
    return ConnInfo(
        major=KERNEL_MAJOR,
        minor=min(kernel.minor, OUR_MINOR),
        kernel_flags=kernel.flags,
        flags=flags,
        max_readahead=max(0, min(conn.max_readahead, kernel.max_readahead, MAX_READAHEAD)),
        max_write=max(PAGE_SIZE, min(conn.max_write, max_pages * PAGE_SIZE)),
        max_pages=max_pages,
    )


def encode_init_out(conn: ConnInfo) -> bytes:
    """fuse_init_out for a settled connection (always the 64-byte form: minor >= 23)."""
    return INIT_OUT.pack(
        conn.major,
        conn.minor,
        conn.max_readahead,
        conn.flags & _LOW32,
        MAX_BACKGROUND,
        CONGESTION_THRESHOLD,
        conn.max_write,
        TIME_GRAN_NS,
        conn.max_pages,
        0,  # map_alignment: no DAX
        conn.flags >> 32,
    )
