"""READs the ring answers in C (csrc/vring.c, vq_pop_direct), from file ranges the FUSE layer
vouched for: a cached READ then costs no Python at all.

One table per connection, shared by its request queues. The FUSE layer adds a range after it
served a READ from it, drops a handle's ranges before the handle closes, and clears the table
whenever the fds behind it may close (a new session, an unmount). C checks each hit's fd still
is the file it was (device and inode), so even a missed drop can never serve another file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from vhostfs._vring import ffi, lib

WINDOW_SHIFT = int(lib.VQ_DIRECT_WINDOW_SHIFT)
WINDOW = 1 << WINDOW_SHIFT
TAGS = int(lib.VQ_DIRECT_TAGS)
CLASSES = int(lib.VQ_DIRECT_CLASSES)


@dataclass(frozen=True, slots=True)
class DirectAccount:
    reads: int
    bytes: int
    sizes: list[int]  # by size class
    latencies: list[int]  # by latency class


class DirectReads:
    """The spans of READs the ring answers, and the requests it answers with constant replies
    (vq_const_*): one `enabled` switch and one `clear` for both."""

    def __init__(self) -> None:
        self.table = ffi.new("struct vq_direct *")
        self.consts = ffi.new("struct vq_const *")
        lib.vq_direct_clear(self.table)

    @property
    def enabled(self) -> bool:
        return bool(self.table.enabled)

    @enabled.setter
    def enabled(self, on: bool) -> None:
        self.table.enabled = int(on)

    def add(
        self,
        node: int,
        fh: int,
        file_start: int,
        file_end: int,
        eof: int,
        fd: int,
        pos: int,
        tag: int = 0,
    ) -> bool:
        """READs of (node, fh) within [file_start, file_end) are fd's bytes from pos on; eof is
        the file's size (reads stop there) or -1; hits count in account `tag`. False if C
        refused it (a range that is empty or spans a window, a tag out of range, an fd that
        cannot be stat'ed)."""
        table = self.table
        return lib.vq_direct_add(table, node, fh, file_start, file_end, eof, fd, pos, tag) == 0

    def set_classes(self, size_bounds: Sequence[int], latency_bounds_ns: Sequence[int]) -> None:
        """The size and latency classes hits are counted in (CLASSES - 1 ascending bounds
        each: a size counts in the class after the bounds <= it, a latency after those < it)."""
        if len(size_bounds) != CLASSES - 1 or len(latency_bounds_ns) != CLASSES - 1:
            raise ValueError(f"{CLASSES - 1} bounds of each kind are needed")
        for i, (size, latency) in enumerate(zip(size_bounds, latency_bounds_ns, strict=True)):
            self.table.size_bounds[i] = size
            self.table.latency_bounds_ns[i] = latency

    def take(self, tag: int) -> DirectAccount:
        """What account `tag` counted since the last take, and zero it."""
        account = self.table.accounts[tag]
        taken = DirectAccount(
            account.reads, account.bytes, list(account.sizes), list(account.latencies)
        )
        account.reads = account.bytes = 0
        for i in range(CLASSES):
            account.sizes[i] = account.latencies[i] = 0
        return taken

    def drop(self, node: int, fh: int) -> None:
        lib.vq_direct_drop(self.table, node, fh)

    def clear(self) -> None:
        lib.vq_direct_clear(self.table)
        lib.vq_const_clear(self.consts)

    def add_constant(
        self, node: int, opcode: int, args_len: int, arg_mask: int, arg_value: int, payload: bytes
    ) -> bool:
        """Requests (opcode, node) with args_len bytes of in-args whose first u32 has
        (arg & arg_mask) == arg_value are answered with payload after the header from now on.
        False if C refused it (opcode out of range, payload too long)."""
        consts = self.consts
        added = lib.vq_const_add(
            consts, node, opcode, args_len, arg_mask, arg_value, payload, len(payload)
        )
        return added == 0

    def add_empty_range(self, opcode: int, args_len: int, lo: int, hi: int) -> bool:
        """Requests of opcode for any node in lo..hi, with args_len bytes of in-args, get an
        empty reply from now on. False if refused (no free range, a bad opcode or range)."""
        return lib.vq_const_add_range(self.consts, opcode, args_len, lo, hi) == 0

    def constant_hits(self) -> dict[int, int]:
        """Requests answered with constant replies so far, by opcode."""
        return {op: int(n) for op, n in enumerate(self.consts.hits) if n}

    @property
    def hits(self) -> int:
        return int(self.table.hits)
