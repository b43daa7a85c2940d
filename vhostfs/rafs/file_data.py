"""Reading a file's bytes outside the daemon: the image says where they are, the storage layer
fetches and decodes them, through the same path the daemon serves guests from."""

from __future__ import annotations

import stat

from vhostfs.rafs.base import RafsImage
from vhostfs.rafs.errors import InodeTypeError
from vhostfs.storage.sync import SyncStorage


def read_file(image: RafsImage, storage: SyncStorage, ino: int, offset: int, size: int) -> bytes:
    """File bytes [offset, offset + size), clipped at the end of the file. RafsError when the
    image cannot say where they are, StorageError when they cannot be fetched or decoded."""
    attr = image.getattr(ino)
    if not stat.S_ISREG(attr.mode):
        raise InodeTypeError(f"inode {ino}: not a regular file (mode {attr.mode:o})")
    end = min(offset + size, attr.size)
    if offset >= end:
        return b""
    return storage.read(image.chunks(ino, offset, end - offset), offset, end)
