"""A guest request as the opcode handlers see it, and decoding of its in-args.

The dispatcher builds a `Call` after checking the header; handlers decode their fixed struct
with the abi layouts and their strings with the helpers here, which refuse anything the kernel
would never send (missing terminator, empty or over-long names, '/' in a path component).
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from vhostfs.fuse import abi
from vhostfs.fuse.ops import FileSlice, FuseError, NodeId, Operations, RequestContext
from vhostfs.fuse.transport import GuestRequest

NO_REPLY: Final = None
Reply: TypeAlias = bytes | bytearray | FileSlice | list[FileSlice | bytes] | None

_OFFSET_MAX: Final = (1 << 63) - 1
_NAME_MAX: Final = abi.NAME_MAX


@dataclass(slots=True)
class Call:
    """One request, decoded as far as the dispatcher goes."""

    req: GuestRequest
    node: NodeId
    ctx: RequestContext
    args: memoryview  # in-args after fuse_in_header, without WRITE payload or extensions
    payload_len: int  # WRITE only: bytes after write_in
    room: int  # reply payload bytes that fit after fuse_out_header
    max_write: int
    session_flags: int  # the INIT flags the session runs with


Handler: TypeAlias = Callable[[Operations, Call], Coroutine[Any, Any, Reply]]


@dataclass(frozen=True, slots=True)
class Spec:
    handler: Handler
    min_args: int  # shorter in-args are EINVAL
    reply_size: int  # fixed payload the kernel always makes room for; less is ERANGE
    replies: bool = True


class GuestPayload:
    """WRITE data left in guest memory until the file system decides how to take it."""

    __slots__ = ("_offset", "_req", "_size")

    def __init__(self, req: GuestRequest, offset: int, size: int) -> None:
        self._req = req
        self._offset = offset
        self._size = size

    def __len__(self) -> int:
        return self._size

    def to_bytes(self) -> bytes:
        data = self._req.read(self._offset, self._size)
        if len(data) != self._size:
            raise FuseError(errno.EIO)
        return data

    def to_file(self, fd: int, pos: int) -> int:
        return self._req.read_to_file(self._offset, fd, pos, self._size)


def cstring(args: memoryview, start: int, limit: int, too_long: int) -> tuple[bytes, int]:
    """The NUL-terminated, non-empty string at start and the offset after its NUL."""
    raw = args[start:].tobytes()
    end = raw.find(b"\0")
    if end <= 0:  # no terminator, or empty
        raise FuseError(errno.EINVAL)
    if end > limit:
        raise FuseError(too_long)
    return raw[:end], start + end + 1


def name_arg(args: memoryview, start: int = 0) -> tuple[bytes, int]:
    """A single path component; a '/' in it is never legitimate.

    cstring(args, start, NAME_MAX, ENAMETOOLONG) spelled out: it runs for every LOOKUP."""
    raw = args[start:].tobytes()
    end = raw.find(0)
    if end <= 0:  # no terminator, or empty
        raise FuseError(errno.EINVAL)
    if end > _NAME_MAX:
        raise FuseError(errno.ENAMETOOLONG)
    name = raw[:end]
    if b"/" in name:
        raise FuseError(errno.EINVAL)
    return name, start + end + 1


def xattr_name_arg(args: memoryview, start: int) -> tuple[bytes, int]:
    return cstring(args, start, abi.XATTR_NAME_MAX, errno.ERANGE)


def offset_arg(value: int) -> int:
    if value > _OFFSET_MAX:
        raise FuseError(errno.EINVAL)
    return value
