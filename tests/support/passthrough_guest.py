"""A test guest for the passthrough: real FUSE bytes through the real dispatcher.

Requests that the file system finishes on a worker thread (fsync, big writes, ...) suspend;
`send` then runs an event loop until the reply is there, as the daemon's loop would.

Directories are opened as Linux does it (fs/fuse/file.c): OPENDIR until the daemon answers it
with ENOSYS, then never again, every directory read with fh 0 and no RELEASEDIR. The default
kernel offers NO_OPENDIR_SUPPORT; `HANDLES_KERNEL` is one that does not, so the daemon keeps
handing out directory handles.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import weakref
from pathlib import Path

from tests.support import fuse_client as fc
from vhostfs.fs import Passthrough
from vhostfs.fuse import Dispatcher

ROOT = 1
HANDLES_KERNEL = fc.ALL_FLAGS & ~fc.NO_OPENDIR_SUPPORT
Snapshot = dict[str, tuple[object, ...]]


class Guest:
    """Talks FUSE to a Passthrough the way the guest kernel would."""

    def __init__(self, fs: Passthrough, **init_kw: object) -> None:
        self.fs = fs
        self.d = Dispatcher(fs)
        self.loop = asyncio.new_event_loop()
        weakref.finalize(self, self.loop.close)
        self.init = fc.handshake(self.d.handle, **init_kw)
        self.no_opendir = False  # OPENDIR was answered with ENOSYS: fh 0 from now on

    def send(self, raw: bytes, writable_len: int = 1 << 21) -> fc.BufferRequest:
        return self.loop.run_until_complete(self.asend(raw, writable_len))

    async def asend(self, raw: bytes, writable_len: int = 1 << 21) -> fc.BufferRequest:
        """Send one request on the running loop and wait for its reply."""
        req = fc.exchange(self.d.handle, raw, writable_len, data_limit=len(raw))
        while not req.completed:
            await asyncio.sleep(0.001)
        return req

    def errno_of(self, raw: bytes) -> int:
        return self.send(raw).error

    def setxattr(
        self, node: int, name: bytes, value: bytes, flags: int = 0, setxattr_flags: int = 0
    ) -> bytes:
        """SETXATTR as the kernel sends it in this session (16 bytes under SETXATTR_EXT)."""
        extended = self.init.flags & fc.SETXATTR_EXT
        return fc.setxattr(
            node, name, value, flags, setxattr_flags=setxattr_flags if extended else None
        )

    def lookup(self, parent: int, name: bytes) -> fc.EntryOut:
        return fc.parse_entry_out(self.send(fc.lookup(parent, name)).payload)

    def walk(self, *names: bytes) -> int:
        node = ROOT
        for name in names:
            node = self.lookup(node, name).nodeid
        return node

    def open(self, node: int, flags: int = os.O_RDONLY) -> int:
        return fc.parse_open_out(self.send(fc.open_(node, flags)).payload)[0]

    def create(self, parent: int, name: bytes, mode: int = 0o644, **kw: int) -> tuple[int, int]:
        """(node, fh) of a new file opened read-write."""
        payload = self.send(fc.create(parent, name, os.O_RDWR | os.O_CREAT, mode, **kw)).payload
        return fc.parse_entry_out(payload).nodeid, fc.parse_open_out(payload, 128)[0]

    def opendir(self, node: int) -> int:
        """The handle to read directory node with (0: none, the daemon wants no OPENDIR)."""
        if self.no_opendir:
            return 0
        req = self.send(fc.opendir(node))
        if req.error == errno.ENOSYS:
            self.no_opendir = True
            return 0
        return fc.parse_open_out(req.payload)[0]

    def read(self, node: int, fh: int, offset: int, size: int) -> bytes:
        return self.send(fc.read(node, fh, offset, size)).payload

    def nlookup(self, node: int) -> int:
        try:
            return self.fs.inodes.get(node).nlookup  # type: ignore[arg-type]
        except Exception:
            return 0

    def listing(self, node: int, size: int, plus: bool = False) -> list[tuple[int, fc.Dirent]]:
        """Page through a whole directory; (nodeid, dirent) per entry (nodeid 0 for READDIR)."""
        fh = self.opendir(node)
        out: list[tuple[int, fc.Dirent]] = []
        offset = 0
        while True:
            build = fc.readdirplus if plus else fc.readdir
            payload = self.send(build(node, fh, offset, size)).payload
            if not payload:
                break
            if plus:
                page = [(e.nodeid, de) for e, de in fc.parse_direntplus(payload)]
            else:
                page = [(0, de) for de in fc.parse_dirents(payload)]
            out += page
            offset = page[-1][1].off
        if fh:
            assert self.send(fc.releasedir(node, fh)).error == 0
        return out


def build_tree(tmp_path: Path) -> Path:
    """An export with one of everything, and a file next to it that must stay unreachable."""
    root = tmp_path / "export"
    root.mkdir()
    (root / "file.txt").write_bytes(b"hello world\n")
    os.link(root / "file.txt", root / "hard")
    (root / "big.bin").write_bytes(os.urandom(3 << 20))
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "inner.txt").write_bytes(b"inner")
    (root / "link_etc").symlink_to("/etc")
    (root / "up").symlink_to("..")
    (root / "rel").symlink_to("sub/inner.txt")
    (root / "exec.sh").write_bytes(b"#!/bin/sh\n")
    (root / "exec.sh").chmod(0o755)
    (root / "private").write_bytes(b"secret")
    (root / "private").chmod(0o600)
    os.mkfifo(root / "fifo")
    with open(root / "sparse", "wb") as f:
        f.truncate(8 << 20)
        f.seek(4 << 20)
        f.write(b"data" * 1024)
    many = root / "many"
    many.mkdir()
    for i in range(150):
        (many / f"entry-{i:03d}-{'x' * (i % 17)}").write_bytes(b"")
    (tmp_path / "outside.txt").write_bytes(b"must not be reachable")
    return root


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
