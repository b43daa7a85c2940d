"""Operations that really suspend: replied later, out of order, tracked for drain()."""

import asyncio
import errno
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

import pytest
import uvloop

from tests.support import fuse_client as fc
from vhostfs.fuse import (
    Attr,
    AttrOut,
    Dispatcher,
    EntryOut,
    FileHandle,
    FuseError,
    NodeId,
    Operations,
    RequestContext,
)

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    factory = LOOPS[request.param]

    def runner(main: Coroutine[Any, Any, None]) -> None:
        with asyncio.Runner(loop_factory=factory) as r:
            r.run(main)

    return runner


class SlowFs(Operations):
    """getattr on node 2 waits for `gate`; everything else answers at once."""

    def __init__(self) -> None:
        self.gate: asyncio.Future[None] | None = None
        self.forgotten: list[tuple[NodeId, int]] = []
        self.lookup_done = asyncio.Event()  # set as a lookup returns

    async def getattr(self, node: NodeId, fh: FileHandle | None, ctx: RequestContext) -> AttrOut:
        if node == 2:
            assert self.gate is not None
            await asyncio.shield(self.gate)  # cancelling one waiter leaves the gate alone
            await asyncio.sleep(0)  # and once more, through the Task this time
        if node == 3:
            assert self.gate is not None
            await self.gate
            raise FuseError(errno.ENOLINK)
        if node == 4:
            await asyncio.sleep(0)  # suspends without needing a loop to do so
        return AttrOut(Attr(st_ino=node, st_mode=0o40755), 1.0)

    async def lookup(self, parent: NodeId, name: bytes, ctx: RequestContext) -> EntryOut:
        await asyncio.sleep(0)  # really suspends: a Task carries it on
        self.lookup_done.set()
        return EntryOut(NodeId(9), Attr(st_ino=9, st_mode=0o100644))

    async def forget(self, batch: Sequence[tuple[NodeId, int]]) -> None:
        await asyncio.sleep(0)
        self.forgotten += batch


def test_suspended_request_replies_later_out_of_order(run: Callable[..., None]) -> None:
    async def main() -> None:
        fs = SlowFs()
        fs.gate = asyncio.get_running_loop().create_future()
        d = Dispatcher(fs)
        fc.handshake(d.handle)
        slow = fc.exchange(d.handle, fc.getattr_(2, unique=100), data_limit=8192)
        fast = fc.exchange(d.handle, fc.getattr_(5, unique=101))
        assert not slow.completed
        assert fast.completed and fast.header.unique == 101
        assert d.inflight() == 1
        fs.gate.set_result(None)
        await d.drain()
        assert slow.completed
        assert slow.header.unique == 100
        assert fc.parse_attr_out(slow.payload).attr.ino == 2
        assert d.inflight() == 0

    run(main())


def test_error_after_suspension(run: Callable[..., None]) -> None:
    async def main() -> None:
        fs = SlowFs()
        fs.gate = asyncio.get_running_loop().create_future()
        d = Dispatcher(fs)
        fc.handshake(d.handle)
        req = fc.exchange(d.handle, fc.getattr_(3))
        fs.gate.set_result(None)
        await d.drain()
        assert req.error == errno.ENOLINK

    run(main())


def test_drain_waits_for_every_suspended_request(run: Callable[..., None]) -> None:
    async def main() -> None:
        fs = SlowFs()
        fs.gate = asyncio.get_running_loop().create_future()
        d = Dispatcher(fs)
        fc.handshake(d.handle)
        blocked = fc.exchange(d.handle, fc.getattr_(2))
        quick = fc.exchange(d.handle, fc.lookup(1, b"x"))
        assert d.inflight() == 2
        draining = asyncio.ensure_future(d.drain())
        await asyncio.wait_for(fs.lookup_done.wait(), 5)
        await asyncio.sleep(0)  # the lookup's Task finishes on this turn of the loop
        assert quick.completed and not blocked.completed
        assert d.inflight() == 1 and not draining.done()
        fs.gate.set_result(None)
        await asyncio.wait_for(draining, 5)
        assert blocked.completed

    run(main())


def test_cancelled_request_is_answered_eintr(run: Callable[..., None]) -> None:
    async def main() -> None:
        fs = SlowFs()
        fs.gate = asyncio.get_running_loop().create_future()
        d = Dispatcher(fs)
        fc.handshake(d.handle)
        req = fc.exchange(d.handle, fc.getattr_(2))
        fs.gate.cancel()  # e.g. the fs's backend went away
        await d.drain()
        assert req.error == errno.EINTR

    run(main())


def test_cancel_answers_every_suspended_request_eintr(run: Callable[..., None]) -> None:
    async def main() -> None:
        fs = SlowFs()
        fs.gate = asyncio.get_running_loop().create_future()  # never opens: the daemon stops
        d = Dispatcher(fs)
        fc.handshake(d.handle)
        first = fc.exchange(d.handle, fc.getattr_(2))
        second = fc.exchange(d.handle, fc.getattr_(3))
        assert d.inflight() == 2
        d.cancel()
        await asyncio.wait_for(d.drain(), 5)
        assert first.error == errno.EINTR and second.error == errno.EINTR

    run(main())


def test_suspending_forget_completes_with_no_reply(run: Callable[..., None]) -> None:
    async def main() -> None:
        fs = SlowFs()
        d = Dispatcher(fs)
        fc.handshake(d.handle)
        req = fc.exchange(d.handle, fc.forget(9, 2), writable_len=0)
        await d.drain()
        assert req.written == 0
        assert fs.forgotten == [(9, 2)]

    run(main())


def test_drain_with_nothing_inflight_returns(run: Callable[..., None]) -> None:
    async def main() -> None:
        d = Dispatcher(SlowFs())
        await asyncio.wait_for(d.drain(), 1)

    run(main())


def test_suspension_without_event_loop_is_eio() -> None:
    d = Dispatcher(SlowFs())
    fc.handshake(d.handle)
    req = fc.exchange(d.handle, fc.getattr_(4))
    assert req.error == errno.EIO
    assert d.inflight() == 0
