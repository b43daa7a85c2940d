"""File systems served over FUSE."""

from vhostfs.fs.passthrough import CachePolicy, Passthrough
from vhostfs.fs.readonly import ReadOnlyOperations

__all__ = ["CachePolicy", "Passthrough", "ReadOnlyOperations"]
