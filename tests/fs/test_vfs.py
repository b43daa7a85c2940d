"""The VFS: a pseudo root with file systems mounted in it, driven with real FUSE bytes.

Two passthrough exports stand in for Kata's `/containers` and an image at
`/rafs/c1/lowerdir`; the rules under test (routing, node ids, lookup counts, unmounting while
the guest holds nodes, EXDEV, ENOSYS kept local, OPENDIR answered for the whole session) do
not depend on what is mounted.
"""

from __future__ import annotations

import asyncio
import errno
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.paths import NYDUS_FIXTURES
from vhostfs.fs import Passthrough
from vhostfs.fs.pseudo import PathError
from vhostfs.fs.rafs import RafsFs
from vhostfs.fs.vfs import INDEX_SHIFT, MAX_MOUNTS, MountTableFull, Vfs
from vhostfs.fuse import Dispatcher
from vhostfs.fuse.ops import FuseError, NodeId, Operations, RequestContext
from vhostfs.rafs import open_image, read_file
from vhostfs.storage import RafsConfig, SyncStorage, open_storage

ROOT = 1


class Guest:
    def __init__(self, vfs: Vfs, **init_kw: int) -> None:
        self.vfs = vfs
        self.dispatcher = Dispatcher(vfs)
        self.init = fc.handshake(self.dispatcher.handle, **init_kw)

    def send(self, raw: bytes) -> fc.BufferRequest:
        request = fc.exchange(self.dispatcher.handle, raw, 1 << 20)
        assert request.completed
        return request

    def lookup(self, parent: int, name: bytes) -> fc.EntryOut:
        request = self.send(fc.lookup(parent, name))
        assert request.error == 0, (name, request.error)
        return fc.parse_entry_out(request.payload)

    def walk(self, path: str) -> int:
        node = ROOT
        for name in path.strip("/").split("/"):
            node = self.lookup(node, name.encode()).nodeid
        return node

    def names(self, node: int) -> list[bytes]:
        """The directory's names, opened as Linux opens it: an OPENDIR answered ENOSYS means
        no handle (fh 0) and no RELEASEDIR."""
        opened = self.send(fc.opendir(node))
        fh = 0 if opened.error == errno.ENOSYS else fc.parse_open_out(opened.payload)[0]
        names = [d.name for d in fc.parse_dirents(self.send(fc.readdir(node, fh)).payload)]
        if fh:
            assert self.error(fc.releasedir(node, fh)) == 0
        return names

    def error(self, raw: bytes) -> int:
        return self.send(raw).error


class NoXattrs(Operations):
    """A mount that answers ENOSYS for xattrs, as an image with enable_xattr false may."""


def share(root: Path, name: str, files: dict[str, bytes]) -> Passthrough:
    directory = root / name
    directory.mkdir()
    for path, data in files.items():
        (directory / path).write_bytes(data)
    return Passthrough(directory)


@pytest.fixture
def kata(tmp_path: Path) -> Iterator[Guest]:
    vfs = Vfs()
    containers = share(tmp_path, "containers", {"shared.txt": b"shared"})
    image = share(tmp_path, "image", {"etc-os-release": b"ID=debian\n"})
    asyncio.run(vfs.mount("/containers", containers))
    asyncio.run(vfs.mount("/rafs/c1/lowerdir", image))
    yield Guest(vfs)
    containers.close()
    image.close()


def test_the_guest_sees_one_tree(kata: Guest) -> None:
    assert sorted(kata.names(ROOT)) == [b".", b"..", b"containers", b"rafs"]
    rafs = kata.lookup(ROOT, b"rafs")
    assert stat.S_ISDIR(rafs.attr.mode) and rafs.attr.mode & 0o777 == 0o777
    assert rafs.attr.uid == 0 and rafs.attr.gid == 0
    assert kata.names(kata.walk("/rafs/c1")) == [b".", b"..", b"lowerdir"]
    lowerdir = kata.walk("/rafs/c1/lowerdir")
    node = kata.lookup(lowerdir, b"etc-os-release").nodeid
    fh = fc.parse_open_out(kata.send(fc.open_(node)).payload)[0]
    assert kata.send(fc.read(node, fh, 0, 100)).payload == b"ID=debian\n"


def test_node_ids_and_inode_numbers_carry_the_mount_index(kata: Guest) -> None:
    containers = kata.lookup(ROOT, b"containers")
    lowerdir = kata.lookup(kata.walk("/rafs/c1"), b"lowerdir")
    assert containers.nodeid >> INDEX_SHIFT == 1 and lowerdir.nodeid >> INDEX_SHIFT == 2
    assert not containers.attr.flags & 1, "no ATTR_SUBMOUNT: overlayfs refuses automount points"
    shared = kata.lookup(containers.nodeid, b"shared.txt")
    release = kata.lookup(lowerdir.nodeid, b"etc-os-release")
    assert shared.attr.ino >> INDEX_SHIFT == 1 and release.attr.ino >> INDEX_SHIFT == 2
    assert shared.attr.ino != release.attr.ino


def test_nothing_joins_two_mounts(kata: Guest) -> None:
    containers = kata.walk("/containers")
    lowerdir = kata.walk("/rafs/c1/lowerdir")
    shared = kata.lookup(containers, b"shared.txt").nodeid
    assert kata.error(fc.link(shared, lowerdir, b"x")) == errno.EXDEV
    assert kata.error(fc.rename(containers, b"shared.txt", lowerdir, b"x")) == errno.EXDEV
    # The pseudo tree takes no changes and holds no files.
    assert kata.error(fc.mkdir(ROOT, b"new")) == errno.EROFS
    assert kata.error(fc.unlink(kata.walk("/rafs"), b"c1")) == errno.EROFS
    assert kata.error(fc.open_(ROOT)) == errno.EISDIR


def test_unmount_while_the_guest_holds_nodes(kata: Guest) -> None:
    c1 = kata.walk("/rafs/c1")
    lowerdir = kata.lookup(c1, b"lowerdir").nodeid
    release = kata.lookup(lowerdir, b"etc-os-release").nodeid
    kata.vfs.umount("/rafs/c1/lowerdir")

    assert kata.error(fc.getattr_(release)) == errno.ESTALE
    assert kata.error(fc.lookup(lowerdir, b"etc-os-release")) == errno.ESTALE
    assert kata.error(fc.getattr_(c1)) == errno.ENOENT, "its pseudo directories went with it"
    assert kata.names(ROOT) == [b".", b"..", b"containers"]
    assert kata.lookup(kata.walk("/containers"), b"shared.txt").nodeid >> INDEX_SHIFT == 1

    # Index 2 stays taken until the guest forgets what it held of it.
    assert asyncio.run(kata.vfs.mount("/rafs/c2/lowerdir", NoXattrs())) == 3
    fc.exchange(kata.dispatcher.handle, fc.batch_forget([(lowerdir, 1), (release, 1)]), 0)
    assert asyncio.run(kata.vfs.mount("/rafs/c3/lowerdir", NoXattrs())) == 2


def test_enosys_from_one_mount_stays_local() -> None:
    vfs = Vfs()
    asyncio.run(vfs.mount("/quiet", NoXattrs()))
    node = NodeId(1 << INDEX_SHIFT | 1)
    ctx = RequestContext(0, 0, 0)
    with pytest.raises(FuseError) as getxattr:
        asyncio.run(vfs.getxattr(node, b"user.x", ctx))
    assert getxattr.value.errno == errno.ENODATA
    assert asyncio.run(vfs.listxattr(node, ctx)) == []
    with pytest.raises(FuseError) as access:
        asyncio.run(vfs.access(node, 0, ctx))
    assert access.value.errno == errno.EOPNOTSUPP


@pytest.mark.parametrize(
    ("path", "says"),
    [
        ("/", "root"),
        ("relative", "absolute"),
        ("/a/../b", "bad path component"),
        ("/a/./b", "bad path component"),
        ("/containers", "already exists"),
        ("/containers/inner", "mountpoint already"),
        ("/rafs/c1", "other mounts lie below"),
    ],
)
def test_bad_mountpoints(kata: Guest, path: str, says: str) -> None:
    with pytest.raises(PathError, match=says):
        asyncio.run(kata.vfs.mount(path, NoXattrs()))


def test_at_most_255_mounts() -> None:
    vfs = Vfs()

    async def fill() -> None:
        for i in range(MAX_MOUNTS):
            await vfs.mount(f"/m/{i}", NoXattrs())
        with pytest.raises(MountTableFull):
            await vfs.mount("/one-more", NoXattrs())

    asyncio.run(fill())


def test_a_rafs_image_serves_through_the_pseudo_root(tmp_path: Path) -> None:
    bootstrap = NYDUS_FIXTURES / "v6" / "rafs-v6-2.2.boot"
    image = open_image(bootstrap)
    config = RafsConfig.from_flags(blob_dir=bootstrap.parent)
    with SyncStorage(config, image.blobs, bootstrap=bootstrap) as offline:
        ino = image.lookup(image.root_ino, b"lib.rs")
        assert ino is not None
        expected = read_file(image, offline, ino, 0, 1 << 20)
    assert len(expected) == 16931

    async def serve() -> bytes:
        storage = open_storage(config, image.blobs, bootstrap=bootstrap)
        vfs = Vfs()
        await vfs.mount("/rafs/c1/lowerdir", RafsFs(image, storage))
        dispatcher = Dispatcher(vfs)
        fc.handshake(dispatcher.handle)

        async def call(raw: bytes) -> fc.BufferRequest:
            request = fc.exchange(dispatcher.handle, raw, 1 << 20)
            await dispatcher.drain()  # a chunk fetch suspends the request; it ends here
            assert request.completed and request.error == 0
            return request

        node = 1
        for name in (b"rafs", b"c1", b"lowerdir", b"lib.rs"):
            node = fc.parse_entry_out((await call(fc.lookup(node, name))).payload).nodeid
        assert node >> INDEX_SHIFT == 1
        fh = fc.parse_open_out((await call(fc.open_(node))).payload)[0]
        pieces = [(await call(fc.read(node, fh, at, 8192))).payload for at in range(0, 16931, 8192)]
        await storage.aclose()
        return b"".join(pieces)

    assert asyncio.run(serve()) == expected
    image.close()


# OPENDIR: answered for the whole session.

HANDLES_KERNEL = fc.ALL_FLAGS & ~fc.NO_OPENDIR_SUPPORT


def test_the_vfs_answers_every_opendir_with_enosys_when_negotiated(kata: Guest) -> None:
    assert kata.init.flags & fc.NO_OPENDIR_SUPPORT
    containers = kata.walk("/containers")
    for node in (ROOT, kata.walk("/rafs"), containers, kata.walk("/rafs/c1/lowerdir")):
        # ENOSYS itself, not the EOPNOTSUPP a mount's ENOSYS becomes: it is meant to end
        # OPENDIR for the session.
        assert kata.error(fc.opendir(node)) == errno.ENOSYS
        assert kata.error(fc.opendir(node)) == errno.ENOSYS
    assert kata.error(fc.opendir(0xDE << INDEX_SHIFT | 7)) == errno.ENOSYS
    # Pseudo directories and mounts list with fh 0, inode numbers folded as ever.
    assert sorted(kata.names(ROOT)) == [b".", b"..", b"containers", b"rafs"]
    listing = fc.parse_dirents(kata.send(fc.readdir(containers, 0)).payload)
    shared = next(d for d in listing if d.name == b"shared.txt")
    assert shared.ino >> INDEX_SHIFT == 1
    assert kata.error(fc.fsyncdir(containers, 0)) == 0
    assert kata.error(fc.fsyncdir(ROOT, 0)) == 0


def test_without_the_flag_opendir_goes_to_the_mount(tmp_path: Path) -> None:
    vfs = Vfs()
    containers = share(tmp_path, "containers", {"shared.txt": b"shared"})
    asyncio.run(vfs.mount("/containers", containers))
    try:
        guest = Guest(vfs, flags=HANDLES_KERNEL)
        assert not guest.init.flags & fc.NO_OPENDIR_SUPPORT
        assert fc.parse_open_out(guest.send(fc.opendir(ROOT)).payload) == (0, 0)
        node = guest.walk("/containers")
        fh = fc.parse_open_out(guest.send(fc.opendir(node)).payload)[0]
        assert fh != 0 and len(containers.handles) == 1  # the passthrough's own handle
        assert b"shared.txt" in guest.names(node)
        assert guest.error(fc.releasedir(node, fh)) == 0
        assert len(containers.handles) == 0
    finally:
        containers.close()


def test_one_mount_that_keeps_opendir_keeps_it_for_all(tmp_path: Path) -> None:
    """cache=never keeps OPENDIR; a mount that wanted the flag answers ENOSYS, which the VFS
    turns into an open without a handle, as the kernel itself would have made it."""
    vfs = Vfs()
    (tmp_path / "never").mkdir()
    (tmp_path / "never" / "a").write_bytes(b"a")
    never = Passthrough(tmp_path / "never", cache="never")
    auto = share(tmp_path, "auto", {"b": b"b"})
    asyncio.run(vfs.mount("/never", never))
    asyncio.run(vfs.mount("/auto", auto))
    try:
        guest = Guest(vfs)
        assert not guest.init.flags & fc.NO_OPENDIR_SUPPORT
        never_root, auto_root = guest.walk("/never"), guest.walk("/auto")
        fh = fc.parse_open_out(guest.send(fc.opendir(never_root)).payload)[0]
        assert fh != 0
        opened = fc.parse_open_out(guest.send(fc.opendir(auto_root)).payload)
        assert opened == (0, fc.FOPEN_KEEP_CACHE | fc.FOPEN_CACHE_DIR)
        assert guest.names(auto_root) == [b".", b"..", b"b"]
        assert guest.error(fc.releasedir(auto_root, 0)) == 0
        assert guest.error(fc.releasedir(never_root, fh)) == 0
    finally:
        never.close()
        auto.close()


def test_a_mount_added_after_init_lists_without_handles(tmp_path: Path) -> None:
    vfs = Vfs()
    guest = Guest(vfs)  # nothing mounted yet: the pseudo tree alone wants the flag
    assert guest.init.flags & fc.NO_OPENDIR_SUPPORT
    assert guest.error(fc.opendir(ROOT)) == errno.ENOSYS
    assert guest.names(ROOT) == [b".", b".."]
    late = share(tmp_path, "late", {"x": b"x"})
    asyncio.run(vfs.mount("/late", late))
    try:
        node = guest.walk("/late")
        assert guest.error(fc.opendir(node)) == errno.ENOSYS
        assert guest.names(node) == [b".", b"..", b"x"]
    finally:
        late.close()


def test_flags_a_mount_adds_are_on_for_the_session(tmp_path: Path) -> None:
    """The passthrough's writeback cache and killpriv_v2 are not in the dispatcher's offer;
    they must survive the pseudo root, as they do for the passthrough alone."""
    vfs = Vfs()
    (tmp_path / "containers").mkdir()
    containers = Passthrough(tmp_path / "containers", writeback=True)
    asyncio.run(vfs.mount("/containers", containers))
    try:
        flags = Guest(vfs).init.flags
        added = fc.WRITEBACK_CACHE | fc.HANDLE_KILLPRIV_V2 | fc.SETXATTR_EXT
        assert flags & added == added
        assert flags & fc.NO_OPENDIR_SUPPORT
    finally:
        containers.close()
