"""Export of a host directory, read-write by default, read-only on request.

The package splits the work: core (nodes, handles, the reading ops, the worker pool), names
(the containment rule for guest names), creds (per-request fsuid/fsgid), namespace (creating,
linking, renaming, removing), data (SETATTR, WRITE, syncs, FALLOCATE, COPY_FILE_RANGE), xattrs,
and syscalls (what Python's os module lacks). Locks (GETLK/SETLK/FLOCK) are not implemented:
they answer ENOSYS and the guest kernel keeps locks local, as with virtiofsd's default.
"""

from vhostfs.fs.passthrough.core import CachePolicy
from vhostfs.fs.passthrough.data import DataOps
from vhostfs.fs.passthrough.namespace import NamespaceOps
from vhostfs.fs.passthrough.xattrs import XattrOps


class Passthrough(NamespaceOps, DataOps, XattrOps):
    """A host directory for one guest; see core.PassthroughCore for the options."""


__all__ = ["CachePolicy", "Passthrough"]
