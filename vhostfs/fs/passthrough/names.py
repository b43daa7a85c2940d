"""Containment rule for names: one guest name is one path component, resolved relative to a
directory's O_PATH descriptor and nothing else.

The dispatcher already refuses '/' and empty names; these checks are repeated here so that the
file system holds on its own, whoever calls it. No host path string is ever built from a guest
name: names only ever reach *at() system calls next to a directory descriptor.
"""

from __future__ import annotations

import errno
from typing import Final

from vhostfs.fuse.ops import FuseError

NAME_MAX: Final = 255


def checked_name(name: bytes) -> bytes:
    """A name for an op that creates, removes or renames: no '/', no NUL, not "." or ".."."""
    if not name or b"/" in name or b"\0" in name or name in (b".", b".."):
        raise FuseError(errno.EINVAL)
    if len(name) > NAME_MAX:
        raise FuseError(errno.ENAMETOOLONG)
    return name


def checked_lookup_name(name: bytes) -> bytes:
    """LOOKUP alone may name "." and ".." (the caller keeps ".." inside the export)."""
    if name in (b".", b".."):
        return name
    return checked_name(name)
