"""A test-side guest: RAM regions backed by memfds, and the driver half of a split virtqueue.

GuestMemory plays QEMU's part for memory: each region is a memfd mapped in this process, with a
made-up front-end virtual address (uva) that differs from its guest physical address (gpa), so a
mix-up between the two shows. `regions` carries everything SET_MEM_TABLE needs (fd, gpa, size,
uva, mmap_offset), and `hva` lets in-process tests point the C engine at the mapping directly.

DriverRing plays the guest driver: it lays out a split ring (virtio 1.x §2.7) in GuestMemory,
adds descriptor chains, and reads back the used ring. Raw writers (`write_desc`, `publish`,
`set_avail_idx`) build the malformed layouts a hostile guest could.

Everything is little-endian, as virtio 1.x rings are.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from types import TracebackType

DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
USED_F_NO_NOTIFY = 1

UVA_BASE = 0x7F00_0000_0000
UVA_STRIDE = 1 << 36  # one front-end "mapping" per region, far apart


@dataclass
class Region:
    """One RAM region as the front-end describes it, plus where this process mapped it."""

    gpa: int
    size: int
    uva: int
    mmap_offset: int
    fd: int  # memfd; the file holds mmap_offset bytes of padding, then the region
    mapping: mmap.mmap  # the whole file, mapped from offset 0
    hva: int  # address of gpa in this process
    _pin: ctypes.c_char | None = field(default=None, repr=False)
    _next_free: int = 0  # bump allocator offset inside the region

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        return self.gpa <= gpa and gpa + length <= self.end


class GuestMemory:
    """Guest RAM made of memfd-backed regions at chosen guest physical addresses.

    layout: (gpa, size) pairs; they must not overlap. Adjacent regions (one ending where the
    next begins) let a buffer straddle two regions, a gap between them is a hole.
    mmap_offset: bytes of padding in front of each region in its memfd (as QEMU does when a RAM
    block is split into several regions).
    """

    def __init__(
        self,
        layout: Sequence[tuple[int, int]] = ((0x10_0000, 1 << 20),),
        *,
        mmap_offset: int = 0,
        uva_base: int = UVA_BASE,
    ) -> None:
        self.regions: list[Region] = []
        spans = sorted(layout)
        for (gpa, size), (next_gpa, _) in itertools.pairwise(spans):
            if gpa + size > next_gpa:
                raise ValueError(f"regions at {gpa:#x} and {next_gpa:#x} overlap")
        try:
            for i, (gpa, size) in enumerate(spans):
                self.regions.append(self._make_region(i, gpa, size, mmap_offset, uva_base))
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _make_region(i: int, gpa: int, size: int, mmap_offset: int, uva_base: int) -> Region:
        if size <= 0 or size > UVA_STRIDE:
            raise ValueError(f"bad region size {size:#x}")
        fd = os.memfd_create(f"guest-ram-{i}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, mmap_offset + size)  # sparse: untouched pages cost nothing
            mapping = mmap.mmap(
                fd,
                mmap_offset + size,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
            )
        except BaseException:
            os.close(fd)
            raise
        pin = ctypes.c_char.from_buffer(mapping)  # holds a buffer export until close()
        return Region(
            gpa=gpa,
            size=size,
            uva=uva_base + i * UVA_STRIDE,
            mmap_offset=mmap_offset,
            fd=fd,
            mapping=mapping,
            hva=ctypes.addressof(pin) + mmap_offset,
            _pin=pin,
        )

    # -- lifetime --

    def close(self) -> None:
        for r in self.regions:
            r._pin = None  # drop the export so the mmap can close
            r.mapping.close()
            os.close(r.fd)
        self.regions = []

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- what a front-end sends --

    def fds(self) -> list[int]:
        """The memfds, in region order (SET_MEM_TABLE ancillary data). Still owned by us."""
        return [r.fd for r in self.regions]

    def region_table(self) -> list[tuple[int, int, int, int]]:
        """(gpa, size, uva, mmap_offset) per region, in the order of fds()."""
        return [(r.gpa, r.size, r.uva, r.mmap_offset) for r in self.regions]

    # -- address conversion --

    def region_of(self, gpa: int, length: int = 1) -> Region:
        for r in self.regions:
            if r.contains(gpa, max(length, 1)):
                return r
        raise ValueError(f"gpa {gpa:#x}+{length:#x} is not inside one region")

    def gpa_to_uva(self, gpa: int) -> int:
        r = self.region_of(gpa)
        return r.uva + gpa - r.gpa

    def gpa_to_hva(self, gpa: int) -> int:
        r = self.region_of(gpa)
        return r.hva + gpa - r.gpa

    def hva_ranges(self) -> list[tuple[int, int]]:
        """[start, end) of every region in this process's address space."""
        return [(r.hva, r.hva + r.size) for r in self.regions]

    # -- access --

    def _pieces(self, gpa: int, length: int) -> Iterable[tuple[Region, int, int]]:
        """(region, offset in region, length) pieces of [gpa, gpa+length), across regions."""
        while length > 0:
            r = self.region_of(gpa)
            off = gpa - r.gpa
            n = min(length, r.size - off)
            yield r, off, n
            gpa += n
            length -= n

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        data = memoryview(data).cast("B")
        done = 0
        for r, off, n in self._pieces(gpa, len(data)):
            start = r.mmap_offset + off
            r.mapping[start : start + n] = data[done : done + n]
            done += n

    def read(self, gpa: int, length: int) -> bytes:
        out = bytearray()
        for r, off, n in self._pieces(gpa, length):
            start = r.mmap_offset + off
            out += r.mapping[start : start + n]
        return bytes(out)

    def write_u16(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<H", value & 0xFFFF))

    def write_u32(self, gpa: int, value: int) -> None:
        self.write(gpa, struct.pack("<I", value & 0xFFFF_FFFF))

    def read_u16(self, gpa: int) -> int:
        return int(struct.unpack("<H", self.read(gpa, 2))[0])

    def read_u32(self, gpa: int) -> int:
        return int(struct.unpack("<I", self.read(gpa, 4))[0])

    def alloc(self, size: int, align: int = 8, region: int | None = None) -> int:
        """Bump-allocate size bytes (zeroed) inside one region; returns the gpa. Never freed."""
        candidates = [self.regions[region]] if region is not None else self.regions
        for r in candidates:
            base = r.gpa + r._next_free
            gpa = (base + align - 1) // align * align
            if gpa + size <= r.end:
                r._next_free = gpa + size - r.gpa
                self.write(gpa, bytes(size))
                return gpa
        raise MemoryError(f"no room for {size:#x} bytes aligned to {align}")


@dataclass
class _Chain:
    descs: list[int]  # main-table descriptors the chain holds
    writable: list[tuple[int, int]]  # (gpa, size) of its device-writable buffers


class DriverRing:
    """The guest driver's side of one split virtqueue, laid out in GuestMemory.

    Areas are allocated with the alignment virtio 1.x requires (desc 16, avail 2, used 4);
    pass `region` to place them in a given region. Indices are free-running u16 as in the spec.
    """

    def __init__(self, mem: GuestMemory, num: int, *, region: int | None = None) -> None:
        if num <= 0 or num & (num - 1) or num > 32768:
            raise ValueError(f"queue size {num} is not a power of two <= 32768")
        self.mem = mem
        self.num = num
        self.desc_gpa = mem.alloc(16 * num, 16, region)
        self.avail_gpa = mem.alloc(6 + 2 * num, 2, region)
        self.used_gpa = mem.alloc(6 + 8 * num, 4, region)
        self.avail_idx = 0  # driver's shadow of avail->idx
        self.last_used = 0  # next used entry to read back
        self._free = list(range(num))
        self._chains: dict[int, _Chain] = {}

    # -- addresses the front-end passes in SET_VRING_ADDR --

    @property
    def desc_uva(self) -> int:
        return self.mem.gpa_to_uva(self.desc_gpa)

    @property
    def avail_uva(self) -> int:
        return self.mem.gpa_to_uva(self.avail_gpa)

    @property
    def used_uva(self) -> int:
        return self.mem.gpa_to_uva(self.used_gpa)

    # -- raw access, for malformed layouts --

    def write_desc(
        self,
        i: int,
        addr: int,
        length: int,
        flags: int = 0,
        next: int = 0,  # the spec's field name
        *,
        table_gpa: int | None = None,
    ) -> None:
        """Write descriptor i of the main table, or of the table at table_gpa (indirect)."""
        base = self.desc_gpa if table_gpa is None else table_gpa
        self.mem.write(
            base + 16 * i,
            struct.pack(
                "<QIHH",
                addr & (2**64 - 1),
                length & 0xFFFF_FFFF,
                flags & 0xFFFF,
                next & 0xFFFF,
            ),
        )

    def read_desc(self, i: int, *, table_gpa: int | None = None) -> tuple[int, int, int, int]:
        base = self.desc_gpa if table_gpa is None else table_gpa
        addr, length, flags, nxt = struct.unpack("<QIHH", self.mem.read(base + 16 * i, 16))
        return addr, length, flags, nxt

    def publish(self, head: int) -> None:
        """Put head in the next avail slot and advance avail->idx."""
        self.mem.write_u16(self.avail_gpa + 4 + 2 * (self.avail_idx % self.num), head)
        self.set_avail_idx(self.avail_idx + 1)

    def set_avail_idx(self, idx: int) -> None:
        self.avail_idx = idx & 0xFFFF
        self.mem.write_u16(self.avail_gpa + 2, self.avail_idx)

    # -- the normal driver path --

    def add_chain(
        self,
        readable: Sequence[bytes],
        writable_sizes: Sequence[int] = (),
        *,
        indirect: bool = False,
        publish: bool = True,
    ) -> int:
        """Lay out buffers and a chain for them (readable first); returns the head index."""
        bufs: list[tuple[int, int, int]] = []
        for data in readable:
            gpa = self.mem.alloc(max(len(data), 1))
            self.mem.write(gpa, data)
            bufs.append((gpa, len(data), 0))
        writable: list[tuple[int, int]] = []
        for size in writable_sizes:
            gpa = self.mem.alloc(max(size, 1))
            bufs.append((gpa, size, DESC_F_WRITE))
            writable.append((gpa, size))
        if not bufs:
            raise ValueError("a chain needs at least one buffer")

        descs = self._link(bufs, indirect)

        head = descs[0]
        self._chains[head] = _Chain(descs, writable)
        if publish:
            self.publish(head)
        return head

    def _link(self, bufs: list[tuple[int, int, int]], indirect: bool) -> list[int]:
        """Write descriptors chaining bufs (gpa, size, flags), directly or through an indirect
        table; returns the main-table descriptors used, head first."""
        if indirect:
            table = self.mem.alloc(16 * len(bufs), 16)
            for j, (gpa, size, flags) in enumerate(bufs):
                more = DESC_F_NEXT if j + 1 < len(bufs) else 0
                self.write_desc(j, gpa, size, flags | more, j + 1, table_gpa=table)
            descs = self._take(1)
            self.write_desc(descs[0], table, 16 * len(bufs), DESC_F_INDIRECT)
            return descs
        descs = self._take(len(bufs))
        for j, (gpa, size, flags) in enumerate(bufs):
            last = j + 1 == len(bufs)
            nxt = 0 if last else descs[j + 1]
            self.write_desc(descs[j], gpa, size, flags | (0 if last else DESC_F_NEXT), nxt)
        return descs

    def _take(self, n: int) -> list[int]:
        if n > len(self._free):
            raise RuntimeError(f"ring full: need {n} descriptors, {len(self._free)} free")
        # Take from the end so successive chains use descending, non-adjacent indices.
        taken = self._free[-n:][::-1]
        del self._free[-n:]
        return taken

    def add_fixed_chain(
        self,
        readable: Sequence[bytes],
        writable_sizes: Sequence[int] = (),
        *,
        indirect: bool = False,
        align: int = 8,
    ) -> FixedChain:
        """Lay out buffers and a chain (readable first) without publishing it, for re-publishing.

        The buffers and descriptors are never freed. `align` applies to the writable buffers
        (e.g. 4096 to place each in its own page, as a guest's page-cache pages are)."""
        bufs: list[tuple[int, int, int]] = []
        readable_bufs: list[tuple[int, int]] = []
        for data in readable:
            gpa = self.mem.alloc(max(len(data), 1))
            self.mem.write(gpa, data)
            bufs.append((gpa, len(data), 0))
            readable_bufs.append((gpa, len(data)))
        writable: list[tuple[int, int]] = []
        for size in writable_sizes:
            gpa = self.mem.alloc(max(size, 1), align)
            bufs.append((gpa, size, DESC_F_WRITE))
            writable.append((gpa, size))
        if not bufs:
            raise ValueError("a chain needs at least one buffer")
        descs = self._link(bufs, indirect)
        return FixedChain(descs[0], readable_bufs, writable)

    def fast(self) -> FastRing:
        """The benchmark fast path over this ring (see FastRing)."""
        return FastRing(self)

    def used_entries(self) -> list[tuple[int, int]]:
        """(id, len) of used entries published since the last call; frees their descriptors."""
        out = []
        idx = self.used_idx
        while self.last_used != idx:
            slot = self.used_gpa + 4 + 8 * (self.last_used % self.num)
            head, length = self.mem.read_u32(slot), self.mem.read_u32(slot + 4)
            out.append((head, length))
            chain = self._chains.pop(head, None)
            if chain is not None:
                self._free.extend(chain.descs)
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def writable_buffers(self, head: int) -> list[tuple[int, int]]:
        return list(self._chains[head].writable)

    def read_writable(self, head: int) -> bytes:
        """The device-writable part of an outstanding chain, concatenated."""
        return b"".join(self.mem.read(gpa, size) for gpa, size in self._chains[head].writable)

    # -- ring fields --

    @property
    def avail_flags(self) -> int:
        return self.mem.read_u16(self.avail_gpa)

    @avail_flags.setter
    def avail_flags(self, value: int) -> None:
        self.mem.write_u16(self.avail_gpa, value)

    @property
    def used_event(self) -> int:
        """EVENT_IDX: the used index after which the driver wants an interrupt."""
        return self.mem.read_u16(self.avail_gpa + 4 + 2 * self.num)

    @used_event.setter
    def used_event(self, value: int) -> None:
        self.mem.write_u16(self.avail_gpa + 4 + 2 * self.num, value)

    @property
    def used_flags(self) -> int:
        return self.mem.read_u16(self.used_gpa)

    @property
    def used_idx(self) -> int:
        return self.mem.read_u16(self.used_gpa + 2)

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        self.mem.write_u16(self.used_gpa + 2, value)

    @property
    def avail_event(self) -> int:
        """EVENT_IDX: the avail index at which the device wants the next kick."""
        return self.mem.read_u16(self.used_gpa + 4 + 8 * self.num)

    def used_elem(self, slot: int) -> tuple[int, int]:
        base = self.used_gpa + 4 + 8 * slot
        return self.mem.read_u32(base), self.mem.read_u32(base + 4)


# -- benchmark fast path ----------------------------------------------------------------------
#
# Benchmarks push many requests through the same ring, so building a chain per request would
# exhaust the bump allocator and make the front-end's own Python cost dominate. Instead chains
# are laid out once (`DriverRing.add_fixed_chain`) and their heads re-published again and again
# (`FastRing`), with ring fields accessed through precomputed offsets into the memfd mappings.
# Nothing above changes: fixed chains are never recorded in `_chains`, so `used_entries` does not
# free their descriptors, and a ring should be driven either the normal way or the fast way.


@dataclass
class FixedChain:
    """A chain laid out once and re-published many times; its descriptors stay reserved."""

    head: int
    readable: list[tuple[int, int]]  # (gpa, size) of each device-readable buffer
    writable: list[tuple[int, int]]  # (gpa, size) of each device-writable buffer


def _locate(mem: GuestMemory, gpa: int, length: int) -> tuple[mmap.mmap, int]:
    """The mapping holding [gpa, gpa+length) (one region) and the offset of gpa in it."""
    r = mem.region_of(gpa, length)
    return r.mapping, r.mmap_offset + gpa - r.gpa


def guest_view(mem: GuestMemory, gpa: int, length: int) -> memoryview:
    """A writable view of [gpa, gpa+length) inside one region, for patching requests in place."""
    mapping, off = _locate(mem, gpa, length)
    return memoryview(mapping)[off : off + length]


class FastRing:
    """Re-publish fixed chains and count completions with few Python operations each.

    Shares the avail/used indices with its DriverRing (`avail_idx`, `last_used`). Ring indices
    are read and written through memoryviews cast to u16, which move the two bytes with one
    aligned load or store: struct.pack_into/unpack_from go byte by byte, and the device could
    see (or we could read) half of an index update. Call close() before unmapping the memory."""

    def __init__(self, ring: DriverRing) -> None:
        self.ring = ring
        num = ring.num
        self._num_mask = num - 1
        avail_map, avail = _locate(ring.mem, ring.avail_gpa, 6 + 2 * num)
        used_map, used = _locate(ring.mem, ring.used_gpa, 6 + 8 * num)
        if avail % 2 or used % 4 or len(avail_map) % 2 or len(used_map) % 2:
            raise ValueError("ring not naturally aligned in its mapping (odd mmap_offset?)")
        self._avail16 = memoryview(avail_map).cast("B").cast("H")
        self._used16 = memoryview(used_map).cast("B").cast("H")
        self._used_map = used_map
        self._avail_idx_at = (avail + 2) // 2
        self._avail_ring_at = (avail + 4) // 2
        self._used_event_at = (avail + 4 + 2 * num) // 2
        self._used_idx_at = (used + 2) // 2
        self._used_ring_off = used + 4

    def close(self) -> None:
        self._avail16.release()
        self._used16.release()

    def publish(self, heads: Sequence[int]) -> None:
        """Put heads in the next avail slots, then advance avail->idx once."""
        ring = self.ring
        avail16, base, mask = self._avail16, self._avail_ring_at, self._num_mask
        idx = ring.avail_idx
        for head in heads:
            avail16[base + (idx & mask)] = head
            idx = (idx + 1) & 0xFFFF
        ring.avail_idx = idx
        avail16[self._avail_idx_at] = idx

    def set_used_event(self, value: int) -> None:
        self._avail16[self._used_event_at] = value & 0xFFFF

    def used_idx(self) -> int:
        return int(self._used16[self._used_idx_at])

    def outstanding(self) -> int:
        """Chains published and not yet seen on the used ring."""
        return (self.ring.avail_idx - self.ring.last_used) & 0xFFFF

    def reap(self) -> int:
        """Advance past every used entry published so far; returns how many there were."""
        idx = self.used_idx()
        got = (idx - self.ring.last_used) & 0xFFFF
        self.ring.last_used = idx
        return got

    def reap_entries(self) -> list[tuple[int, int]]:
        """As reap(), returning (head, written) of each entry."""
        idx = self.used_idx()
        out = []
        last = self.ring.last_used
        while last != idx:
            head, length = struct.unpack_from(
                "<II", self._used_map, self._used_ring_off + 8 * (last & self._num_mask)
            )
            out.append((head, length))
            last = (last + 1) & 0xFFFF
        self.ring.last_used = idx
        return out
