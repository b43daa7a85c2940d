"""Reading Nydus RAFS bootstraps (v5 and v6) and plain EROFS images.

with open_image(path) as image, SyncStorage(config, image.blobs, bootstrap=path) as storage:
    ino = image.lookup(image.root_ino, b"etc")
    data = read_file(image, storage, ino, 0, 4096)

The format package only reads metadata; the blob vocabulary it hands out (BlobInfo, ChunkRef,
Compressor...) and everything that fetches or decodes blob bytes live in vhostfs.storage.
"""

from vhostfs.rafs.base import DirEntry, InodeAttr, RafsImage, StatFs
from vhostfs.rafs.errors import (
    BlobError,
    CorruptError,
    InodeTypeError,
    NotDirectoryError,
    RafsError,
    UnsupportedError,
)
from vhostfs.rafs.file_data import read_file
from vhostfs.rafs.image import open_image

__all__ = [
    "BlobError",
    "CorruptError",
    "DirEntry",
    "InodeAttr",
    "InodeTypeError",
    "NotDirectoryError",
    "RafsError",
    "RafsImage",
    "StatFs",
    "UnsupportedError",
    "open_image",
    "read_file",
]
