"""Everything the RAFS reader raises.

The bootstrap and the blobs come from whoever built the image, so bad bytes are an expected
input, not a bug: each failure is a RafsError whose message names the structure and field that
was wrong. `errno` is what a file system serving the image should answer with. Fetching and
decoding blob data is the storage layer's business, with its own errors (vhostfs.storage.errors).
"""

import errno as _errno


class RafsError(Exception):
    """The image, or a blob it refers to, cannot serve this request."""

    errno = _errno.EIO


class CorruptError(RafsError):
    """The on-disk metadata is inconsistent: out of bounds, overlapping, unsorted, looping."""


class UnsupportedError(RafsError):
    """Well-formed, but uses a layout or feature this reader refuses (compression, ZRan...)."""

    errno = _errno.EOPNOTSUPP


class NotDirectoryError(RafsError):
    """A directory operation on an inode that is not a directory."""

    errno = _errno.ENOTDIR


class InodeTypeError(RafsError):
    """An operation that does not apply to this kind of inode (readlink of a file...)."""

    errno = _errno.EINVAL


class BlobError(RafsError):
    """A data blob's own metadata (ToC, chunk-info array, digest array) is inconsistent, or
    disagrees with the bootstrap. Failures to fetch or decode blob bytes are storage errors
    (vhostfs.storage.errors), not format errors."""
