"""SETATTR, WRITE, the syncs, FALLOCATE, COPY_FILE_RANGE and LSEEK through the passthrough."""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import time
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.passthrough_guest import ROOT, Guest
from vhostfs.fs import Passthrough
from vhostfs.fs.passthrough.handles import Handles
from vhostfs.fuse.abi import SetattrValid as V
from vhostfs.fuse.ops import FuseError, NodeId

WRITE_KILL_SUIDGID = 1 << 2
FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE = 1, 2
CAP = "security.capability"
# A valid v2 file capability (cap_net_raw+ep), as setcap writes it.
CAP_BLOB = bytes.fromhex("0100000200200000000000000000000000000000")


def _attr(w: Guest, raw: bytes) -> fc.FuseAttr:
    return fc.parse_attr_out(w.send(raw).payload).attr


def test_small_and_large_writes(w: Guest, tree: Path) -> None:
    node, fh = w.create(ROOT, b"data")
    small, large = os.urandom(4096), os.urandom(1 << 20)  # the large one runs on a worker
    assert fc.parse_u32_size(w.send(fc.write(node, fh, 0, small)).payload) == 4096
    assert fc.parse_u32_size(w.send(fc.write(node, fh, 4096, large)).payload) == 1 << 20
    assert (tree / "data").read_bytes() == small + large
    assert w.send(fc.fsync(node, fh)).error == 0
    assert w.send(fc.fsync(node, fh, datasync=True)).error == 0
    assert w.send(fc.flush(node, fh)).error == 0
    assert w.send(fc.syncfs()).error == 0
    dfh = w.opendir(ROOT)
    assert w.send(fc.fsyncdir(ROOT, dfh)).error == 0


def test_writes_are_concurrent_with_other_requests(w: Guest) -> None:
    """An offloaded write does not hold up a GETATTR sent after it."""
    node, fh = w.create(ROOT, b"big")
    order: list[str] = []

    async def both() -> None:
        async def write() -> None:
            await w.asend(fc.write(node, fh, 0, os.urandom(1 << 20)))
            order.append("write")

        async def stat_root() -> None:
            await w.asend(fc.getattr_(ROOT))
            order.append("getattr")

        await asyncio.gather(write(), stat_root())

    w.loop.run_until_complete(both())
    assert order == ["getattr", "write"]


def test_write_refusals(w: Guest, tree: Path) -> None:
    node, fh = w.create(ROOT, b"f")
    other = w.walk(b"file.txt")
    ro = w.open(other)
    assert w.errno_of(fc.write(other, ro, 0, b"x")) == errno.EBADF  # opened read-only
    assert w.errno_of(fc.write(other, fh, 0, b"x")) == errno.EBADF  # another node's handle
    assert w.errno_of(fc.write(node, 999, 0, b"x")) == errno.EBADF
    assert w.errno_of(fc.write(node, fh, 1 << 63, b"x")) == errno.EINVAL
    assert w.errno_of(fc.write(node, fh, 2**64 - 4096, b"x")) == errno.EINVAL
    assert w.errno_of(fc.write(node, fh, 2**63 - 10, b"x" * 4096)) == errno.EFBIG
    assert w.errno_of(fc.write(node, fh, 0, b"x" * 10, size=4096)) == errno.EINVAL
    assert (tree / "file.txt").read_bytes() == b"hello world\n"
    assert w.send(fc.release(node, fh)).error == 0
    assert w.errno_of(fc.write(node, fh, 0, b"x")) == errno.EBADF  # after RELEASE


@pytest.mark.parametrize(
    ("mode", "after"), [(0o6777, 0o0777), (0o6755, 0o0755), (0o6745, 0o2745), (0o4700, 0o700)]
)
def test_write_kill_suidgid(w: Guest, tree: Path, mode: int, after: int) -> None:
    path = tree / "setid"
    path.write_bytes(b"")
    path.chmod(mode)
    os.setxattr(path, CAP, CAP_BLOB)
    node = w.walk(b"setid")
    fh = w.open(node, os.O_WRONLY)
    assert w.send(fc.write(node, fh, 0, b"plain")).error == 0
    assert stat.S_IMODE(path.stat().st_mode) == mode  # no flag: a privileged writer
    os.setxattr(path, CAP, CAP_BLOB)  # (the host kernel drops capabilities on any write)
    killing = fc.write(node, fh, 0, b"x", write_flags=WRITE_KILL_SUIDGID, uid=1000, gid=1000)
    assert w.send(killing).error == 0
    assert stat.S_IMODE(path.stat().st_mode) == after  # S_ISGID stays unless group-exec
    assert CAP not in os.listxattr(path)


def test_killpriv_v2_and_setxattr_ext_are_negotiated_unless_off(tree: Path) -> None:
    asked = fc.HANDLE_KILLPRIV_V2 | fc.SETXATTR_EXT
    cases = [((False, True), asked), ((False, False), fc.SETXATTR_EXT), ((True, True), 0)]
    for (readonly, killpriv_v2), flags in cases:
        fs = Passthrough(tree, readonly=readonly, killpriv_v2=killpriv_v2)
        try:
            assert Guest(fs).init.flags & asked == flags, (readonly, killpriv_v2)
        finally:
            fs.close()


@pytest.mark.parametrize(("kill", "after"), [(True, 0o0755), (False, 0o6755)])
def test_truncating_open_kills_suidgid_when_flagged(
    w: Guest, tree: Path, kill: bool, after: int
) -> None:
    path = tree / "setid"
    path.write_bytes(b"data")
    path.chmod(0o6755)
    node = w.walk(b"setid")
    flags = os.O_WRONLY | os.O_TRUNC
    opened = w.send(fc.open_(node, flags, open_flags=int(kill), uid=1000, gid=1000))
    assert opened.error == 0
    assert path.read_bytes() == b"" and stat.S_IMODE(path.stat().st_mode) == after
    # Without O_TRUNC the flag changes nothing: writes carry their own.
    path.chmod(0o6755)
    assert w.send(fc.open_(node, os.O_WRONLY, open_flags=1, uid=1000, gid=1000)).error == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o6755


def test_acl_kill_sgid_clears_only_s_isgid(w: Guest, tree: Path) -> None:
    path = tree / "shared"
    path.write_bytes(b"")
    path.chmod(0o6775)
    node = w.walk(b"shared")
    assert w.init.flags & fc.SETXATTR_EXT
    assert w.send(w.setxattr(node, b"user.acl", b"1", setxattr_flags=1)).error == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o4775
    assert os.getxattr(path, "user.acl") == b"1"
    path.chmod(0o2775)
    assert w.send(w.setxattr(node, b"user.acl", b"2")).error == 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o2775


def test_setattr_mode_owner_size_times(w: Guest, tree: Path) -> None:
    node = w.walk(b"file.txt")
    assert _attr(w, fc.setattr_(node, V.MODE, 0o600)).mode & 0o7777 == 0o600
    owned = _attr(w, fc.setattr_(node, V.UID | V.GID, uid=1234, gid=5678))
    assert (owned.uid, owned.gid) == (1234, 5678) == (os.stat(tree / "file.txt").st_uid, 5678)
    assert _attr(w, fc.setattr_(node, V.SIZE, size=5)).size == 5
    assert (tree / "file.txt").read_bytes() == b"hello"
    fh = w.open(node, os.O_RDWR)
    assert _attr(w, fc.setattr_(node, V.SIZE | V.FH, size=2, fh=fh)).size == 2
    ro = w.open(node)
    assert w.errno_of(fc.setattr_(node, V.SIZE | V.FH, size=0, fh=ro)) == errno.EBADF
    times = _attr(w, fc.setattr_(node, V.ATIME | V.MTIME, atime=1_000_000, mtime=2_000_000))
    assert (times.atime, times.mtime) == (1_000_000, 2_000_000)
    only_m = _attr(w, fc.setattr_(node, V.MTIME, mtime=3_000_000))
    assert (only_m.atime, only_m.mtime) == (1_000_000, 3_000_000)
    now = _attr(w, fc.setattr_(node, V.MTIME | V.MTIME_NOW))
    assert abs(now.mtime - time.time()) < 60 and now.atime == 1_000_000
    assert w.errno_of(fc.setattr_(node, V.SIZE, size=1 << 63)) == errno.EINVAL
    assert w.errno_of(fc.setattr_(w.walk(b"sub"), V.SIZE, size=0)) == errno.EISDIR


def test_setattr_kill_suidgid_and_chown_drop_privileges(w: Guest, tree: Path) -> None:
    path = tree / "exec.sh"
    path.chmod(0o6755)
    os.setxattr(path, CAP, CAP_BLOB)
    node = w.walk(b"exec.sh")
    w.send(fc.setattr_(node, V.SIZE | V.KILL_SUIDGID, size=0, uid=1000, gid=1000))
    assert stat.S_IMODE(path.stat().st_mode) == 0o755 and CAP not in os.listxattr(path)
    path.chmod(0o4755)
    os.setxattr(path, CAP, CAP_BLOB)
    w.send(fc.setattr_(node, V.UID, uid=1000))  # the host kernel drops both on chown
    assert stat.S_IMODE(path.stat().st_mode) == 0o755 and CAP not in os.listxattr(path)


def test_setattr_on_a_symlink_acts_on_the_link(w: Guest, tree: Path) -> None:
    victim = tree.parent / "outside-dir" / "victim"
    (tree / "s").symlink_to(victim)
    before = victim.stat()
    node = w.walk(b"s")
    assert w.errno_of(fc.setattr_(node, V.MODE, 0o4777)) == errno.EOPNOTSUPP
    assert w.errno_of(fc.setattr_(node, V.SIZE, size=0)) == errno.EINVAL
    assert w.send(fc.setattr_(node, V.UID | V.GID, uid=1000, gid=1000)).error == 0
    assert w.send(fc.setattr_(node, V.ATIME | V.MTIME, atime=5, mtime=6)).error == 0
    link = os.lstat(tree / "s")
    assert (link.st_uid, link.st_mtime) == (1000, 6)
    after = victim.stat()
    assert (after.st_mode, after.st_uid, after.st_size, after.st_mtime_ns) == (
        before.st_mode,
        before.st_uid,
        before.st_size,
        before.st_mtime_ns,
    )


def test_setattr_of_a_fifo_never_opens_it(w: Guest, tree: Path) -> None:
    node = w.walk(b"fifo")
    assert w.errno_of(fc.setattr_(node, V.SIZE, size=0)) == errno.EINVAL  # no blocking open
    assert w.send(fc.setattr_(node, V.MODE, 0o600)).error == 0
    assert stat.S_IMODE(os.lstat(tree / "fifo").st_mode) == 0o600


def test_fallocate(w: Guest, tree: Path) -> None:
    node, fh = w.create(ROOT, b"alloc")
    assert w.send(fc.fallocate(node, fh, 0, 1 << 20)).error == 0
    assert os.stat(tree / "alloc").st_size == 1 << 20
    w.send(fc.write(node, fh, 0, b"\xff" * 8192))
    punch = fc.fallocate(node, fh, 0, 4096, FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE)
    assert w.send(punch).error == 0
    assert (tree / "alloc").read_bytes()[:8192] == b"\0" * 4096 + b"\xff" * 4096
    assert w.errno_of(fc.fallocate(node, fh, 0, 0)) == errno.EINVAL
    assert w.errno_of(fc.fallocate(node, fh, 2**63 - 2, 4096)) == errno.EFBIG
    ro = w.open(node)
    assert w.errno_of(fc.fallocate(node, ro, 0, 4096)) == errno.EBADF


def test_copy_file_range(w: Guest, tree: Path) -> None:
    src = w.walk(b"file.txt")
    src_fh = w.open(src)
    dst, dst_fh = w.create(ROOT, b"copy")
    copied = w.send(fc.copy_file_range(src, src_fh, dst, dst_fh, 5, off_out=2))
    assert fc.parse_u32_size(copied.payload) == 5
    assert (tree / "copy").read_bytes() == b"\0\0hello"
    flagged = fc.copy_file_range(src, src_fh, dst, dst_fh, 5, flags=1)
    assert w.errno_of(flagged) == errno.EINVAL
    assert w.errno_of(fc.copy_file_range(src, src_fh, src, src_fh, 5)) == errno.EBADF
    assert w.errno_of(fc.copy_file_range(dst, src_fh, dst, dst_fh, 5)) == errno.EBADF
    huge = fc.copy_file_range(src, src_fh, dst, dst_fh, 2**64 - 1)
    assert fc.parse_u32_size(w.send(huge).payload) == 12  # a short copy, to the end


def test_lseek_after_writes(w: Guest) -> None:
    node, fh = w.create(ROOT, b"holes")
    w.send(fc.write(node, fh, 1 << 20, b"tail"))
    assert w.errno_of(fc.lseek(node, fh, 0, os.SEEK_DATA)) == 0
    data = fc.parse_lseek_out(w.send(fc.lseek(node, fh, 0, os.SEEK_DATA)).payload)
    assert 0 < data <= 1 << 20
    assert w.errno_of(fc.lseek(node, fh, (1 << 20) + 10, os.SEEK_DATA)) == errno.ENXIO
    assert w.errno_of(fc.lseek(node, fh, 0, 7)) == errno.EINVAL
    assert w.errno_of(fc.lseek(ROOT, fh, 0, os.SEEK_DATA)) == errno.EBADF


def test_open_with_truncate_and_writeback_upgrade(tree: Path) -> None:
    from vhostfs.fs import Passthrough

    fs = Passthrough(tree, writeback=True)
    try:
        g = Guest(fs, flags=fc.WRITEBACK_CACHE)
        node = g.walk(b"file.txt")
        fh = g.open(node, os.O_WRONLY | os.O_APPEND)
        # The guest's page cache reads around partial writes: a write-only handle reads too.
        assert g.read(node, fh, 0, 5) == b"hello"
        g.open(node, os.O_WRONLY | os.O_TRUNC)
        assert (tree / "file.txt").read_bytes() == b""
    finally:
        fs.close()


def test_a_handle_in_use_outlives_its_release() -> None:
    handles = Handles()
    fd = os.open("/dev/null", os.O_WRONLY)
    fh = handles.add_file(NodeId(5), fd, True)
    handle = handles.writable_file(fh, NodeId(5))
    with handles.using(handle) as used:
        handles.release_file(fh, NodeId(5))
        os.fstat(used)  # still open: a worker may be writing through it
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(FuseError):
        handles.file(fh, NodeId(5))
    assert len(handles) == 0


def test_attributes_after_writes_are_fresh(w: Guest) -> None:
    node, fh = w.create(ROOT, b"grow")
    before = _attr(w, fc.getattr_(node))
    time.sleep(0.01)
    w.send(fc.write(node, fh, 0, b"x" * 5000))
    after = _attr(w, fc.getattr_(node))
    assert (before.size, after.size) == (0, 5000)
    assert after.mtime * 10**9 + after.mtimensec > before.mtime * 10**9 + before.mtimensec
