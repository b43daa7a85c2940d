"""READDIR and READDIRPLUS: pack as many entries as fit into the guest's buffer.

The file system's listing is consumed lazily and abandoned at the first entry that does not fit,
so entries are never produced for nothing. For READDIRPLUS the lookup of an entry happens only
after it is known to fit, which makes "every counted lookup reaches the guest" hold by
construction; "." and ".." go out with node id 0 and are never looked up.
"""

from __future__ import annotations

import errno
import logging

from vhostfs.fuse import abi
from vhostfs.fuse.call import Call, Reply
from vhostfs.fuse.ops import FileHandle, FuseError, Operations

log = logging.getLogger(__name__)


async def _list_dir(ops: Operations, call: Call, plus: bool) -> Reply:
    fh, offset, size, *_ = abi.READ_IN.unpack_from(call.args)
    budget = min(size, call.room)
    entries = await ops.readdir(call.node, FileHandle(fh), offset, call.ctx)
    out = bytearray()
    for entry in entries:
        name = entry.name
        if not name or b"/" in name or b"\0" in name:
            log.warning("readdir skipped an unencodable name %r", name)
            continue
        need = abi.direntplus_size(len(name)) if plus else abi.dirent_size(len(name))
        if len(out) + need > budget:
            if not out:  # not even one entry fits: an empty reply would read as end of dir
                raise FuseError(errno.EINVAL)
            break
        if not plus:
            out += abi.pack_dirent(entry.ino, entry.next_offset, entry.kind, name)
            continue
        # The lookup happens only now that the entry is known to fit, so every counted lookup
        # reaches the guest.
        if name in (b".", b".."):
            found = abi.negative_entry_out(entry.ino, entry.kind)
        else:
            try:
                looked_up = await ops.lookup(call.node, name, call.ctx)
            except (FuseError, OSError) as exc:
                if exc.errno == errno.ENOENT:
                    continue  # vanished since the listing was taken
                found = abi.negative_entry_out(entry.ino, entry.kind)
            else:
                if looked_up.node_id == 0:
                    continue
                found = abi.pack_entry_out(looked_up)
        out += abi.pack_direntplus(found, entry.ino, entry.next_offset, entry.kind, name)
    return out


async def readdir(ops: Operations, call: Call) -> Reply:
    return await _list_dir(ops, call, plus=False)


async def readdirplus(ops: Operations, call: Call) -> Reply:
    return await _list_dir(ops, call, plus=True)
