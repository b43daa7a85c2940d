"""Raw attacks from a hostile guest, after the reference's list (rw-passthrough-security.md §2).

Each attack sends crafted FUSE requests through the real dispatcher and checks the errno; then,
for every one, nothing outside the export has changed (a snapshot of the export's parent
directory, taken before, still matches) and the daemon keeps serving. Containment must hold
without a sandbox, which is what these check; the races with the host (B11, B12, D26) are in
test_passthrough_races.py, the sandbox's items (H46-H50) with the daemon that has it. Every
attack runs twice: against a session that reads directories without handles (fh 0,
NO_OPENDIR_SUPPORT negotiated) and one with handles.
"""

from __future__ import annotations

import errno
import os
import resource
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.passthrough_guest import HANDLES_KERNEL, ROOT, Guest, snapshot_around
from vhostfs.fs import Passthrough
from vhostfs.fuse.abi import SetattrValid as V

Attack = Callable[[Guest, Path], None]
ATTACKS: dict[str, Attack] = {}


def attack(fn: Attack) -> Attack:
    ATTACKS[fn.__name__] = fn
    return fn


@pytest.fixture(params=[fc.ALL_FLAGS, HANDLES_KERNEL], ids=["fh0", "handles"])
def w(rw: Passthrough, request: pytest.FixtureRequest) -> Guest:
    return Guest(rw, flags=request.param)


def _einval(w: Guest, *raws: bytes) -> None:
    for raw in raws:
        assert w.errno_of(raw) == errno.EINVAL, raw


# A. Names and paths.


@attack
def a1_slash_in_create_type_names(w: Guest, tree: Path) -> None:
    _einval(
        w,
        fc.symlink(ROOT, b"/tmp/pwn", b"x"),
        fc.mkdir(ROOT, b"../../escape"),
        fc.mknod(ROOT, b"a/b", stat.S_IFREG | 0o644),
        fc.create(ROOT, b"/etc/cron.d/pwn"),
        fc.symlink(ROOT, b"../outside-link", b"x"),
    )


@attack
def a2_slash_and_dots_in_destructive_ops(w: Guest, tree: Path) -> None:
    sub = w.walk(b"sub")
    node = w.walk(b"file.txt")
    _einval(
        w,
        fc.unlink(ROOT, b"../outside.txt"),
        fc.unlink(sub, b".."),
        fc.rmdir(sub, b".."),
        fc.rmdir(sub, b"."),
        fc.rename(sub, b".", ROOT, b"x"),
        fc.rename(ROOT, b"file.txt", ROOT, b".."),
        fc.rename2(ROOT, b"file.txt", ROOT, b"/etc/passwd", 2),
        fc.link(node, ROOT, b"../../x"),
        fc.link(node, ROOT, b".."),
        fc.mkdir(ROOT, b"."),
        fc.mknod(ROOT, b"..", stat.S_IFIFO),
        fc.symlink(ROOT, b".", b"x"),
        fc.create(ROOT, b".."),
    )


@attack
def a3_dotdot_on_the_root(w: Guest, tree: Path) -> None:
    root = os.stat(tree)
    node = ROOT
    for _ in range(10):
        entry = w.lookup(node, b"..")
        assert (entry.nodeid, entry.attr.ino) == (ROOT, root.st_ino)
        node = entry.nodeid


@attack
def a4_malformed_names(w: Guest, tree: Path) -> None:
    assert w.errno_of(fc.request(fc.MKDIR, ROOT, struct.pack("<II", 0o755, 0) + b"\0")) == (
        errno.EINVAL
    )
    unterminated = fc.request(fc.MKDIR, ROOT, struct.pack("<II", 0o755, 0) + b"abc")
    assert w.errno_of(unterminated) == errno.EINVAL
    assert w.errno_of(fc.mkdir(ROOT, b"n" * 256)) == errno.ENAMETOOLONG
    assert w.errno_of(fc.mkdir(ROOT, b"n" * 4096)) == errno.ENAMETOOLONG
    # An interior NUL ends the name there: "a" is made, never "a\0b" (which Python refuses).
    assert w.send(fc.request(fc.MKDIR, ROOT, struct.pack("<II", 0o755, 0) + b"a\0b\0")).error == 0
    assert (tree / "a").is_dir()
    assert w.errno_of(fc.symlink(ROOT, b"t", b"")) == errno.EINVAL


# B. Symlinks and TOCTOU.


@attack
def b6_lookup_through_a_symlink(w: Guest, tree: Path) -> None:
    w.send(fc.symlink(ROOT, b"l", b"/"))
    link = w.walk(b"l")
    assert w.errno_of(fc.lookup(link, b"etc")) == errno.ENOTDIR
    assert w.errno_of(fc.create(link, b"x")) == errno.ENOTDIR
    assert w.errno_of(fc.mkdir(link, b"x")) == errno.ENOTDIR


@attack
def b7_opening_a_symlink(w: Guest, tree: Path) -> None:
    w.send(fc.symlink(ROOT, b"l", str(tree.parent / "outside.txt").encode()))
    link = w.walk(b"l")
    assert w.errno_of(fc.open_(link, os.O_RDWR)) in (errno.EACCES, errno.ELOOP, errno.EBADF)
    link_etc = w.walk(b"link_etc")
    opened = w.errno_of(fc.opendir(link_etc))
    assert opened == (errno.ENOSYS if w.init.flags & fc.NO_OPENDIR_SUPPORT else errno.ENOTDIR)
    assert w.errno_of(fc.readdir(link_etc, 0)) == errno.ENOTDIR
    assert w.errno_of(fc.readdirplus(link_etc, 0)) == errno.ENOTDIR
    assert w.errno_of(fc.fsyncdir(link_etc, 0)) == errno.ENOTDIR


@attack
def b8_setattr_on_a_symlink(w: Guest, tree: Path) -> None:
    (tree / "s").symlink_to(tree.parent / "outside-dir" / "victim")
    node = w.walk(b"s")
    w.errno_of(fc.setattr_(node, V.MODE, 0o4777))
    w.errno_of(fc.setattr_(node, V.SIZE, size=0))
    w.errno_of(fc.setattr_(node, V.UID | V.GID, uid=1000, gid=1000))
    w.errno_of(fc.setattr_(node, V.ATIME | V.MTIME, atime=1, mtime=1))


@attack
def b9_xattrs_on_a_symlink(w: Guest, tree: Path) -> None:
    (tree / "s").symlink_to(tree.parent / "outside-dir" / "victim")
    node = w.walk(b"s")
    w.errno_of(w.setxattr(node, b"trusted.x", b"1"))
    w.errno_of(w.setxattr(node, b"user.x", b"1"))
    w.errno_of(fc.removexattr(node, b"trusted.x"))


@attack
def b10_hard_link_through_a_symlink(w: Guest, tree: Path) -> None:
    (tree / "s").symlink_to(tree.parent / "outside-dir" / "victim")
    assert w.send(fc.link(w.walk(b"s"), ROOT, b"h")).error == 0
    assert os.readlink(tree / "h") == str(tree.parent / "outside-dir" / "victim")


@attack
def b12_create_over_a_dangling_symlink(w: Guest, tree: Path) -> None:
    (tree / "t").symlink_to(tree.parent / "created-by-guest")
    assert w.errno_of(fc.create(ROOT, b"t", os.O_RDWR)) == errno.EEXIST
    assert w.errno_of(fc.create(ROOT, b"t", os.O_RDWR | os.O_TRUNC)) == errno.EEXIST
    assert not (tree.parent / "created-by-guest").exists()


@attack
def b13_a_directory_moved_out_by_the_host(w: Guest, tree: Path) -> None:
    d = w.walk(b"sub", b"deeper")
    moved = tree.parent / "moved-out"
    os.rename(tree / "sub" / "deeper", moved)
    try:
        for _ in range(3):
            assert w.errno_of(fc.lookup(d, b"..")) == errno.EACCES
    finally:
        os.rename(moved, tree / "sub" / "deeper")


@attack
def b14_creating_over_a_symlink_name(w: Guest, tree: Path) -> None:
    (tree / "n").symlink_to(tree.parent / "newdir")
    assert w.errno_of(fc.mkdir(ROOT, b"n")) == errno.EEXIST
    assert w.errno_of(fc.mknod(ROOT, b"n", stat.S_IFIFO | 0o644)) == errno.EEXIST
    assert w.errno_of(fc.symlink(ROOT, b"n", b"x")) == errno.EEXIST
    assert not (tree.parent / "newdir").exists()


# C. Special files and devices.


@attack
def c15_device_nodes(w: Guest, tree: Path) -> None:
    assert w.errno_of(fc.mknod(ROOT, b"sda", stat.S_IFBLK | 0o600, os.makedev(8, 0))) == (
        errno.EPERM
    )
    assert w.errno_of(fc.mknod(ROOT, b"mem", stat.S_IFCHR | 0o600, os.makedev(1, 1))) == (
        errno.EPERM
    )
    os.mknod(tree / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))  # planted by the host
    node = w.walk(b"null")
    assert w.errno_of(fc.open_(node, os.O_RDONLY)) == errno.EACCES
    assert w.errno_of(fc.setattr_(node, V.SIZE, size=0)) == errno.EINVAL
    assert w.errno_of(fc.read(node, 12345, 0, 10)) == errno.EBADF


@attack
def c16_fifos_never_block(w: Guest, tree: Path) -> None:
    node = w.walk(b"fifo")
    for _ in range(100):
        assert w.errno_of(fc.open_(node, os.O_RDONLY)) == errno.EACCES
    assert w.errno_of(fc.setattr_(node, V.SIZE, size=0)) == errno.EINVAL
    assert w.errno_of(fc.getxattr(node, b"user.x", 10)) == errno.ENODATA


@attack
def c17_sockets(w: Guest, tree: Path) -> None:
    entry = fc.parse_entry_out(w.send(fc.mknod(ROOT, b"sock", stat.S_IFSOCK | 0o600)).payload)
    assert w.errno_of(fc.open_(entry.nodeid)) == errno.EACCES
    assert w.send(fc.getattr_(entry.nodeid)).error == 0


@attack
def c18_rename_flags(w: Guest, tree: Path) -> None:
    for flags in (8, 0xFFFF_FFFF):
        assert w.errno_of(fc.rename2(ROOT, b"file.txt", ROOT, b"x", flags)) == errno.EINVAL


# D. Set-id bits and capabilities.


@attack
def d20_d21_unprivileged_writes_and_truncates_clear_setid(w: Guest, tree: Path) -> None:
    path = tree / "exec.sh"
    path.chmod(0o6777)
    node = w.walk(b"exec.sh")
    fh = w.open(node, os.O_WRONLY)
    w.send(fc.write(node, fh, 0, b"x", write_flags=1 << 2, uid=1000, gid=1000))
    assert stat.S_IMODE(path.stat().st_mode) == 0o777
    path.chmod(0o4777)
    w.send(fc.setattr_(node, V.SIZE | V.KILL_SUIDGID, size=0, uid=1000, gid=1000))
    assert stat.S_IMODE(path.stat().st_mode) == 0o777


# E. Xattr sizes.


@attack
def e28_oversized_xattrs(w: Guest, tree: Path) -> None:
    node = w.walk(b"file.txt")
    assert w.errno_of(w.setxattr(node, b"user.big", b"x" * 65537)) == errno.E2BIG
    assert w.errno_of(w.setxattr(node, b"user." + b"n" * 251, b"x")) == errno.ERANGE
    declared = fc.request(fc.SETXATTR, node, struct.pack("<II", 4096, 0) + b"user.x\0abc")
    assert w.errno_of(declared) == errno.EINVAL
    assert w.send(fc.getxattr(node, b"user.none", 0xFFFF_FFFF)).error == errno.ENODATA
    assert w.send(fc.listxattr(node, 0)).error == 0


# F. Sizes, offsets and the I/O ops.


@attack
def f30_writes_at_extreme_offsets(w: Guest, tree: Path) -> None:
    node, fh = w.create(ROOT, b"f")
    assert w.errno_of(fc.write(node, fh, 1 << 63, b"x")) == errno.EINVAL
    assert w.errno_of(fc.write(node, fh, 2**64 - 4096, b"x")) == errno.EINVAL
    assert w.errno_of(fc.write(node, fh, 2**63 - 10, b"x" * 4096)) == errno.EFBIG


@attack
def f31_reads_with_absurd_sizes(w: Guest, tree: Path) -> None:
    node = w.walk(b"file.txt")
    fh = w.open(node)
    assert w.send(fc.read(node, fh, 0, 0xFFFF_FFFF), writable_len=4096).error == 0
    assert w.send(fc.read(node, fh, 0, 0)).payload == b""
    assert w.errno_of(fc.read(node, fh, 1 << 63, 10)) == errno.EINVAL


@attack
def f32_lseek(w: Guest, tree: Path) -> None:
    node, fh = w.create(ROOT, b"empty")
    assert w.errno_of(fc.lseek(node, fh, 0, os.SEEK_DATA)) == errno.ENXIO
    assert w.errno_of(fc.lseek(node, fh, 10, os.SEEK_HOLE)) == errno.ENXIO
    assert w.errno_of(fc.lseek(node, fh, 0, 7)) == errno.EINVAL
    assert w.errno_of(fc.lseek(node, fh, -1, os.SEEK_DATA)) == errno.EINVAL
    assert w.errno_of(fc.lseek(ROOT, w.opendir(ROOT), 0, os.SEEK_DATA)) == errno.EBADF
    assert w.errno_of(fc.lseek(w.walk(b"file.txt"), fh, 0, os.SEEK_DATA)) == errno.EBADF


@attack
def f33_fallocate(w: Guest, tree: Path) -> None:
    node, fh = w.create(ROOT, b"f")
    assert w.errno_of(fc.fallocate(node, fh, 1, 3, 0x08)) == errno.EINVAL  # collapse, unaligned
    assert w.errno_of(fc.fallocate(node, fh, 0, 0)) == errno.EINVAL
    assert w.errno_of(fc.fallocate(node, fh, 0, 1 << 50, 1)) in (errno.ENOSPC, errno.EFBIG)
    assert w.errno_of(fc.fallocate(node, w.open(node), 0, 4096)) == errno.EBADF


@attack
def f34_copy_file_range(w: Guest, tree: Path) -> None:
    src = w.walk(b"file.txt")
    wo = w.open(src, os.O_WRONLY)
    ro = w.open(src)
    dst, dst_fh = w.create(ROOT, b"copy")
    dst_ro = w.open(dst)
    assert w.errno_of(fc.copy_file_range(src, wo, dst, dst_fh, 5)) == errno.EBADF
    assert w.errno_of(fc.copy_file_range(src, ro, dst, dst_ro, 5)) == errno.EBADF
    assert w.errno_of(fc.copy_file_range(dst, ro, dst, dst_fh, 5)) == errno.EBADF
    assert w.errno_of(fc.copy_file_range(src, ro, dst, dst_fh, 5, flags=1)) == errno.EINVAL
    assert w.errno_of(fc.copy_file_range(src, ro, src, wo, 5, off_out=2)) == errno.EINVAL


@attack
def f35_truncating_open_on_a_readonly_share(w: Guest, tree: Path) -> None:
    from vhostfs.fs import Passthrough

    fs = Passthrough(tree, readonly=True)
    try:
        g = Guest(fs)
        assert g.errno_of(fc.open_(g.walk(b"file.txt"), os.O_RDONLY | os.O_TRUNC)) == errno.EROFS
    finally:
        fs.close()
    assert (tree / "file.txt").read_bytes() == b"hello world\n"


@attack
def f36_odirect_is_stripped(w: Guest, tree: Path) -> None:
    node = w.walk(b"file.txt")
    fh = w.open(node, os.O_RDWR | os.O_DIRECT)
    assert w.send(fc.write(node, fh, 1, b"abc")).error == 0
    assert (tree / "file.txt").read_bytes() == b"habco world\n"


@attack
def f38_tmpfile_read_only(w: Guest, tree: Path) -> None:
    assert w.errno_of(fc.tmpfile(ROOT, os.O_RDONLY)) == errno.EINVAL


# G. Resources and bookkeeping.


@attack
def g39_fd_exhaustion_by_lookups(w: Guest, tree: Path) -> None:
    for i in range(200):
        (tree / "many" / f"extra-{i}").write_bytes(b"")
    many = w.walk(b"many")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 50, hard))
    try:
        errors = {w.send(fc.lookup(many, f"extra-{i}".encode())).error for i in range(200)}
        assert errno.EMFILE in errors
        assert w.send(fc.getattr_(many)).error == 0  # known nodes keep working
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert w.send(fc.lookup(many, b"extra-199")).error == 0


@attack
def g40_fd_exhaustion_by_opens(w: Guest, tree: Path) -> None:
    node = w.walk(b"file.txt")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    in_use = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 20, hard))
    try:
        replies = [w.send(fc.open_(node)) for _ in range(40)]
        assert errno.EMFILE in {r.error for r in replies}
        assert w.errno_of(fc.create(ROOT, b"more")) in (0, errno.EMFILE)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    for reply in replies:
        if reply.error == 0:
            assert w.send(fc.release(node, fc.parse_open_out(reply.payload)[0])).error == 0
    assert w.send(fc.open_(node)).error == 0


@attack
def g39_lookup_flood_meets_the_guest_quota(w: Guest, tree: Path) -> None:
    """Below RLIMIT_NOFILE: ENFILE for the guest, descriptors left for the daemon."""
    for i in range(60):
        (tree / "many" / f"q-{i}").write_bytes(b"")
    many, known = w.walk(b"many"), w.walk(b"file.txt")
    quota = w.fs.fd_quota
    limit, quota.limit = quota.limit, quota.held + 40
    try:
        replies = [w.send(fc.lookup(many, f"q-{i}".encode())) for i in range(60)]
        assert [r.error for r in replies] == [0] * 40 + [errno.ENFILE] * 20
        assert quota.held == quota.limit == len(w.fs.inodes) + len(w.fs.handles) - 1
        # Known nodes keep working; whatever would hold one more descriptor gets ENFILE and
        # changes nothing.
        assert w.send(fc.getattr_(many)).error == 0
        assert w.send(fc.lookup(many, b"q-0")).error == 0
        assert w.errno_of(fc.open_(known)) == errno.ENFILE
        assert w.errno_of(fc.create(ROOT, b"nope")) == errno.ENFILE
        assert w.errno_of(fc.mkdir(ROOT, b"nope-dir")) == errno.ENFILE
        assert not (tree / "nope").exists() and not (tree / "nope-dir").exists()
        # FORGET gives descriptors back.
        nodes = [fc.parse_entry_out(r.payload).nodeid for r in replies[1:11]]
        w.send(fc.batch_forget([(node, 1) for node in nodes]))
        assert [w.send(fc.lookup(many, f"q-{i}".encode())).error for i in range(40, 50)] == [0] * 10
        assert w.errno_of(fc.lookup(many, b"q-50")) == errno.ENFILE
    finally:
        quota.limit = limit


@attack
def g40_open_flood_meets_the_guest_quota(w: Guest, tree: Path) -> None:
    node = w.walk(b"file.txt")
    quota = w.fs.fd_quota
    limit, quota.limit = quota.limit, quota.held + 10
    try:
        replies = [w.send(fc.open_(node)) for _ in range(15)]
        assert [r.error for r in replies] == [0] * 10 + [errno.ENFILE] * 5
        fh = fc.parse_open_out(replies[0].payload)[0]
        assert w.send(fc.release(node, fh)).error == 0  # RELEASE gives one back
        assert w.send(fc.open_(node)).error == 0
    finally:
        quota.limit = limit
    for reply in replies[1:10]:
        assert w.send(fc.release(node, fc.parse_open_out(reply.payload)[0])).error == 0


@attack
def g41_forget_abuse(w: Guest, tree: Path) -> None:
    node = w.walk(b"file.txt")
    w.send(fc.forget(node, 2**64 - 1))
    assert w.nlookup(node) == 0
    w.send(fc.forget(0xDEADBEEF, 1))
    w.send(fc.forget(ROOT, 100))
    w.send(fc.batch_forget([(ROOT, 1)], count=2**32 - 1))
    assert w.send(fc.getattr_(ROOT)).error == 0
    assert w.lookup(ROOT, b"file.txt").nodeid > node


@attack
def g42_forged_ids_and_handles(w: Guest, tree: Path) -> None:
    for nodeid in (0, 0xDEADBEEF, 2**64 - 1):
        assert w.errno_of(fc.getattr_(nodeid)) == errno.ESTALE
        assert w.errno_of(fc.mkdir(nodeid, b"x")) == errno.ESTALE
    node = w.walk(b"file.txt")
    fh = w.open(node, os.O_RDWR)
    assert w.send(fc.release(node, fh)).error == 0
    assert w.errno_of(fc.read(node, fh, 0, 10)) == errno.EBADF
    assert w.errno_of(fc.release(node, fh)) == errno.EBADF
    dfh = w.opendir(ROOT)
    assert w.errno_of(fc.write(ROOT, dfh, 0, b"x")) == errno.EBADF


@attack
def g43_readdirplus_edges(w: Guest, tree: Path) -> None:
    many = w.walk(b"many")
    fh = w.opendir(many)
    before = len(w.fs.inodes)
    for size, offset in ((1, 0), (80, 0), (4096, 2**63), (4096, 123456)):
        w.send(fc.readdirplus(many, fh, offset, size))
    assert len(w.fs.inodes) == before  # nothing that did not fit was counted


@attack
def g44_inconsistent_headers(w: Guest, tree: Path) -> None:
    assert w.errno_of(fc.request(fc.GETATTR, ROOT, b"", length=(1 << 32) - 1)) == errno.EINVAL
    assert w.errno_of(fc.request(fc.MKNOD, ROOT, b"\0" * 4)) == errno.EINVAL
    node, fh = w.create(ROOT, b"f")
    assert w.errno_of(fc.write(node, fh, 0, b"abc", size=1 << 20)) == errno.EINVAL
    assert w.errno_of(fc.request(4242, ROOT)) == errno.ENOSYS


@attack
def g45_locks_are_not_served(w: Guest, tree: Path) -> None:
    for opcode in (fc.GETLK, 32, 33):  # GETLK, SETLK, SETLKW
        assert w.errno_of(fc.request(opcode, ROOT, b"\0" * 64)) == errno.ENOSYS


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_attack_is_contained(w: Guest, tree: Path, name: str) -> None:
    before = snapshot_around(tree)
    outside_files = sorted(p.name for p in tree.parent.iterdir())
    ATTACKS[name](w, tree)
    assert sorted(p.name for p in tree.parent.iterdir()) == outside_files
    assert snapshot_around(tree) == before
    # The daemon keeps serving: a lookup, a read and a write all still work.
    node = w.walk(b"sub", b"inner.txt")
    assert w.read(node, w.open(node), 0, 100) == b"inner"
    probe, fh = w.create(ROOT, b"probe-after-attack")
    assert w.send(fc.write(probe, fh, 0, b"ok")).error == 0
    assert (tree / "probe-after-attack").read_bytes() == b"ok"


def test_the_list_covers_the_raw_attacks() -> None:
    # Every item of §2 A-G that raw FUSE requests can express (the rest need guest threads,
    # an id map or a sandbox: see the module docstring).
    assert len(ATTACKS) >= 30
