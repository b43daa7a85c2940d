"""From a guest request to an Operations call and back to a reply.

Life of one request in `Dispatcher.handle`:
1. Admit: check the header against the request (length, opcode, in-args, room for the reply)
   and the session (only INIT before INIT). Problems are answered right here with an errno,
   before the file system sees anything, so a refused request never changes fs state.
2. Run the opcode's handler coroutine inline with `send(None)`. Most finish without suspending;
   their reply is written before handle() returns. A handler that suspends on a real future is
   continued by an asyncio Task and replies later, out of order.
3. Reply: header + payload (or READ data straight from a file), then complete() exactly once;
   a transport whose requests have send_reply/send_file_reply does all of it in one step.
   Requests without a reply (FORGET, BATCH_FORGET, INTERRUPT) are completed with 0 bytes.

handle() must be called on the event loop's thread and never raises for anything the guest
sends.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import types
from collections import Counter
from collections.abc import Callable, Coroutine, Generator
from functools import partial
from typing import Any, Final, TypeAlias

from vhostfs.fuse import abi, negotiate
from vhostfs.fuse.abi import Opcode
from vhostfs.fuse.call import Call, Reply
from vhostfs.fuse.handlers import SPECS
from vhostfs.fuse.ops import ConnInfo, FileSlice, FuseError, Operations, RequestContext
from vhostfs.fuse.transport import GuestRequest

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
_unpack_header: Final = abi.IN_HEADER.unpack_from
_pack_out: Final = abi.OUT_HEADER.pack
_CONTEXTS_KEPT: Final = 256  # distinct (uid, gid, pid) request contexts kept for reuse

# Per request type: its FastGuestRequest methods (send_reply, send_file_reply), or None if it
# has not got them. Looked up once per type, then called unbound.
_Fast: TypeAlias = tuple[Callable[[Any, bytes], None], Callable[[Any, int, int, int, int], None]]
_FAST_REPLIES: dict[type, _Fast | None] = {}


def _fast_replies(kind: type) -> _Fast | None:
    send, send_file = getattr(kind, "send_reply", None), getattr(kind, "send_file_reply", None)
    fast = (send, send_file) if callable(send) and callable(send_file) else None
    _FAST_REPLIES[kind] = fast
    return fast


class Dispatcher:
    """One FUSE session: the INIT state plus the requests still running, per queue.

    `queue` in handle/inflight/drain is any label the transport chooses (e.g. the virtqueue
    index); it only groups in-flight requests so that one queue can be drained on its own.
    """

    def __init__(self, ops: Operations) -> None:
        self._ops = ops
        self.opcodes: Counter[int] = Counter()  # requests seen, by opcode, for the metrics
        self._conn: ConnInfo | None = None  # None until INIT succeeds, and again after DESTROY
        self._running: dict[int, set[asyncio.Task[Reply]]] = {}
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._contexts: dict[tuple[int, int, int], RequestContext] = {}

    @property
    def conn(self) -> ConnInfo | None:
        """The negotiated connection, or None while the session is down."""
        return self._conn

    def inflight(self, queue: int | None = None) -> int:
        """Requests of this queue (or all queues) that suspended and have not replied yet."""
        if queue is not None:
            return len(self._running.get(queue, ()))
        return sum(len(tasks) for tasks in self._running.values())

    async def drain(self, queue: int | None = None) -> None:
        """Wait until inflight(queue) is 0; the transport stops taking new requests first."""
        while self.inflight(queue):
            waiter = asyncio.get_running_loop().create_future()
            self._idle_waiters.append(waiter)
            await waiter

    def cancel(self, queue: int | None = None) -> None:
        """Cancel suspended requests (e.g. on shutdown); each still gets its EINTR reply."""
        for label, tasks in self._running.items():
            if queue is None or label == queue:
                for task in tasks:
                    task.cancel()

    def opcode_counts(self) -> dict[str, int]:
        """Requests seen so far, by opcode name (unknown opcodes by number)."""
        return {_opcode_name(op): count for op, count in sorted(self.opcodes.items())}

    def handle(self, req: GuestRequest, queue: int = 0) -> None:
        """Serve one request; its reply may be written now or, if the fs suspends, later."""
        try:
            admitted = self._admit(req)
        except Exception:
            log.exception("dispatcher failed to decode a request")
            self._reply_error(req, 0, errno.EIO)
            return
        if admitted is not None:
            opcode, unique, work = admitted
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
            self._suspended(req, queue, opcode, unique, work, suspended_on)

    # Admission.

    def _admit(self, req: GuestRequest) -> tuple[int, int, _Work] | None:
        """Decode and check a request. Returns what to run, or None after answering it."""
        data = req.data
        total = req.readable_len
        if total < _HEADER or len(data) < _HEADER:
            log.debug("request shorter than fuse_in_header (%d bytes)", total)
            self._reply_error(req, 0, errno.EINVAL)
            return None
        length, opcode, unique, node, uid, gid, pid, ext_units, _ = _unpack_header(data)
        self.opcodes[opcode] += 1
        spec = _SPECS.get(opcode)
        replies = spec is None or spec.replies
        err = 0
        writable_len = req.writable_len
        if replies and writable_len < _OUT:
            log.warning("opcode %d: no room for a reply (%d bytes)", opcode, writable_len)
            req.complete(0)
            return None
        args_len = length - _HEADER - ext_units * 8
        room = writable_len - _OUT
        conn = self._conn
        if length != total:
            log.debug("opcode %d: header len %d but %d bytes readable", opcode, length, total)
            err = errno.EINVAL
        elif conn is None and opcode != _INIT:
            err = errno.EIO
        elif args_len < 0:
            err = errno.EINVAL
        elif opcode == _INIT:
            init_args = self._read_args(req, min(args_len, _MAX_ARGS))
            if init_args is not None:
                return opcode, unique, self._init(init_args)
            err = errno.EINVAL
        elif opcode == _DESTROY:
            return opcode, unique, self._destroy()
        elif spec is None:
            err = errno.ENOSYS
        else:
            payload_len = 0
            if opcode == _WRITE:
                payload_len = max(0, args_len - abi.WRITE_IN.size)
                args_len -= payload_len
            args = None
            if spec.min_args <= args_len <= _MAX_ARGS:
                end = _HEADER + args_len
                if end <= len(data):  # the common case: _read_args, inlined
                    args = memoryview(data[_HEADER:end].tobytes())
                else:
                    args = self._read_args(req, args_len)
            if args is None:
                err = errno.EINVAL
            elif replies and room < spec.reply_size:
                err = errno.ERANGE
            else:
                assert conn is not None
                # Requests from one guest process share a context: reuse it.
                ctx = self._contexts.get((uid, gid, pid))
                if ctx is None:
                    ctx = self._context(uid, gid, pid)
                call = Call(req, node, ctx, args, payload_len, room, conn.max_write)
                return opcode, unique, spec.handler(self._ops, call)
        if replies:
            self._reply_error(req, unique, err)
        else:
            req.complete(0)
        return None

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
        self,
        req: GuestRequest,
        queue: int,
        opcode: int,
        unique: int,
        work: _Work,
        suspended_on: Any,
    ) -> None:
        """The handler awaited a real future: an asyncio Task carries it on."""
        try:
            task = asyncio.get_running_loop().create_task(_finish_later(work, suspended_on))
        except RuntimeError:
            work.close()
            log.error("opcode %d suspended with no running event loop", opcode)
            self._send_failure(req, opcode, unique, FuseError(errno.EIO))
            return
        self._running.setdefault(queue, set()).add(task)
        task.add_done_callback(partial(self._finished, req, queue, opcode, unique))

    def _finished(
        self, req: GuestRequest, queue: int, opcode: int, unique: int, task: asyncio.Task[Reply]
    ) -> None:
        self._running[queue].discard(task)
        try:
            if task.cancelled():
                self._send_failure(req, opcode, unique, FuseError(errno.EINTR))
            elif (exc := task.exception()) is not None:
                self._send_failure(req, opcode, unique, exc)
            else:
                self._send(req, unique, task.result())
        finally:
            if not self._running[queue]:
                waiters, self._idle_waiters = self._idle_waiters, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)

    # Replies.

    def _send(self, req: GuestRequest, unique: int, reply: Reply) -> None:
        if reply is None:
            req.complete(0)
            return
        if isinstance(reply, list):
            self._send_pieces(req, unique, reply)
            return
        kind = type(req)
        fast = _FAST_REPLIES[kind] if kind in _FAST_REPLIES else _fast_replies(kind)
        if fast is not None:
            # The transport writes the whole reply and completes in one step.
            if isinstance(reply, FileSlice):
                if reply.size >= 0:
                    try:
                        fast[1](req, unique, reply.fd, reply.pos, reply.size)
                    except OSError as exc:
                        self._reply_error(req, unique, exc.errno or errno.EIO)
                    return
            else:
                total = _OUT + len(reply)
                if total > req.writable_len:
                    self._reply_error(req, unique, errno.ERANGE)
                    return
                fast[0](req, _pack_out(total, 0, unique) + reply)
                return
        try:
            if isinstance(reply, FileSlice):
                got = 0
                if reply.size > 0:
                    got = req.reply_from_file(_OUT, reply.fd, reply.pos, reply.size)
                total = _OUT + min(got, reply.size)
            else:
                total = _OUT + len(reply)
                if total > req.writable_len:
                    self._reply_error(req, unique, errno.ERANGE)
                    return
                if reply:
                    req.write_reply(_OUT, reply)
            req.write_reply(0, abi.OUT_HEADER.pack(total, 0, unique))
        except OSError as exc:
            self._reply_error(req, unique, exc.errno or errno.EIO)
            return
        except ValueError:
            log.warning("reply for unique %d did not fit after all", unique)
            req.complete(0)
            return
        req.complete(total)

    def _send_pieces(self, req: GuestRequest, unique: int, pieces: list[FileSlice | bytes]) -> None:
        """A READ reply gathered from several files: each piece goes straight to guest memory;
        a short file piece (end of file) ends the reply there."""
        offset = _OUT
        try:
            for piece in pieces:
                if isinstance(piece, FileSlice):
                    got = req.reply_from_file(offset, piece.fd, piece.pos, piece.size)
                    offset += got
                    if got < piece.size:
                        break
                else:
                    req.write_reply(offset, piece)
                    offset += len(piece)
            req.write_reply(0, abi.OUT_HEADER.pack(offset, 0, unique))
        except OSError as exc:
            self._reply_error(req, unique, exc.errno or errno.EIO)
            return
        except ValueError:
            log.warning("reply for unique %d did not fit after all", unique)
            req.complete(0)
            return
        req.complete(offset)

    def _send_failure(
        self, req: GuestRequest, opcode: int, unique: int, exc: BaseException
    ) -> None:
        if isinstance(exc, FuseError):
            err = exc.errno
        elif isinstance(exc, OSError):
            err = exc.errno or errno.EIO
        else:
            log.debug("opcode %d failed unexpectedly, answering EIO", opcode, exc_info=exc)
            err = errno.EIO
        if not 0 < err < 4096:
            err = errno.EIO
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
        kind = type(req)
        fast = _FAST_REPLIES[kind] if kind in _FAST_REPLIES else _fast_replies(kind)
        if fast is not None:
            fast[0](req, _pack_out(_OUT, -err, unique))
            return
        try:
            req.write_reply(0, abi.OUT_HEADER.pack(_OUT, -err, unique))
        except ValueError:
            req.complete(0)
            return
        req.complete(_OUT)


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
