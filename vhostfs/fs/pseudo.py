"""The pseudo file system at the root of the VFS: the directories that lead to mountpoints.

Mounting at `/rafs/c1/lowerdir` creates `/rafs` and `/rafs/c1` here, as nydusd does (reference
§2.4): directories of mode 0777 owned by root, with the time they were made. Each directory
holds either more pseudo directories or, at the last step, a mount (by its VFS index). The
tree only grows while mounts are added and shrinks when they go, so a path that was never
mounted never appears.
"""

from __future__ import annotations

import stat
import time
from dataclasses import dataclass, field

ROOT_INO = 1


class PathError(ValueError):
    """A mountpoint that cannot be used; the message says why."""


@dataclass(slots=True)
class PseudoDir:
    ino: int
    parent: int
    name: bytes
    mtime_ns: int = field(default_factory=time.time_ns)
    dirs: dict[bytes, int] = field(default_factory=dict)  # name -> pseudo ino
    mounts: dict[bytes, int] = field(default_factory=dict)  # name -> VFS index

    MODE = stat.S_IFDIR | 0o777

    def __len__(self) -> int:
        return len(self.dirs) + len(self.mounts)


class PseudoTree:
    def __init__(self) -> None:
        self._dirs: dict[int, PseudoDir] = {ROOT_INO: PseudoDir(ROOT_INO, ROOT_INO, b"")}
        self._next_ino = ROOT_INO + 1

    def dir(self, ino: int) -> PseudoDir | None:
        return self._dirs.get(ino)

    def add_mount(self, path: str, index: int) -> None:
        """Make the directories leading to `path` and put mount `index` at its end."""
        *parents, last = split_mountpoint(path)
        directory = self._dirs[ROOT_INO]
        for name in parents:
            if name in directory.mounts:
                raise PathError(f"{path}: {name.decode()} is a mountpoint already")
            ino = directory.dirs.get(name)
            if ino is None:
                ino = self._next_ino
                self._next_ino += 1
                self._dirs[ino] = PseudoDir(ino, directory.ino, name)
                directory.dirs[name] = ino
                directory.mtime_ns = time.time_ns()
            directory = self._dirs[ino]
        if last in directory.mounts:
            raise PathError(f"{path}: already exists")
        if last in directory.dirs:
            raise PathError(f"{path}: other mounts lie below it")
        directory.mounts[last] = index
        directory.mtime_ns = time.time_ns()

    def remove_mount(self, path: str) -> int:
        """Take the mount at `path` out, and the pseudo directories only it needed; returns
        its index."""
        *parents, last = split_mountpoint(path)
        chain = [self._dirs[ROOT_INO]]
        for name in parents:
            ino = chain[-1].dirs.get(name)
            if ino is None:
                raise PathError(f"{path}: not found")
            chain.append(self._dirs[ino])
        index = chain[-1].mounts.pop(last, None)
        if index is None:
            raise PathError(f"{path}: not found")
        chain[-1].mtime_ns = time.time_ns()
        # Pseudo inodes are never reused, so a guest still holding a removed one gets ENOENT
        # from dir(), never another directory.
        for child, parent in zip(reversed(chain[1:]), reversed(chain[:-1]), strict=True):
            if len(child):
                break
            del parent.dirs[child.name]
            del self._dirs[child.ino]
            parent.mtime_ns = time.time_ns()
        return index


def split_mountpoint(path: str) -> list[bytes]:
    """The names of an absolute mountpoint path; refuses "/", "." and ".." steps and NULs."""
    if not path.startswith("/"):
        raise PathError(f"{path!r}: a mountpoint is an absolute path")
    names = [name.encode() for name in path.split("/") if name]
    if not names:
        raise PathError("/: the root is the pseudo file system itself")
    for name in names:
        if name in (b".", b"..") or b"\0" in name or len(name) > 255:
            raise PathError(f"{path!r}: bad path component {name!r}")
    return names
