"""Writing an image's tree out to a local directory: contents, modes, owners, links, xattrs,
device nodes and mtimes.

Names come from the image but cannot contain "/" or be "." or ".." (the reader refuses such
entries), and every parent is a directory created here, so nothing is written outside the
output directory. Directory attributes are applied last, deepest first, so that a read-only
directory can still be filled and creating entries does not disturb the mtimes set.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass, field

from vhostfs.rafs.base import InodeAttr, RafsImage
from vhostfs.rafs.file_data import read_file
from vhostfs.storage.sync import SyncStorage

READ_SIZE = 4 << 20
# Errors that mean "this system or user cannot hold that", not "the unpack is broken".
_NOT_PERMITTED = (errno.EPERM, errno.EACCES, errno.ENOTSUP, errno.EOPNOTSUPP)


class UnpackError(Exception):
    """The output cannot be written; the message says why."""


@dataclass(slots=True)
class UnpackReport:
    inodes: int = 0
    files: int = 0
    file_bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # what could not be recreated, and why


def unpack_image(
    image: RafsImage,
    store: SyncStorage,
    output: str | os.PathLike[str],
    *,
    owners: bool | None = None,
    on_file: Callable[[int], None] | None = None,
) -> UnpackReport:
    """Recreate the image's tree in `output`, which must be missing or empty. Owners are
    set when `owners` (default: when running as root) and the image records them."""
    top = os.fsencode(output)
    if os.path.lexists(top) and (not os.path.isdir(top) or os.listdir(top)):
        raise UnpackError(f"{os.fsdecode(top)}: exists and is not an empty directory")
    os.makedirs(top, exist_ok=True)
    writer = _Writer(
        image,
        store,
        set_owners=(os.geteuid() == 0 if owners is None else owners) and image.explicit_uid_gid,
        on_file=on_file,
    )
    directories: list[tuple[bytes, int, InodeAttr]] = []
    for path, ino, attr in image.walk():
        writer.report.inodes += 1
        target = os.path.join(top, path.lstrip(b"/")) if path != b"/" else top
        if stat.S_ISDIR(attr.mode):
            if path != b"/":
                os.mkdir(target, 0o700)
            directories.append((target, ino, attr))
        else:
            writer.create(target, ino, attr)
    for target, ino, attr in reversed(directories):
        writer.apply_attributes(target, ino, attr)
    return writer.report


class _Writer:
    def __init__(
        self,
        image: RafsImage,
        store: SyncStorage,
        set_owners: bool,
        on_file: Callable[[int], None] | None,
    ) -> None:
        self._image = image
        self._store = store
        self._set_owners = set_owners
        self._on_file = on_file
        self._first_path: dict[int, bytes] = {}  # hard links: later names link to the first
        self._refused: set[str] = set()  # kinds of attribute already reported as skipped
        self.report = UnpackReport()

    def create(self, target: bytes, ino: int, attr: InodeAttr) -> None:
        first = self._first_path.get(ino)
        if first is not None:
            os.link(first, target, follow_symlinks=False)
            return
        kind = stat.S_IFMT(attr.mode)
        if kind == stat.S_IFREG:
            self._write_file(target, ino, attr.size)
        elif kind == stat.S_IFLNK:
            os.symlink(self._image.readlink(ino), target)
        elif kind == stat.S_IFIFO:
            os.mkfifo(target, 0o600)
        elif not self._make_node(target, attr):
            return
        self._first_path[ino] = target
        self.apply_attributes(target, ino, attr)

    def _write_file(self, target: bytes, ino: int, size: int) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(target, flags, 0o600)
        try:
            for offset in range(0, size, READ_SIZE):
                data = read_file(self._image, self._store, ino, offset, READ_SIZE)
                if data.count(0) == len(data):
                    continue  # leave a hole; ftruncate below gives the file its size
                os.lseek(fd, offset, os.SEEK_SET)
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        self.report.files += 1
        self.report.file_bytes += size
        if self._on_file is not None:
            self._on_file(size)

    def _make_node(self, target: bytes, attr: InodeAttr) -> bool:
        """Device node or socket; False (and noted) when this process may not make it."""
        rdev = attr.rdev if stat.S_ISCHR(attr.mode) or stat.S_ISBLK(attr.mode) else 0
        try:
            os.mknod(target, stat.S_IFMT(attr.mode) | 0o600, rdev)
        except OSError as e:
            if e.errno not in _NOT_PERMITTED:
                raise
            self.report.skipped.append(f"{os.fsdecode(target)}: {e.strerror}")
            return False
        return True

    def apply_attributes(self, target: bytes, ino: int, attr: InodeAttr) -> None:
        # Owner before mode: chown clears the set-id bits.
        if self._set_owners:
            os.chown(target, attr.uid, attr.gid, follow_symlinks=False)
        if not stat.S_ISLNK(attr.mode):
            os.chmod(target, stat.S_IMODE(attr.mode))
        for name in self._image.listxattr(ino):
            value = self._image.getxattr(ino, name)
            if value is not None:
                self._set_xattr(target, name, value)
        mtime = attr.mtime * 1_000_000_000 + attr.mtime_nsec
        os.utime(target, ns=(mtime, mtime), follow_symlinks=False)

    def _set_xattr(self, target: bytes, name: bytes, value: bytes) -> None:
        try:
            os.setxattr(target, name, value, follow_symlinks=False)
        except OSError as e:
            if e.errno not in _NOT_PERMITTED:
                raise
            namespace = name.split(b".", 1)[0].decode(errors="replace")
            if namespace not in self._refused:
                self._refused.add(namespace)
                self.report.skipped.append(f"{namespace}.* xattrs: {e.strerror}")
