"""The VFS: a pseudo root with file systems mounted in it, driven with real FUSE bytes.

Two passthrough exports stand in for Kata's `/containers` and an image at
`/rafs/c1/lowerdir`; the rules under test (routing, node ids, lookup counts, unmounting while
the guest holds nodes, EXDEV, ENOSYS kept local) do not depend on what is mounted.
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
    def __init__(self, vfs: Vfs) -> None:
        self.vfs = vfs
        self.dispatcher = Dispatcher(vfs)
        self.init = fc.handshake(self.dispatcher.handle)

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
        fh = fc.parse_open_out(self.send(fc.opendir(node)).payload)[0]
        return [d.name for d in fc.parse_dirents(self.send(fc.readdir(node, fh)).payload)]

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
