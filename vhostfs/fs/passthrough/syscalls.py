"""The few system calls Python 3.11's os module lacks, through libc.

All of them act on the calling thread or on descriptors, never on a path built from guest
input. setfsuid/setfsgid are per-thread in the kernel, and glibc does not broadcast them to
other threads (unlike setresuid/setgroups), which is what per-request credentials need.
"""

from __future__ import annotations

import ctypes
import os
from typing import Final

_libc: Final = ctypes.CDLL(None, use_errno=True)

_setfsuid: Final = _libc.setfsuid
_setfsuid.argtypes = [ctypes.c_uint]
_setfsuid.restype = ctypes.c_int
_setfsgid: Final = _libc.setfsgid
_setfsgid.argtypes = [ctypes.c_uint]
_setfsgid.restype = ctypes.c_int
_renameat2: Final = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int
_fallocate: Final = _libc.fallocate64
_fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_fallocate.restype = ctypes.c_int
_syncfs: Final = _libc.syncfs
_syncfs.argtypes = [ctypes.c_int]
_syncfs.restype = ctypes.c_int

RENAME_NOREPLACE: Final = 1
RENAME_EXCHANGE: Final = 2
RENAME_WHITEOUT: Final = 4


def _check(result: int) -> None:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def setfsuid(uid: int) -> int:
    """Switch this thread's file-system uid; returns the previous one."""
    return int(_setfsuid(uid))


def setfsgid(gid: int) -> int:
    return int(_setfsgid(gid))


def renameat2(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int) -> None:
    _check(_renameat2(old_dir, old, new_dir, new, flags))


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    _check(_fallocate(fd, mode, offset, length))


def syncfs(fd: int) -> None:
    _check(_syncfs(fd))
