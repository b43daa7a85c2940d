"""SETXATTR and REMOVEXATTR: user.*, trusted.* and security.* pass through to the node's own
inode, symlinks and FIFOs included."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.passthrough_guest import Guest
from vhostfs.fs import Passthrough

XATTR_CREATE, XATTR_REPLACE = 1, 2


@pytest.mark.parametrize("name", [b"user.color", b"trusted.overlay.opaque", b"security.test"])
def test_set_get_remove(w: Guest, tree: Path, name: bytes) -> None:
    node = w.walk(b"file.txt")
    assert w.send(w.setxattr(node, name, b"y")).error == 0
    assert os.getxattr(tree / "file.txt", name) == b"y"
    assert w.send(fc.getxattr(node, name, 10)).payload == b"y"
    assert w.send(fc.removexattr(node, name)).error == 0
    assert w.errno_of(fc.getxattr(node, name, 10)) == errno.ENODATA
    assert w.errno_of(fc.removexattr(node, name)) == errno.ENODATA


def test_create_and_replace_flags(w: Guest) -> None:
    node = w.walk(b"file.txt")
    assert w.errno_of(w.setxattr(node, b"user.a", b"1", XATTR_REPLACE)) == errno.ENODATA
    assert w.send(w.setxattr(node, b"user.a", b"1", XATTR_CREATE)).error == 0
    assert w.errno_of(w.setxattr(node, b"user.a", b"2", XATTR_CREATE)) == errno.EEXIST
    assert w.send(w.setxattr(node, b"user.a", b"3", XATTR_REPLACE)).error == 0
    assert w.errno_of(w.setxattr(node, b"user.a", b"4", 4)) == errno.EINVAL
    assert w.send(fc.getxattr(node, b"user.a", 10)).payload == b"3"


def test_a_symlinks_xattrs_are_its_own(w: Guest, tree: Path) -> None:
    victim = tree.parent / "outside-dir" / "victim"
    (tree / "s").symlink_to(victim)
    node = w.walk(b"s")
    assert w.send(w.setxattr(node, b"trusted.x", b"link")).error == 0
    assert os.getxattr(tree / "s", "trusted.x", follow_symlinks=False) == b"link"
    assert w.errno_of(w.setxattr(node, b"user.x", b"v")) == errno.EPERM  # Linux's rule
    assert "trusted.x" not in os.listxattr(victim)
    assert w.send(fc.removexattr(node, b"trusted.x")).error == 0


def test_a_fifo_is_never_opened(w: Guest, tree: Path) -> None:
    node = w.walk(b"fifo")
    assert w.send(w.setxattr(node, b"trusted.y", b"1")).error == 0  # would hang if opened
    assert w.send(fc.getxattr(node, b"trusted.y", 10)).payload == b"1"


def test_oversized_values_and_names(w: Guest) -> None:
    node = w.walk(b"file.txt")
    assert w.errno_of(w.setxattr(node, b"user.big", b"x" * 65537)) == errno.E2BIG
    assert w.errno_of(w.setxattr(node, b"user." + b"n" * 251, b"x")) == errno.ERANGE
    short = fc.request(fc.SETXATTR, node, b"\x00\x10\x00\x00\x00\x00\x00\x00user.x\0abc")
    assert w.errno_of(short) == errno.EINVAL  # declares 4096 bytes, sends 3


def test_readonly_and_disabled(tree: Path) -> None:
    for kw, err in (({"readonly": True}, errno.EROFS), ({"xattr": False}, errno.ENOSYS)):
        fs = Passthrough(tree, **kw)  # type: ignore[arg-type]
        try:
            g = Guest(fs)
            node = g.walk(b"file.txt")
            assert g.errno_of(g.setxattr(node, b"user.a", b"1")) == err
            assert g.errno_of(fc.removexattr(node, b"user.a")) == err
        finally:
            fs.close()
