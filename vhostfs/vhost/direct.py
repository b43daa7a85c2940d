"""READs the ring answers in C (csrc/vring.c, vq_pop_direct), from file ranges the FUSE layer
vouched for: a cached READ then costs no Python at all.

One table per connection, shared by its request queues. The FUSE layer adds a range after it
served a READ from it, drops a handle's ranges before the handle closes, and clears the table
whenever the fds behind it may close (a new session, an unmount). C checks each hit's fd still
is the file it was (device and inode), so even a missed drop can never serve another file.
"""

from __future__ import annotations

from vhostfs._vring import ffi, lib

WINDOW_SHIFT = int(lib.VQ_DIRECT_WINDOW_SHIFT)
WINDOW = 1 << WINDOW_SHIFT


class DirectReads:
    def __init__(self) -> None:
        self.table = ffi.new("struct vq_direct *")
        lib.vq_direct_clear(self.table)

    @property
    def enabled(self) -> bool:
        return bool(self.table.enabled)

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self.table.enabled = int(on)

    def add(
        self, node: int, fh: int, file_start: int, file_end: int, eof: int, fd: int, pos: int
    ) -> bool:
        """READs of (node, fh) within [file_start, file_end) are fd's bytes from pos on; eof is
        the file's size (reads stop there) or -1. False if C refused it (a range that is empty
        or spans a window, an fd that cannot be stat'ed)."""
        return lib.vq_direct_add(self.table, node, fh, file_start, file_end, eof, fd, pos) == 0

    def drop(self, node: int, fh: int) -> None:
        lib.vq_direct_drop(self.table, node, fh)

    def clear(self) -> None:
        lib.vq_direct_clear(self.table)

    @property
    def hits(self) -> int:
        return int(self.table.hits)

    @property
    def bytes(self) -> int:
        return int(self.table.bytes)
