"""FUSE_INIT negotiation, session gating and reset through the dispatcher."""

import errno
from dataclasses import replace

from tests.support import fuse_client as fc
from vhostfs.fuse import ConnInfo, Dispatcher, Operations, RequestContext, negotiate
from vhostfs.fuse.abi import InitFlag
from vhostfs.fuse.ops import ROOT_ID, Attr, AttrOut, NodeId

OFFERED = (
    fc.ASYNC_READ
    | fc.ATOMIC_O_TRUNC
    | fc.BIG_WRITES
    | fc.AUTO_INVAL_DATA
    | fc.DO_READDIRPLUS
    | fc.READDIRPLUS_AUTO
    | fc.PARALLEL_DIROPS
    | fc.MAX_PAGES
    | fc.INIT_EXT
)


class Recorder(Operations):
    """Counts init/destroy calls and can adjust the proposal."""

    def __init__(self, add: int = 0, remove: int = 0) -> None:
        self.inits: list[ConnInfo] = []
        self.destroys = 0
        self.add = add
        self.remove = remove

    async def init(self, conn: ConnInfo) -> ConnInfo:
        self.inits.append(conn)
        return replace(conn, flags=(conn.flags | self.add) & ~self.remove)

    async def destroy(self) -> None:
        self.destroys += 1

    async def getattr(self, node: NodeId, fh: object, ctx: RequestContext) -> AttrOut:
        return AttrOut(Attr(st_ino=node, st_mode=0o40755))


def test_everything_offered_by_kernel() -> None:
    d = Dispatcher(Recorder())
    out = fc.handshake(d.handle)
    assert (out.major, out.minor) == (7, 36)
    assert out.flags == OFFERED
    assert out.flags2 == 0
    assert out.max_pages == 256
    assert out.max_write == 1 << 20
    assert out.max_readahead == 128 * 1024  # kernel asked for less than our 1 MiB
    assert out.time_gran == 1
    assert out.map_alignment == 0
    assert 0 < out.congestion_threshold <= out.max_background
    assert d.conn is not None and d.conn.flags == OFFERED


def test_reply_is_intersection_with_kernel_wants() -> None:
    wanted = fc.ASYNC_READ | fc.MAX_PAGES | fc.WRITEBACK_CACHE | fc.POSIX_LOCKS | fc.MAP_ALIGNMENT
    out = fc.handshake(Dispatcher(Recorder()).handle, flags=wanted, ext=False)
    assert out.flags == fc.ASYNC_READ | fc.MAX_PAGES


def test_never_dax_or_locks_even_if_fs_asks() -> None:
    bad = InitFlag.POSIX_LOCKS | InitFlag.MAP_ALIGNMENT
    out = fc.handshake(Dispatcher(Recorder(add=bad | InitFlag.HAS_INODE_DAX)).handle)
    assert out.flags & (fc.POSIX_LOCKS | fc.MAP_ALIGNMENT) == 0
    assert out.flags2 == 0


def test_writeback_only_when_the_fs_asks() -> None:
    assert fc.handshake(Dispatcher(Recorder()).handle).flags & fc.WRITEBACK_CACHE == 0
    out = fc.handshake(Dispatcher(Recorder(add=InitFlag.WRITEBACK_CACHE)).handle)
    assert out.flags & fc.WRITEBACK_CACHE


def test_fs_can_add_cache_symlinks_and_drop_readdirplus() -> None:
    ops = Recorder(add=InitFlag.CACHE_SYMLINKS, remove=InitFlag.DO_READDIRPLUS)
    out = fc.handshake(Dispatcher(ops).handle)
    assert out.flags & fc.CACHE_SYMLINKS
    assert not out.flags & fc.DO_READDIRPLUS
    assert ops.inits[0].kernel_flags == fc.ALL_FLAGS


def test_init_without_ext_sees_no_high_flags() -> None:
    ops = Recorder()
    out = fc.handshake(Dispatcher(ops).handle, ext=False)
    assert out.flags == OFFERED & ~fc.INIT_EXT
    assert ops.inits[0].kernel_flags >> 32 == 0


def test_flags2_reaches_the_fs_only_with_init_ext() -> None:
    ops = Recorder()
    fc.handshake(Dispatcher(ops).handle, flags=fc.ALL_FLAGS)
    assert ops.inits[0].kernel_flags & fc.SECURITY_CTX


def test_older_minor_is_used() -> None:
    out = fc.handshake(Dispatcher(Recorder()).handle, minor=31, ext=False)
    assert (out.major, out.minor) == (7, 31)


def test_too_old_minor_is_eproto() -> None:
    d = Dispatcher(Recorder())
    req = fc.exchange(d.handle, fc.init(minor=26, ext=False))
    assert req.error == errno.EPROTO
    assert d.conn is None


def test_old_major_is_eproto() -> None:
    req = fc.exchange(Dispatcher(Recorder()).handle, fc.init(major=6, ext=False))
    assert req.error == errno.EPROTO


def test_newer_major_gets_our_version_and_no_session() -> None:
    ops = Recorder()
    d = Dispatcher(ops)
    req = fc.exchange(d.handle, fc.init(major=8, minor=1))
    out = fc.parse_init_out(req.payload)
    assert (out.major, out.minor, out.flags) == (7, 36, 0)
    assert d.conn is None
    assert ops.inits == []
    # The kernel then retries with major 7.
    assert fc.handshake(d.handle).major == 7


def test_short_init_is_einval() -> None:
    req = fc.exchange(Dispatcher(Recorder()).handle, fc.request(fc.INIT, 0, b"\x07\0\0\0"))
    assert req.error == errno.EINVAL


def test_requests_before_init_are_eio() -> None:
    d = Dispatcher(Recorder())
    assert fc.exchange(d.handle, fc.getattr_(ROOT_ID)).error == errno.EIO
    assert fc.exchange(d.handle, fc.request(9999)).error == errno.EIO
    forget = fc.exchange(d.handle, fc.forget(5, 1), writable_len=0)
    assert forget.written == 0


def test_new_init_resets_the_session() -> None:
    ops = Recorder()
    d = Dispatcher(ops)
    fc.handshake(d.handle)
    assert fc.exchange(d.handle, fc.getattr_(ROOT_ID)).error == 0
    fc.handshake(d.handle, minor=33, ext=False)  # guest rebooted: INIT without DESTROY
    assert len(ops.inits) == 2
    assert d.conn is not None and d.conn.minor == 33


def test_destroy_replies_header_and_ends_session() -> None:
    ops = Recorder()
    d = Dispatcher(ops)
    fc.handshake(d.handle)
    req = fc.exchange(d.handle, fc.destroy())
    assert req.error == 0 and req.written == 16
    assert ops.destroys == 1
    assert fc.exchange(d.handle, fc.getattr_(ROOT_ID)).error == errno.EIO
    fc.handshake(d.handle)
    assert fc.exchange(d.handle, fc.getattr_(ROOT_ID)).error == 0


def test_failing_fs_init_leaves_session_down() -> None:
    class Broken(Operations):
        async def init(self, conn: ConnInfo) -> ConnInfo:
            raise OSError(errno.EMFILE, "no fds")

    d = Dispatcher(Broken())
    assert fc.exchange(d.handle, fc.init()).error == errno.EMFILE
    assert d.conn is None


def test_no_opendir_support_when_the_fs_asks_and_the_kernel_offers() -> None:
    assert not fc.handshake(Dispatcher(Recorder()).handle).flags & fc.NO_OPENDIR_SUPPORT
    wants = Recorder(add=InitFlag.NO_OPENDIR_SUPPORT)
    assert fc.handshake(Dispatcher(wants).handle).flags & fc.NO_OPENDIR_SUPPORT
    without = fc.ALL_FLAGS & ~fc.NO_OPENDIR_SUPPORT
    out = fc.handshake(Dispatcher(wants).handle, flags=without)
    assert not out.flags & fc.NO_OPENDIR_SUPPORT


def test_granted_is_what_the_session_runs_with() -> None:
    """A file system asks negotiate.granted what its init will get; settle must agree."""
    for kernel in (fc.ALL_FLAGS, fc.ALL_FLAGS & ~fc.NO_OPENDIR_SUPPORT, fc.ASYNC_READ):
        for ext in (True, False):
            ops = Recorder(add=InitFlag.NO_OPENDIR_SUPPORT | InitFlag.SECURITY_CTX)
            d = Dispatcher(ops)
            fc.handshake(d.handle, flags=kernel, ext=ext)
            proposal = ops.inits[-1]
            wanted = (proposal.flags | ops.add) & ~ops.remove
            assert d.conn is not None
            assert negotiate.granted(proposal.kernel_flags, wanted) == d.conn.flags
