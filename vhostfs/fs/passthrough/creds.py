"""Whose name new files are created in.

A request that creates a file, directory, node or symlink runs its system call with the
thread's fsuid/fsgid switched to the guest caller's ids, so the host kernel applies its own
rules: owner and group (the directory's group under set-gid, CVE-2022-0358), and S_ISGID
cleared on a file whose creator is not in its group. Switching fsuid away from 0 also drops
the file-system capabilities from the thread's effective set, so the kernel checks the
caller's permissions too. Supplementary groups are dropped once at start, or the daemon's own
groups would count as the caller's.

Only a daemon running as root switches: an unprivileged daemon creates everything as itself,
as virtiofsd does without root.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from vhostfs.fs.passthrough import syscalls
from vhostfs.fuse.ops import RequestContext

log = logging.getLogger(__name__)


def can_switch() -> bool:
    return os.geteuid() == 0


def drop_supplementary_groups() -> None:
    """Forget the daemon's supplementary groups (all threads: glibc broadcasts setgroups)."""
    if can_switch() and os.getgroups():
        os.setgroups([])
        log.info("dropped the daemon's supplementary groups")


@contextlib.contextmanager
def as_caller(ctx: RequestContext, switch: bool) -> Iterator[None]:
    """Run the body with this thread's fsuid/fsgid set to the caller's (when switch)."""
    if not switch or (ctx.uid == 0 and ctx.gid == 0):
        yield
        return
    # gid first: once fsuid is not 0 the thread could no longer change its fsgid.
    old_gid = syscalls.setfsgid(ctx.gid)
    old_uid = syscalls.setfsuid(ctx.uid)
    try:
        yield
    finally:
        syscalls.setfsuid(old_uid)
        syscalls.setfsgid(old_gid)
