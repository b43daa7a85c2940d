"""Guest RAM as the front-end shares it: one mmap per region, and the C table rings translate with.

Regions come and go while rings run (QEMU's ADD/REM_MEM_REG follow the guest's memory map, and
SET_MEM_TABLE is resent at every start). A chain popped before a change still holds host pointers
into the old mappings, so a replaced mapping is retired, not unmapped, until no chain is in flight.
"""

import itertools
import logging
import mmap
import os
import stat
from dataclasses import dataclass
from typing import Any

from vhostfs._vring import ffi, lib
from vhostfs.vhost.codec import MemRegion, PayloadError

log = logging.getLogger(__name__)

U64_LIMIT = 1 << 64


@dataclass
class MappedRegion:
    region: MemRegion
    mapping: mmap.mmap
    view: Any  # the cffi buffer pinning `mapping`; released before unmapping

    @property
    def hva(self) -> int:
        return int(ffi.cast("uintptr_t", self.view)) + self.region.mmap_offset

    def unmap(self) -> None:
        ffi.release(self.view)
        self.mapping.close()


def _check_region(region: MemRegion, fd: int) -> None:
    if region.size == 0:
        raise PayloadError("memory region of size 0")
    for name, start in (("gpa", region.gpa), ("uva", region.uva), ("offset", region.mmap_offset)):
        if start + region.size > U64_LIMIT:
            raise PayloadError(f"memory region {name} {start:#x}+{region.size:#x} wraps")
    info = os.fstat(fd)
    # Touching a mapping past the end of its file raises SIGBUS, which would kill the daemon.
    if stat.S_ISREG(info.st_mode) and info.st_size < region.mmap_offset + region.size:
        raise PayloadError(
            f"memory region at gpa {region.gpa:#x} runs past the end of its file "
            f"({region.mmap_offset:#x}+{region.size:#x} > {info.st_size:#x})"
        )


def _map(region: MemRegion, fd: int) -> MappedRegion:
    """Map the region's fd and take ownership of it (it is closed here, mapped or not)."""
    try:
        _check_region(region, fd)
        # Map from file offset 0 as libvhost-user does, so mmap_offset needs no page alignment.
        mapping = mmap.mmap(
            fd,
            region.mmap_offset + region.size,
            flags=mmap.MAP_SHARED,
            prot=mmap.PROT_READ | mmap.PROT_WRITE,
        )
    except OSError as exc:
        raise PayloadError(f"cannot map memory region at gpa {region.gpa:#x}: {exc}") from None
    finally:
        os.close(fd)
    return MappedRegion(region, mapping, ffi.from_buffer(mapping))


class GuestMemory:
    def __init__(self) -> None:
        self.table = ffi.new("struct vq_memory *")
        self._regions: list[MappedRegion] = []
        self._retired: list[MappedRegion] = []
        self.users = 0  # chains in flight, which hold pointers into the mappings

    @property
    def regions(self) -> list[MemRegion]:
        return [mapped.region for mapped in self._regions]

    def replace(self, regions: list[MemRegion], fds: list[int]) -> None:
        """SET_MEM_TABLE: the whole map at once. Takes ownership of fds."""
        mapped = _map_all(regions, fds)
        self._retire(self._regions)
        self._regions = mapped
        self._publish()

    def add(self, region: MemRegion, fd: int) -> None:
        """ADD_MEM_REG. Takes ownership of fd."""
        if len(self._regions) >= lib.VQ_MAX_REGIONS:
            os.close(fd)
            raise PayloadError(f"no free memory slot (all {lib.VQ_MAX_REGIONS} in use)")
        mapped = _map(region, fd)
        try:
            _check_disjoint([*self.regions, region])
        except PayloadError:
            mapped.unmap()
            raise
        self._regions.append(mapped)
        self._publish()

    def remove(self, region: MemRegion) -> None:
        """REM_MEM_REG: matched on gpa, uva and size; QEMU sends mmap_offset 0."""
        for mapped in self._regions:
            known = mapped.region
            if (known.gpa, known.uva, known.size) == (region.gpa, region.uva, region.size):
                self._regions.remove(mapped)
                self._retire([mapped])
                self._publish()
                return
        raise PayloadError(f"no memory region at gpa {region.gpa:#x} size {region.size:#x}")

    def clear(self) -> None:
        self._retire(self._regions)
        self._regions = []
        self._publish()

    def release(self) -> None:
        """A chain that was in flight has been completed."""
        self.users -= 1
        if self.users == 0 and self._retired:
            self._unmap_retired()

    def _retire(self, mapped: list[MappedRegion]) -> None:
        self._retired += mapped
        if self.users == 0:
            self._unmap_retired()

    def _unmap_retired(self) -> None:
        for mapped in self._retired:
            mapped.unmap()
        self._retired = []

    def _publish(self) -> None:
        self._regions.sort(key=lambda mapped: mapped.region.gpa)
        # Rings keep reading the table while it changes only between our own callbacks
        # (single-threaded), so rewriting it in place is safe.
        for i, mapped in enumerate(self._regions):
            entry = self.table.regions[i]
            entry.gpa = mapped.region.gpa
            entry.size = mapped.region.size
            entry.uva = mapped.region.uva
            entry.hva = mapped.hva
        self.table.nregions = len(self._regions)
        log.debug(
            "guest memory: %s",
            ", ".join(f"gpa {m.region.gpa:#x}+{m.region.size:#x}" for m in self._regions),
        )


def _map_all(regions: list[MemRegion], fds: list[int]) -> list[MappedRegion]:
    unmapped = list(fds)
    mapped: list[MappedRegion] = []
    try:
        if len(regions) != len(fds):
            raise PayloadError(f"{len(regions)} memory regions but {len(fds)} fds")
        if len(regions) > lib.VQ_MAX_REGIONS:
            raise PayloadError(f"{len(regions)} memory regions, at most {lib.VQ_MAX_REGIONS}")
        for region in regions:
            mapped.append(_map(region, unmapped.pop(0)))
        _check_disjoint(regions)
    except PayloadError:
        for fd in unmapped:
            os.close(fd)
        for m in mapped:
            m.unmap()
        raise
    return mapped


def _check_disjoint(regions: list[MemRegion]) -> None:
    ordered = sorted(regions, key=lambda region: region.gpa)
    for low, high in itertools.pairwise(ordered):
        if low.gpa + low.size > high.gpa:
            raise PayloadError(f"memory regions at gpa {low.gpa:#x} and {high.gpa:#x} overlap")
