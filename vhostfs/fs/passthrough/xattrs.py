"""Setting and removing extended attributes.

Through /proc/self/fd/N, which reaches the node's own inode without opening it: a symlink's
xattrs are its own (the kernel refuses user.* on symlinks), and a FIFO or device is never
opened. user.*, trusted.* and security.* pass through as far as the daemon's privileges go;
trusted.* is what overlayfs in the guest keeps its whiteouts, opaque dirs and redirects in.
With an xattr map (xattrmap.py) the names are the host's under the map, after its refusals.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import Final

from vhostfs.fs.passthrough.core import PassthroughCore, proc_path
from vhostfs.fuse.ops import FuseError, NodeId, RequestContext

_XATTR_FLAGS: Final = os.XATTR_CREATE | os.XATTR_REPLACE


class XattrOps(PassthroughCore):
    async def setxattr(
        self,
        node: NodeId,
        name: bytes,
        value: bytes,
        flags: int,
        ctx: RequestContext,
        *,
        kill_sgid: bool = False,
    ) -> None:
        self.check_xattr()
        self.check_writable()
        if flags & ~_XATTR_FLAGS or b"\0" in name:
            raise FuseError(errno.EINVAL)
        name = self.host_xattr_name(name)
        inode = self.inodes.get(node)
        os.setxattr(proc_path(inode.fd), name, value, flags)
        if kill_sgid:
            # The host set the ACL as root, who keeps S_ISGID; the guest's caller may not.
            mode = os.fstat(inode.fd).st_mode
            if mode & stat.S_ISGID and not stat.S_ISLNK(mode):
                os.chmod(proc_path(inode.fd), stat.S_IMODE(mode) & ~stat.S_ISGID)

    async def removexattr(self, node: NodeId, name: bytes, ctx: RequestContext) -> None:
        self.check_xattr()
        self.check_writable()
        if b"\0" in name:
            raise FuseError(errno.EINVAL)
        name = self.host_xattr_name(name)
        os.removexattr(proc_path(self.inodes.get(node).fd), name)
