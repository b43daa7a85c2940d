"""Reading a byte range of an open file completely: pread may return less than asked for."""

from __future__ import annotations

import os


def pread_full(fd: int, size: int, offset: int) -> bytes:
    """`size` bytes at `offset`, or fewer when the file ends first. OSError as pread raises it."""
    first = os.pread(fd, size, offset)
    if len(first) == size or not first:
        return first  # the common case: one call, no copy
    data = bytearray(first)
    while len(data) < size:
        piece = os.pread(fd, size - len(data), offset + len(data))
        if not piece:
            break
        data += piece
    return bytes(data)
