"""Helpers for the builder tests (no tests here): source trees that hold every kind of entry a
rootfs has, and snapshots of trees to compare a source with what comes back out of an image.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click
from click.testing import CliRunner, Result

from vhostfs.cli.image import build_command, check_command, inspect_command, unpack_command

IS_ROOT = os.geteuid() == 0
MTIME_NS = 1_600_000_000_123_456_789
SMALL_CHUNK = 64 * 1024


def make_rootfs_tree(root: Path) -> None:
    """Every entry type, odd names, owners, xattrs and nanosecond mtimes; small enough to build
    in well under a second with 64 KiB chunks, big enough for multi-chunk files and dedup."""
    root.mkdir()
    (root / "empty").write_bytes(b"")
    (root / "small").write_bytes(b"hello, world\n")
    (root / "multi-chunk").write_bytes(os.urandom(3 * SMALL_CHUNK + 4321))
    (root / "copy-of-multi-chunk").write_bytes((root / "multi-chunk").read_bytes())
    (root / "repeated").write_bytes(b"\xab" * (4 * SMALL_CHUNK))  # four identical chunks
    with open(root / "sparse", "wb") as f:
        f.seek(5 * SMALL_CHUNK + 7)
        f.write(b"tail")
    (root / "setuid").write_bytes(b"#!/bin/sh\n")

    nested = root / "usr" / "lib" / "deep"
    nested.mkdir(parents=True)
    (nested / "lib.so").write_bytes(bytes(range(256)) * 300)
    (root / "sticky").mkdir(mode=0o1777)
    os.chmod(root / "sticky", 0o1777)
    (root / "read-only").mkdir()
    (root / "read-only" / "inside").write_bytes(b"still readable\n")

    names = root / "names"
    names.mkdir()
    for name in (b"x" * 255, "ünïcødé".encode(), b"\xff\xfe-not-utf8", b"-before-dot", b" space"):
        (names / os.fsdecode(name)).write_bytes(name)

    links = names / "links"
    links.mkdir()
    os.symlink("../small", root / "relative-link")
    os.symlink("/etc/passwd", links / "absolute")
    os.symlink("nowhere/at/all", links / "dangling")
    os.symlink("t" * 4000, links / "long-target")
    os.link(root / "small", links / "hard-1")
    os.link(root / "small", root / "usr" / "hard-2")

    special = root / "dev"
    special.mkdir()
    os.mkfifo(special / "fifo")
    os.mknod(special / "socket", stat.S_IFSOCK | 0o600)
    if IS_ROOT:
        os.mknod(special / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(special / "sda", stat.S_IFBLK | 0o660, os.makedev(8, 0))
        os.mknod(special / "big", stat.S_IFCHR | 0o600, os.makedev(300, 70000))
        os.chown(root / "setuid", 1234, 5678)
        os.chown(root / "relative-link", 4321, 8765, follow_symlinks=False)
        os.chown(nested, 100000, 100000)  # needs an extended inode
        os.setxattr(root / "small", "trusted.note", b"for root only")
        os.setxattr(root / "setuid", "security.capability", b"\x01\x00\x00\x02" + bytes(16))
    os.chmod(root / "setuid", 0o4755)
    os.setxattr(root / "small", "user.empty", b"")
    os.setxattr(root / "multi-chunk", "user.binary", bytes(range(256)))
    os.setxattr(names, "user.on-a-directory", b"yes")

    os.chmod(root / "read-only", 0o555)
    set_mtimes(root)


def set_mtimes(root: Path, mtime_ns: int = MTIME_NS) -> None:
    """Give everything a fixed, nanosecond-precise mtime (deepest first, so setting a child
    does not disturb its parent afterwards)."""
    for directory, dirnames, filenames in os.walk(root, topdown=False):
        for name in [*dirnames, *filenames]:
            os.utime(os.path.join(directory, name), ns=(mtime_ns, mtime_ns), follow_symlinks=False)
    os.utime(root, ns=(mtime_ns, mtime_ns))


@dataclass(frozen=True)
class Entry:
    kind: int
    mode: int  # permission bits, set-id and sticky included
    uid: int
    gid: int
    content: str  # sha256 of file data, symlink target, device number, or "" for the rest
    xattrs: tuple[tuple[bytes, bytes], ...]
    mtime_ns: int
    links: tuple[bytes, ...]  # every path of this inode within the tree, for non-directories


def snapshot(
    root: Path,
    *,
    owners: bool = True,
    xattrs: bool = True,
    mtimes: bool = True,
    hard_links: bool = True,
) -> dict[bytes, Entry]:
    """Everything about the tree at `root` an image should carry, by relative path (b"." for
    the root itself). The flags leave out what a given reader cannot reproduce."""
    top = os.fsencode(root)
    paths: dict[tuple[int, int], list[bytes]] = {}
    stats: dict[bytes, os.stat_result] = {}
    for directory, dirnames, filenames in os.walk(top):
        for name in [b".", *dirnames, *filenames] if directory == top else [*dirnames, *filenames]:
            full = os.path.normpath(os.path.join(directory, name))
            relative = os.path.relpath(full, top)
            info = os.lstat(full)
            stats[relative] = info
            if not stat.S_ISDIR(info.st_mode):
                paths.setdefault((info.st_dev, info.st_ino), []).append(relative)
    result = {}
    for relative, info in stats.items():
        full = os.path.join(top, relative)
        group = paths.get((info.st_dev, info.st_ino), [])
        result[relative] = Entry(
            kind=stat.S_IFMT(info.st_mode),
            mode=stat.S_IMODE(info.st_mode),
            uid=info.st_uid if owners else 0,
            gid=info.st_gid if owners else 0,
            content=_content(full, info),
            xattrs=_xattrs(full) if xattrs else (),
            mtime_ns=info.st_mtime_ns if mtimes else 0,
            links=tuple(sorted(group)) if hard_links else (),
        )
    return result


def _content(path: bytes, info: os.stat_result) -> str:
    kind = stat.S_IFMT(info.st_mode)
    if kind == stat.S_IFREG:
        with open(path, "rb") as f:
            return f"{info.st_size}:{hashlib.file_digest(f, 'sha256').hexdigest()}"
    if kind == stat.S_IFLNK:
        return os.fsdecode(os.readlink(path))
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        return f"{os.major(info.st_rdev)}:{os.minor(info.st_rdev)}"
    return ""


def _xattrs(path: bytes) -> tuple[tuple[bytes, bytes], ...]:
    names = os.listxattr(path, follow_symlinks=False)
    return tuple(
        sorted(
            (os.fsencode(name), os.getxattr(path, name, follow_symlinks=False)) for name in names
        )
    )


def differences(expected: dict[bytes, Entry], actual: dict[bytes, Entry]) -> list[str]:
    """Readable differences, empty when the trees match."""
    lines = []
    for path in sorted(expected.keys() | actual.keys()):
        want, got = expected.get(path), actual.get(path)
        if want != got:
            lines.append(f"{path!r}:\n  expected {want}\n  actual   {got}")
    return lines


def assert_same_tree(expected: dict[bytes, Entry], actual: dict[bytes, Entry]) -> None:
    found = differences(expected, actual)
    assert not found, "\n".join(found[:20])


# --- Running the commands ------------------------------------------------------------------

_GROUP = click.Group(commands=[build_command, inspect_command, check_command, unpack_command])


def run_vhostfs(*args: str | os.PathLike[str]) -> Result:
    """`vhostfs ARGS` in this process (the image commands only)."""
    return CliRunner().invoke(_GROUP, [os.fspath(arg) for arg in args], catch_exceptions=False)


def build(sources: Sequence[Path], output: Path, *options: str) -> tuple[Path, Path | None]:
    """Build with the CLI; returns (bootstrap, blob or None)."""
    result = run_vhostfs("build", *sources, "-o", output, *options)
    assert result.exit_code == 0, result.output
    blobs = [p for p in output.iterdir() if len(p.name) == 64]
    assert len(blobs) <= 1, blobs
    return output / "bootstrap", (blobs[0] if blobs else None)
