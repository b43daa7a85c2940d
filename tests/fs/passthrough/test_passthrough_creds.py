"""New files belong to the guest caller, and set-gid directories behave as the kernel says.

These need the daemon to run as root (it switches fsuid/fsgid per request), as the tests do."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.passthrough_guest import ROOT, Guest
from vhostfs.fs import Passthrough

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="switching credentials needs root")
USER = {"uid": 1000, "gid": 1000}
GROUP = 4242  # a group the caller is not in


def test_new_objects_belong_to_the_caller(w: Guest, tree: Path) -> None:
    w.create(ROOT, b"f", 0o644, **USER)
    w.send(fc.mkdir(ROOT, b"d", **USER))
    w.send(fc.mknod(ROOT, b"p", stat.S_IFIFO | 0o644, **USER))
    w.send(fc.symlink(ROOT, b"l", b"f", **USER))
    for name in ("f", "d", "p", "l"):
        st = os.lstat(tree / name)
        assert (st.st_uid, st.st_gid) == (1000, 1000), name
    w.create(ROOT, b"as-root", 0o644)
    assert (os.stat(tree / "as-root").st_uid, os.stat(tree / "as-root").st_gid) == (0, 0)


def test_the_host_checks_the_callers_permissions_too(w: Guest, tree: Path) -> None:
    os.chmod(tree / "sub", 0o755)  # root's: a raw request from uid 1000 may not write here
    sub = w.walk(b"sub")
    assert w.errno_of(fc.create(sub, b"x", **USER)) == errno.EACCES
    assert w.errno_of(fc.mkdir(sub, b"x", **USER)) == errno.EACCES
    assert not (tree / "sub" / "x").exists()


def test_sgid_inheritance(w: Guest, tree: Path) -> None:
    """CVE-2022-0358: a file made by a caller outside the directory's group loses S_ISGID;
    a directory keeps it; root keeps both."""
    g = tree / "g"
    g.mkdir()
    os.chown(g, 0, GROUP)
    g.chmod(0o2777)
    gdir = w.walk(b"g")
    w.create(gdir, b"f", 0o2755, **USER)
    w.send(fc.mkdir(gdir, b"d", 0o755, **USER))
    w.send(fc.mknod(gdir, b"n", stat.S_IFIFO | 0o644, **USER))
    w.create(gdir, b"rootf", 0o2755)
    f, d, n, rootf = (os.lstat(g / name) for name in ("f", "d", "n", "rootf"))
    assert (f.st_gid, d.st_gid, n.st_gid) == (GROUP, GROUP, GROUP)
    assert f.st_mode & stat.S_ISGID == 0
    assert d.st_mode & stat.S_ISGID
    assert rootf.st_mode & stat.S_ISGID


def test_supplementary_groups_are_dropped(tree: Path) -> None:
    os.setgroups([GROUP])
    fs = Passthrough(tree)
    try:
        assert os.getgroups() == []
    finally:
        fs.close()


def test_readonly_never_switches_or_drops(tree: Path) -> None:
    os.setgroups([GROUP])
    fs = Passthrough(tree, readonly=True)
    try:
        assert os.getgroups() == [GROUP] and not fs.switch_creds
    finally:
        fs.close()
        os.setgroups([])


def test_credentials_are_restored_after_each_request(w: Guest, tree: Path) -> None:
    w.send(fc.mkdir(ROOT, b"d", **USER))
    assert w.errno_of(fc.mkdir(ROOT, b"d/x".replace(b"/", b"_"), **USER)) == 0
    w.create(ROOT, b"after", 0o644)
    assert os.stat(tree / "after").st_uid == 0
    # A failing request restores them too.
    assert w.errno_of(fc.mkdir(ROOT, b"d", **USER)) == errno.EEXIST
    w.create(ROOT, b"after2", 0o644)
    assert os.stat(tree / "after2").st_uid == 0
