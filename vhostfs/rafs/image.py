"""Opening an image: telling RAFS v5, RAFS v6 and plain EROFS apart by their superblocks.

RAFS v5 is checked first (its magic sits at offset 0), then EROFS at offset 1024; an EROFS
image whose compat features carry the RAFS v6 bit is a nydus bootstrap.
"""

from __future__ import annotations

import os

from vhostfs.rafs import layout as L
from vhostfs.rafs.base import RafsImage
from vhostfs.rafs.erofs import ErofsImage
from vhostfs.rafs.errors import CorruptError, UnsupportedError
from vhostfs.rafs.mapped import MappedFile
from vhostfs.rafs.v5 import RafsV5Image
from vhostfs.rafs.v6 import RafsV6Image


def open_image(path: str | os.PathLike[str]) -> RafsImage:
    """Open a bootstrap or EROFS image; RafsError if it is neither or is malformed."""
    mapped = MappedFile(path)
    try:
        return _detect(mapped)(mapped)
    except BaseException:
        mapped.close()
        raise


def _detect(mapped: MappedFile) -> type[RafsImage]:
    if mapped.size >= L.RAFS_V5_MAGIC_VERSION.size:
        magic, version = mapped.unpack(L.RAFS_V5_MAGIC_VERSION, 0, "RAFS v5 superblock")
        if magic == L.RAFS_V5_MAGIC:
            if version not in (L.RAFS_V5_VERSION, L.RAFS_V4_VERSION):
                raise UnsupportedError(f"RAFS superblock: version {version:#x}")
            return RafsV5Image
    if mapped.size >= L.EROFS_SUPER_OFFSET + L.EROFS_SUPER.size:
        magic, _checksum, compat = mapped.unpack(
            L.EROFS_MAGIC_COMPAT, L.EROFS_SUPER_OFFSET, "EROFS superblock"
        )
        if magic == L.EROFS_MAGIC:
            return RafsV6Image if compat & L.COMPAT_RAFS_V6 else ErofsImage
    raise CorruptError(f"{mapped.path}: neither a RAFS v5 nor an EROFS superblock magic")
