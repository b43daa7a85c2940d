"""Everything the RAFS reader raises.

The bootstrap and the blobs come from whoever built the image, so bad bytes are an expected
input, not a bug: each failure is a RafsError whose message names the structure and field that
was wrong. `errno` is what a file system serving the image should answer with.
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
    """A data blob is missing, short, or holds chunk bytes that do not decode."""


class ChunkDigestError(BlobError):
    """A chunk decoded, but its digest differs from the one the bootstrap records."""
