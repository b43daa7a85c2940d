"""Dispatcher: request validation, argument decoding, reply encoding, error mapping."""

import errno
import logging
import os
import stat
import struct
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.support import fuse_client as fc
from vhostfs.fuse import (
    Attr,
    AttrOut,
    ConnInfo,
    DirEntry,
    Dispatcher,
    EntryOut,
    FileHandle,
    FileSlice,
    FuseError,
    NodeId,
    OpenOut,
    Operations,
    ReadResult,
    RequestContext,
    SetattrChanges,
    StatFs,
    WriteData,
)
from vhostfs.fuse.dispatch import FailureLog

DIR = stat.S_IFDIR | 0o755
REG = stat.S_IFREG | 0o644


class TreeFs(Operations):
    """A root directory with a few children, exact lookup counts and a record of every call."""

    def __init__(self, names: Sequence[bytes] = (b"alpha", b"beta", b"gamma"), data_fd: int = -1):
        self.children = {name: NodeId(2 + i) for i, name in enumerate(names)}
        self.lookups: dict[NodeId, int] = {}
        self.calls: list[tuple[object, ...]] = []
        self.yielded = 0  # readdir entries handed out, to check the dispatcher stops early
        self.vanished: set[bytes] = set()
        self.data_fd = data_fd
        self.written = b""

    def _entry(self, node: NodeId) -> EntryOut:
        return EntryOut(node, Attr(st_ino=1000 + node, st_mode=REG, st_size=node), 1.0, 2.0)

    async def lookup(self, parent: NodeId, name: bytes, ctx: RequestContext) -> EntryOut:
        self.calls.append(("lookup", parent, name, ctx))
        node = self.children.get(name)
        if node is None or name in self.vanished:
            raise FuseError(errno.ENOENT)
        self.lookups[node] = self.lookups.get(node, 0) + 1
        return self._entry(node)

    async def forget(self, batch: Sequence[tuple[NodeId, int]]) -> None:
        self.calls.append(("forget", list(batch)))
        for node, n in batch:
            self.lookups[node] -= n

    async def getattr(self, node: NodeId, fh: FileHandle | None, ctx: RequestContext) -> AttrOut:
        self.calls.append(("getattr", node, fh))
        return AttrOut(Attr(st_ino=node, st_mode=DIR), 3.0)

    async def setattr(
        self, node: NodeId, fh: FileHandle | None, changes: SetattrChanges, ctx: RequestContext
    ) -> AttrOut:
        self.calls.append(("setattr", node, fh, changes))
        return AttrOut(Attr(st_ino=node, st_mode=REG, st_size=changes.size or 0))

    async def readlink(self, node: NodeId, ctx: RequestContext) -> bytes:
        return b"t" * node

    async def symlink(
        self, parent: NodeId, name: bytes, target: bytes, ctx: RequestContext
    ) -> EntryOut:
        self.calls.append(("symlink", parent, name, target))
        return self._entry(NodeId(50))

    async def rename(
        self,
        parent: NodeId,
        name: bytes,
        new_parent: NodeId,
        new_name: bytes,
        flags: int,
        ctx: RequestContext,
    ) -> None:
        self.calls.append(("rename", parent, name, new_parent, new_name, flags))

    async def create(
        self, parent: NodeId, name: bytes, mode: int, flags: int, umask: int, ctx: RequestContext
    ) -> tuple[EntryOut, OpenOut]:
        self.calls.append(("create", parent, name, mode, flags, umask))
        return self._entry(NodeId(60)), OpenOut(FileHandle(61), 2)

    async def open(
        self, node: NodeId, flags: int, ctx: RequestContext, *, kill_suidgid: bool = False
    ) -> OpenOut:
        self.calls.append(("open", node, flags, kill_suidgid))
        return OpenOut(FileHandle(node * 10), 1)

    async def read(
        self, node: NodeId, fh: FileHandle, offset: int, size: int, ctx: RequestContext
    ) -> ReadResult:
        self.calls.append(("read", node, fh, offset, size))
        if fh == 1:
            return FileSlice(self.data_fd, offset, size)
        if fh == 2:  # gathered from pieces: file, literal bytes, file again
            return [
                FileSlice(self.data_fd, offset, 10),
                b"-gap-",
                FileSlice(self.data_fd, offset + 100, size),
            ]
        return b"x" * (size + 100)  # more than asked: the dispatcher must cut it

    async def write(
        self,
        node: NodeId,
        fh: FileHandle,
        offset: int,
        data: WriteData,
        flags: int,
        ctx: RequestContext,
    ) -> int:
        if fh == 1:
            return data.to_file(self.data_fd, offset)
        self.written = data.to_bytes()
        return len(data)

    async def statfs(self, node: NodeId, ctx: RequestContext) -> StatFs:
        return StatFs(1, 2, 3, 4, 5, 4096, 255, 4096)

    async def readdir(
        self, node: NodeId, fh: FileHandle, offset: int, ctx: RequestContext
    ) -> Iterable[DirEntry]:
        listing = [DirEntry(b".", 1, 1, 4), DirEntry(b"..", 2, 1, 4)]
        listing += [
            DirEntry(name, 3 + i, 1000 + node, 8)
            for i, (name, node) in enumerate(self.children.items())
        ]
        return self._counted(listing[offset:])

    def _counted(self, entries: list[DirEntry]) -> Iterable[DirEntry]:
        for entry in entries:
            self.yielded += 1
            yield entry

    async def getxattr(self, node: NodeId, name: bytes, ctx: RequestContext) -> bytes:
        if name != b"user.k":
            raise OSError(errno.ENODATA, "no such attribute")
        return b"0123456789"

    async def listxattr(self, node: NodeId, ctx: RequestContext) -> Sequence[bytes]:
        return [b"user.a", b"user.bb"]

    async def access(self, node: NodeId, mask: int, ctx: RequestContext) -> None:
        raise RuntimeError("a bug in the file system")


def mounted(ops: Operations) -> Dispatcher:
    d = Dispatcher(ops)
    fc.handshake(d.handle)
    return d


@pytest.fixture
def fs() -> TreeFs:
    return TreeFs()


@pytest.fixture
def d(fs: TreeFs) -> Dispatcher:
    return mounted(fs)


# Malformed requests.


def test_short_header_is_einval(d: Dispatcher) -> None:
    req = fc.exchange(d.handle, fc.lookup(1, b"alpha")[:30])
    assert req.error == errno.EINVAL
    assert req.header.unique == 0


@pytest.mark.parametrize("delta", [-1, 1, 1000])
def test_len_mismatch_is_einval(d: Dispatcher, fs: TreeFs, delta: int) -> None:
    raw = fc.lookup(1, b"alpha")
    req = fc.exchange(d.handle, fc.lookup(1, b"alpha", length=len(raw) + delta))
    assert req.error == errno.EINVAL
    assert fs.lookups == {}


@pytest.mark.parametrize(
    "opcode", [9999, 0, fc.GETLK, fc.IOCTL, fc.SETUPMAPPING, fc.STATX, 4096, 2**32 - 1]
)
def test_unknown_or_unsupported_opcode_is_enosys(d: Dispatcher, opcode: int) -> None:
    req = fc.exchange(d.handle, fc.request(opcode, 1, b"\0" * 64, unique=77))
    assert req.error == errno.ENOSYS
    assert req.header.unique == 77


def test_default_operation_is_enosys(d: Dispatcher) -> None:
    assert fc.exchange(d.handle, fc.mkdir(1, b"new")).error == errno.ENOSYS


@pytest.mark.parametrize(
    ("args", "err"),
    [
        (b"alpha", errno.EINVAL),  # no NUL
        (b"\0", errno.EINVAL),  # empty
        (b"", errno.EINVAL),  # nothing at all
        (b"a/b\0", errno.EINVAL),
        (b"../../etc\0", errno.EINVAL),
        (b"x" * 2000 + b"\0", errno.ENAMETOOLONG),
    ],
)
def test_bad_names(d: Dispatcher, fs: TreeFs, args: bytes, err: int) -> None:
    assert fc.exchange(d.handle, fc.request(fc.LOOKUP, 1, args)).error == err
    assert fs.calls == []


def test_symlink_target_needs_nul(d: Dispatcher, fs: TreeFs) -> None:
    req = fc.exchange(d.handle, fc.request(fc.SYMLINK, 1, b"name\0target"))
    assert req.error == errno.EINVAL


def test_rename_needs_both_names(d: Dispatcher) -> None:
    body = struct.pack("<Q", 1) + b"old\0"
    assert fc.exchange(d.handle, fc.request(fc.RENAME, 1, body)).error == errno.EINVAL


@pytest.mark.parametrize(
    ("opcode", "args_len"),
    [
        (fc.GETATTR, 8),
        (fc.READ, 39),
        (fc.OPEN, 4),
        (fc.SETATTR, 87),
        (fc.FORGET, 0),
        (fc.RELEASE, 16),
        (fc.LSEEK, 16),
        (fc.INIT, 8),
    ],
)
def test_short_args_are_einval(d: Dispatcher, fs: TreeFs, opcode: int, args_len: int) -> None:
    req = fc.exchange(d.handle, fc.request(opcode, 1, b"\0" * args_len))
    if opcode == fc.FORGET:
        assert req.written == 0  # no reply possible, silently dropped
    else:
        assert req.error == errno.EINVAL
    assert fs.calls == []


def test_no_room_for_out_header_completes_with_zero(
    d: Dispatcher, fs: TreeFs, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        req = fc.exchange(d.handle, fc.lookup(1, b"alpha"), writable_len=15)
    assert req.written == 0
    assert fs.lookups == {}
    assert "no room" in caplog.text


def test_no_room_for_entry_is_erange_and_counts_nothing(d: Dispatcher, fs: TreeFs) -> None:
    req = fc.exchange(d.handle, fc.lookup(1, b"alpha"), writable_len=16 + 127)
    assert req.error == errno.ERANGE
    assert fs.lookups == {}


def test_offset_beyond_int64_is_einval(d: Dispatcher) -> None:
    assert fc.exchange(d.handle, fc.read(2, 5, 2**63, 10)).error == errno.EINVAL


def test_huge_read_size_is_capped_by_room(d: Dispatcher, fs: TreeFs) -> None:
    req = fc.exchange(d.handle, fc.read(2, 5, 0, 2**32 - 1), writable_len=16 + 300)
    assert req.payload == b"x" * 300
    assert fs.calls[-1] == ("read", 2, 5, 0, 300)


def test_oversized_args_are_einval(d: Dispatcher) -> None:
    req = fc.exchange(d.handle, fc.request(fc.LOOKUP, 1, b"a" * 200_000 + b"\0"))
    assert req.error == errno.EINVAL


def test_extension_bytes_are_not_part_of_the_name(d: Dispatcher, fs: TreeFs) -> None:
    raw = fc.request(fc.LOOKUP, 1, b"alpha\0" + b"\xff" * 8, total_extlen=1)
    assert fc.exchange(d.handle, raw).error == 0
    assert fs.lookups == {2: 1}


def test_extension_longer_than_request_is_einval(d: Dispatcher) -> None:
    raw = fc.request(fc.LOOKUP, 1, b"alpha\0", total_extlen=100)
    assert fc.exchange(d.handle, raw).error == errno.EINVAL


def test_args_beyond_the_copied_data_are_read(d: Dispatcher, fs: TreeFs) -> None:
    req = fc.exchange(d.handle, fc.lookup(1, b"gamma"), data_limit=42)
    assert fc.parse_entry_out(req.payload).nodeid == 4


@settings(max_examples=300, deadline=None)
@given(
    body=st.binary(max_size=200),
    opcode=st.integers(0, 60),
    writable=st.sampled_from([0, 8, 16, 100, 4096]),
    fix_len=st.booleans(),
)
def test_garbage_never_escapes_handle(
    body: bytes, opcode: int, writable: int, fix_len: bool
) -> None:
    d = mounted(TreeFs())
    raw = fc.request(opcode, 1, body) if fix_len else body
    req = fc.exchange(d.handle, raw, writable_len=writable)
    assert req.completed
    if req.written:
        assert fc.parse_out_header(req.reply).len == req.written


# Requests without a reply.


def test_forget_and_batch_forget(d: Dispatcher, fs: TreeFs) -> None:
    for _ in range(3):
        fc.exchange(d.handle, fc.lookup(1, b"alpha"))
    fc.exchange(d.handle, fc.lookup(1, b"beta"))
    assert fc.exchange(d.handle, fc.forget(2, 2), writable_len=0).written == 0
    req = fc.exchange(d.handle, fc.batch_forget([(2, 1), (3, 1)]), writable_len=0)
    assert req.written == 0
    assert fs.lookups == {2: 0, 3: 0}


def test_batch_forget_with_lying_count_is_dropped(d: Dispatcher, fs: TreeFs) -> None:
    req = fc.exchange(d.handle, fc.batch_forget([(2, 1)], count=1000), writable_len=0)
    assert req.written == 0
    assert fs.calls == []


def test_forget_that_raises_is_swallowed(caplog: pytest.LogCaptureFixture) -> None:
    class Bad(Operations):
        async def forget(self, batch: Sequence[tuple[NodeId, int]]) -> None:
            raise KeyError("oops")

    d = mounted(Bad())
    with caplog.at_level(logging.WARNING):
        assert fc.exchange(d.handle, fc.forget(2, 1), writable_len=0).written == 0
    assert "forget raised" in caplog.text


def test_interrupt_gets_no_reply(d: Dispatcher) -> None:
    assert fc.exchange(d.handle, fc.interrupt(5), writable_len=0).written == 0


# Errors from the file system.


def test_oserror_errno_is_passed_on(d: Dispatcher) -> None:
    assert fc.exchange(d.handle, fc.getxattr(1, b"user.nope", 100)).error == errno.ENODATA


def test_fuse_error(d: Dispatcher) -> None:
    assert fc.exchange(d.handle, fc.lookup(1, b"missing")).error == errno.ENOENT


def test_unexpected_exception_is_eio_and_logged(
    d: Dispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="vhostfs.fuse.dispatch"):
        assert fc.exchange(d.handle, fc.access(1, os.R_OK)).error == errno.EIO
    [record] = [r for r in caplog.records if r.name == "vhostfs.fuse.dispatch"]
    assert record.levelno == logging.ERROR
    assert record.getMessage() == f"opcode {fc.ACCESS} failed unexpectedly, answering EIO"
    assert record.exc_info is not None and record.exc_info[0] is RuntimeError


def test_unexpected_exceptions_are_rate_limited_and_counted(
    d: Dispatcher, caplog: pytest.LogCaptureFixture
) -> None:
    now = [1000.0]
    d.failures = FailureLog(burst=2, interval=60.0, clock=lambda: now[0])

    def fail_once() -> None:
        assert fc.exchange(d.handle, fc.access(1, os.R_OK)).error == errno.EIO

    def messages() -> list[tuple[int, str, bool]]:
        return [
            (r.levelno, r.getMessage(), r.exc_info is not None)
            for r in caplog.records
            if r.name == "vhostfs.fuse.dispatch"
        ]

    traceback = (logging.ERROR, f"opcode {fc.ACCESS} failed unexpectedly, answering EIO", True)
    with caplog.at_level(logging.DEBUG, logger="vhostfs.fuse.dispatch"):
        for _ in range(5):  # every one still answers EIO
            fail_once()
        assert messages() == [traceback, traceback]
        now[0] += 59.0
        fail_once()
        assert messages() == [traceback, traceback]
        now[0] += 1.0  # a new interval: the count of the four left out, then tracebacks again
        fail_once()
        fail_once()
        count = (logging.ERROR, "4 more unexpected handler failures in 60 s were not logged", False)
        assert messages() == [traceback, traceback, count, traceback, traceback]


@pytest.mark.parametrize("bad", [0, -5, 4096, 100000])
def test_out_of_range_errno_becomes_eio(bad: int) -> None:
    class Odd(Operations):
        async def statfs(self, node: NodeId, ctx: RequestContext) -> StatFs:
            raise FuseError(bad)

    assert fc.exchange(mounted(Odd()).handle, fc.statfs()).error == errno.EIO


# Decoding and encoding per opcode.


def test_lookup_reply_and_context(d: Dispatcher, fs: TreeFs) -> None:
    req = fc.exchange(d.handle, fc.lookup(1, b"beta", uid=1000, gid=100, pid=42, unique=9))
    assert req.header.unique == 9
    entry = fc.parse_entry_out(req.payload)
    assert (entry.nodeid, entry.attr.ino, entry.entry_valid, entry.attr_valid) == (3, 1003, 1, 2)
    assert fs.calls[-1] == ("lookup", 1, b"beta", RequestContext(1000, 100, 42))


def test_getattr_with_and_without_fh(d: Dispatcher, fs: TreeFs) -> None:
    out = fc.parse_attr_out(fc.exchange(d.handle, fc.getattr_(1)).payload)
    assert (out.attr_valid, out.attr.ino) == (3, 1)
    fc.exchange(d.handle, fc.getattr_(1, fh=77))
    assert fs.calls[-2:] == [("getattr", 1, None), ("getattr", 1, 77)]


def test_setattr_decodes_only_valid_fields(d: Dispatcher, fs: TreeFs) -> None:
    valid = 1 << 3  # FATTR_SIZE
    out = fc.parse_attr_out(fc.exchange(d.handle, fc.setattr_(2, valid=valid, size=99)).payload)
    assert out.attr.size == 99
    assert fs.calls[-1] == ("setattr", 2, None, SetattrChanges(size=99))


def test_symlink_rename_create_decode(d: Dispatcher, fs: TreeFs) -> None:
    fc.exchange(d.handle, fc.symlink(1, b"ln", b"../some/where"))
    assert fs.calls[-1] == ("symlink", 1, b"ln", b"../some/where")
    assert fc.exchange(d.handle, fc.rename(1, b"a", 5, b"b")).written == 16
    assert fs.calls[-1:] == [("rename", 1, b"a", 5, b"b", 0)]
    fc.exchange(d.handle, fc.rename2(1, b"a", 5, b"b", flags=1))
    assert fs.calls[-1:] == [("rename", 1, b"a", 5, b"b", 1)]
    assert fc.exchange(d.handle, fc.rename2(1, b"a", 5, b"b", flags=64)).error == errno.EINVAL
    payload = fc.exchange(d.handle, fc.create(1, b"new", os.O_RDWR, 0o600)).payload
    assert fc.parse_entry_out(payload).nodeid == 60
    assert fc.parse_open_out(payload, 128) == (61, 2)
    assert fs.calls[-1:] == [("create", 1, b"new", 0o600, os.O_RDWR, 0o022)]


def test_open_and_statfs(d: Dispatcher) -> None:
    assert fc.parse_open_out(fc.exchange(d.handle, fc.open_(3)).payload) == (30, 1)
    assert fc.parse_statfs(fc.exchange(d.handle, fc.statfs()).payload).bavail == 3


def test_readlink_too_long_for_room_is_erange(d: Dispatcher) -> None:
    assert fc.exchange(d.handle, fc.readlink(5)).payload == b"ttttt"
    assert fc.exchange(d.handle, fc.readlink(50), writable_len=16 + 10).error == errno.ERANGE


def test_read_from_file_slice(d: Dispatcher, fs: TreeFs, tmp_path: Path) -> None:
    path = tmp_path / "data"
    path.write_bytes(bytes(range(256)) * 10)
    fs.data_fd = os.open(path, os.O_RDONLY)
    try:
        assert (
            fc.exchange(d.handle, fc.read(2, 1, 100, 50)).payload
            == (bytes(range(256)) * 10)[100:150]
        )
        assert len(fc.exchange(d.handle, fc.read(2, 1, 2500, 500)).payload) == 60  # short at EOF
        assert fc.exchange(d.handle, fc.read(2, 1, 2560, 10)).payload == b""
        capped = fc.exchange(d.handle, fc.read(2, 1, 0, 4096), writable_len=16 + 7)
        assert capped.payload == bytes(range(7))
    finally:
        os.close(fs.data_fd)


def test_read_gathered_from_pieces(d: Dispatcher, fs: TreeFs, tmp_path: Path) -> None:
    data = bytes(range(256)) * 10
    (tmp_path / "data").write_bytes(data)
    fs.data_fd = os.open(tmp_path / "data", os.O_RDONLY)
    try:
        whole = fc.exchange(d.handle, fc.read(2, 2, 0, 40)).payload
        assert whole == data[0:10] + b"-gap-" + data[100:125]  # clipped to the 40 asked for
        short = fc.exchange(d.handle, fc.read(2, 2, 2500, 100)).payload
        assert short == data[2500:2510] + b"-gap-"  # the last piece starts past the end
        room = fc.exchange(d.handle, fc.read(2, 2, 0, 4096), writable_len=16 + 12)
        assert room.payload == data[0:10] + b"-g"
    finally:
        os.close(fs.data_fd)


def test_read_error_from_file_becomes_errno(d: Dispatcher, fs: TreeFs) -> None:
    fs.data_fd = 12345  # not open
    assert fc.exchange(d.handle, fc.read(2, 1, 0, 10)).error == errno.EBADF


def test_write_payload(d: Dispatcher, fs: TreeFs, tmp_path: Path) -> None:
    req = fc.exchange(d.handle, fc.write(2, 5, 0, b"hello"))
    assert fc.parse_u32_size(req.payload) == 5
    assert fs.written == b"hello"
    path = tmp_path / "out"
    fs.data_fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        big = os.urandom(20000)  # more than the 8 KiB the transport copies up front
        req = fc.exchange(d.handle, fc.write(2, 1, 3, big))
        assert fc.parse_u32_size(req.payload) == len(big)
        assert path.read_bytes() == b"\0\0\0" + big
    finally:
        os.close(fs.data_fd)


def test_write_size_must_match_payload_and_limit(d: Dispatcher) -> None:
    assert fc.exchange(d.handle, fc.write(2, 5, 0, b"abc", size=10)).error == errno.EINVAL
    huge = b"z" * ((1 << 20) + 1)
    assert fc.exchange(d.handle, fc.write(2, 5, 0, huge)).error == errno.EINVAL


def test_getxattr_sizes(d: Dispatcher) -> None:
    assert fc.parse_u32_size(fc.exchange(d.handle, fc.getxattr(1, b"user.k", 0)).payload) == 10
    assert fc.exchange(d.handle, fc.getxattr(1, b"user.k", 9)).error == errno.ERANGE
    assert fc.exchange(d.handle, fc.getxattr(1, b"user.k", 10)).payload == b"0123456789"
    small_room = fc.exchange(d.handle, fc.getxattr(1, b"user.k", 100), writable_len=16 + 5)
    assert small_room.error == errno.ERANGE


def test_listxattr_sizes(d: Dispatcher) -> None:
    names = b"user.a\0user.bb\0"
    assert fc.parse_u32_size(fc.exchange(d.handle, fc.listxattr(1, 0)).payload) == len(names)
    assert fc.exchange(d.handle, fc.listxattr(1, len(names) - 1)).error == errno.ERANGE
    assert fc.exchange(d.handle, fc.listxattr(1, 4096)).payload == names


def test_xattr_name_too_long_is_erange(d: Dispatcher) -> None:
    assert fc.exchange(d.handle, fc.getxattr(1, b"user." + b"n" * 300, 0)).error == errno.ERANGE


# Directory listings.


def _list_all(d: Dispatcher, opcode_builder: object, size: int) -> list[bytes]:
    names: list[bytes] = []
    offset = 0
    while True:
        payload = fc.exchange(d.handle, opcode_builder(1, 7, offset, size)).payload  # type: ignore[operator]
        if not payload:
            return names
        if opcode_builder is fc.readdir:
            batch = fc.parse_dirents(payload)
        else:
            batch = [dirent for _, dirent in fc.parse_direntplus(payload)]
        names += [e.name for e in batch]
        offset = batch[-1].off


@pytest.mark.parametrize("size", [32, 40, 64, 100, 4096])
def test_readdir_pages_through_everything(d: Dispatcher, size: int) -> None:
    assert _list_all(d, fc.readdir, size) == [b".", b"..", b"alpha", b"beta", b"gamma"]


def test_readdir_stops_asking_when_full(d: Dispatcher, fs: TreeFs) -> None:
    payload = fc.exchange(d.handle, fc.readdir(1, 7, 0, 64)).payload
    assert [e.name for e in fc.parse_dirents(payload)] == [b".", b".."]
    assert fs.yielded == 3  # the third did not fit and nothing beyond it was produced


def test_readdir_buffer_too_small_for_one_entry_is_einval(d: Dispatcher) -> None:
    assert fc.exchange(d.handle, fc.readdir(1, 7, 0, 20)).error == errno.EINVAL


def test_readdir_room_limits_like_size(d: Dispatcher) -> None:
    req = fc.exchange(d.handle, fc.readdir(1, 7, 0, 4096), writable_len=16 + 64)
    assert len(fc.parse_dirents(req.payload)) == 2


def test_readdirplus_counts_lookups_only_for_sent_entries(d: Dispatcher, fs: TreeFs) -> None:
    # "." and ".." (152+8 each) plus one 160-byte entry fit in 480 bytes; beta does not.
    payload = fc.exchange(d.handle, fc.readdirplus(1, 7, 0, 480)).payload
    records = fc.parse_direntplus(payload)
    assert [(e.nodeid, de.name) for e, de in records] == [(0, b"."), (0, b".."), (2, b"alpha")]
    assert fs.lookups == {2: 1}
    assert records[2][0].attr.ino == 1002
    rest = fc.parse_direntplus(fc.exchange(d.handle, fc.readdirplus(1, 7, 3, 4096)).payload)
    assert [de.name for _, de in rest] == [b"beta", b"gamma"]
    assert fs.lookups == {2: 1, 3: 1, 4: 1}


def test_readdirplus_dot_entries_do_not_look_up(d: Dispatcher, fs: TreeFs) -> None:
    fc.exchange(d.handle, fc.readdirplus(1, 7, 0, 4096))
    assert all(call[2] not in (b".", b"..") for call in fs.calls if call[0] == "lookup")


def test_readdirplus_skips_vanished_entries(d: Dispatcher, fs: TreeFs) -> None:
    fs.vanished.add(b"beta")
    assert _list_all(d, fc.readdirplus, 4096) == [b".", b"..", b"alpha", b"gamma"]
    assert fs.lookups == {2: 1, 4: 1}


def test_readdirplus_pages_through_everything(d: Dispatcher, fs: TreeFs) -> None:
    assert _list_all(d, fc.readdirplus, 200) == [b".", b"..", b"alpha", b"beta", b"gamma"]
    assert fs.lookups == {2: 1, 3: 1, 4: 1}


def test_requests_are_counted_by_opcode_name(d: Dispatcher) -> None:
    before = d.opcode_counts()
    fc.exchange(d.handle, fc.getattr_(1))
    fc.exchange(d.handle, fc.getattr_(1))
    fc.exchange(d.handle, fc.request(4000))
    after = d.opcode_counts()
    assert after["GETATTR"] - before.get("GETATTR", 0) == 2
    assert after["4000"] == 1


# Requests whose layout or meaning depends on the session's flags.


class KillprivFs(Operations):
    """Asks for SETXATTR_EXT and HANDLE_KILLPRIV_V2 (unless told not to) and records what
    setxattr and open receive."""

    def __init__(self, extra_flags: int) -> None:
        self.extra_flags = extra_flags
        self.calls: list[tuple[object, ...]] = []

    async def init(self, conn: ConnInfo) -> ConnInfo:
        return replace(conn, flags=conn.flags | self.extra_flags)

    async def setxattr(
        self,
        node: NodeId,
        name: bytes,
        value: bytes,
        flags: int,
        ctx: RequestContext,
        *,
        kill_sgid: bool = False,
    ) -> None:
        self.calls.append(("setxattr", name, value, flags, kill_sgid))

    async def open(
        self, node: NodeId, flags: int, ctx: RequestContext, *, kill_suidgid: bool = False
    ) -> OpenOut:
        self.calls.append(("open", flags, kill_suidgid))
        return OpenOut(FileHandle(1), 0)


def test_setxattr_in_grows_to_16_bytes_under_setxattr_ext() -> None:
    fs = KillprivFs(fc.SETXATTR_EXT)
    d = Dispatcher(fs)
    assert fc.handshake(d.handle).flags & fc.SETXATTR_EXT
    extended = fc.setxattr(2, b"system.posix_acl_access", b"acl", 1, setxattr_flags=1)
    assert fc.exchange(d.handle, extended).error == 0
    assert fc.exchange(d.handle, fc.setxattr(2, b"user.a", b"v", setxattr_flags=0)).error == 0
    # The old 8-byte form in such a session: setxattr_flags and pad would be read from the name.
    assert fc.exchange(d.handle, fc.request(fc.SETXATTR, 2, b"\0" * 12)).error == errno.EINVAL
    assert fs.calls == [
        ("setxattr", b"system.posix_acl_access", b"acl", 1, True),
        ("setxattr", b"user.a", b"v", 0, False),
    ]


def test_setxattr_in_stays_8_bytes_without_setxattr_ext() -> None:
    fs = KillprivFs(0)
    d = Dispatcher(fs)
    assert not fc.handshake(d.handle).flags & fc.SETXATTR_EXT
    assert fc.exchange(d.handle, fc.setxattr(2, b"user.a", b"v", 2)).error == 0
    assert fs.calls == [("setxattr", b"user.a", b"v", 2, False)]


def test_open_passes_kill_suidgid_from_open_flags() -> None:
    fs = KillprivFs(fc.HANDLE_KILLPRIV_V2)
    d = Dispatcher(fs)
    assert fc.handshake(d.handle).flags & fc.HANDLE_KILLPRIV_V2
    trunc = os.O_WRONLY | os.O_TRUNC
    assert fc.exchange(d.handle, fc.open_(2, trunc, open_flags=1)).error == 0
    assert fc.exchange(d.handle, fc.open_(2, os.O_RDONLY)).error == 0
    assert fs.calls == [("open", trunc, True), ("open", os.O_RDONLY, False)]
