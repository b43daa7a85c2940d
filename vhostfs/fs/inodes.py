"""The nodes a guest knows about, each pinned on the host by an O_PATH descriptor.

A host inode is identified by (st_dev, st_ino) and gets one node id for as long as the guest
holds lookups on it. Holding the O_PATH descriptor keeps the host inode alive, so its number
cannot be reused by another file while the guest still refers to it. Node ids come from a
counter that never goes back, not even across sessions, so a stale id from an old session can
never name a new file.

Every descriptor kept for the guest (a node's O_PATH descriptor, an open handle) counts against
an FdQuota set below RLIMIT_NOFILE, so a guest that looks up or opens without end gets ENFILE
for its own requests while the daemon keeps the descriptors it needs itself (memory regions,
eventfds, sockets, the worker threads' opens). The quota also bounds the inode table.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import resource
from dataclasses import dataclass

from vhostfs.fuse.ops import ROOT_ID, FuseError, NodeId

log = logging.getLogger(__name__)

HostKey = tuple[int, int]  # (st_dev, st_ino)

# Descriptors left to the daemon itself: up to half the limit, never more than this.
DAEMON_RESERVE = 1024


def guest_fd_limit() -> int:
    """How many descriptors the guest may make the daemon hold, under the current limit."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(1, soft - min(soft // 2, DAEMON_RESERVE))


class FdQuota:
    """Descriptors held for the guest, and how many it may have."""

    __slots__ = ("held", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def check(self, wanted: int = 1) -> None:
        """ENFILE unless `wanted` more descriptors may be held: asked before a change that
        would keep them (a create keeps two), so that the change is not made at all."""
        if self.held + wanted > self.limit:
            raise FuseError(errno.ENFILE)

    def take(self, fd: int) -> None:
        """Count fd as held for the guest; at the limit, close it and answer ENFILE."""
        if self.held >= self.limit:
            os.close(fd)
            raise FuseError(errno.ENFILE)
        self.held += 1

    def give_back(self, count: int = 1) -> None:
        self.held = max(0, self.held - count)


@dataclass(slots=True)
class Inode:
    node_id: NodeId
    fd: int  # O_PATH | O_NOFOLLOW: names this exact inode, symlinks included, opens nothing
    key: HostKey
    mode: int  # st_mode at first lookup; the file type of an inode never changes
    nlookup: int


class InodeTable:
    """Node id → Inode with exact lookup counts. The root is pinned and never forgotten."""

    def __init__(self, root_fd: int, quota: FdQuota | None = None) -> None:
        self.quota = quota or FdQuota(guest_fd_limit())
        st = os.fstat(root_fd)
        self.root = Inode(ROOT_ID, root_fd, (st.st_dev, st.st_ino), st.st_mode, 1)
        self._by_id: dict[NodeId, Inode] = {ROOT_ID: self.root}
        self._by_key: dict[HostKey, Inode] = {self.root.key: self.root}
        self._next_id = itertools.count(ROOT_ID + 1)

    def __len__(self) -> int:
        return len(self._by_id)

    def get(self, node: NodeId) -> Inode:
        inode = self._by_id.get(node)
        if inode is None:
            raise FuseError(errno.ESTALE)
        return inode

    def find(self, key: HostKey) -> Inode | None:
        return self._by_key.get(key)

    def count_lookup(self, fd: int, st: os.stat_result) -> Inode:
        """Record one lookup of the inode fd refers to; takes ownership of fd."""
        key = (st.st_dev, st.st_ino)
        inode = self._by_key.get(key)
        if inode is not None:
            os.close(fd)
            inode.nlookup += 1
            return inode
        self.quota.take(fd)
        inode = Inode(NodeId(next(self._next_id)), fd, key, st.st_mode, 1)
        self._by_id[inode.node_id] = inode
        self._by_key[key] = inode
        return inode

    def recount(self, inode: Inode) -> Inode:
        """One more lookup of an inode already in the table."""
        inode.nlookup += 1
        return inode

    def forget(self, node: NodeId, nlookup: int) -> None:
        """Drop lookups; at zero the node goes and its descriptor is closed. Never raises."""
        inode = self._by_id.get(node)
        if inode is None or inode is self.root:
            return
        if nlookup > inode.nlookup:
            log.warning(
                "guest forgot node %d %d times but looked it up %d", node, nlookup, inode.nlookup
            )
        inode.nlookup -= min(nlookup, inode.nlookup)
        if inode.nlookup == 0:
            del self._by_id[node]
            del self._by_key[inode.key]
            _close_quietly(inode.fd)
            self.quota.give_back()

    def reset(self) -> None:
        """Forget every node but the root (a new session starts)."""
        for inode in self._by_id.values():
            if inode is not self.root:
                _close_quietly(inode.fd)
        self.quota.give_back(len(self._by_id) - 1)
        self._by_id = {ROOT_ID: self.root}
        self._by_key = {self.root.key: self.root}

    def close(self) -> None:
        self.reset()
        _close_quietly(self.root.fd)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        log.warning("closing fd %d failed", fd, exc_info=True)
