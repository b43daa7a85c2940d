"""The RAFS file system's FUSE operations over the real nydus images in the shared fixtures."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import stat
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support import fuse_client as fc
from tests.support.paths import NYDUS_FIXTURES as FIXTURES
from vhostfs.fs.rafs import RafsFs
from vhostfs.fuse import Dispatcher
from vhostfs.fuse.ops import ROOT_ID, FileHandle, FileSlice, FuseError, NodeId, RequestContext
from vhostfs.rafs import open_image
from vhostfs.rafs.build.builder import BuildOptions, build_image
from vhostfs.storage import RafsConfig, open_storage, parse_config

ROOT = RequestContext(uid=0, gid=0, pid=1)
USER = RequestContext(uid=1000, gid=1000, pid=1)
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


@pytest.fixture(params=["v6/rafs-v6-2.2.boot", "v5/sha256-nocompress-repeatable"])
def fs(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RafsFs]:
    bootstrap = FIXTURES / request.param
    image = open_image(bootstrap)
    config = RafsConfig.from_flags(blob_dir=bootstrap.parent, cache_dir=tmp_path / "cache")
    storage = open_storage(config, image.blobs, bootstrap=bootstrap)
    yield RafsFs(image, storage)
    run(storage.aclose())
    image.close()


async def read_all(fs: RafsFs, node: NodeId, size: int) -> bytes:
    out = bytearray()
    offset = 0
    while offset < size:
        pieces = await fs.read(node, FileHandle(0), offset, 128 * 1024, ROOT)
        assert isinstance(pieces, list)
        for piece in pieces:
            if isinstance(piece, FileSlice):
                out += os.pread(piece.fd, piece.size, piece.pos)
            else:
                out += piece
        offset = len(out)
    return bytes(out)


async def walk(fs: RafsFs, node: NodeId, path: str, found: dict[str, bytes | str]) -> None:
    handle = await fs.opendir(node, os.O_RDONLY, ROOT)
    for entry in await fs.readdir(node, handle.fh, 0, ROOT):
        if entry.name in (b".", b".."):
            continue
        child = await fs.lookup(node, entry.name, ROOT)
        name = f"{path}/{entry.name.decode()}"
        mode = child.attr.st_mode
        assert child.attr.st_ino == entry.ino
        if stat.S_ISDIR(mode):
            found[name] = "dir"
            await walk(fs, child.node_id, name, found)
        elif stat.S_ISLNK(mode):
            found[name] = b"-> " + await fs.readlink(child.node_id, ROOT)
        elif stat.S_ISREG(mode):
            opened = await fs.open(child.node_id, os.O_RDONLY, ROOT)
            assert opened.fh == 0
            found[name] = await read_all(fs, child.node_id, child.attr.st_size)
            assert len(found[name]) == child.attr.st_size


def test_the_whole_tree_reads_through_fuse_operations(fs: RafsFs) -> None:
    found: dict[str, bytes | str] = {}
    run(walk(fs, ROOT_ID, "", found))
    files = {name: data for name, data in found.items() if isinstance(data, bytes)}
    assert files
    if "rafs-v6" in fs.image.path:
        assert len(found["/lib.rs"]) == 16931 and len(found["/sync_io.rs"]) == 13400
        assert b"fn " in found["/lib.rs"]


def test_missing_names_are_negative_entries_the_guest_may_cache(fs: RafsFs) -> None:
    entry = run(fs.lookup(ROOT_ID, b"no-such-name", ROOT))
    assert entry.node_id == 0 and entry.entry_timeout > 0


def test_every_mutation_is_erofs_and_write_opens_too(fs: RafsFs) -> None:
    async def attempts() -> list[int]:
        codes = []
        for call in (
            fs.mkdir(ROOT_ID, b"d", 0o755, 0, ROOT),
            fs.unlink(ROOT_ID, b"x", ROOT),
            fs.create(ROOT_ID, b"n", 0o644, os.O_WRONLY, 0, ROOT),
            fs.setxattr(ROOT_ID, b"user.x", b"1", 0, ROOT),
            fs.access(ROOT_ID, os.W_OK, ROOT),
        ):
            try:
                await call
            except FuseError as exc:
                codes.append(exc.errno)
        return codes

    assert run(attempts()) == [errno.EROFS] * 5


def test_stale_or_foreign_node_ids_are_refused(fs: RafsFs) -> None:
    for foreign in (NodeId(0), NodeId(1 << 56 | 5), NodeId(1 << 63)):
        with pytest.raises(FuseError) as stale:
            run(fs.getattr(foreign, None, ROOT))
        assert stale.value.errno == errno.ESTALE
    # A node never handed out names no valid inode: a clean EIO, never wrong attributes.
    with pytest.raises(FuseError) as bogus:
        run(fs.getattr(NodeId(12345), None, ROOT))
    assert bogus.value.errno == errno.EIO


def test_access_follows_the_mode_bits(fs: RafsFs) -> None:
    run(fs.access(ROOT_ID, os.R_OK | os.X_OK, USER))  # the root directory is world-searchable


def test_the_image_prefetch_list_resolves_to_chunks(fs: RafsFs) -> None:
    refs = list(fs.prefetch_refs([b"/"], everything=False))
    assert refs and all(ref.uncompressed_size > 0 for ref in refs)
    assert list(fs.prefetch_refs([b"/does/not/exist"])) == list(fs.prefetch_refs([]))


def test_lookup_below_a_file_is_enotdir(fs: RafsFs) -> None:
    path = next(p for p, _, attr in fs.image.walk() if stat.S_ISREG(attr.mode))

    async def below(path: bytes) -> int:
        node = ROOT_ID
        for name in path.strip(b"/").split(b"/"):
            node = (await fs.lookup(node, name, ROOT)).node_id
        try:
            await fs.lookup(node, b"x", ROOT)
        except FuseError as exc:
            return exc.errno
        return 0

    assert run(below(path)) == errno.ENOTDIR


def first_file(fs: RafsFs, mode: int) -> bytes:
    return next(p for p, _, attr in fs.image.walk() if attr.mode == stat.S_IFREG | mode)


async def node_of(fs: RafsFs, path: bytes) -> NodeId:
    node = ROOT_ID
    for name in path.strip(b"/").split(b"/"):
        node = (await fs.lookup(node, name, ROOT)).node_id
    return node


def test_access_refuses_what_the_mode_bits_do_not_grant(fs: RafsFs) -> None:
    node = run(node_of(fs, first_file(fs, 0o644)))  # root's, readable by all, executable by none
    run(fs.access(node, os.R_OK, USER))
    for mask in (os.X_OK, os.R_OK | os.X_OK):
        with pytest.raises(FuseError) as refused:
            run(fs.access(node, mask, USER))
        assert refused.value.errno == errno.EACCES
    with pytest.raises(FuseError) as read_only:
        run(fs.access(node, os.W_OK, ROOT))
    assert read_only.value.errno == errno.EROFS


def test_xattrs_are_served_when_enabled(fs: RafsFs) -> None:
    assert fs.serves_xattrs  # from_flags enables them
    assert run(fs.listxattr(ROOT_ID, ROOT)) == []
    with pytest.raises(FuseError) as absent:
        run(fs.getxattr(ROOT_ID, b"user.none", ROOT))
    assert absent.value.errno == errno.ENODATA


def test_disabled_xattrs_answer_enosys_as_nydusd_does(fs: RafsFs) -> None:
    hidden = RafsFs(fs.image, fs.data, enable_xattr=False)
    for call in (hidden.listxattr(ROOT_ID, ROOT), hidden.getxattr(ROOT_ID, b"user.x", ROOT)):
        with pytest.raises(FuseError) as refused:
            run(call)
        assert refused.value.errno == errno.ENOSYS


def test_the_mount_config_decides_about_xattrs(tmp_path: Path) -> None:
    bootstrap = FIXTURES / "v6/rafs-v6-2.2.boot"
    for enable, served in ((False, False), (True, True)):
        document = {
            "device": {"backend": {"type": "localfs", "config": {"dir": str(bootstrap.parent)}}},
            "mode": "direct",
            "enable_xattr": enable,
        }
        with open_image(bootstrap) as image:
            storage = open_storage(parse_config(json.dumps(document)), image.blobs)
            assert RafsFs(image, storage).serves_xattrs is served
            run(storage.aclose())


def test_the_image_flag_serves_xattrs_whatever_the_config(fs: RafsFs) -> None:
    fs.image.has_xattr_flag = True
    try:
        assert RafsFs(fs.image, fs.data, enable_xattr=False).serves_xattrs
    finally:
        fs.image.has_xattr_flag = False


def test_data_that_cannot_be_fetched_is_eio_for_the_guest(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bootstrap = FIXTURES / "v6/rafs-v6-2.2.boot"
    (tmp_path / "empty").mkdir()
    with open_image(bootstrap) as image:
        storage = open_storage(RafsConfig.from_flags(blob_dir=tmp_path / "empty"), image.blobs)
        fs = RafsFs(image, storage)

        async def read_lib_rs() -> None:
            node = await node_of(fs, b"/lib.rs")
            await fs.read(node, FileHandle(0), 0, 4096, ROOT)

        with pytest.raises(FuseError) as failed:
            run(read_lib_rs())
        assert failed.value.errno == errno.EIO
        run(storage.aclose())
    assert any("not found in" in record.getMessage() for record in caplog.records)


def test_a_file_read_sequentially_is_fetched_ahead_of_the_reader(tmp_path: Path) -> None:
    chunk = 64 * 1024
    content = b"".join(f"line {i:08}\n".encode() for i in range(200_000))[: 32 * chunk]
    (tmp_path / "tree").mkdir()
    (tmp_path / "tree" / "big").write_bytes(content)
    built = build_image([tmp_path / "tree"], tmp_path / "image", BuildOptions(chunk_size=chunk))
    image = open_image(built.bootstrap)
    config = RafsConfig.from_flags(blob_dir=tmp_path / "image", cache_dir=tmp_path / "cache")

    async def scenario() -> None:
        storage = open_storage(config, image.blobs, bootstrap=built.bootstrap)
        fs = RafsFs(image, storage)
        node = (await fs.lookup(ROOT_ID, b"big", ROOT)).node_id
        out = bytearray()
        misses_after_start = 0
        for offset in range(0, len(content), 16 * 1024):
            pieces = await fs.read(node, FileHandle(0), offset, 16 * 1024, ROOT)
            assert isinstance(pieces, list)
            for piece in pieces:
                if isinstance(piece, FileSlice):
                    out += os.pread(piece.fd, piece.size, piece.pos)
                else:
                    out += piece
            if offset == 16 * 1024:
                misses_after_start = storage.metrics.cache_misses
            await asyncio.sleep(0.01)  # the guest's pace: readahead lands meanwhile
        assert bytes(out) == content
        # Only the reads before the stream was recognised waited for fetches.
        assert storage.metrics.cache_misses == misses_after_start <= 2
        assert storage.metrics.prefetch_bytes > 0
        await storage.aclose()

    try:
        run(scenario())
    finally:
        image.close()


# Directories without handles: the image lists by inode whatever fh says.


class FuseGuest:
    """Real FUSE bytes through the dispatcher; every reply here comes back inline."""

    def __init__(self, fs: RafsFs, flags: int = fc.ALL_FLAGS) -> None:
        self.dispatcher = Dispatcher(fs)
        self.init = fc.handshake(self.dispatcher.handle, flags=flags)

    def send(self, raw: bytes) -> fc.BufferRequest:
        request = fc.exchange(self.dispatcher.handle, raw, 1 << 16)
        assert request.completed
        return request

    def walk(self, path: bytes) -> int:
        node = 1
        for name in path.strip(b"/").split(b"/"):
            node = fc.parse_entry_out(self.send(fc.lookup(node, name)).payload).nodeid
        return node

    def listing(self, node: int, size: int, plus: bool = False) -> list[fc.Dirent]:
        """A whole directory read with fh 0, until an empty reply."""
        out: list[fc.Dirent] = []
        offset = 0
        while True:
            if plus:
                payload = self.send(fc.readdirplus(node, 0, offset, size)).payload
                entries = [dirent for _, dirent in fc.parse_direntplus(payload)]
            else:
                entries = fc.parse_dirents(self.send(fc.readdir(node, 0, offset, size)).payload)
            if not entries:
                return out
            out += entries
            offset = entries[-1].off


def largest_record(names: list[bytes], plus: bool) -> int:
    return max((24 + len(name) + 7) & ~7 for name in names) + (128 if plus else 0)


@pytest.mark.parametrize("plus", [False, True], ids=["readdir", "readdirplus"])
def test_directories_page_without_handles(fs: RafsFs, plus: bool) -> None:
    guest = FuseGuest(fs)
    assert guest.init.flags & fc.NO_OPENDIR_SUPPORT
    assert guest.send(fc.opendir(1)).error == errno.ENOSYS
    for path, ino, attr in fs.image.walk():
        if not stat.S_ISDIR(attr.mode):
            continue
        node = 1 if ino == fs.image.root_ino else guest.walk(path)
        expected = [entry.name for entry in fs.image.readdir(ino)]
        # One entry per reply at most: every directory takes several.
        listed = guest.listing(node, largest_record(expected, plus), plus)
        assert [d.name for d in listed] == expected
        assert guest.send(fc.opendir(node)).error == errno.ENOSYS  # every time


def test_a_kernel_without_the_flag_still_opens_directories(fs: RafsFs) -> None:
    guest = FuseGuest(fs, flags=fc.ALL_FLAGS & ~fc.NO_OPENDIR_SUPPORT)
    assert not guest.init.flags & fc.NO_OPENDIR_SUPPORT
    fh, flags = fc.parse_open_out(guest.send(fc.opendir(1)).payload)
    assert (fh, flags) == (0, fc.FOPEN_KEEP_CACHE | fc.FOPEN_CACHE_DIR)
    assert guest.listing(1, 4096)
    assert guest.send(fc.releasedir(1, fh)).error == 0


def test_fh0_edges(fs: RafsFs) -> None:
    guest = FuseGuest(fs)
    file = guest.walk(first_file(fs, 0o644))
    for raw in (fc.readdir(file, 0), fc.readdirplus(file, 0)):
        assert guest.send(raw).error == errno.ENOTDIR
    for stale in (0, 1 << 56 | 5, 2**64 - 1):
        assert guest.send(fc.readdir(stale, 0)).error == errno.ESTALE
    for offset in (2**32, 2**63 - 1, 2**64 - 1):
        assert guest.send(fc.readdir(1, 0, offset)).payload == b""
        assert guest.send(fc.readdirplus(1, 0, offset)).payload == b""


def test_a_big_directory_pages_through_each_entry_once(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "big").mkdir(parents=True)
    for i in range(600):
        (tree / "big" / f"entry-{i:03d}-{'z' * (i % 29)}").write_bytes(b"")
    built = build_image([tree], tmp_path / "image", BuildOptions())
    with open_image(built.bootstrap) as image:
        storage = open_storage(RafsConfig.from_flags(blob_dir=tmp_path / "image"), image.blobs)
        guest = FuseGuest(RafsFs(image, storage))
        big = guest.walk(b"big")
        expected = sorted([b".", b"..", *(os.fsencode(n) for n in os.listdir(tree / "big"))])
        for plus in (False, True):
            listed = [d.name for d in guest.listing(big, 4096, plus)]
            assert sorted(listed) == expected
        run(storage.aclose())


def test_a_miss_fetches_the_next_files_of_its_blob_too(tmp_path: Path) -> None:
    (tmp_path / "tree").mkdir()
    for n in range(20):  # small files, one chunk each, written to the blob in this order
        (tmp_path / "tree" / f"f{n:02}").write_bytes(f"file {n} ".encode() * 500)
    built = build_image([tmp_path / "tree"], tmp_path / "image", BuildOptions(chunk_size=65536))
    image = open_image(built.bootstrap)
    config = RafsConfig.from_flags(blob_dir=tmp_path / "image", cache_dir=tmp_path / "cache")

    async def scenario() -> None:
        storage = open_storage(config, image.blobs, bootstrap=built.bootstrap)
        fs = RafsFs(image, storage)
        first = (await fs.lookup(ROOT_ID, b"f00", ROOT)).node_id
        await fs.read(first, FileHandle(0), 0, 65536, ROOT)
        await asyncio.sleep(0.05)  # the amplified fetch lands meanwhile
        misses = storage.metrics.cache_misses
        for n in range(1, 20):
            node = (await fs.lookup(ROOT_ID, f"f{n:02}".encode(), ROOT)).node_id
            pieces = await fs.read(node, FileHandle(0), 0, 65536, ROOT)
            assert isinstance(pieces, list)
            got = b"".join(
                os.pread(p.fd, p.size, p.pos) if isinstance(p, FileSlice) else p for p in pieces
            )
            assert got == f"file {n} ".encode() * 500
        assert storage.metrics.cache_misses == misses  # every later file was fetched already
        await storage.aclose()

    try:
        run(scenario())
    finally:
        image.close()
