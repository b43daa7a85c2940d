"""A bootstrap file mapped read-only, read only through bounds-checked accessors.

Every offset and length the readers use comes from the file itself, so each access checks the
range against the file size first and names what it was reading when it does not fit. Nothing
else in the package touches the mapping directly.

The mapping assumes the file is not truncated while it is open (bootstraps are immutable); a
shrinking file would fault on access, like any mmap reader.
"""

from __future__ import annotations

import itertools
import mmap
import os
import struct
from typing import Any

from vhostfs.rafs.errors import CorruptError


class MappedFile:
    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            self.size = os.fstat(f.fileno()).st_size
            # mmap refuses empty files; an empty image fails detection anyway.
            self._data: mmap.mmap | bytes = (
                mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) if self.size else b""
            )

    def close(self) -> None:
        if isinstance(self._data, mmap.mmap):
            self._data.close()
        self._data = b""

    def check_range(self, offset: int, length: int, what: str) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise CorruptError(
                f"{what}: bytes {offset}..{offset + length} lie outside the image "
                f"({self.size} bytes)"
            )

    def unpack(self, layout: struct.Struct, offset: int, what: str) -> tuple[Any, ...]:
        self.check_range(offset, layout.size, what)
        return layout.unpack_from(self._data, offset)

    def read(self, offset: int, length: int, what: str) -> bytes:
        self.check_range(offset, length, what)
        return self._data[offset : offset + length]

    def check_regions(self, regions: list[tuple[str, int, int]], what: str) -> None:
        """Each (name, offset, length) lies inside the file and no two overlap."""
        present = sorted((region for region in regions if region[2]), key=lambda r: r[1])
        for name, offset, length in present:
            self.check_range(offset, length, f"{what} {name}")
        for (name, offset, length), (next_name, next_offset, _) in itertools.pairwise(present):
            if offset + length > next_offset:
                raise CorruptError(f"{what} {name} overlaps the {next_name}")
