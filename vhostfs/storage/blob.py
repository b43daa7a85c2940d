"""The blob vocabulary the image formats and the storage layer share.

A BlobInfo is one row of an image's blob table (RAFS v6 blob table, RAFS v5 blob table plus
its extended table, or an EROFS extra device). A ChunkRef says where the bytes for one stretch
of a file are: in a data blob (compressed or not, with a digest to check), in the bootstrap file
itself (plain EROFS layouts), or nowhere (a hole that reads as zeros).

These types sit in the storage layer, below the format readers, as nydus keeps `BlobInfo` and
`BlobChunkInfo` in its storage crate: the readers produce them, storage consumes them, and
storage never needs to know which format they came from.
"""

from __future__ import annotations

import enum
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

# ChunkRef.blob_index values that do not name a blob.
IN_BOOTSTRAP: Final = -1  # the bytes sit uncompressed in the bootstrap (image) file itself
ZERO_FILL: Final = -2  # a hole: nothing is stored, the range reads as zeros


class Compressor(enum.Enum):
    NONE = "none"
    LZ4_BLOCK = "lz4_block"
    GZIP = "gzip"
    ZSTD = "zstd"


class Digester(enum.Enum):
    BLAKE3 = "blake3"
    SHA256 = "sha256"


# Numeric codes of the blob table and the blob meta header.
COMPRESSOR_BY_CODE: Final = {
    0: Compressor.NONE,
    1: Compressor.LZ4_BLOCK,
    2: Compressor.GZIP,
    3: Compressor.ZSTD,
}
DIGESTER_BY_CODE: Final = {0: Digester.BLAKE3, 1: Digester.SHA256}


@dataclass(frozen=True, slots=True)
class BlobMetaLocation:
    """Where a RAFS v6 blob keeps its chunk-info array and table of contents."""

    ci_compressor: Compressor
    ci_offset: int
    ci_compressed_size: int
    ci_uncompressed_size: int
    chunk_info_v2: bool
    toc_size: int  # ToC entries plus their tar header; 0 when the blob has no ToC
    toc_digest: bytes  # sha256 of those bytes


@dataclass(frozen=True, slots=True)
class BlobInfo:
    index: int
    blob_id: str  # the name to fetch it by; empty for an anonymous EROFS device
    compressor: Compressor
    digester: Digester | None  # None: the image records no chunk digests (plain EROFS)
    chunk_size: int
    chunk_count: int
    compressed_size: int | None  # None when the image does not say
    uncompressed_size: int | None
    features: int
    meta: BlobMetaLocation | None = None


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """The bytes of file range [file_offset, file_offset + uncompressed_size)."""

    file_offset: int
    blob_index: int  # index into the image's blobs, or IN_BOOTSTRAP / ZERO_FILL
    compressed_offset: int  # in the blob (or the bootstrap file)
    compressed_size: int
    uncompressed_offset: int  # in the blob's uncompressed address space
    uncompressed_size: int
    compressed: bool
    digest: bytes | None  # of the uncompressed bytes, when the image records one
    chunk_index: int | None = None  # entry in the blob's chunk-info array, for error messages

    @property
    def file_end(self) -> int:
        return self.file_offset + self.uncompressed_size

    def describe(self, blob_id: str) -> str:
        index = "" if self.chunk_index is None else f" chunk {self.chunk_index}"
        return (
            f"blob {blob_id or self.blob_index}{index} "
            f"(compressed {self.compressed_offset}+{self.compressed_size})"
        )


def blob_names(blob_ids: Sequence[str]) -> list[str]:
    """The name each blob of an image's blob table is fetched by, in table order.

    Normally its id. A blob with no id (an anonymous EROFS extra device), or whose id another
    blob of the table also carries, is named by its slot instead. Such a name contains a space,
    which the ids images carry (hex digests, printable device tags) never do, so it cannot
    collide with one.
    """
    counts = Counter(blob_ids)
    return [
        blob_id if blob_id and counts[blob_id] == 1 else f"<device {index}>"
        for index, blob_id in enumerate(blob_ids)
    ]
