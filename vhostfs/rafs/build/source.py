"""Reading build sources into a Tree: directories, and tar layers (plain, gzip or zstd).

Each source is one layer, applied in the order given (tree.py has the OCI whiteout rules).
File contents are not read here, only located: a directory's files stay where they are, and so
do the members of an uncompressed tar (at their data offset in the archive). Members of
compressed archives can only be read in stream order, so their bytes are copied to a spool
file that the chunker can then read in any order.
"""

from __future__ import annotations

import base64
import errno
import gzip
import os
import stat
import tarfile
import tempfile
import urllib.parse
import zlib
from collections.abc import Sequence
from types import TracebackType
from typing import IO, cast

import zstandard

from vhostfs.rafs.build.errors import BuildError
from vhostfs.rafs.build.tree import FileData, Node, Path, Tree, display

_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_COPY_SIZE = 1 << 20
_UNSUPPORTED_XATTR_ERRNOS = (errno.ENOTSUP, errno.EOPNOTSUPP)
_TAR_TYPES = (
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.CONTTYPE,
    tarfile.GNUTYPE_SPARSE,
    tarfile.LNKTYPE,
    tarfile.SYMTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.DIRTYPE,
    tarfile.FIFOTYPE,
)


class Spool:
    """A temporary file holding the contents of compressed layers, deleted on close."""

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self._file = tempfile.NamedTemporaryFile(prefix=".spool-", dir=directory)  # noqa: SIM115
        self.path = self._file.name
        self._size = 0

    def store(self, reader: IO[bytes], size: int, what: str) -> FileData:
        offset = self._size
        remaining = size
        while remaining:
            piece = reader.read(min(remaining, _COPY_SIZE))
            if not piece:
                raise BuildError(f"{what}: archive ends inside the file")
            self._file.write(piece)
            remaining -= len(piece)
        self._file.flush()
        self._size += size
        return FileData(self.path, offset, size)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def load_sources(
    sources: Sequence[str | os.PathLike[str]],
    spool: Spool,
    skip: str | os.PathLike[str] | None = None,
) -> Node:
    """The root of the tree the sources make, applied in order. `skip` (the output directory)
    is left out wherever a directory source contains it."""
    tree = Tree()
    skipped: set[tuple[int, int]] = set()
    if skip is not None:
        info = os.stat(skip)
        skipped.add((info.st_dev, info.st_ino))
    for source in sources:
        tree.begin_layer()
        try:
            if os.path.isdir(source):
                _add_directory(tree, os.fsdecode(source), skipped)
            else:
                _add_tar(tree, os.fsdecode(source), spool)
        except OSError as e:
            raise BuildError(f"{os.fsdecode(source)}: {e.strerror or e}") from None
    return tree.root


# --- Directories ---------------------------------------------------------------------------


def _add_directory(tree: Tree, top: str, skipped: set[tuple[int, int]]) -> None:
    tree.add((), _node_from_disk(top, os.lstat(top)))
    first_link: dict[tuple[int, int], Path] = {}
    pending: list[tuple[str, Path]] = [(top, ())]
    while pending:
        directory, path = pending.pop()
        with os.scandir(os.fsencode(directory)) as scan:
            entries = sorted(scan, key=lambda entry: entry.name)
        for entry in entries:
            child_path = (*path, entry.name)
            full = os.fsdecode(entry.path)
            info = entry.stat(follow_symlinks=False)
            if (info.st_dev, info.st_ino) in skipped:
                continue
            if not stat.S_ISDIR(info.st_mode) and info.st_nlink > 1:
                key = (info.st_dev, info.st_ino)
                if key in first_link:
                    tree.link(child_path, first_link[key])
                    continue
                first_link[key] = child_path
            tree.add(child_path, _node_from_disk(full, info))
            if stat.S_ISDIR(info.st_mode):
                pending.append((full, child_path))


def _node_from_disk(path: str, info: os.stat_result) -> Node:
    kind = stat.S_IFMT(info.st_mode)
    node = Node(
        mode=info.st_mode,
        uid=info.st_uid,
        gid=info.st_gid,
        mtime=info.st_mtime_ns // 1_000_000_000,
        mtime_nsec=info.st_mtime_ns % 1_000_000_000,
        xattrs=_disk_xattrs(path),
    )
    if kind in (stat.S_IFCHR, stat.S_IFBLK):
        node.rdev = info.st_rdev
    elif kind == stat.S_IFLNK:
        node.target = os.readlink(os.fsencode(path))
    elif kind == stat.S_IFREG and info.st_size:
        node.data = FileData(path, 0, info.st_size)
    return node


def _disk_xattrs(path: str) -> dict[bytes, bytes]:
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in _UNSUPPORTED_XATTR_ERRNOS:
            return {}
        raise
    return {
        os.fsencode(name): os.getxattr(path, name, follow_symlinks=False) for name in sorted(names)
    }


# --- Tar layers ----------------------------------------------------------------------------


def _add_tar(tree: Tree, archive: str, spool: Spool) -> None:
    with open(archive, "rb") as raw:
        magic = raw.read(4)
        raw.seek(0)
        stream: IO[bytes]
        if magic.startswith(_GZIP_MAGIC):
            stream = cast(IO[bytes], gzip.GzipFile(fileobj=raw, mode="rb"))
        elif magic == _ZSTD_MAGIC:
            stream = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
        else:
            stream = raw
        in_place = stream is raw  # members can be read where they are in the archive
        try:
            with tarfile.open(
                fileobj=stream, mode="r|", encoding="utf-8", errors="surrogateescape"
            ) as tar:
                for member in tar:
                    _add_member(tree, archive, tar, member, spool, in_place)
        except (tarfile.TarError, EOFError, zlib.error, zstandard.ZstdError, gzip.BadGzipFile) as e:
            raise BuildError(f"{archive}: not a readable tar archive: {e}") from None


def _add_member(
    tree: Tree,
    archive: str,
    tar: tarfile.TarFile,
    member: tarfile.TarInfo,
    spool: Spool,
    in_place: bool,
) -> None:
    path = _member_path(archive, member.name)
    what = f"{archive}: {display(path)}"
    if member.type not in _TAR_TYPES:
        raise BuildError(f"{what}: unsupported tar entry type {member.type!r}")
    if member.islnk():
        tree.link(path, _member_path(archive, member.linkname))
        return
    mtime, mtime_nsec = _member_mtime(member)
    node = Node(
        mode=_member_kind(member) | (member.mode & 0o7777),
        uid=member.uid,
        gid=member.gid,
        mtime=mtime,
        mtime_nsec=mtime_nsec,
        xattrs=_member_xattrs(member, what),
    )
    if member.isreg() and member.size:
        if in_place and not member.issparse():
            node.data = FileData(archive, member.offset_data, member.size)
        else:
            reader = tar.extractfile(member)
            if reader is None:
                raise BuildError(f"{what}: cannot read its contents")
            node.data = spool.store(reader, member.size, what)
    elif member.issym():
        node.target = _encode(member.linkname)
    elif member.ischr() or member.isblk():
        node.rdev = os.makedev(member.devmajor, member.devminor)
    tree.add(path, node)


def _member_path(archive: str, name: str) -> Path:
    parts = tuple(part for part in _encode(name).split(b"/") if part not in (b"", b"."))
    if b".." in parts:
        raise BuildError(f"{archive}: entry {name!r} climbs out of the archive root")
    return parts


def _member_kind(member: tarfile.TarInfo) -> int:
    if member.isdir():
        return stat.S_IFDIR
    if member.issym():
        return stat.S_IFLNK
    if member.ischr():
        return stat.S_IFCHR
    if member.isblk():
        return stat.S_IFBLK
    if member.isfifo():
        return stat.S_IFIFO
    return stat.S_IFREG


def _member_mtime(member: tarfile.TarInfo) -> tuple[int, int]:
    # A pax mtime carries nanoseconds as decimal text; the float tarfile makes of it would
    # round them.
    text = member.pax_headers.get("mtime")
    if text is not None:
        seconds, _, fraction = text.partition(".")
        try:
            nsec = int((fraction + "000000000")[:9]) if fraction else 0
            whole = int(seconds)
        except ValueError:
            pass
        else:
            if whole < 0 and nsec:  # "-1.25" is 1.25 s before the epoch
                return whole - 1, 1_000_000_000 - nsec
            return whole, nsec
    return int(member.mtime), 0


def _member_xattrs(member: tarfile.TarInfo, what: str) -> dict[bytes, bytes]:
    xattrs: dict[bytes, bytes] = {}
    for key, value in member.pax_headers.items():
        if key.startswith("SCHILY.xattr."):
            xattrs[_encode(key[len("SCHILY.xattr.") :])] = _encode(value)
        elif key.startswith("LIBARCHIVE.xattr."):
            name = urllib.parse.unquote_to_bytes(key[len("LIBARCHIVE.xattr.") :])
            try:
                xattrs[name] = base64.b64decode(_encode(value) + b"==")
            except ValueError:
                raise BuildError(f"{what}: xattr {name!r}: value is not base64") from None
    return dict(sorted(xattrs.items()))


def _encode(text: str) -> bytes:
    # tarfile decoded names and pax values with surrogateescape: this gives the raw bytes back.
    return text.encode("utf-8", "surrogateescape")
