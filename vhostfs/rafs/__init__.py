"""Reading Nydus RAFS bootstraps (v5 and v6) and plain EROFS images.

with open_image(path) as image:
    ino = image.lookup(image.root_ino, b"etc")
    data = image.read_file(ino, 0, 4096, blobs=BlobStore(blob_dir))
"""

from vhostfs.rafs.base import DirEntry, InodeAttr, RafsImage, StatFs
from vhostfs.rafs.blob import BlobInfo, BlobMetaLocation, BlobStore
from vhostfs.rafs.chunk import IN_BOOTSTRAP, ZERO_FILL, ChunkRef, Compressor, Digester
from vhostfs.rafs.errors import (
    BlobError,
    ChunkDigestError,
    CorruptError,
    InodeTypeError,
    NotDirectoryError,
    RafsError,
    UnsupportedError,
)
from vhostfs.rafs.image import open_image

__all__ = [
    "IN_BOOTSTRAP",
    "ZERO_FILL",
    "BlobError",
    "BlobInfo",
    "BlobMetaLocation",
    "BlobStore",
    "ChunkDigestError",
    "ChunkRef",
    "Compressor",
    "CorruptError",
    "Digester",
    "DirEntry",
    "InodeAttr",
    "InodeTypeError",
    "NotDirectoryError",
    "RafsError",
    "RafsImage",
    "StatFs",
    "UnsupportedError",
    "open_image",
]
