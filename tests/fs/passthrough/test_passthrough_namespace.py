"""Creating, linking, renaming and removing names through the writable passthrough."""

from __future__ import annotations

import errno
import os
import stat
import subprocess
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.passthrough_guest import ROOT, Guest
from vhostfs.fs import Passthrough

RENAME_NOREPLACE, RENAME_EXCHANGE, RENAME_WHITEOUT = 1, 2, 4


def test_create_opens_a_new_file_exclusively(w: Guest, tree: Path) -> None:
    node, fh = w.create(ROOT, b"new.txt", 0o640)
    assert w.nlookup(node) == 1
    assert w.send(fc.write(node, fh, 0, b"fresh")).error == 0
    assert w.read(node, fh, 0, 100) == b"fresh"
    assert (tree / "new.txt").read_bytes() == b"fresh"
    assert stat.S_IMODE(os.stat(tree / "new.txt").st_mode) == 0o640
    assert w.errno_of(fc.create(ROOT, b"new.txt")) == errno.EEXIST
    assert w.errno_of(fc.create(ROOT, b"link_etc")) == errno.EEXIST  # never through a symlink


def test_mkdir_mknod_symlink(w: Guest, tree: Path) -> None:
    d = fc.parse_entry_out(w.send(fc.mkdir(ROOT, b"d", 0o777)).payload)
    assert stat.S_ISDIR(d.attr.mode) and w.nlookup(d.nodeid) == 1
    # The daemon's own umask (022 under pytest) does not take bits from the guest's mode.
    assert stat.S_IMODE(os.stat(tree / "d").st_mode) == 0o777
    fifo = fc.parse_entry_out(w.send(fc.mknod(d.nodeid, b"p", stat.S_IFIFO | 0o600)).payload)
    assert stat.S_ISFIFO(os.lstat(tree / "d" / "p").st_mode) and stat.S_ISFIFO(fifo.attr.mode)
    sock = w.send(fc.mknod(d.nodeid, b"s", stat.S_IFSOCK | 0o600))
    assert sock.error == 0 and stat.S_ISSOCK(os.lstat(tree / "d" / "s").st_mode)
    assert w.send(fc.mknod(d.nodeid, b"r", stat.S_IFREG | 0o600)).error == 0
    assert (tree / "d" / "r").read_bytes() == b""
    link = fc.parse_entry_out(w.send(fc.symlink(d.nodeid, b"l", b"/etc/../x")).payload)
    assert os.readlink(tree / "d" / "l") == "/etc/../x"
    assert w.send(fc.readlink(link.nodeid)).payload == b"/etc/../x"
    for name in (b"p", b"l", b"r"):
        assert w.errno_of(fc.mkdir(d.nodeid, name)) == errno.EEXIST


def test_mknod_devices_only_whiteouts_unless_allowed(tree: Path) -> None:
    for allow in (False, True):
        fs = Passthrough(tree, allow_devices=allow)
        try:
            g = Guest(fs)
            wh = g.send(fc.mknod(ROOT, b"wh%d" % allow, stat.S_IFCHR | 0o600, 0))
            assert wh.error == 0
            assert os.lstat(tree / f"wh{int(allow)}").st_rdev == 0
            char, block = stat.S_IFCHR | 0o600, stat.S_IFBLK | 0o600
            mem = g.errno_of(fc.mknod(ROOT, b"mem%d" % allow, char, os.makedev(1, 1)))
            sda = g.errno_of(fc.mknod(ROOT, b"sda%d" % allow, block, os.makedev(8, 0)))
            assert (mem, sda) == ((0, 0) if allow else (errno.EPERM, errno.EPERM))
        finally:
            fs.close()
    assert not (tree / "mem0").exists() and not (tree / "sda0").exists()
    assert stat.S_ISCHR(os.lstat(tree / "mem1").st_mode)


def test_mknod_of_a_directory_type_is_einval(w: Guest) -> None:
    assert w.errno_of(fc.mknod(ROOT, b"x", stat.S_IFDIR | 0o755)) == errno.EINVAL


def test_link_counts_and_shares_the_inode(w: Guest, tree: Path) -> None:
    node = w.walk(b"file.txt")
    before = w.nlookup(node)
    entry = fc.parse_entry_out(w.send(fc.link(node, ROOT, b"third")).payload)
    assert entry.nodeid == node and w.nlookup(node) == before + 1
    assert entry.attr.nlink == 3 and os.stat(tree / "third").st_nlink == 3
    assert w.errno_of(fc.link(w.walk(b"sub"), ROOT, b"dirlink")) == errno.EPERM


def test_link_to_a_symlink_links_the_symlink(w: Guest, tree: Path) -> None:
    link = w.walk(b"link_etc")
    assert w.send(fc.link(link, ROOT, b"h")).error == 0
    assert os.readlink(tree / "h") == "/etc"
    assert os.lstat(tree / "link_etc").st_nlink == 2


def test_unlink_and_rmdir(w: Guest, tree: Path) -> None:
    node = w.walk(b"file.txt")
    assert w.send(fc.unlink(ROOT, b"file.txt")).error == 0
    assert not (tree / "file.txt").exists()
    assert w.send(fc.getattr_(node)).error == 0  # the guest still holds it: still served
    assert w.errno_of(fc.rmdir(ROOT, b"sub")) == errno.ENOTEMPTY
    assert w.errno_of(fc.unlink(ROOT, b"sub")) == errno.EISDIR
    assert w.send(fc.rmdir(w.walk(b"sub"), b"deeper")).error == 0
    assert not (tree / "sub" / "deeper").exists()
    assert w.errno_of(fc.unlink(ROOT, b"missing")) == errno.ENOENT


def test_rename_and_its_flags(w: Guest, tree: Path) -> None:
    sub = w.walk(b"sub")
    assert w.send(fc.rename(ROOT, b"file.txt", sub, b"moved")).error == 0
    assert (tree / "sub" / "moved").read_bytes() == b"hello world\n"
    noreplace = fc.rename2(sub, b"moved", ROOT, b"exec.sh", RENAME_NOREPLACE)
    assert w.errno_of(noreplace) == errno.EEXIST
    assert w.send(fc.rename2(sub, b"moved", ROOT, b"private", RENAME_EXCHANGE)).error == 0
    assert (tree / "private").read_bytes() == b"hello world\n"
    assert (tree / "sub" / "moved").read_bytes() == b"secret"
    assert w.send(fc.rename2(ROOT, b"private", ROOT, b"gone", RENAME_WHITEOUT)).error == 0
    whiteout = os.lstat(tree / "private")
    assert stat.S_ISCHR(whiteout.st_mode) and whiteout.st_rdev == 0
    for flags in (8, 0xFFFF_FFFF):
        assert w.errno_of(fc.rename2(ROOT, b"gone", ROOT, b"x", flags)) == errno.EINVAL
    exchange_dir = fc.rename2(ROOT, b"gone", ROOT, b"sub", RENAME_EXCHANGE)
    assert w.send(exchange_dir).error == 0  # a file and a directory trade places
    assert (tree / "gone").is_dir() and (tree / "sub").is_file()


def test_tmpfile(w: Guest, tree: Path) -> None:
    reply = w.send(fc.tmpfile(ROOT, os.O_RDWR, 0o600))
    entry = fc.parse_entry_out(reply.payload)
    fh = fc.parse_open_out(reply.payload, 128)[0]
    assert entry.attr.nlink == 0
    assert w.send(fc.write(entry.nodeid, fh, 0, b"anon")).error == 0
    assert w.send(fc.link(entry.nodeid, ROOT, b"named")).error == 0
    assert (tree / "named").read_bytes() == b"anon"
    assert w.errno_of(fc.tmpfile(ROOT, os.O_RDONLY)) == errno.EINVAL


def test_every_new_entry_counts_one_lookup(w: Guest) -> None:
    made = [
        fc.parse_entry_out(w.send(raw).payload).nodeid
        for raw in (
            fc.mkdir(ROOT, b"a"),
            fc.mknod(ROOT, b"b", stat.S_IFIFO | 0o644),
            fc.symlink(ROOT, b"c", b"a"),
        )
    ]
    node, _ = w.create(ROOT, b"d")
    for nodeid in [*made, node]:
        assert w.nlookup(nodeid) == 1
        w.send(fc.forget(nodeid, 1))
        assert w.nlookup(nodeid) == 0


def test_non_utf8_names_round_trip(w: Guest, tree: Path) -> None:
    names = [b"\xff\xfe", b"a\nb", "é".encode(), "e\u0301".encode()]
    for name in names:
        assert w.send(fc.mkdir(ROOT, name)).error == 0
    listed = {de.name for _, de in w.listing(ROOT, 4096)}
    assert set(names) <= listed
    assert w.send(fc.rename(ROOT, b"\xff\xfe", ROOT, b"\xfe\xff")).error == 0
    assert os.path.isdir(bytes(tree) + b"/\xfe\xff")


@pytest.mark.parametrize("cache", ["auto", "always", "never"])
def test_writeback_is_offered_only_when_asked(tree: Path, cache: str) -> None:
    for writeback in (False, True):
        fs = Passthrough(tree, cache=cache, writeback=writeback)  # type: ignore[arg-type]
        try:
            g = Guest(fs, flags=fc.WRITEBACK_CACHE | fc.DO_READDIRPLUS)
            assert bool(g.init.flags & fc.WRITEBACK_CACHE) == writeback
        finally:
            fs.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
@pytest.mark.parametrize("announce", [True, False])
def test_host_mounts_below_the_share_are_announced_as_submounts(
    tree: Path, announce: bool
) -> None:
    mountpoint = tree / "volume"
    mountpoint.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "vol", str(mountpoint)], check=True)
    fs = Passthrough(tree, announce_submounts=announce)
    try:
        (mountpoint / "inner").mkdir()
        g = Guest(fs)
        assert bool(g.init.flags & fc.SUBMOUNTS) == announce
        volume = g.lookup(ROOT, b"volume")
        assert volume.attr.flags == (fc.ATTR_SUBMOUNT if announce else 0)
        # Within the mount, and on the share's own file system, nothing is marked.
        assert g.lookup(volume.nodeid, b"inner").attr.flags == 0
        assert g.lookup(ROOT, b"sub").attr.flags == 0
        assert g.lookup(volume.nodeid, b"..").attr.flags == 0
        # READDIRPLUS builds its entries through LOOKUP: the same marks.
        fh = g.opendir(ROOT)
        plus = fc.parse_direntplus(g.send(fc.readdirplus(ROOT, fh, 0, 1 << 16)).payload)
        marked = {d.name for e, d in plus if e.attr.flags & fc.ATTR_SUBMOUNT}
        assert marked == ({b"volume"} if announce else set())
    finally:
        fs.close()
        subprocess.run(["umount", str(mountpoint)], check=True)
