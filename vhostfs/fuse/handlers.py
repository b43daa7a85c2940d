"""One coroutine per opcode: decode the in-args, call Operations, encode the reply payload.

A handler gets a `Call` whose args the dispatcher has already bounded (header checked, at least
`Spec.min_args` bytes present) and returns the reply payload that follows fuse_out_header:
bytes (b"" for a bare header), a FileSlice for READ data, or NO_REPLY. Failures are raised as
FuseError/OSError and turned into error replies by the dispatcher. `SPECS` at the bottom is the
opcode table.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Sequence
from typing import Final

from vhostfs.fuse import abi
from vhostfs.fuse.abi import InitFlag, Opcode, SetattrValid
from vhostfs.fuse.call import (
    NO_REPLY,
    Call,
    GuestPayload,
    Reply,
    Spec,
    cstring,
    name_arg,
    offset_arg,
    xattr_name_arg,
)
from vhostfs.fuse.listing import readdir, readdirplus
from vhostfs.fuse.ops import (
    FileHandle,
    FileSlice,
    FuseError,
    NodeId,
    Operations,
    SetattrChanges,
)

log = logging.getLogger(__name__)

# The kernel caps copy_file_range at this so the byte count fits write_out.size.
_COPY_MAX: Final = 0xFFFF_F000
_RENAME_FLAGS: Final = 0x7  # NOREPLACE | EXCHANGE | WHITEOUT


def _sized_reply(data: bytes, size: int, room: int) -> bytes:
    """GETXATTR/LISTXATTR: size 0 asks only for the length; too small a buffer is ERANGE."""
    if size == 0:
        return abi.GETXATTR_OUT.pack(len(data), 0)
    if len(data) > min(size, room):
        raise FuseError(errno.ERANGE)
    return data


async def _forget_quietly(ops: Operations, batch: Sequence[tuple[NodeId, int]]) -> None:
    try:
        await ops.forget(batch)
    except Exception:
        # The guest gets no reply to FORGET, so there is nobody to tell; keep serving.
        log.warning("forget raised", exc_info=True)


async def _lookup(ops: Operations, call: Call) -> Reply:
    name, _ = name_arg(call.args)
    return abi.pack_entry_out(await ops.lookup(call.node, name, call.ctx))


async def _forget(ops: Operations, call: Call) -> Reply:
    (nlookup,) = abi.FORGET_IN.unpack_from(call.args)
    await _forget_quietly(ops, [(call.node, nlookup)])
    return NO_REPLY


async def _batch_forget(ops: Operations, call: Call) -> Reply:
    count, _ = abi.BATCH_FORGET_IN.unpack_from(call.args)
    start = abi.BATCH_FORGET_IN.size
    if start + count * abi.FORGET_ONE.size > len(call.args):
        raise FuseError(errno.EINVAL)
    batch = [
        (NodeId(node), nlookup)
        for node, nlookup in abi.FORGET_ONE.iter_unpack(
            call.args[start : start + count * abi.FORGET_ONE.size]
        )
    ]
    await _forget_quietly(ops, batch)
    return NO_REPLY


async def _getattr(ops: Operations, call: Call) -> Reply:
    flags, _, fh = abi.GETATTR_IN.unpack_from(call.args)
    handle = FileHandle(fh) if flags & abi.GETATTR_FH else None
    reply = abi.pack_attr_out(await ops.getattr(call.node, handle, call.ctx))
    _offer_constant(ops, call, Opcode.GETATTR, reply)
    return reply


# OPEN's answer from a file system with constant replies depends on these flags only.
_OPEN_FLAGS_THAT_MATTER: Final = os.O_ACCMODE | os.O_TRUNC


def _offer_constant(
    ops: Operations, call: Call, opcode: Opcode, reply: bytes, arg_mask: int = 0
) -> None:
    """A reply the file system says never changes for this node: let the transport give it
    itself next time (vhostfs.vhost.direct), for requests shaped like this one."""
    direct = call.req.direct
    if direct is not None and direct.enabled and ops.constant_replies(call.node):
        first_arg = int.from_bytes(call.args[:4], "little") if arg_mask else 0
        direct.add_constant(call.node, opcode, len(call.args), arg_mask, first_arg, reply)


async def _setattr(ops: Operations, call: Call) -> Reply:
    valid, _, fh, size, _, *times, mode, _, uid, gid, _ = abi.SETATTR_IN.unpack_from(call.args)
    atime, mtime, ctime, atime_ns, mtime_ns, ctime_ns = times
    v = SetattrValid(valid)
    changes = SetattrChanges(
        mode=mode if v & SetattrValid.MODE else None,
        uid=uid if v & SetattrValid.UID else None,
        gid=gid if v & SetattrValid.GID else None,
        size=offset_arg(size) if v & SetattrValid.SIZE else None,
        atime_ns=atime * 1_000_000_000 + atime_ns if v & SetattrValid.ATIME else None,
        mtime_ns=mtime * 1_000_000_000 + mtime_ns if v & SetattrValid.MTIME else None,
        ctime_ns=ctime * 1_000_000_000 + ctime_ns if v & SetattrValid.CTIME else None,
        atime_now=bool(v & SetattrValid.ATIME_NOW),
        mtime_now=bool(v & SetattrValid.MTIME_NOW),
        kill_suidgid=bool(v & SetattrValid.KILL_SUIDGID),
    )
    handle = FileHandle(fh) if v & SetattrValid.FH else None
    return abi.pack_attr_out(await ops.setattr(call.node, handle, changes, call.ctx))


async def _readlink(ops: Operations, call: Call) -> Reply:
    target = await ops.readlink(call.node, call.ctx)
    if len(target) > call.room:
        raise FuseError(errno.ERANGE)
    return target


async def _symlink(ops: Operations, call: Call) -> Reply:
    name, after = name_arg(call.args)
    target, _ = cstring(call.args, after, abi.PATH_MAX, errno.ENAMETOOLONG)
    return abi.pack_entry_out(await ops.symlink(call.node, name, target, call.ctx))


async def _mknod(ops: Operations, call: Call) -> Reply:
    mode, rdev, umask, _ = abi.MKNOD_IN.unpack_from(call.args)
    name, _ = name_arg(call.args, abi.MKNOD_IN.size)
    return abi.pack_entry_out(await ops.mknod(call.node, name, mode, rdev, umask, call.ctx))


async def _mkdir(ops: Operations, call: Call) -> Reply:
    mode, umask = abi.MKDIR_IN.unpack_from(call.args)
    name, _ = name_arg(call.args, abi.MKDIR_IN.size)
    return abi.pack_entry_out(await ops.mkdir(call.node, name, mode, umask, call.ctx))


async def _unlink(ops: Operations, call: Call) -> Reply:
    name, _ = name_arg(call.args)
    await ops.unlink(call.node, name, call.ctx)
    return b""


async def _rmdir(ops: Operations, call: Call) -> Reply:
    name, _ = name_arg(call.args)
    await ops.rmdir(call.node, name, call.ctx)
    return b""


async def _rename_common(ops: Operations, call: Call, new_dir: int, flags: int, at: int) -> Reply:
    if flags & ~_RENAME_FLAGS:
        raise FuseError(errno.EINVAL)
    old, after = name_arg(call.args, at)
    new, _ = name_arg(call.args, after)
    await ops.rename(call.node, old, NodeId(new_dir), new, flags, call.ctx)
    return b""


async def _rename(ops: Operations, call: Call) -> Reply:
    (new_dir,) = abi.RENAME_IN.unpack_from(call.args)
    return await _rename_common(ops, call, new_dir, 0, abi.RENAME_IN.size)


async def _rename2(ops: Operations, call: Call) -> Reply:
    new_dir, flags, _ = abi.RENAME2_IN.unpack_from(call.args)
    return await _rename_common(ops, call, new_dir, flags, abi.RENAME2_IN.size)


async def _link(ops: Operations, call: Call) -> Reply:
    (old_node,) = abi.LINK_IN.unpack_from(call.args)
    name, _ = name_arg(call.args, abi.LINK_IN.size)
    return abi.pack_entry_out(await ops.link(NodeId(old_node), call.node, name, call.ctx))


def _offer_idle(ops: Operations, call: Call, opcode: Opcode) -> None:
    """FLUSH or RELEASE had nothing to do, and the file system says so for a whole range of
    nodes: let the transport answer those itself."""
    direct = call.req.direct
    if direct is not None and direct.enabled:
        nodes = ops.idle_range(call.node)
        if nodes is not None:
            direct.add_empty_range(opcode, len(call.args), *nodes)


async def _open(ops: Operations, call: Call) -> Reply:
    flags, open_flags = abi.OPEN_IN.unpack_from(call.args)
    kill_suidgid = bool(open_flags & abi.OPEN_KILL_SUIDGID)
    out = await ops.open(call.node, flags, call.ctx, kill_suidgid=kill_suidgid)
    reply = abi.OPEN_OUT.pack(out.fh, out.flags, 0)
    _offer_constant(ops, call, Opcode.OPEN, reply, _OPEN_FLAGS_THAT_MATTER)
    return reply


async def _read(ops: Operations, call: Call) -> Reply:
    fh, offset, size, *_ = abi.READ_IN.unpack_from(call.args)
    size = min(size, call.room)
    offset = offset_arg(offset)
    data = await ops.read(call.node, FileHandle(fh), offset, size, call.ctx)
    if isinstance(data, list):
        if len(data) != 1:
            return _clip_pieces(data, size)
        data = data[0]
    if isinstance(data, FileSlice):
        _offer_direct(ops, call, fh, offset)
        return data if data.size <= size else FileSlice(data.fd, data.pos, size)
    return data if len(data) <= size else data[:size]


def _offer_direct(ops: Operations, call: Call, fh: int, offset: int) -> None:
    """A READ served from a host file: let the transport answer the next ones around it."""
    direct = call.req.direct
    if direct is not None and direct.enabled:
        span = ops.direct_span(call.node, FileHandle(fh), offset)
        if span is not None:
            start, end, eof = span.file_start, span.file_end, span.eof
            direct.add(call.node, fh, start, end, eof, span.fd, span.pos, span.tag)


def _clip_pieces(pieces: list[FileSlice | bytes], size: int) -> list[FileSlice | bytes]:
    """The pieces covering the first `size` bytes, so a reply never outgrows the room."""
    clipped: list[FileSlice | bytes] = []
    for piece in pieces:
        length = piece.size if isinstance(piece, FileSlice) else len(piece)
        if length >= size:
            if size:
                clipped.append(
                    FileSlice(piece.fd, piece.pos, size)
                    if isinstance(piece, FileSlice)
                    else piece[:size]
                )
            break
        clipped.append(piece)
        size -= length
    return clipped


async def _write(ops: Operations, call: Call) -> Reply:
    fh, offset, size, write_flags, *_ = abi.WRITE_IN.unpack_from(call.args)
    if size != call.payload_len or size > call.max_write:
        raise FuseError(errno.EINVAL)
    data = GuestPayload(call.req, abi.IN_HEADER.size + abi.WRITE_IN.size, size)
    written = await ops.write(
        call.node, FileHandle(fh), offset_arg(offset), data, write_flags, call.ctx
    )
    return abi.WRITE_OUT.pack(min(written, size), 0)


async def _statfs(ops: Operations, call: Call) -> Reply:
    return abi.pack_statfs(await ops.statfs(call.node, call.ctx))


async def _release(ops: Operations, call: Call) -> Reply:
    fh, flags, _, _ = abi.RELEASE_IN.unpack_from(call.args)
    direct = call.req.direct
    if direct is not None:
        direct.drop(call.node, fh)  # before the file system closes the fd behind it
    await ops.release(call.node, FileHandle(fh), flags)
    _offer_idle(ops, call, Opcode.RELEASE)
    return b""


async def _fsync(ops: Operations, call: Call) -> Reply:
    fh, fsync_flags, _ = abi.FSYNC_IN.unpack_from(call.args)
    await ops.fsync(call.node, FileHandle(fh), bool(fsync_flags & 1))
    return b""


async def _setxattr(ops: Operations, call: Call) -> Reply:
    setxattr_flags = 0
    if call.session_flags & InitFlag.SETXATTR_EXT:
        if len(call.args) < abi.SETXATTR_IN_EXT.size:
            raise FuseError(errno.EINVAL)
        size, flags, setxattr_flags, _ = abi.SETXATTR_IN_EXT.unpack_from(call.args)
        name_at = abi.SETXATTR_IN_EXT.size
    else:
        size, flags = abi.SETXATTR_IN.unpack_from(call.args)
        name_at = abi.SETXATTR_IN.size
    if size > abi.XATTR_SIZE_MAX:
        raise FuseError(errno.E2BIG)
    name, after = xattr_name_arg(call.args, name_at)
    if after + size > len(call.args):
        raise FuseError(errno.EINVAL)
    value = call.args[after : after + size].tobytes()
    kill_sgid = bool(setxattr_flags & abi.SETXATTR_ACL_KILL_SGID)
    await ops.setxattr(call.node, name, value, flags, call.ctx, kill_sgid=kill_sgid)
    return b""


async def _getxattr(ops: Operations, call: Call) -> Reply:
    size, _ = abi.GETXATTR_IN.unpack_from(call.args)
    name, _ = xattr_name_arg(call.args, abi.GETXATTR_IN.size)
    value = await ops.getxattr(call.node, name, call.ctx)
    return _sized_reply(value, size, call.room)


async def _listxattr(ops: Operations, call: Call) -> Reply:
    size, _ = abi.GETXATTR_IN.unpack_from(call.args)
    names = await ops.listxattr(call.node, call.ctx)
    return _sized_reply(b"".join(name + b"\0" for name in names), size, call.room)


async def _removexattr(ops: Operations, call: Call) -> Reply:
    name, _ = xattr_name_arg(call.args, 0)
    await ops.removexattr(call.node, name, call.ctx)
    return b""


async def _flush(ops: Operations, call: Call) -> Reply:
    fh, _, _, lock_owner = abi.FLUSH_IN.unpack_from(call.args)
    await ops.flush(call.node, FileHandle(fh), lock_owner)
    _offer_idle(ops, call, Opcode.FLUSH)
    return b""


async def _opendir(ops: Operations, call: Call) -> Reply:
    flags, _ = abi.OPEN_IN.unpack_from(call.args)
    out = await ops.opendir(call.node, flags, call.ctx)
    return abi.OPEN_OUT.pack(out.fh, out.flags, 0)


async def _releasedir(ops: Operations, call: Call) -> Reply:
    fh, _, _, _ = abi.RELEASE_IN.unpack_from(call.args)
    await ops.releasedir(call.node, FileHandle(fh))
    return b""


async def _fsyncdir(ops: Operations, call: Call) -> Reply:
    fh, fsync_flags, _ = abi.FSYNC_IN.unpack_from(call.args)
    await ops.fsyncdir(call.node, FileHandle(fh), bool(fsync_flags & 1))
    return b""


async def _access(ops: Operations, call: Call) -> Reply:
    mask, _ = abi.ACCESS_IN.unpack_from(call.args)
    await ops.access(call.node, mask, call.ctx)
    return b""


async def _create(ops: Operations, call: Call) -> Reply:
    flags, mode, umask, _ = abi.CREATE_IN.unpack_from(call.args)
    name, _ = name_arg(call.args, abi.CREATE_IN.size)
    entry, opened = await ops.create(call.node, name, mode, flags, umask, call.ctx)
    return abi.pack_entry_out(entry) + abi.OPEN_OUT.pack(opened.fh, opened.flags, 0)


async def _tmpfile(ops: Operations, call: Call) -> Reply:
    flags, mode, umask, _ = abi.CREATE_IN.unpack_from(call.args)
    entry, opened = await ops.tmpfile(call.node, mode, flags, umask, call.ctx)
    return abi.pack_entry_out(entry) + abi.OPEN_OUT.pack(opened.fh, opened.flags, 0)


async def _interrupt(ops: Operations, call: Call) -> Reply:
    # Linux virtio-fs never interrupts; requests here finish quickly anyway.
    return NO_REPLY


async def _fallocate(ops: Operations, call: Call) -> Reply:
    fh, offset, length, mode, _ = abi.FALLOCATE_IN.unpack_from(call.args)
    await ops.fallocate(call.node, FileHandle(fh), offset_arg(offset), offset_arg(length), mode)
    return b""


async def _lseek(ops: Operations, call: Call) -> Reply:
    fh, offset, whence, _ = abi.LSEEK_IN.unpack_from(call.args)
    position = await ops.lseek(call.node, FileHandle(fh), offset, whence)
    return abi.LSEEK_OUT.pack(position)


async def _copy_file_range(ops: Operations, call: Call) -> Reply:
    fh_in, off_in, node_out, fh_out, off_out, length, flags = abi.COPY_FILE_RANGE_IN.unpack_from(
        call.args
    )
    length = min(length, _COPY_MAX)
    copied = await ops.copy_file_range(
        call.node,
        FileHandle(fh_in),
        offset_arg(off_in),
        NodeId(node_out),
        FileHandle(fh_out),
        offset_arg(off_out),
        length,
        flags,
    )
    return abi.WRITE_OUT.pack(min(copied, length), 0)


async def _syncfs(ops: Operations, call: Call) -> Reply:
    await ops.syncfs(call.node)
    return b""


_ENTRY: Final = abi.ENTRY_OUT.size
_OPEN: Final = abi.OPEN_OUT.size

# INIT and DESTROY change the session, so the dispatcher handles them itself. Opcodes missing
# here (locks, ioctl, poll, bmap, DAX mappings, statx, ...) are answered with ENOSYS.
SPECS: Final[dict[int, Spec]] = {
    Opcode.LOOKUP: Spec(_lookup, 0, _ENTRY),
    Opcode.FORGET: Spec(_forget, abi.FORGET_IN.size, 0, replies=False),
    Opcode.GETATTR: Spec(_getattr, abi.GETATTR_IN.size, abi.ATTR_OUT.size),
    Opcode.SETATTR: Spec(_setattr, abi.SETATTR_IN.size, abi.ATTR_OUT.size),
    Opcode.READLINK: Spec(_readlink, 0, 0),
    Opcode.SYMLINK: Spec(_symlink, 0, _ENTRY),
    Opcode.MKNOD: Spec(_mknod, abi.MKNOD_IN.size, _ENTRY),
    Opcode.MKDIR: Spec(_mkdir, abi.MKDIR_IN.size, _ENTRY),
    Opcode.UNLINK: Spec(_unlink, 0, 0),
    Opcode.RMDIR: Spec(_rmdir, 0, 0),
    Opcode.RENAME: Spec(_rename, abi.RENAME_IN.size, 0),
    Opcode.LINK: Spec(_link, abi.LINK_IN.size, _ENTRY),
    Opcode.OPEN: Spec(_open, abi.OPEN_IN.size, _OPEN),
    Opcode.READ: Spec(_read, abi.READ_IN.size, 0),
    Opcode.WRITE: Spec(_write, abi.WRITE_IN.size, abi.WRITE_OUT.size),
    Opcode.STATFS: Spec(_statfs, 0, abi.STATFS_OUT.size),
    Opcode.RELEASE: Spec(_release, abi.RELEASE_IN.size, 0),
    Opcode.FSYNC: Spec(_fsync, abi.FSYNC_IN.size, 0),
    Opcode.SETXATTR: Spec(_setxattr, abi.SETXATTR_IN.size, 0),
    Opcode.GETXATTR: Spec(_getxattr, abi.GETXATTR_IN.size, 0),
    Opcode.LISTXATTR: Spec(_listxattr, abi.GETXATTR_IN.size, 0),
    Opcode.REMOVEXATTR: Spec(_removexattr, 0, 0),
    Opcode.FLUSH: Spec(_flush, abi.FLUSH_IN.size, 0),
    Opcode.OPENDIR: Spec(_opendir, abi.OPEN_IN.size, _OPEN),
    Opcode.READDIR: Spec(readdir, abi.READ_IN.size, 0),
    Opcode.RELEASEDIR: Spec(_releasedir, abi.RELEASE_IN.size, 0),
    Opcode.FSYNCDIR: Spec(_fsyncdir, abi.FSYNC_IN.size, 0),
    Opcode.ACCESS: Spec(_access, abi.ACCESS_IN.size, 0),
    Opcode.CREATE: Spec(_create, abi.CREATE_IN.size, _ENTRY + _OPEN),
    Opcode.INTERRUPT: Spec(_interrupt, abi.INTERRUPT_IN.size, 0, replies=False),
    Opcode.BATCH_FORGET: Spec(_batch_forget, abi.BATCH_FORGET_IN.size, 0, replies=False),
    Opcode.FALLOCATE: Spec(_fallocate, abi.FALLOCATE_IN.size, 0),
    Opcode.READDIRPLUS: Spec(readdirplus, abi.READ_IN.size, 0),
    Opcode.RENAME2: Spec(_rename2, abi.RENAME2_IN.size, 0),
    Opcode.LSEEK: Spec(_lseek, abi.LSEEK_IN.size, abi.LSEEK_OUT.size),
    Opcode.COPY_FILE_RANGE: Spec(_copy_file_range, abi.COPY_FILE_RANGE_IN.size, abi.WRITE_OUT.size),
    Opcode.SYNCFS: Spec(_syncfs, 8, 0),
    Opcode.TMPFILE: Spec(_tmpfile, abi.CREATE_IN.size, _ENTRY + _OPEN),
}
