"""The read-only passthrough (--readonly) over real host directories, driven with real FUSE
bytes through the dispatcher."""

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import fuse_client as fc
from tests.support.passthrough_guest import HANDLES_KERNEL, ROOT, Guest, build_tree
from vhostfs.fs import Passthrough
from vhostfs.fs.passthrough import CachePolicy


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return build_tree(tmp_path)


@pytest.fixture
def fs(tree: Path) -> Iterator[Passthrough]:
    passthrough = Passthrough(tree, readonly=True)
    yield passthrough
    passthrough.close()


@pytest.fixture
def g(fs: Passthrough) -> Guest:
    return Guest(fs)


@pytest.fixture(params=[fc.ALL_FLAGS, HANDLES_KERNEL], ids=["fh0", "handles"])
def dg(fs: Passthrough, request: pytest.FixtureRequest) -> Guest:
    """A guest reading directories without handles (the kernel offers NO_OPENDIR_SUPPORT), or
    with them (it does not)."""
    return Guest(fs, flags=request.param)


@pytest.fixture
def hg(fs: Passthrough) -> Guest:
    """A guest whose kernel does not offer NO_OPENDIR_SUPPORT: directories have handles."""
    return Guest(fs, flags=HANDLES_KERNEL)


# Lookup, attributes and lookup counts.


def test_lookup_matches_host_lstat(g: Guest, tree: Path) -> None:
    entry = g.lookup(ROOT, b"file.txt")
    host = os.lstat(tree / "file.txt")
    assert entry.nodeid >= 2
    assert (entry.attr.ino, entry.attr.size, entry.attr.mode) == (host.st_ino, 12, host.st_mode)
    assert (entry.attr.nlink, entry.attr.uid, entry.attr.gid) == (2, host.st_uid, host.st_gid)
    assert (entry.attr.mtime, entry.attr.mtimensec) == divmod(host.st_mtime_ns, 10**9)
    assert (entry.entry_valid, entry.attr_valid) == (1, 1)  # cache=auto


def test_hard_links_share_a_node_and_count(g: Guest) -> None:
    a = g.lookup(ROOT, b"file.txt").nodeid
    b = g.lookup(ROOT, b"hard").nodeid
    assert a == b
    assert g.nlookup(a) == 2


def test_getattr(g: Guest, tree: Path) -> None:
    node = g.walk(b"sub", b"inner.txt")
    out = fc.parse_attr_out(g.send(fc.getattr_(node)).payload)
    assert out.attr.ino == os.stat(tree / "sub" / "inner.txt").st_ino
    assert out.attr_valid == 1
    root = fc.parse_attr_out(g.send(fc.getattr_(ROOT)).payload)
    assert root.attr.ino == os.stat(tree).st_ino


def test_missing_name_is_a_cached_negative_entry(g: Guest) -> None:
    entry = g.lookup(ROOT, b"nope")
    assert entry.nodeid == 0
    assert entry.entry_valid == 1


def test_forget_is_exact_and_ids_are_not_reused(g: Guest) -> None:
    node = 0
    for _ in range(3):
        node = g.lookup(ROOT, b"file.txt").nodeid
    assert g.nlookup(node) == 3
    g.send(fc.forget(node, 2), writable_len=0)
    assert g.nlookup(node) == 1
    assert g.errno_of(fc.getattr_(node)) == 0
    g.send(fc.batch_forget([(node, 1)]), writable_len=0)
    assert g.nlookup(node) == 0
    assert g.errno_of(fc.getattr_(node)) == errno.ESTALE
    again = g.lookup(ROOT, b"file.txt").nodeid
    assert again != node


def test_forget_releases_descriptors(g: Guest, tree: Path) -> None:
    many = g.walk(b"many")
    baseline = len(os.listdir("/proc/self/fd"))
    nodes = [g.lookup(many, os.fsencode(name)).nodeid for name in os.listdir(tree / "many")]
    assert len(os.listdir("/proc/self/fd")) == baseline + 150
    g.send(fc.batch_forget([(n, 1) for n in nodes]), writable_len=0)
    assert len(os.listdir("/proc/self/fd")) == baseline


def test_forget_of_root_or_unknown_is_harmless(g: Guest) -> None:
    g.send(fc.forget(ROOT, 100), writable_len=0)
    g.send(fc.forget(987654, 1), writable_len=0)
    assert g.errno_of(fc.getattr_(ROOT)) == 0


# Containment.


def test_dotdot_at_root_is_root(g: Guest) -> None:
    assert g.lookup(ROOT, b"..").nodeid == ROOT
    assert g.lookup(ROOT, b".").nodeid == ROOT


def test_dotdot_below_root_returns_known_parent(g: Guest) -> None:
    sub = g.walk(b"sub")
    deeper = g.lookup(sub, b"deeper").nodeid
    assert g.lookup(deeper, b"..").nodeid == sub
    assert g.lookup(sub, b"..").nodeid == ROOT


def test_dotdot_to_an_unknown_parent_is_refused(g: Guest) -> None:
    sub = g.walk(b"sub")
    deeper = g.lookup(sub, b"deeper").nodeid
    g.send(fc.forget(sub, 1), writable_len=0)  # the kernel would never do this
    assert g.errno_of(fc.lookup(deeper, b"..")) == errno.EACCES


@pytest.mark.parametrize("name", [b"a/b", b"../outside.txt", b"/etc/passwd", b"sub/inner.txt"])
def test_names_with_slash_are_einval(g: Guest, name: bytes) -> None:
    assert g.errno_of(fc.lookup(ROOT, name)) == errno.EINVAL


def test_symlinks_are_inodes_not_paths(g: Guest) -> None:
    link = g.lookup(ROOT, b"link_etc")
    assert stat.S_ISLNK(link.attr.mode)
    assert link.attr.ino != os.stat("/etc").st_ino
    assert g.send(fc.readlink(link.nodeid)).payload == b"/etc"
    # Looking up a name "inside" the symlink must not reach /etc/passwd.
    assert g.errno_of(fc.lookup(link.nodeid, b"passwd")) == errno.ENOTDIR
    assert g.errno_of(fc.lookup(link.nodeid, b"..")) == errno.ENOTDIR
    assert g.errno_of(fc.readdir(link.nodeid, 0)) == errno.ENOTDIR
    assert g.errno_of(fc.open_(link.nodeid)) == errno.EACCES
    up = g.lookup(ROOT, b"up")
    assert g.send(fc.readlink(up.nodeid)).payload == b".."
    assert g.errno_of(fc.lookup(up.nodeid, b"outside.txt")) == errno.ENOTDIR


def test_lookup_inside_a_file_is_enotdir(g: Guest) -> None:
    node = g.walk(b"file.txt")
    assert g.errno_of(fc.lookup(node, b"x")) == errno.ENOTDIR
    assert g.errno_of(fc.lookup(node, b".")) == errno.ENOTDIR


def test_readlink_of_non_symlink_is_einval(g: Guest) -> None:
    assert g.errno_of(fc.readlink(g.walk(b"file.txt"))) == errno.EINVAL
    assert g.send(fc.readlink(g.walk(b"rel"))).payload == b"sub/inner.txt"


# Files.


def test_open_read_release(g: Guest, tree: Path) -> None:
    node = g.walk(b"big.bin")
    fh = g.open(node)
    data = (tree / "big.bin").read_bytes()
    assert g.read(node, fh, 0, 1 << 20) == data[: 1 << 20]
    assert g.read(node, fh, 12345, 4096) == data[12345 : 12345 + 4096]
    assert g.read(node, fh, len(data) - 10, 4096) == data[-10:]
    assert g.read(node, fh, len(data) + 10, 4096) == b""
    assert g.errno_of(fc.flush(node, fh)) == 0
    assert g.errno_of(fc.fsync(node, fh)) == 0
    assert g.errno_of(fc.release(node, fh)) == 0
    assert g.errno_of(fc.read(node, fh, 0, 10)) == errno.EBADF
    assert g.errno_of(fc.release(node, fh)) == errno.EBADF


def test_read_is_served_from_a_file_slice(g: Guest, fs: Passthrough) -> None:
    node = g.walk(b"file.txt")
    fh = g.open(node)
    calls: list[tuple[int, int, int]] = []

    class Spy(fc.BufferRequest):
        def reply_from_file(self, offset: int, fd: int, pos: int, length: int) -> int:
            calls.append((offset, pos, length))
            return super().reply_from_file(offset, fd, pos, length)

    req = Spy(fc.read(node, fh, 6, 100))
    g.d.handle(req)
    assert req.payload == b"world\n"
    assert calls == [(16, 6, 100)]


@pytest.mark.parametrize(
    "flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC, os.O_WRONLY | os.O_APPEND]
)
def test_open_for_writing_is_erofs(g: Guest, flags: int) -> None:
    assert g.errno_of(fc.open_(g.walk(b"file.txt"), flags)) == errno.EROFS


def test_open_special_files_is_refused(g: Guest) -> None:
    assert g.errno_of(fc.open_(g.walk(b"fifo"))) == errno.EACCES
    assert g.errno_of(fc.open_(g.walk(b"sub"))) == errno.EISDIR


def test_lseek_data_and_holes(g: Guest) -> None:
    node = g.walk(b"sparse")
    fh = g.open(node)

    def seek(offset: int, whence: int) -> int:
        return fc.parse_lseek_out(g.send(fc.lseek(node, fh, offset, whence)).payload)

    data = seek(0, os.SEEK_DATA)
    assert 0 < data <= 4 << 20
    assert seek(data, os.SEEK_HOLE) > data
    assert seek(0, os.SEEK_END) == 8 << 20
    assert seek(100, os.SEEK_SET) == 100
    assert g.errno_of(fc.lseek(node, fh, (9 << 20), os.SEEK_DATA)) == errno.ENXIO
    assert g.errno_of(fc.lseek(node, fh, 0, 17)) == errno.EINVAL
    assert g.errno_of(fc.lseek(node, fh, -1, os.SEEK_SET)) == errno.EINVAL


# Directories.


def test_readdir_lists_everything_with_small_pages(dg: Guest, tree: Path) -> None:
    many = dg.walk(b"many")
    expected = sorted([b".", b".."] + [os.fsencode(n) for n in os.listdir(tree / "many")])
    for size in (64, 200, 4096):
        entries = dg.listing(many, size)
        assert sorted(de.name for _, de in entries) == expected
        assert len({de.off for _, de in entries}) == len(entries)
        assert dg.nlookup(dg.walk(b"many", b"entry-000-")) >= 1


def test_readdir_types_and_inodes(dg: Guest, tree: Path) -> None:
    by_name = {de.name: de for _, de in dg.listing(ROOT, 4096)}
    assert by_name[b"sub"].type == stat.S_IFDIR >> 12
    assert by_name[b"file.txt"].type == stat.S_IFREG >> 12
    assert by_name[b"link_etc"].type == stat.S_IFLNK >> 12
    assert by_name[b"fifo"].type == stat.S_IFIFO >> 12
    assert by_name[b"file.txt"].ino == os.stat(tree / "file.txt").st_ino
    assert by_name[b"."].ino == by_name[b".."].ino == os.stat(tree).st_ino  # host parent hidden


def test_readdirplus_counts_exactly_the_entries_sent(dg: Guest, tree: Path) -> None:
    many = dg.walk(b"many")
    entries = dg.listing(many, 700, plus=True)
    names = [de.name for _, de in entries]
    assert sorted(names) == sorted(
        [b".", b".."] + [os.fsencode(n) for n in os.listdir(tree / "many")]
    )
    for nodeid, de in entries:
        if de.name in (b".", b".."):
            assert nodeid == 0
        else:
            assert dg.nlookup(nodeid) == 1, de.name
    assert len(dg.fs.inodes) == 2 + 150  # root, many, and each entry once


def test_readdirplus_entry_attrs(dg: Guest, tree: Path) -> None:
    entries = {de.name: (nodeid, de) for nodeid, de in dg.listing(ROOT, 4096, plus=True)}
    nodeid, _ = entries[b"file.txt"]
    assert nodeid == dg.lookup(ROOT, b"file.txt").nodeid
    assert dg.nlookup(nodeid) == 3  # file.txt and hard via readdirplus, plus this lookup


def test_readdir_offset_zero_takes_a_fresh_snapshot(hg: Guest, tree: Path) -> None:
    sub = hg.walk(b"sub")
    fh = hg.opendir(sub)
    assert fh != 0
    first = fc.parse_dirents(hg.send(fc.readdir(sub, fh, 0)).payload)
    (tree / "sub" / "later").write_bytes(b"")
    cached = fc.parse_dirents(hg.send(fc.readdir(sub, fh, 1)).payload)
    assert [d.name for d in cached] == [d.name for d in first[1:]]
    fresh = fc.parse_dirents(hg.send(fc.readdir(sub, fh, 0)).payload)
    assert b"later" in [d.name for d in fresh]
    past_end = hg.send(fc.readdir(sub, fh, 2**64 - 1)).payload
    assert past_end == b""


def test_opendir_on_file_and_bad_handles(hg: Guest) -> None:
    assert hg.errno_of(fc.opendir(hg.walk(b"file.txt"))) == errno.ENOTDIR
    assert hg.errno_of(fc.opendir(hg.walk(b"link_etc"))) == errno.ENOTDIR
    assert hg.errno_of(fc.readdir(ROOT, 999)) == errno.EBADF
    assert hg.errno_of(fc.releasedir(ROOT, 999)) == errno.EBADF
    fh = hg.opendir(ROOT)
    assert fh != 0
    assert hg.errno_of(fc.readdir(hg.walk(b"sub"), fh)) == errno.EBADF  # another node's
    assert hg.errno_of(fc.fsyncdir(ROOT, fh)) == 0
    assert hg.errno_of(fc.syncfs()) == 0
    assert hg.errno_of(fc.releasedir(ROOT, fh)) == 0
    assert hg.errno_of(fc.readdir(ROOT, fh)) == errno.EBADF


# Everything else read-only.


def test_statfs(g: Guest, tree: Path) -> None:
    out = fc.parse_statfs(g.send(fc.statfs()).payload)
    host = os.statvfs(tree)
    assert (out.bsize, out.frsize, out.namelen, out.blocks) == (
        host.f_bsize,
        host.f_frsize,
        host.f_namemax,
        host.f_blocks,
    )


def test_access(g: Guest, tree: Path) -> None:
    exe, private, plain = g.walk(b"exec.sh"), g.walk(b"private"), g.walk(b"file.txt")
    assert g.errno_of(fc.access(plain, os.R_OK)) == 0
    assert g.errno_of(fc.access(plain, os.F_OK)) == 0
    assert g.errno_of(fc.access(plain, os.W_OK)) == errno.EROFS
    assert g.errno_of(fc.access(ROOT, os.W_OK | os.X_OK)) == errno.EROFS
    assert g.errno_of(fc.access(plain, os.X_OK)) == errno.EACCES
    assert g.errno_of(fc.access(exe, os.X_OK, uid=1000, gid=1000)) == 0
    assert g.errno_of(fc.access(private, os.R_OK, uid=1000, gid=1000)) == errno.EACCES
    owner = os.stat(tree / "private").st_uid
    assert g.errno_of(fc.access(private, os.R_OK, uid=owner, gid=12345)) == 0


def test_xattrs(g: Guest, tree: Path) -> None:
    os.setxattr(tree / "file.txt", "user.color", b"blue")
    node = g.walk(b"file.txt")
    size = fc.parse_u32_size(g.send(fc.getxattr(node, b"user.color", 0)).payload)
    assert size == 4
    assert g.send(fc.getxattr(node, b"user.color", 4)).payload == b"blue"
    assert g.errno_of(fc.getxattr(node, b"user.color", 3)) == errno.ERANGE
    assert g.errno_of(fc.getxattr(node, b"user.none", 10)) == errno.ENODATA
    assert b"user.color\0" in g.send(fc.listxattr(node, 4096)).payload


def test_xattrs_of_a_symlink_are_its_own(g: Guest, tree: Path) -> None:
    os.setxattr(tree / "link_etc", "trusted.mark", b"link", follow_symlinks=False)
    node = g.walk(b"link_etc")
    assert g.send(fc.getxattr(node, b"trusted.mark", 100)).payload == b"link"
    names = g.send(fc.listxattr(node, 4096)).payload.split(b"\0")[:-1]
    assert names == [n.encode() for n in os.listxattr(tree / "link_etc", follow_symlinks=False)]


def test_xattr_disabled_is_enosys(tree: Path) -> None:
    fs = Passthrough(tree, xattr=False, readonly=True)
    try:
        g = Guest(fs)
        assert g.errno_of(fc.getxattr(ROOT, b"user.x", 0)) == errno.ENOSYS
        assert g.errno_of(fc.listxattr(ROOT, 0)) == errno.ENOSYS
    finally:
        fs.close()


MUTATIONS = {
    "setattr": lambda n, fh: fc.setattr_(n),
    "mknod": lambda n, fh: fc.mknod(ROOT, b"node"),
    "mkdir": lambda n, fh: fc.mkdir(ROOT, b"dir"),
    "unlink": lambda n, fh: fc.unlink(ROOT, b"file.txt"),
    "rmdir": lambda n, fh: fc.rmdir(ROOT, b"sub"),
    "rename": lambda n, fh: fc.rename(ROOT, b"file.txt", ROOT, b"moved"),
    "rename2": lambda n, fh: fc.rename2(ROOT, b"file.txt", ROOT, b"moved", 1),
    "link": lambda n, fh: fc.link(n, ROOT, b"another"),
    "symlink": lambda n, fh: fc.symlink(ROOT, b"newlink", b"/etc"),
    "write": lambda n, fh: fc.write(n, fh, 0, b"overwrite"),
    "create": lambda n, fh: fc.create(ROOT, b"created"),
    "tmpfile": lambda n, fh: fc.tmpfile(ROOT),
    "setxattr": lambda n, fh: fc.setxattr(n, b"user.new", b"v"),
    "removexattr": lambda n, fh: fc.removexattr(n, b"user.color"),
    "fallocate": lambda n, fh: fc.fallocate(n, fh),
    "copy_file_range": lambda n, fh: fc.copy_file_range(n, fh, n, fh, 5),
}


@pytest.mark.parametrize("op", sorted(MUTATIONS))
def test_every_mutation_is_erofs(g: Guest, tree: Path, op: str) -> None:
    before = {p: p.stat().st_mtime_ns for p in tree.rglob("*") if not p.is_symlink()}
    node = g.walk(b"file.txt")
    fh = g.open(node)
    assert g.errno_of(MUTATIONS[op](node, fh)) == errno.EROFS
    after = {p: p.stat().st_mtime_ns for p in tree.rglob("*") if not p.is_symlink()}
    assert before == after
    assert (tree / "file.txt").read_bytes() == b"hello world\n"


# Sessions and cache policies.


def test_new_init_drops_nodes_and_handles(g: Guest) -> None:
    node = g.walk(b"sub", b"inner.txt")
    fh = g.open(node)
    assert len(g.fs.inodes) == 3
    fc.handshake(g.d.handle)
    assert len(g.fs.inodes) == 1
    assert g.errno_of(fc.getattr_(node)) == errno.ESTALE
    assert g.errno_of(fc.read(node, fh, 0, 10)) == errno.EBADF
    fresh = g.walk(b"sub", b"inner.txt")
    assert fresh > node  # ids keep counting up across sessions


def test_destroy_drops_nodes(g: Guest) -> None:
    g.walk(b"sub")
    assert g.send(fc.destroy()).error == 0
    assert len(g.fs.inodes) == 1


@pytest.mark.parametrize(
    ("cache", "timeout", "file_flags", "dir_flags", "plus", "symlinks", "no_opendir"),
    [
        # never: the kernel would cache the listings of directories it opens without OPENDIR
        ("never", 0, fc.FOPEN_DIRECT_IO, 0, False, False, False),
        ("auto", 1, 0, 0, True, False, True),
        (
            "always",
            86400,
            fc.FOPEN_KEEP_CACHE,
            fc.FOPEN_KEEP_CACHE | fc.FOPEN_CACHE_DIR,
            True,
            True,
            True,
        ),
    ],
)
def test_cache_policies(
    tree: Path,
    cache: CachePolicy,
    timeout: int,
    file_flags: int,
    dir_flags: int,
    plus: bool,
    symlinks: bool,
    no_opendir: bool,
) -> None:
    fs = Passthrough(tree, cache=cache, readonly=True)
    try:
        g = Guest(fs)
        assert bool(g.init.flags & fc.DO_READDIRPLUS) == plus
        assert bool(g.init.flags & fc.CACHE_SYMLINKS) == symlinks
        assert bool(g.init.flags & fc.NO_OPENDIR_SUPPORT) == no_opendir
        entry = g.lookup(ROOT, b"file.txt")
        assert (entry.entry_valid, entry.attr_valid) == (timeout, timeout)
        assert fc.parse_open_out(g.send(fc.open_(entry.nodeid)).payload)[1] == file_flags
        opened = g.send(fc.opendir(ROOT))
        if no_opendir:
            assert opened.error == errno.ENOSYS
        else:
            assert fc.parse_open_out(opened.payload)[1] == dir_flags
        with_handles = Guest(fs, flags=HANDLES_KERNEL)
        assert fc.parse_open_out(with_handles.send(fc.opendir(ROOT)).payload)[1] == dir_flags
        missing = g.send(fc.lookup(ROOT, b"missing"))
        if timeout:
            assert fc.parse_entry_out(missing.payload).nodeid == 0
        else:
            assert missing.error == errno.ENOENT
    finally:
        fs.close()


def test_constructor_checks(tree: Path) -> None:
    with pytest.raises(ValueError):
        Passthrough(tree, cache="sometimes")  # type: ignore[arg-type]
    with pytest.raises(NotADirectoryError):
        Passthrough(tree / "file.txt")


@pytest.mark.parametrize("flags", [fc.ALL_FLAGS, HANDLES_KERNEL], ids=["fh0", "handles"])
def test_close_releases_every_descriptor(tree: Path, flags: int) -> None:
    baseline = len(os.listdir("/proc/self/fd"))
    fs = Passthrough(tree)
    g = Guest(fs, flags=flags)
    node = g.walk(b"sub", b"inner.txt")
    g.open(node)
    g.opendir(ROOT)
    g.send(fc.readdir(ROOT, g.opendir(ROOT)))
    g.listing(g.walk(b"many"), 4096, plus=True)
    fs.close()
    g.loop.close()  # the test guest's own event loop holds descriptors too
    assert len(os.listdir("/proc/self/fd")) == baseline


@contextlib.contextmanager
def _unexpected_failures() -> Iterator[list[logging.LogRecord]]:
    """Collect the dispatcher's "failed unexpectedly" records: each one is a bug of ours."""
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.exc_info:
                records.append(record)

    logger = logging.getLogger("vhostfs")
    handler = Collect(logging.DEBUG)
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    opcode=st.sampled_from(sorted(set(range(1, 54)) - {fc.INIT, fc.DESTROY})),
    node=st.sampled_from([0, 1, 2, 3, 4, 2**64 - 1]),
    body=st.binary(max_size=96),
)
def test_garbage_requests_change_nothing(tree: Path, opcode: int, node: int, body: bytes) -> None:
    fs = Passthrough(tree, readonly=True)
    try:
        g = Guest(fs)
        g.walk(b"sub", b"inner.txt")
        g.open(g.walk(b"file.txt"))
        g.opendir(ROOT)
        with _unexpected_failures() as failures:
            req = fc.exchange(g.d.handle, fc.request(opcode, node, body), writable_len=4096)
        assert req.completed
        assert failures == []
        assert (tree / "file.txt").read_bytes() == b"hello world\n"
        assert (tree / "sub" / "inner.txt").read_bytes() == b"inner"
    finally:
        fs.close()
