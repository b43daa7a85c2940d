"""Everything the storage layer raises.

Storage errors are not image-format errors: a blob that cannot be fetched or does not decode
says nothing about the bootstrap, and a network backend must be able to tell a failure worth
retrying from a permanent one. Each error carries the errno a file system serving the data
should answer with (EIO for all of them today) and a message naming the blob and chunk.
"""

import errno as _errno


class StorageError(Exception):
    """The image's data cannot be served for this request."""

    errno = _errno.EIO


class BackendError(StorageError):
    """A blob range could not be fetched: missing blob, I/O error, short read, refused request.

    `retryable` says whether the same request may succeed later (a timeout, a 503), as opposed
    to a missing blob or a refused credential."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class ChunkDecodeError(StorageError):
    """A chunk's stored bytes do not decompress to what the image says they hold."""


class ChunkDigestError(ChunkDecodeError):
    """A chunk decoded, but its digest differs from the one the bootstrap records."""


class ChunkRefError(StorageError):
    """The refs a reader handed over are inconsistent: a blob that is not in the table, a chunk
    outside its blob, refs that do not cover the range asked for, sizes out of bounds. They come
    from the image, so this is a damaged image, but it is found here."""


class CacheError(StorageError):
    """The chunk cache of a blob cannot be opened (a blob id that cannot name a file...)."""


class StorageClosedError(StorageError):
    """The storage was closed before or while serving the request."""
