"""Fixtures for the writable passthrough: a tree, the fs over it, a guest, and a snapshot of
everything around the export that no guest request may ever change."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.passthrough_guest import Guest, build_tree
from vhostfs.fs import Passthrough

Snapshot = dict[str, tuple[object, ...]]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = build_tree(tmp_path)
    root.chmod(0o777)  # unprivileged callers may create here
    (tmp_path / "outside-dir").mkdir()
    (tmp_path / "outside-dir" / "victim").write_bytes(b"victim")
    (tmp_path / "outside-dir" / "victim").chmod(0o644)
    return root


@pytest.fixture
def rw(tree: Path) -> Iterator[Passthrough]:
    fs = Passthrough(tree)
    yield fs
    fs.close()


@pytest.fixture
def w(rw: Passthrough) -> Guest:
    return Guest(rw)


def snapshot_around(export: Path) -> Snapshot:
    """Every inode in the export's parent directory but the export's own subtree: type, mode,
    owner, size, times, link count, content hash or link target, and xattrs."""
    parent = export.parent
    seen: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(parent, followlinks=False):
        here = Path(dirpath)
        if here == parent and export.name in dirnames:
            dirnames.remove(export.name)
        for name in [".", *dirnames, *filenames]:
            path = here / name
            st = os.lstat(path)
            if path.is_symlink():
                content: object = os.readlink(path)
            elif path.is_file():
                content = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                content = None
            try:
                xattrs = tuple(sorted(os.listxattr(path, follow_symlinks=False)))
            except OSError:
                xattrs = ()
            times = (st.st_mtime_ns, st.st_ctime_ns)
            if path == parent:
                # The host's own renames in b13 touch it; additions and removals there are
                # caught by the entries themselves.
                times = (0, 0)
            seen[str(path.relative_to(parent))] = (
                st.st_mode,
                st.st_uid,
                st.st_gid,
                st.st_size,
                st.st_nlink,
                *times,
                content,
                xattrs,
            )
    return seen
