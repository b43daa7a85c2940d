"""The C split-ring engine (csrc/vring.c) driven directly through cffi.

Each test lays out guest memory and a driver ring itself (tests.support.guest), maps the ring
with vq_ring_map as the daemon does after SET_VRING_ADDR, and checks what the engine takes,
refuses and writes back.
"""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support.guest import (
    AVAIL_F_NO_INTERRUPT,
    DESC_F_INDIRECT,
    DESC_F_NEXT,
    DESC_F_WRITE,
    USED_F_NO_NOTIFY,
    DriverRing,
    GuestMemory,
)
from vhostfs._vring import ffi, lib

MiB = 1 << 20
U64 = 1 << 64


def make_table(mem: GuestMemory) -> Any:
    table = ffi.new("struct vq_memory *")
    table.nregions = len(mem.regions)
    for i, r in enumerate(mem.regions):
        table.regions[i].gpa = r.gpa
        table.regions[i].size = r.size
        table.regions[i].uva = r.uva
        table.regions[i].hva = r.hva
    return table


def iovs(iov: Any, start: int, count: int) -> list[tuple[int, int]]:
    return [
        (int(ffi.cast("uintptr_t", iov[k].base)), iov[k].len) for k in range(start, start + count)
    ]


def error_codes() -> list[int]:
    return [getattr(lib, name) for name in dir(lib) if name.startswith("VQ_ERR_")]


class Harness:
    """Guest memory, a driver ring in it, and the engine's view of that ring."""

    def __init__(
        self,
        layout: Sequence[tuple[int, int]] = ((0x10_0000, MiB),),
        *,
        num: int = 8,
        features: int = 0,
        mmap_offset: int = 0,
        ring_region: int | None = 0,
    ) -> None:
        self.mem = GuestMemory(layout, mmap_offset=mmap_offset)
        self.table = make_table(self.mem)
        self.drv = DriverRing(self.mem, num, region=ring_region)
        self.ring = ffi.new("struct vq_ring *")
        self.ring.num = num
        self.ring.features = features
        self.chain = ffi.new("struct vq_chain *")
        assert self.map() == 0

    def map(self) -> int:
        return int(
            lib.vq_ring_map(
                self.ring, self.table, self.drv.desc_uva, self.drv.avail_uva, self.drv.used_uva
            )
        )

    def pop(self) -> int:
        return int(lib.vq_pop(self.ring, self.table, self.chain))

    def readable(self) -> list[tuple[int, int]]:
        return iovs(self.chain.iov, 0, self.chain.nread)

    def writable(self) -> list[tuple[int, int]]:
        return iovs(self.chain.iov, self.chain.nread, self.chain.nwrite)

    def req(self) -> bytes:
        return bytes(ffi.buffer(self.chain.req, self.chain.req_len))

    def refused(self, code: int) -> None:
        """The next pop fails with code and leaves the ring where it was."""
        last, inflight = self.ring.last_avail, self.ring.inflight
        assert self.pop() == code, ffi.string(lib.vq_strerror(code))
        assert (self.ring.last_avail, self.ring.inflight) == (last, inflight)
        assert self.pop() == code  # and stays refused: nothing moved

    def close(self) -> None:
        self.mem.close()


Make = Callable[..., Harness]


@pytest.fixture
def make() -> Iterator[Make]:
    made: list[Harness] = []

    def factory(*args: Any, **kwargs: Any) -> Harness:
        h = Harness(*args, **kwargs)
        made.append(h)
        return h

    yield factory
    for h in made:
        h.close()


@pytest.fixture
def h(make: Make) -> Harness:
    return make(features=lib.VQ_F_INDIRECT)


# ---------------------------------------------------------------- translation


class TestTranslate:
    def translate(self, mem: GuestMemory, gpa: int, length: int, max_iov: int = 8) -> Any:
        iov = ffi.new("struct vq_iov[]", max(max_iov, 1))
        n = lib.vq_translate(make_table(mem), gpa, length, iov, max_iov)
        return n if n < 0 else iovs(iov, 0, n)

    def test_inside_one_region(self) -> None:
        with GuestMemory([(0x1000, 0x4000)]) as mem:
            r = mem.regions[0]
            assert self.translate(mem, 0x1800, 0x100) == [(r.hva + 0x800, 0x100)]
            assert self.translate(mem, 0x1000, 0x4000) == [(r.hva, 0x4000)]

    def test_split_at_region_border(self) -> None:
        with GuestMemory([(0, 0x2000), (0x2000, 0x1000), (0x3000, 0x1000)]) as mem:
            r0, r1, r2 = mem.regions
            assert self.translate(mem, 0x1F00, 0x1200) == [
                (r0.hva + 0x1F00, 0x100),
                (r1.hva, 0x1000),
                (r2.hva, 0x100),
            ]

    def test_mmap_offset_is_applied(self) -> None:
        with GuestMemory([(0x8000, 0x1000)], mmap_offset=0x3000) as mem:
            mem.write(0x8010, b"xyz")
            [(base, length)] = self.translate(mem, 0x8010, 3)
            assert length == 3 and ffi.buffer(ffi.cast("char *", base), 3)[:] == b"xyz"

    @pytest.mark.parametrize(
        ("gpa", "length"),
        [
            (0x0, 0x10),  # below the first region
            (0xFFF, 0x2),  # starts below the first region
            (0x1F00, 0x200),  # runs into the hole
            (0x2000, 0x10),  # inside the hole
            (0x3F00, 0x200),  # runs past the last region
            (0x4000, 0x1),  # just past the end
            (U64 - 0x10, 0x20),  # gpa + len wraps
            (0x1000, U64 - 0x800),  # len so large it wraps
            (U64 - 1, 1),  # ends exactly at 2^64
        ],
    )
    def test_outside_memory(self, gpa: int, length: int) -> None:
        with GuestMemory([(0x1000, 0x1000), (0x3000, 0x1000)]) as mem:
            assert self.translate(mem, gpa, length) == lib.VQ_ERR_ADDRESS

    def test_zero_length_is_nothing(self) -> None:
        with GuestMemory([(0x1000, 0x1000)]) as mem:
            assert self.translate(mem, 0xDEAD_0000, 0) == []

    def test_iovec_limit(self) -> None:
        with GuestMemory([(0, 0x1000), (0x1000, 0x1000), (0x2000, 0x1000)]) as mem:
            assert len(self.translate(mem, 0x800, 0x2000, max_iov=3)) == 3
            assert self.translate(mem, 0x800, 0x2000, max_iov=2) == lib.VQ_ERR_TOO_MANY_IOV
            assert self.translate(mem, 0x800, 0x10, max_iov=0) == lib.VQ_ERR_TOO_MANY_IOV

    def test_binary_search_over_many_regions(self) -> None:
        layout = [(0x10_0000 * i + 0x1000, 0x1000) for i in range(lib.VQ_MAX_REGIONS)]
        with GuestMemory(layout) as mem:
            table = make_table(mem)
            iov = ffi.new("struct vq_iov[1]")
            for r in mem.regions:
                for off in (0, 0x7FF, 0xFFF):
                    assert lib.vq_translate(table, r.gpa + off, 1, iov, 1) == 1
                    assert int(ffi.cast("uintptr_t", iov[0].base)) == r.hva + off
                for gpa in (r.gpa - 1, r.end, r.end + 0x1000):
                    assert lib.vq_translate(table, gpa, 1, iov, 1) == lib.VQ_ERR_ADDRESS

    def test_uva_to_hva(self) -> None:
        with GuestMemory([(0x1000, 0x1000), (0x2000, 0x1000)]) as mem:
            table = make_table(mem)
            r0, r1 = mem.regions

            def hva(uva: int, length: int) -> int | None:
                p = lib.vq_uva_to_hva(table, uva, length)
                return None if p == ffi.NULL else int(ffi.cast("uintptr_t", p))

            assert hva(r1.uva + 0x10, 0x20) == r1.hva + 0x10
            assert hva(r0.uva, 0x1000) == r0.hva
            # uvas of adjacent gpa regions are not adjacent: no straddling in uva space.
            assert hva(r0.uva + 0xFF0, 0x20) is None
            assert hva(r0.uva - 1, 1) is None
            assert hva(r1.uva + 0x1000, 1) is None
            assert hva(r0.uva + 0x10, U64 - 8) is None


# ---------------------------------------------------------------- mapping


class TestRingMap:
    @pytest.mark.parametrize("num", [0, 3, 6, 65536, 1 << 31])
    def test_size_must_be_power_of_two(self, make: Make, num: int) -> None:
        h = make()
        h.ring.num = num
        assert h.map() == lib.VQ_ERR_NOT_READY
        assert h.pop() == lib.VQ_ERR_NOT_READY

    @pytest.mark.parametrize(("area", "delta"), [("desc", 8), ("avail", 1), ("used", 2)])
    def test_alignment(self, make: Make, area: str, delta: int) -> None:
        h = make()
        addrs = {"desc": h.drv.desc_uva, "avail": h.drv.avail_uva, "used": h.drv.used_uva}
        addrs[area] += delta
        rc = lib.vq_ring_map(h.ring, h.table, addrs["desc"], addrs["avail"], addrs["used"])
        assert rc == lib.VQ_ERR_ADDRESS
        assert h.pop() == lib.VQ_ERR_NOT_READY

    def test_areas_must_lie_in_one_region(self, make: Make) -> None:
        # Two gpa-adjacent regions: the used ring of a 256-entry queue at the very end of the
        # first one spills into the second, which is not contiguous in uva space.
        h = make([(0, 0x10000), (0x10000, 0x10000)], num=256, ring_region=1)
        r0 = h.mem.regions[0]
        used_uva = r0.uva + r0.size - 0x100  # 6 + 8*256 bytes needed
        rc = lib.vq_ring_map(h.ring, h.table, h.drv.desc_uva, h.drv.avail_uva, used_uva)
        assert rc == lib.VQ_ERR_ADDRESS
        rc = lib.vq_ring_map(h.ring, h.table, 0x1000, h.drv.avail_uva, h.drv.used_uva)
        assert rc == lib.VQ_ERR_ADDRESS  # a gpa, not a uva

    def test_map_reads_used_idx_and_keeps_last_avail(self, make: Make) -> None:
        h = make()
        h.drv.used_idx = 0x1234
        h.ring.last_avail = 0x1234  # SET_VRING_BASE
        h.ring.inflight = 3
        h.ring.signalled_used_valid = 1
        assert h.map() == 0
        assert h.ring.used_idx == 0x1234
        assert h.ring.last_avail == 0x1234
        assert h.ring.inflight == 0
        assert h.ring.signalled_used_valid == 0

    def test_unmapped_ring(self) -> None:
        ring = ffi.new("struct vq_ring *")
        ring.num = 8
        table = ffi.new("struct vq_memory *")
        chain = ffi.new("struct vq_chain *")
        assert lib.vq_pop(ring, table, chain) == lib.VQ_ERR_NOT_READY
        assert lib.vq_push(ring, 0, 0) == lib.VQ_ERR_NOT_READY
        assert lib.vq_pending(ring) == 0
        assert lib.vq_should_notify(ring) == 0
        assert lib.vq_set_kicks(ring, 1) == 0


# ---------------------------------------------------------------- popping


class TestPop:
    def test_empty(self, h: Harness) -> None:
        assert h.pop() == 0
        assert h.ring.last_avail == 0

    def test_direct_chain(self, h: Harness) -> None:
        head = h.drv.add_chain([b"hello ", b"world!"], [100, 50])
        assert h.pop() == 1
        c = h.chain
        assert (c.head, c.nread, c.nwrite) == (head, 2, 2)
        assert (c.read_len, c.write_len) == (12, 150)
        assert h.req() == b"hello world!"
        assert [n for _, n in h.readable()] == [6, 6]
        wbufs = h.drv.writable_buffers(head)
        assert h.writable() == [(h.mem.gpa_to_hva(g), n) for g, n in wbufs]
        assert (h.ring.last_avail, h.ring.inflight) == (1, 1)
        assert h.pop() == 0

    def test_indirect_chain(self, h: Harness) -> None:
        head = h.drv.add_chain([b"a" * 40, b"b" * 24], [16, 4096], indirect=True)
        assert h.pop() == 1
        c = h.chain
        assert (c.head, c.nread, c.nwrite, c.read_len, c.write_len) == (head, 2, 2, 64, 4112)
        assert h.req() == b"a" * 40 + b"b" * 24

    def test_direct_descriptors_then_indirect_table(self, h: Harness) -> None:
        d, mem = h.drv, h.mem
        buf = mem.alloc(64)
        mem.write(buf, bytes(range(64)))
        table = mem.alloc(32, 16)
        d.write_desc(0, buf + 32, 32, DESC_F_WRITE, table_gpa=table)
        d.write_desc(1, buf, 16, DESC_F_NEXT, 2)
        d.write_desc(2, buf + 16, 16, DESC_F_NEXT, 3)
        d.write_desc(3, table, 16, DESC_F_INDIRECT | DESC_F_WRITE)  # WRITE here is ignored
        d.publish(1)
        assert h.pop() == 1
        assert (h.chain.nread, h.chain.nwrite, h.chain.read_len, h.chain.write_len) == (
            2,
            1,
            32,
            32,
        )
        assert h.req() == bytes(range(32))

    def test_buffer_split_over_regions(self, make: Make) -> None:
        h = make([(0, 0x10000), (0x10000, 0x10000)])
        d, mem = h.drv, h.mem
        data = os.urandom(0x100)
        mem.write(0xFF80, data)
        d.write_desc(0, 0xFF80, 0x100)
        d.publish(0)
        assert h.pop() == 1
        r0, r1 = mem.regions
        assert h.readable() == [(r0.hva + 0xFF80, 0x80), (r1.hva, 0x80)]
        assert h.req() == data

    def test_request_copy_is_capped(self, h: Harness) -> None:
        parts = [os.urandom(3000) for _ in range(4)]
        h.drv.add_chain(parts, [])
        assert h.pop() == 1
        assert h.chain.read_len == 12000
        assert h.chain.req_len == lib.VQ_REQ_BUF
        assert h.req() == b"".join(parts)[: lib.VQ_REQ_BUF]

    def test_zero_length_descriptors_give_no_iovec(self, h: Harness) -> None:
        head = h.drv.add_chain([b"", b"xy", b""], [0, 8])
        assert h.pop() == 1
        assert (h.chain.head, h.chain.nread, h.chain.nwrite) == (head, 1, 1)
        assert (h.chain.read_len, h.chain.write_len) == (2, 8)

    def test_zero_length_descriptor_address_is_not_checked(self, h: Harness) -> None:
        h.drv.write_desc(0, 0xFFFF_FFFF_FFFF_0000, 0)
        h.drv.publish(0)
        assert h.pop() == 1
        assert (h.chain.nread, h.chain.nwrite) == (0, 0)

    def test_writable_only_chain(self, h: Harness) -> None:
        h.drv.add_chain([], [32])
        assert h.pop() == 1
        assert (h.chain.nread, h.chain.nwrite, h.chain.req_len) == (0, 1, 0)

    def test_longest_chain_is_the_table(self, make: Make) -> None:
        h = make(num=4)
        h.drv.add_chain([b"1", b"2", b"3"], [1])
        assert h.pop() == 1
        assert h.chain.nread + h.chain.nwrite == 4

    def test_event_idx_publishes_avail_event(self, make: Make) -> None:
        h = make(features=lib.VQ_F_EVENT_IDX)
        h.drv.add_chain([b"x"])
        h.drv.add_chain([b"y"])
        assert h.pop() == 1 and h.drv.avail_event == 1
        assert h.pop() == 1 and h.drv.avail_event == 2

    def test_no_event_idx_leaves_avail_event(self, h: Harness) -> None:
        h.drv.add_chain([b"x"])
        assert h.pop() == 1 and h.drv.avail_event == 0

    def test_indices_wrap_at_u16(self, make: Make) -> None:
        h = make(num=4)
        h.drv.set_avail_idx(0xFFFE)
        h.drv.used_idx = 0xFFFE
        h.drv.last_used = 0xFFFE
        h.ring.last_avail = 0xFFFE
        assert h.map() == 0
        for round_ in range(3):
            heads = [h.drv.add_chain([bytes([round_, k])]) for k in range(4)]
            assert lib.vq_pending(h.ring) == 4
            for head in heads:
                assert h.pop() == 1 and h.chain.head == head
                assert lib.vq_push(h.ring, head, 3) == 0
            assert h.drv.used_entries() == [(head, 3) for head in heads]
        assert h.ring.last_avail == h.ring.used_idx == (0xFFFE + 12) & 0xFFFF


class TestRefusals:
    def test_loop(self, h: Harness) -> None:
        buf = h.mem.alloc(16)
        h.drv.write_desc(0, buf, 1, DESC_F_NEXT, 1)
        h.drv.write_desc(1, buf, 1, DESC_F_NEXT, 0)
        h.drv.publish(0)
        h.refused(lib.VQ_ERR_LOOP)

    def test_self_loop_of_zero_length(self, h: Harness) -> None:
        h.drv.write_desc(3, 0, 0, DESC_F_NEXT, 3)
        h.drv.publish(3)
        h.refused(lib.VQ_ERR_LOOP)

    def test_loop_in_indirect_table(self, h: Harness) -> None:
        buf, table = h.mem.alloc(16), h.mem.alloc(48, 16)
        h.drv.write_desc(0, buf, 1, DESC_F_NEXT, 1, table_gpa=table)
        h.drv.write_desc(1, buf, 1, DESC_F_NEXT, 2, table_gpa=table)
        h.drv.write_desc(2, buf, 1, DESC_F_NEXT, 1, table_gpa=table)
        h.drv.write_desc(0, table, 48, DESC_F_INDIRECT)
        h.drv.publish(0)
        h.refused(lib.VQ_ERR_LOOP)

    def test_next_beyond_table(self, h: Harness) -> None:
        buf = h.mem.alloc(16)
        h.drv.write_desc(0, buf, 1, DESC_F_NEXT, 8)
        h.drv.publish(0)
        h.refused(lib.VQ_ERR_NEXT)

    def test_next_beyond_indirect_table(self, h: Harness) -> None:
        # Index 2 is fine for the 8-entry ring but not for a 2-entry indirect table.
        buf, table = h.mem.alloc(16), h.mem.alloc(32, 16)
        h.drv.write_desc(0, buf, 1, DESC_F_NEXT, 2, table_gpa=table)
        h.drv.write_desc(0, table, 32, DESC_F_INDIRECT)
        h.drv.publish(0)
        h.refused(lib.VQ_ERR_NEXT)

    def test_head_beyond_ring(self, h: Harness) -> None:
        h.drv.publish(8)
        h.refused(lib.VQ_ERR_HEAD)

    @pytest.mark.parametrize("ahead", [9, 0x8000, 0xFFFF])
    def test_avail_idx_jump(self, h: Harness, ahead: int) -> None:
        h.drv.set_avail_idx(ahead)
        h.refused(lib.VQ_ERR_AVAIL_IDX)
        assert lib.vq_pending(h.ring) == 0

    def test_indirect_without_feature(self, make: Make) -> None:
        h = make()
        h.drv.add_chain([b"x"], indirect=True)
        h.refused(lib.VQ_ERR_INDIRECT_FEATURE)

    @pytest.mark.parametrize(
        ("length", "flags"),
        [
            (0, 0),
            (15, 0),
            (24, 0),
            (16 * 32768 + 16, 0),
            (32, DESC_F_NEXT),  # the spec forbids INDIRECT together with NEXT
        ],
    )
    def test_bad_indirect_descriptor(self, h: Harness, length: int, flags: int) -> None:
        table = h.drv.mem.alloc(32, 16)
        h.drv.write_desc(0, h.mem.alloc(1), 1, 0, table_gpa=table)
        h.drv.write_desc(0, table, length, DESC_F_INDIRECT | flags, 1)
        h.drv.publish(0)
        h.refused(lib.VQ_ERR_INDIRECT_LEN)

    def test_largest_indirect_table(self, make: Make) -> None:
        # 32768 zero-length entries (512 KiB): accepted, produces no iovec.
        h = make([(0x10_0000, 2 * MiB)], features=lib.VQ_F_INDIRECT)
        n = 32768
        table = h.mem.alloc(16 * n, 16)
        entries = b"".join(struct.pack("<QIHH", 0, 0, DESC_F_NEXT, j + 1) for j in range(n - 1))
        h.mem.write(table, entries + struct.pack("<QIHH", 0, 0, 0, 0))
        h.drv.write_desc(0, table, 16 * n, DESC_F_INDIRECT)
        h.drv.publish(0)
        assert h.pop() == 1 and h.chain.nread == 0

    def test_indirect_table_outside_memory(self, h: Harness) -> None:
        h.drv.write_desc(0, 0x10_0000 + MiB - 16, 32, DESC_F_INDIRECT)
        h.drv.publish(0)
        h.refused(lib.VQ_ERR_ADDRESS)

    def test_indirect_table_split_and_unaligned(self, make: Make) -> None:
        # Accepted: the table is read through its iovecs, wherever it lies.
        h = make([(0, 0x10000), (0x10000, 0x10000)], features=lib.VQ_F_INDIRECT)
        bufs = [h.mem.alloc(8) for _ in range(4)]
        for k, b in enumerate(bufs):
            h.mem.write(b, bytes([k]) * 8)
        table = 0x10000 - 24  # entry 1 straddles the border
        for k, b in enumerate(bufs):
            h.drv.write_desc(k, b, 8, DESC_F_NEXT if k < 3 else 0, k + 1, table_gpa=table)
        h.drv.write_desc(0, table, 64, DESC_F_INDIRECT)
        h.drv.publish(0)
        assert h.pop() == 1
        assert h.req() == b"".join(bytes([k]) * 8 for k in range(4))

    def test_nested_indirect(self, h: Harness) -> None:
        inner, outer = h.mem.alloc(16, 16), h.mem.alloc(16, 16)
        h.drv.write_desc(0, h.mem.alloc(1), 1, table_gpa=inner)
        h.drv.write_desc(0, inner, 16, DESC_F_INDIRECT, table_gpa=outer)
        h.drv.write_desc(0, outer, 16, DESC_F_INDIRECT)
        h.drv.publish(0)
        h.refused(lib.VQ_ERR_INDIRECT_NESTED)

    def test_readable_after_writable(self, h: Harness) -> None:
        buf = h.mem.alloc(16)
        h.drv.write_desc(0, buf, 4, DESC_F_WRITE | DESC_F_NEXT, 1)
        h.drv.write_desc(1, buf, 4, 0)
        h.drv.publish(0)
        h.refused(lib.VQ_ERR_ORDER)

    def test_readable_in_indirect_after_writable_in_main_chain(self, h: Harness) -> None:
        buf, table = h.mem.alloc(16), h.mem.alloc(16, 16)
        h.drv.write_desc(0, buf, 4, 0, table_gpa=table)
        h.drv.write_desc(0, buf, 4, DESC_F_WRITE | DESC_F_NEXT, 1)
        h.drv.write_desc(1, table, 16, DESC_F_INDIRECT)
        h.drv.publish(0)
        h.refused(lib.VQ_ERR_ORDER)

    @pytest.mark.parametrize(("second", "ok"), [(0x3FFF_FFFF, True), (0x4000_0000, False)])
    def test_total_length_limit(self, make: Make, second: int, ok: bool) -> None:
        # A sparse 3 GiB region: the chain totals 2^32 - 1 (accepted) or 2^32 (refused).
        h = make([(0x10_0000, MiB), (1 << 32, 3 << 30)])
        h.drv.write_desc(0, 1 << 32, 0xC000_0000, DESC_F_NEXT, 1)
        h.drv.write_desc(1, 1 << 32, second, DESC_F_WRITE)
        h.drv.publish(0)
        if ok:
            assert h.pop() == 1
            assert (h.chain.read_len, h.chain.write_len) == (0xC000_0000, second)
            assert h.req() == bytes(lib.VQ_REQ_BUF)
        else:
            h.refused(lib.VQ_ERR_OVERFLOW)

    @pytest.mark.parametrize(
        ("addr", "length"),
        [
            (0, 16),  # below memory
            (0x10_0000 + MiB - 8, 16),  # runs off the end
            (U64 - 8, 16),  # wraps
            (0x10_0000, 0x1000_0000),  # far too long
        ],
    )
    def test_buffer_outside_memory(self, h: Harness, addr: int, length: int) -> None:
        h.drv.write_desc(0, h.mem.alloc(1), 1, DESC_F_NEXT, 1)
        h.drv.write_desc(1, addr, length, DESC_F_WRITE)
        h.drv.publish(0)
        h.refused(lib.VQ_ERR_ADDRESS)

    @pytest.mark.parametrize(("n", "code"), [(1024, 1), (1025, lib.VQ_ERR_TOO_MANY_IOV)])
    def test_iovec_limit(self, h: Harness, n: int, code: int) -> None:
        buf = h.mem.alloc(1)
        table = h.mem.alloc(16 * n, 16)
        for j in range(n):
            h.drv.write_desc(j, buf, 1, DESC_F_NEXT if j + 1 < n else 0, j + 1, table_gpa=table)
        h.drv.write_desc(0, table, 16 * n, DESC_F_INDIRECT)
        h.drv.publish(0)
        if code == 1:
            assert h.pop() == 1 and h.chain.nread == 1024
        else:
            h.refused(code)

    def test_iovec_limit_counts_region_splits(self, make: Make) -> None:
        # 512 descriptors that each straddle a region border need 1024 iovecs; one more is too many.
        layout = [(0, 0x1000), (0x1000, 0x10000)]
        h = make(layout, features=lib.VQ_F_INDIRECT)
        n = 513
        table = h.mem.alloc(16 * n, 16)
        for j in range(n):
            more = DESC_F_NEXT if j + 1 < n else 0
            h.drv.write_desc(j, 0xFFF, 2, more, j + 1, table_gpa=table)
        h.drv.write_desc(0, table, 16 * n, DESC_F_INDIRECT)
        h.drv.publish(0)
        h.refused(lib.VQ_ERR_TOO_MANY_IOV)

    def test_in_use(self, make: Make) -> None:
        h = make(num=4)
        heads = [h.drv.add_chain([b"x"]) for _ in range(4)]
        for _ in heads:
            assert h.pop() == 1
        h.drv.publish(heads[0])  # a driver reusing a descriptor still in flight
        h.refused(lib.VQ_ERR_INUSE)
        assert lib.vq_push(h.ring, heads[0], 0) == 0
        assert h.pop() == 1

    def test_strerror(self) -> None:
        codes = error_codes()
        assert len(codes) == 14
        texts = {ffi.string(lib.vq_strerror(c)) for c in codes}
        assert len(texts) == len(codes)
        assert ffi.string(lib.vq_strerror(-999)) == b"unknown vring error"


# ---------------------------------------------------------------- completing


class TestPush:
    def test_used_ring_contents(self, h: Harness) -> None:
        heads = [h.drv.add_chain([b"req"], [64]) for _ in range(3)]
        for _ in heads:
            assert h.pop() == 1
        for head, n in zip(reversed(heads), (10, 20, 30), strict=True):
            assert lib.vq_push(h.ring, head, n) == 0
        assert h.drv.used_idx == 3 and h.ring.used_idx == 3 and h.ring.inflight == 0
        assert h.drv.used_entries() == list(zip(reversed(heads), (10, 20, 30), strict=True))

    def test_reply_bytes_reach_the_guest(self, h: Harness) -> None:
        head = h.drv.add_chain([b"req"], [5, 5])
        assert h.pop() == 1
        w = h.chain.iov + h.chain.nread
        assert lib.vq_iov_write(w, h.chain.nwrite, 3, b"abcdef", 6) == 6
        assert lib.vq_push(h.ring, head, 9) == 0
        assert h.drv.read_writable(head) == b"\0\0\0abcdef\0"

    def test_bad_head(self, h: Harness) -> None:
        h.drv.add_chain([b"x"])
        assert h.pop() == 1
        assert lib.vq_push(h.ring, 8, 0) == lib.VQ_ERR_USED_HEAD
        assert lib.vq_push(h.ring, 0xFFFF, 0) == lib.VQ_ERR_USED_HEAD
        assert h.ring.inflight == 1 and h.drv.used_idx == 0

    def test_nothing_in_flight(self, h: Harness) -> None:
        assert lib.vq_push(h.ring, 0, 0) == lib.VQ_ERR_USED_HEAD
        assert h.drv.used_idx == 0


def need_event(event: int, new: int, old: int) -> bool:
    """virtio's vring_need_event, in Python: did used idx pass `event` going from old to new?"""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


class TestNotify:
    def test_without_event_idx(self, h: Harness) -> None:
        assert lib.vq_should_notify(h.ring) == 1
        h.drv.avail_flags = AVAIL_F_NO_INTERRUPT
        assert lib.vq_should_notify(h.ring) == 0

    def test_event_idx_first_time_always(self, make: Make) -> None:
        h = make(features=lib.VQ_F_EVENT_IDX)
        h.drv.used_event = 0x100  # far away, but nothing is known yet
        assert lib.vq_should_notify(h.ring) == 1
        assert h.ring.signalled_used_valid == 1
        assert lib.vq_should_notify(h.ring) == 0  # nothing new since

    @pytest.mark.parametrize(
        ("old", "new", "event", "expected"),
        [
            (5, 6, 5, True),  # the driver asked for the entry we just published
            (5, 6, 6, False),  # ... for the next one
            (5, 6, 4, False),  # ... for one it was already told about
            (5, 9, 7, True),  # event inside a batch
            (5, 9, 9, False),
            (5, 5, 5, False),  # nothing new
            (0xFFFE, 2, 0xFFFF, True),  # across the u16 wrap
            (0xFFFE, 2, 2, False),
            (0xFFFE, 2, 1, True),
        ],
    )
    def test_event_idx_cases(
        self, make: Make, old: int, new: int, event: int, expected: bool
    ) -> None:
        assert need_event(event, new, old) == expected  # the table agrees with the formula
        h = make(features=lib.VQ_F_EVENT_IDX)
        self.check(h, old, new, event)

    @settings(max_examples=300)
    @given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 0xFFFF))
    def test_event_idx_matches_formula(self, old: int, new: int, event: int) -> None:
        h = Harness(features=lib.VQ_F_EVENT_IDX)
        try:
            self.check(h, old, new, event)
        finally:
            h.close()

    @staticmethod
    def check(h: Harness, old: int, new: int, event: int) -> None:
        h.ring.signalled_used = old
        h.ring.signalled_used_valid = 1
        h.ring.used_idx = new
        h.drv.used_event = event
        h.drv.avail_flags = AVAIL_F_NO_INTERRUPT  # ignored under EVENT_IDX
        assert lib.vq_should_notify(h.ring) == need_event(event, new, old)
        assert h.ring.signalled_used == new

    def test_complete_writes_eventfd(self, h: Harness) -> None:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            heads = [h.drv.add_chain([b"x"], [8]) for _ in range(3)]
            for _ in heads:
                assert h.pop() == 1
            assert lib.vq_complete(h.ring, heads[0], 8, fd) == 1
            assert os.eventfd_read(fd) == 1
            h.drv.avail_flags = AVAIL_F_NO_INTERRUPT
            assert lib.vq_complete(h.ring, heads[1], 8, fd) == 0
            with pytest.raises(BlockingIOError):
                os.eventfd_read(fd)
            h.drv.avail_flags = 0
            assert lib.vq_complete(h.ring, heads[2], 8, -1) == 0
            assert lib.vq_complete(h.ring, 9, 8, fd) == lib.VQ_ERR_USED_HEAD
            assert h.drv.used_entries() == [(head, 8) for head in heads]
        finally:
            os.close(fd)

    def test_complete_with_saturated_eventfd(self, h: Harness) -> None:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            os.eventfd_write(fd, 0xFFFF_FFFF_FFFF_FFFE)  # the next write would block
            head = h.drv.add_chain([b"x"])
            assert h.pop() == 1
            assert lib.vq_complete(h.ring, head, 0, fd) == 1  # an interrupt is pending anyway
        finally:
            os.close(fd)

    def test_complete_event_idx(self, make: Make) -> None:
        h = make(features=lib.VQ_F_EVENT_IDX)
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            heads = [h.drv.add_chain([b"x"]) for _ in range(4)]
            for _ in heads:
                assert h.pop() == 1
            assert lib.vq_complete(h.ring, heads[0], 0, fd) == 1  # first: always
            h.drv.used_event = 2  # wake me once used idx passes 2
            assert lib.vq_complete(h.ring, heads[1], 0, fd) == 0  # used idx 2
            assert lib.vq_complete(h.ring, heads[2], 0, fd) == 1  # used idx 3
            assert lib.vq_complete(h.ring, heads[3], 0, fd) == 0
            assert os.eventfd_read(fd) == 2
        finally:
            os.close(fd)


class TestKicks:
    def test_flag_mode(self, h: Harness) -> None:
        assert lib.vq_set_kicks(h.ring, 0) == 0
        assert h.drv.used_flags & USED_F_NO_NOTIFY
        assert lib.vq_set_kicks(h.ring, 1) == 0
        assert h.drv.used_flags == 0
        lib.vq_set_kicks(h.ring, 0)
        h.drv.add_chain([b"x"])  # arrives while kicks are off
        assert lib.vq_set_kicks(h.ring, 1) == 1
        assert h.drv.used_flags == 0

    def test_event_idx_mode(self, make: Make) -> None:
        h = make(features=lib.VQ_F_EVENT_IDX)
        h.drv.add_chain([b"x"])
        assert h.pop() == 1 and h.drv.avail_event == 1
        h.mem.write_u16(h.drv.used_gpa + 4 + 8 * h.drv.num, 0)  # forget it, to see who writes
        assert lib.vq_set_kicks(h.ring, 0) == 0
        assert h.drv.avail_event == 0 and h.drv.used_flags == 0
        h.drv.add_chain([b"y"])
        assert lib.vq_set_kicks(h.ring, 1) == 1
        assert h.drv.avail_event == 1 and h.drv.used_flags == 0

    def test_pending(self, h: Harness) -> None:
        assert lib.vq_pending(h.ring) == 0
        for _ in range(3):
            h.drv.add_chain([b"x"])
        assert lib.vq_pending(h.ring) == 3
        assert h.pop() == 1
        assert lib.vq_pending(h.ring) == 2


# ---------------------------------------------------------------- iovec copies and file I/O


def scatter(sizes: Sequence[int]) -> tuple[Any, list[Any]]:
    """An iovec list over fresh zeroed C buffers of the given sizes."""
    bufs = [ffi.new("char[]", max(s, 1)) for s in sizes]
    iov = ffi.new("struct vq_iov[]", max(len(sizes), 1))
    for k, (b, s) in enumerate(zip(bufs, sizes, strict=True)):
        iov[k].base = b
        iov[k].len = s
    return iov, bufs


def gather(bufs: list[Any], sizes: Sequence[int]) -> bytes:
    return b"".join(ffi.buffer(b, s)[:] for b, s in zip(bufs, sizes, strict=True))


class TestIov:
    sizes = (3, 0, 5, 1, 0, 7)

    @settings(max_examples=200)
    @given(st.integers(0, 20), st.integers(0, 20))
    def test_read_write_across_borders(self, offset: int, length: int) -> None:
        total = sum(self.sizes)
        iov, bufs = scatter(self.sizes)
        src = bytes(range(1, length + 1))
        n = lib.vq_iov_write(iov, len(self.sizes), offset, src, length)
        expect = max(0, min(length, total - offset))
        assert n == expect
        image = bytearray(total)
        image[offset : offset + n] = src[:n]
        assert gather(bufs, self.sizes) == image
        dst = ffi.new("char[]", max(length, 1))
        assert lib.vq_iov_read(iov, len(self.sizes), offset, dst, length) == expect
        assert ffi.buffer(dst, expect)[:] == bytes(image[offset : offset + expect])

    def test_empty_list(self) -> None:
        dst = ffi.new("char[4]")
        assert lib.vq_iov_read(ffi.NULL, 0, 0, dst, 4) == 0


@pytest.fixture
def datafile() -> Iterator[tuple[int, bytes]]:
    data = os.urandom(10_000)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        yield f.fileno(), data


class TestFileIo:
    sizes = (100, 0, 1, 4096, 50, 3000)

    @pytest.mark.parametrize(
        ("offset", "length", "pos"),
        [(0, 7247, 0), (0, 100, 5), (99, 3, 0), (101, 4200, 17), (5000, 5000, 0), (0, 50, 9990)],
    )
    def test_preadv(self, datafile: tuple[int, bytes], offset: int, length: int, pos: int) -> None:
        fd, data = datafile
        iov, bufs = scatter(self.sizes)
        got = lib.vq_iov_preadv(fd, iov, len(self.sizes), offset, length, pos)
        room = max(0, sum(self.sizes) - offset)
        expect = min(length, room, len(data) - pos)  # short at end of file / end of list
        assert got == expect
        image = bytearray(sum(self.sizes))
        image[offset : offset + expect] = data[pos : pos + expect]
        assert gather(bufs, self.sizes) == image

    def test_pwritev(self) -> None:
        iov, _bufs = scatter(self.sizes)
        total = sum(self.sizes)
        payload = os.urandom(total)
        assert lib.vq_iov_write(iov, len(self.sizes), 0, payload, total) == total
        with tempfile.TemporaryFile() as f:
            fd = f.fileno()
            assert lib.vq_iov_pwritev(fd, iov, len(self.sizes), 90, 4000, 1000) == 4000
            assert os.pread(fd, 10_000, 0) == bytes(1000) + payload[90:4090]
            # len beyond the list: stops at its end
            assert lib.vq_iov_pwritev(fd, iov, len(self.sizes), total - 10, 100, 0) == 10

    def test_many_iovecs(self, datafile: tuple[int, bytes]) -> None:
        fd, data = datafile
        sizes = [3] * 3000  # more than one preadv batch (IOV_MAX)
        iov, bufs = scatter(sizes)
        assert lib.vq_iov_preadv(fd, iov, len(sizes), 1, 8999, 0) == 8999
        assert gather(bufs, sizes) == b"\0" + data[:8999]

    def test_errors(self, datafile: tuple[int, bytes]) -> None:
        fd, _ = datafile
        iov, _bufs = scatter([16])
        r, w = os.pipe()
        try:
            assert lib.vq_iov_preadv(fd, iov, 1, 0, 16, -1) == -22  # EINVAL
            assert lib.vq_iov_preadv(r, iov, 1, 0, 16, 0) == -29  # ESPIPE
        finally:
            os.close(r)
            os.close(w)
        assert lib.vq_iov_pwritev(999_999, iov, 1, 0, 16, 0) == -9  # EBADF
        assert lib.vq_iov_preadv(fd, iov, 1, 0, 0, 0) == 0


# ---------------------------------------------------------------- hostile tables

LAYOUT = [(0x0, 0x10000), (0x10000, 0x10000), (0x30000, 0x10000)]  # a split and a hole
SCRATCH = 0x10000 - 0x80  # 16 random descriptors across the split, for indirect tables

_addr = st.one_of(
    st.integers(0, 0x40000),  # mostly inside memory, sometimes in the hole or past the end
    st.sampled_from([0xFFF0, 0x1FFF8, 0x3FFF0, U64 - 8]),  # borders, and a wrap
    st.integers(0, U64 - 1),
    st.integers(0, 15).map(lambda k: SCRATCH + 16 * k),  # an indirect table
)
_len = st.one_of(
    st.integers(0, 0x100),
    st.sampled_from([0, 16, 48, 0x10000, 0x8000_0000, 0xFFFF_FFFF]),
    st.integers(0, 0xFFFF_FFFF),
)
_flags = st.one_of(
    st.sampled_from([0, DESC_F_NEXT, DESC_F_WRITE, DESC_F_WRITE | DESC_F_NEXT, DESC_F_INDIRECT]),
    st.integers(0, 0xFFFF),
)
_desc = st.tuples(_addr, _len, _flags, st.integers(0, 20))


@settings(max_examples=300, deadline=None)
@given(
    num=st.sampled_from([1, 4, 16]),
    features=st.integers(0, 3),
    table=st.lists(_desc, min_size=16, max_size=16),
    scratch=st.lists(_desc, min_size=16, max_size=16),
    heads=st.lists(st.integers(0, 17), max_size=16),
    jump=st.sampled_from([0] * 7 + [1, 2]),  # sometimes push avail->idx too far ahead
)
def test_random_tables_never_escape(
    num: int,
    features: int,
    table: list[tuple[int, int, int, int]],
    scratch: list[tuple[int, int, int, int]],
    heads: list[int],
    jump: int,
) -> None:
    h = Harness(LAYOUT, num=num, features=features, ring_region=2)
    try:
        for k, (a, n, f, nx) in enumerate(scratch):
            h.drv.write_desc(k, a, n, f, nx, table_gpa=SCRATCH)
        for k, (a, n, f, nx) in enumerate(table[:num]):
            h.drv.write_desc(k, a, n, f, nx)
        for head in heads[:num]:
            h.drv.publish(head % num if head < 16 else head)  # 16, 17: beyond any ring here
        if jump:
            h.drv.set_avail_idx(h.drv.avail_idx + num * jump)
        ranges = h.mem.hva_ranges()
        errors = set(error_codes())
        for _ in range(len(heads) + 1):
            rc = h.pop()
            if rc <= 0:
                assert rc == 0 or rc in errors
                break
            c = h.chain
            assert c.head < num and c.nread + c.nwrite <= lib.VQ_MAX_IOV
            pieces = iovs(c.iov, 0, c.nread + c.nwrite)
            for base, length in pieces:
                assert length > 0
                assert any(lo <= base and base + length <= hi for lo, hi in ranges)
            assert sum(n for _, n in pieces[: c.nread]) == c.read_len
            assert sum(n for _, n in pieces[c.nread :]) == c.write_len
            assert c.req_len == min(c.read_len, lib.VQ_REQ_BUF)
            assert lib.vq_push(h.ring, c.head, 0) == 0
    finally:
        h.close()
