"""From a guest request to an Operations call and back to a reply.

Life of one request in `Dispatcher.handle`:
1. Decode (`_decode`): check the header against the request (length, opcode, in-args, room for
   the reply) and the session (only INIT before INIT), and build the handler's coroutine. It
   never replies: a problem comes back as an errno, answered before the file system sees
   anything, so a refused request never changes fs state.
2. Run the opcode's handler coroutine inline with `send(None)`. Most finish without suspending;
   their reply is written before handle() returns. A handler that suspends on a real future is
   continued by an asyncio Task and replies later, out of order.
3. Reply (`_send`), through the one interface every transport has (vhostfs.fuse.transport):
   header and payload in one `send_reply`, READ data straight from a file with
   `send_file_reply`, or gathered from pieces with `send_pieces`. Requests without a reply
   (FORGET, BATCH_FORGET, INTERRUPT) are completed with 0 bytes.

handle() must be called on the event loop's thread and never raises for anything the guest
sends. A handler that fails with anything but FuseError/OSError is a bug: the guest gets EIO,
and the log gets the traceback (a few per minute, then a count of the ones left out).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
import types
from collections import Counter
from collections.abc import Callable, Coroutine, Generator, Sequence
from functools import partial
from typing import Any, Final, TypeAlias

from vhostfs.fuse import abi, negotiate
from vhostfs.fuse.abi import Opcode
from vhostfs.fuse.call import Call, Reply
from vhostfs.fuse.handlers import SPECS
from vhostfs.fuse.ops import ConnInfo, FileSlice, FuseError, Operations, RequestContext
from vhostfs.fuse.transport import DirectAccount, DirectReads, GuestRequest

log = logging.getLogger(__name__)

_HEADER: Final = abi.IN_HEADER.size
_OUT: Final = abi.OUT_HEADER.size
# Largest in-args other than WRITE data: SETXATTR with a 64 KiB value and its name.
_MAX_ARGS: Final = abi.XATTR_SIZE_MAX + 4096
# Plain ints: cheaper to compare and hash than enum members on every request.
_SPECS: Final = {int(opcode): spec for opcode, spec in SPECS.items()}
_NO_REPLY_OPCODES: Final = frozenset(opcode for opcode, spec in _SPECS.items() if not spec.replies)
_INIT: Final = int(Opcode.INIT)
_DESTROY: Final = int(Opcode.DESTROY)
_WRITE: Final = int(Opcode.WRITE)

_Work = Coroutine[Any, Any, Reply]
# What _decode makes of a request: (opcode, unique, the handler to run or the errno to answer).
_Decoded: TypeAlias = tuple[int, int, "_Work | int"]
_unpack_header: Final = abi.IN_HEADER.unpack_from
_pack_out: Final = abi.OUT_HEADER.pack
_CONTEXTS_KEPT: Final = 256  # distinct (uid, gid, pid) request contexts kept for reuse


class FailureLog:
    """Logs unexpected handler failures at ERROR with their traceback, at most `burst` in each
    `interval` seconds, so a guest that keeps hitting one bug cannot flood the log; the ones
    left out are counted and the count logged when the next interval starts."""

    def __init__(
        self,
        burst: int = 10,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._burst = burst
        self._interval = interval
        self._clock = clock
        self._since = -interval  # the current interval's start; the first failure opens one
        self._logged = 0
        self._suppressed = 0

    def failed(self, opcode: int, exc: BaseException) -> None:
        now = self._clock()
        if now - self._since >= self._interval:
            if self._suppressed:
                log.error(
                    "%d more unexpected handler failures in %.0f s were not logged",
                    self._suppressed,
                    self._interval,
                )
            self._since, self._logged, self._suppressed = now, 0, 0
        if self._logged < self._burst:
            self._logged += 1
            log.error("opcode %d failed unexpectedly, answering EIO", opcode, exc_info=exc)
        else:
            self._suppressed += 1


class Dispatcher:
    """One FUSE session: the INIT state plus the requests that suspended and still run."""

    def __init__(
        self,
        ops: Operations,
        read_classes: tuple[Sequence[int], Sequence[int]] | None = None,
    ) -> None:
        """read_classes: the size and latency bounds the transport counts READs it answers
        by itself in (see DirectReads.set_classes); None leaves the transport's."""
        self._ops = ops
        self._read_classes = read_classes
        self.opcodes: Counter[int] = Counter()  # requests seen, by opcode, for the metrics
        self.errors: Counter[int] = Counter()  # requests answered with an errno, by opcode
        self.failures = FailureLog()
        self._conn: ConnInfo | None = None  # None until INIT succeeds, and again after DESTROY
        self._running: set[asyncio.Task[Reply]] = set()
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._contexts: dict[tuple[int, int, int], RequestContext] = {}
        self._direct: DirectReads | None = None  # the transport's, seen at INIT

    @property
    def conn(self) -> ConnInfo | None:
        """The negotiated connection, or None while the session is down."""
        return self._conn

    def inflight(self) -> int:
        """Requests that suspended and have not replied yet."""
        return len(self._running)

    async def drain(self) -> None:
        """Wait until inflight() is 0; the transport stops taking new requests first."""
        while self._running:
            waiter = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def cancel(self) -> None:
        """Cancel the suspended requests (the daemon is stopping); each still gets its EINTR
        reply, so drain() then returns once they have unwound."""
        for task in self._running:
            task.cancel()

    def opcode_counts(self) -> dict[str, int]:
        """Requests seen so far, by opcode name (unknown opcodes by number), READs the
        transport answered by itself included."""
        counts = self.opcodes.copy()
        if self._direct is not None:
            counts[int(Opcode.READ)] += self._direct.hits
            counts.update(self._direct.constant_hits())
            counts = +counts  # no zero entries
        return {_opcode_name(op): count for op, count in sorted(counts.items())}

    def direct_read_count(self) -> int:
        """READs the transport answered without the file system."""
        return 0 if self._direct is None else self._direct.hits

    def constant_reply_count(self) -> int:
        """Requests the transport answered with constant replies."""
        return 0 if self._direct is None else sum(self._direct.constant_hits().values())

    def error_counts(self) -> dict[str, int]:
        """Requests answered with an errno so far, by opcode name."""
        return {_opcode_name(op): count for op, count in sorted(self.errors.items())}

    def handle(self, req: GuestRequest) -> None:
        """Serve one request; its reply may be written now or, if the fs suspends, later."""
        try:
            opcode, unique, work = self._decode(req)
        except Exception:
            log.exception("dispatcher failed to decode a request")
            self._reply_error(req, 0, errno.EIO)
            return
        if isinstance(work, int):
            self._refuse(req, opcode, unique, work)
            return
        # Run the handler inline; most finish without suspending.
        try:
            suspended_on = work.send(None)
        except StopIteration as done:
            self._send(req, unique, done.value)
            return
        except Exception as exc:
            self._send_failure(req, opcode, unique, exc)
            return
        except BaseException:
            self._send_failure(req, opcode, unique, FuseError(errno.EINTR))
            raise
        self._suspended(req, opcode, unique, work, suspended_on)

    # Decoding.

    def _decode(self, req: GuestRequest) -> _Decoded:
        """Check a request and build its handler's coroutine, or say which errno answers it."""
        data = req.data
        total = req.readable_len
        if total < _HEADER or len(data) < _HEADER:
            log.debug("request shorter than fuse_in_header (%d bytes)", total)
            return 0, 0, errno.EINVAL
        length, opcode, unique, node, uid, gid, pid, ext_units, _ = _unpack_header(data)
        self.opcodes[opcode] += 1
        spec = _SPECS.get(opcode)
        writable_len = req.writable_len
        if writable_len < _OUT and (spec is None or spec.replies):
            return opcode, unique, errno.ERANGE  # no room even for that: completed with 0 bytes
        args_len = length - _HEADER - ext_units * 8
        conn = self._conn
        if length != total:
            log.debug("opcode %d: header len %d but %d bytes readable", opcode, length, total)
            return opcode, unique, errno.EINVAL
        if conn is None and opcode != _INIT:
            return opcode, unique, errno.EIO
        if args_len < 0:
            return opcode, unique, errno.EINVAL
        if spec is None:
            return opcode, unique, self._decode_session(req, opcode, args_len)
        payload_len = 0
        if opcode == _WRITE:
            payload_len = max(0, args_len - abi.WRITE_IN.size)
            args_len -= payload_len
        if not spec.min_args <= args_len <= _MAX_ARGS:
            return opcode, unique, errno.EINVAL
        end = _HEADER + args_len
        if end <= len(data):  # the common case: _read_args, inlined
            args = memoryview(data[_HEADER:end].tobytes())
        else:
            read = self._read_args(req, args_len)
            if read is None:
                return opcode, unique, errno.EINVAL
            args = read
        room = writable_len - _OUT
        if spec.replies and room < spec.reply_size:
            return opcode, unique, errno.ERANGE
        assert conn is not None
        # Requests from one guest process share a context: reuse it.
        ctx = self._contexts.get((uid, gid, pid))
        if ctx is None:
            ctx = self._context(uid, gid, pid)
        call = Call(req, node, ctx, args, payload_len, room, conn.max_write, conn.flags)
        return opcode, unique, spec.handler(self._ops, call)

    def _decode_session(self, req: GuestRequest, opcode: int, args_len: int) -> _Work | int:
        """INIT and DESTROY, which the dispatcher serves itself; other opcodes without a spec
        are ENOSYS."""
        if opcode in (_INIT, _DESTROY):
            # The session's file handles close now: no READ may be answered from them.
            self._direct = req.direct
            if self._direct is not None:
                self._direct.enabled = False
                self._direct.clear()
        if opcode == _INIT:
            init_args = self._read_args(req, min(args_len, _MAX_ARGS))
            return errno.EINVAL if init_args is None else self._init(init_args)
        if opcode == _DESTROY:
            return self._destroy()
        return errno.ENOSYS

    def forget_direct_reads(self) -> None:
        """Drop every READ span the transport answers from; call it before anything closes
        files the session may have read from (an unmount, a remount). Spans are learnt again
        from the next READs."""
        if self._direct is not None:
            self._direct.clear()

    def _enable_direct_reads(self) -> None:
        if self._direct is not None:
            self._direct.clear()
            if self._read_classes is not None:
                self._direct.set_classes(*self._read_classes)
            self._direct.enabled = True

    def take_direct_reads(self, tag: int) -> DirectAccount | None:
        """What the READs the transport answered for `tag` came to since the last take."""
        return None if self._direct is None else self._direct.take(tag)

    def _context(self, uid: int, gid: int, pid: int) -> RequestContext:
        if len(self._contexts) >= _CONTEXTS_KEPT:
            self._contexts.clear()
        ctx = self._contexts[(uid, gid, pid)] = RequestContext(uid, gid, pid)
        return ctx

    @staticmethod
    def _read_args(req: GuestRequest, size: int) -> memoryview | None:
        """A private copy of in-args [header, header+size), or None if the request is short.

        Copied (they are small) so that a handler which suspends never depends on the
        transport keeping `data` intact after handle() returns."""
        data = req.data
        end = _HEADER + size
        if end <= len(data):
            return memoryview(data[_HEADER:end].tobytes())
        rest = req.read(len(data), end - len(data))
        if len(rest) != end - len(data):
            return None
        return memoryview(data[_HEADER:].tobytes() + rest)

    # Session.

    async def _init(self, args: memoryview) -> Reply:
        kernel = negotiate.parse_init_in(args)
        if kernel.major > abi.KERNEL_MAJOR:
            return negotiate.version_only_reply()
        proposal = negotiate.propose(kernel)
        # A guest reboot sends INIT without DESTROY: the fs resets inside init().
        self._conn = None
        conn = negotiate.settle(kernel, await self._ops.init(proposal))
        self._conn = conn
        self._enable_direct_reads()
        log.info(
            "FUSE session up: %d.%d, flags %#x, max_write %d",
            conn.major,
            conn.minor,
            conn.flags,
            conn.max_write,
        )
        return negotiate.encode_init_out(conn)

    async def _destroy(self) -> Reply:
        self._conn = None
        await self._ops.destroy()
        return b""

    # Running.

    def _suspended(
        self, req: GuestRequest, opcode: int, unique: int, work: _Work, suspended_on: Any
    ) -> None:
        """The handler awaited a real future: an asyncio Task carries it on."""
        try:
            task = asyncio.get_running_loop().create_task(_finish_later(work, suspended_on))
        except RuntimeError:
            work.close()
            log.error("opcode %d suspended with no running event loop", opcode)
            self._send_failure(req, opcode, unique, FuseError(errno.EIO))
            return
        self._running.add(task)
        task.add_done_callback(partial(self._finished, req, opcode, unique))

    def _finished(
        self, req: GuestRequest, opcode: int, unique: int, task: asyncio.Task[Reply]
    ) -> None:
        self._running.discard(task)
        try:
            if task.cancelled():
                self._send_failure(req, opcode, unique, FuseError(errno.EINTR))
            elif (exc := task.exception()) is not None:
                self._send_failure(req, opcode, unique, exc)
            else:
                self._send(req, unique, task.result())
        finally:
            if not self._running:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)

    # Replies.

    def _send(self, req: GuestRequest, unique: int, reply: Reply) -> None:
        try:
            if reply is None:
                req.complete(0)
            elif isinstance(reply, FileSlice):
                req.send_file_reply(unique, reply.fd, reply.pos, reply.size)
            elif isinstance(reply, list):
                req.send_pieces(unique, reply)
            else:
                total = _OUT + len(reply)
                if total > req.writable_len:
                    self._reply_error(req, unique, errno.ERANGE)
                    return
                req.send_reply(_pack_out(total, 0, unique) + reply)
        except OSError as exc:
            self._reply_error(req, unique, exc.errno or errno.EIO)
        except (ValueError, OverflowError):  # OverflowError: a negative size from the fs
            log.warning("reply for unique %d did not fit after all", unique)
            req.complete(0)

    def _send_failure(
        self, req: GuestRequest, opcode: int, unique: int, exc: BaseException
    ) -> None:
        if isinstance(exc, FuseError):
            err = exc.errno
        elif isinstance(exc, OSError):
            err = exc.errno or errno.EIO
        else:
            self.failures.failed(opcode, exc)
            err = errno.EIO
        if not 0 < err < 4096:
            err = errno.EIO
        self._refuse(req, opcode, unique, err)

    def _refuse(self, req: GuestRequest, opcode: int, unique: int, err: int) -> None:
        self.errors[opcode] += 1
        if opcode in _NO_REPLY_OPCODES:
            req.complete(0)
        else:
            self._reply_error(req, unique, err)

    @staticmethod
    def _reply_error(req: GuestRequest, unique: int, err: int) -> None:
        if req.writable_len < _OUT:
            log.warning("no room to report errno %d for unique %d", err, unique)
            req.complete(0)
            return
        req.send_reply(_pack_out(_OUT, -err, unique))


def _opcode_name(opcode: int) -> str:
    try:
        return abi.Opcode(opcode).name
    except ValueError:
        return str(opcode)


@types.coroutine
def _resume(work: _Work, suspended_on: Any) -> Generator[Any, Any, Reply]:
    """Carry on a coroutine that already ran up to its first suspension.

    Whatever the driving Task sends or throws goes straight through, so the work behaves as if
    the Task had started it."""
    yielded = suspended_on
    while True:
        try:
            sent = yield yielded
        except BaseException as exc:
            try:
                yielded = work.throw(exc)
            except StopIteration as done:
                result: Reply = done.value
                return result
        else:
            try:
                yielded = work.send(sent)
            except StopIteration as done:
                result = done.value
                return result


async def _finish_later(work: _Work, suspended_on: Any) -> Reply:
    return await _resume(work, suspended_on)
