"""One split virtqueue: the ring state the front-end configures, its kick loop, and its requests.

The walking, translating and used-ring pushes happen in C (csrc/vring.c); this class owns the
fds and the lifecycle. Replies are written and completed in one C call each, and big READs that
arrive in a burst are copied by a C helper thread while the next requests are decoded (the
helper only fills guest buffers; every ring update stays on the event loop thread).

Lifecycle (`RingState`, transitions in `_TRANSITIONS`): a ring *starts* when its kick fd
arrives and *runs* once it is also enabled, in either order; GET_VRING_BASE *stops* it. A bad
chain *breaks* it: one log line, and no more processing until the front-end stops it or hands
it a new kick fd. Only a RUNNING ring pops chains. Replies still complete on a ring in any
state, since a request may outlive the state it arrived in.
"""

import asyncio
import enum
import logging
import os
import struct
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, TypeAlias

from vhostfs._vring import ffi, lib
from vhostfs.segments import FileSlice
from vhostfs.vhost.codec import PayloadError, VringAddr
from vhostfs.vhost.direct import DirectReads
from vhostfs.vhost.memory import GuestMemory

if TYPE_CHECKING:
    from vhostfs._vring import VqChain  # only the stub has the struct classes

log = logging.getLogger(__name__)

# Structurally a vhostfs.fuse.transport.GuestRequest; the transport does not import the FUSE layer.
RequestHandler = Callable[["ChainRequest"], None]
# A chain struct and a view of its whole request buffer, made once and reused.
_Slot: TypeAlias = "tuple[VqChain, memoryview]"


class RingState(enum.Enum):
    STOPPED = "stopped"  # no kick fd, not enabled: the state after GET_VRING_BASE or a reset
    ENABLED = "enabled"  # enabled, waiting for its kick fd
    STARTED = "started"  # kick fd watched, waiting to be enabled
    RUNNING = "running"  # both: kicks pop chains
    BROKEN = "broken"  # a bad chain: kicks are no longer watched


class RingEvent(enum.Enum):
    KICK_FD = "SET_VRING_KICK"
    ENABLE = "enable"  # SET_VRING_ENABLE 1, or SET_FEATURES without PROTOCOL_FEATURES
    DISABLE = "SET_VRING_ENABLE 0"
    STOP = "GET_VRING_BASE"  # also a device reset
    BAD_CHAIN = "bad chain"  # a pop or a push failed: the guest broke the ring


_S, _E = RingState, RingEvent
# Every move a ring makes, as h11 lists its connection states. The front-end may send its ring
# messages in any order, so each of its events is listed for every state; a BAD_CHAIN on a ring
# that is not started (a late reply after a reset) stops nothing, and a broken ring ignores
# enables until it is stopped or given a new kick fd, after which it waits for an enable again.
_TRANSITIONS: Final[dict[RingState, dict[RingEvent, RingState]]] = {
    _S.STOPPED: {
        _E.KICK_FD: _S.STARTED,
        _E.ENABLE: _S.ENABLED,
        _E.DISABLE: _S.STOPPED,
        _E.STOP: _S.STOPPED,
        _E.BAD_CHAIN: _S.STOPPED,
    },
    _S.ENABLED: {
        _E.KICK_FD: _S.RUNNING,
        _E.ENABLE: _S.ENABLED,
        _E.DISABLE: _S.STOPPED,
        _E.STOP: _S.STOPPED,
        _E.BAD_CHAIN: _S.ENABLED,
    },
    _S.STARTED: {
        _E.KICK_FD: _S.STARTED,
        _E.ENABLE: _S.RUNNING,
        _E.DISABLE: _S.STARTED,
        _E.STOP: _S.STOPPED,
        _E.BAD_CHAIN: _S.BROKEN,
    },
    _S.RUNNING: {
        _E.KICK_FD: _S.RUNNING,
        _E.ENABLE: _S.RUNNING,
        _E.DISABLE: _S.STARTED,
        _E.STOP: _S.STOPPED,
        _E.BAD_CHAIN: _S.BROKEN,
    },
    _S.BROKEN: {
        _E.KICK_FD: _S.STARTED,
        _E.ENABLE: _S.BROKEN,
        _E.DISABLE: _S.BROKEN,
        _E.STOP: _S.STOPPED,
        _E.BAD_CHAIN: _S.BROKEN,
    },
}
_RUNNING: Final = RingState.RUNNING


class Virtqueue:
    def __init__(
        self,
        index: int,
        memory: GuestMemory,
        handler: RequestHandler,
        direct: DirectReads | None = None,
    ) -> None:
        self.index = index
        self.memory = memory
        self.handler = handler
        # READs C answers by itself, without calling the handler (vhostfs.vhost.direct).
        self.direct = direct
        self._answered = ffi.new("uint32_t *")
        self.ring = ffi.new("struct vq_ring *")
        self.state = RingState.STOPPED  # changed only by _move()
        self.addr: VringAddr | None = None
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self._event_idx = False  # mirrors VQ_F_EVENT_IDX in ring.features
        self._spare_chains: list[_Slot] = []
        self._idle: asyncio.Event | None = None
        # Outside process() a completed chain notifies the guest at once; inside, process()
        # notifies once at its end. Passed to C as its `notify` int.
        self._notify_now = True
        self._notify_fd = -1  # the call fd for C, -1 for none
        # Big READs while more requests wait go to the C helper thread (vq_offload_*), which
        # copies while we decode the next requests; process() finishes them before it returns.
        self._offload = False  # set when the ring starts
        self._offloaded: list[_Slot] = []
        self._read_result = ffi.new("int64_t *")  # vq_reply_preadv's bytes read or -errno

    def _move(self, event: RingEvent) -> None:
        """The one place the ring state changes; a pair missing from the table is refused."""
        new = _TRANSITIONS[self.state].get(event)
        if new is None:
            raise RuntimeError(f"queue {self.index}: {event.value} while {self.state.value}")
        self.state = new

    # Configuration (vhost-user messages) ------------------------------------------------------

    def set_num(self, num: int) -> None:
        if num == 0 or num & (num - 1) or num > lib.VQ_MAX_QUEUE_SIZE:
            raise PayloadError(f"queue {self.index}: size {num} is not a power of two <= 32768")
        self.ring.num = num

    def set_base(self, base: int) -> None:
        if base > 0xFFFF:
            raise PayloadError(f"queue {self.index}: base {base:#x} does not fit a split ring")
        self.ring.last_avail = base

    def set_features(self, indirect: bool, event_idx: bool) -> None:
        self.ring.features = (lib.VQ_F_INDIRECT if indirect else 0) | (
            lib.VQ_F_EVENT_IDX if event_idx else 0
        )
        self._event_idx = event_idx

    def set_addr(self, addr: VringAddr) -> None:
        if addr.flags & ~1:
            raise PayloadError(f"queue {self.index}: unknown vring address flags {addr.flags:#x}")
        self.addr = addr
        self.remap()

    def remap(self) -> None:
        """Derive host pointers again: after SET_VRING_ADDR and after every memory change.

        A ring that is not mapped pops nothing (C answers VQ_ERR_NOT_READY) until this
        succeeds."""
        if self.addr is None or self.ring.num == 0 or self.memory.table.nregions == 0:
            return
        inflight = self.ring.inflight  # vq_ring_map starts from an idle ring; ours may not be
        err = lib.vq_ring_map(
            self.ring,
            self.memory.table,
            self.addr.desc_uva,
            self.addr.avail_uva,
            self.addr.used_uva,
        )
        self.ring.inflight = inflight
        if err < 0:
            raise PayloadError(
                f"queue {self.index}: ring addresses not in guest memory "
                f"({ffi.string(lib.vq_strerror(err)).decode()})"
            )

    def set_call(self, fd: int | None) -> None:
        # QEMU swaps between its masked notifier and the guest irqfd while the ring runs.
        old, self.call_fd = self.call_fd, fd
        self._notify_fd = -1 if fd is None else fd
        if old is not None:
            os.close(old)

    def set_err(self, fd: int | None) -> None:
        old, self.err_fd = self.err_fd, fd
        if old is not None:
            os.close(old)

    def start(self, kick_fd: int) -> None:
        self._offload = _offload_available()
        self._stop_kicks()
        os.set_blocking(kick_fd, False)
        self.kick_fd = kick_fd
        asyncio.get_running_loop().add_reader(kick_fd, self._on_kick)
        self._move(RingEvent.KICK_FD)
        self.process()  # the guest may have queued requests before we listened

    def set_enabled(self, enabled: bool) -> None:
        self._move(RingEvent.ENABLE if enabled else RingEvent.DISABLE)
        self.process()

    def stop(self) -> int:
        """GET_VRING_BASE: stop the ring and return where the next avail entry is."""
        self._stop_kicks()
        self._move(RingEvent.STOP)
        return int(self.ring.last_avail)

    def reset(self) -> None:
        self.stop()
        self.set_call(None)
        self.set_err(None)
        self.addr = None
        lib.vq_ring_unmap(self.ring)
        self.ring.num = 0
        self.ring.last_avail = 0

    @property
    def inflight(self) -> int:
        return int(self.ring.inflight)

    async def drain(self) -> None:
        """Wait until every chain popped from this ring has been completed."""
        while self.ring.inflight:
            self._idle = self._idle or asyncio.Event()
            await self._idle.wait()

    def _stop_kicks(self) -> None:
        if self.kick_fd is not None:
            asyncio.get_running_loop().remove_reader(self.kick_fd)
            os.close(self.kick_fd)
            self.kick_fd = None

    # Request flow ------------------------------------------------------------------------------
    #
    # process() pops every available chain and hands each to the handler, which usually replies
    # before returning. While it runs, replies only push to the used ring; the guest is notified
    # once at the end (if it asked to be), so a burst of requests costs one interrupt. Replies
    # that come later (a handler that suspended) notify at once.

    def _on_kick(self) -> None:
        try:  # noqa: SIM105 (contextlib.suppress costs more, on every kick)
            os.read(self.kick_fd, 8)  # type: ignore[arg-type]  # set while the reader exists
        except BlockingIOError:
            pass
        self.process()

    def process(self) -> None:
        if self.state is not _RUNNING:
            return
        ring, table, handler, memory = self.ring, self.memory.table, self.handler, self.memory
        spare, pop, answered = self._spare_chains, lib.vq_pop_direct, self._answered
        direct = _NO_DIRECT if self.direct is None else self.direct.table
        consts = _NO_CONST if self.direct is None else self.direct.consts
        if not self._event_idx:
            # (With EVENT_IDX this is a no-op in C: not moving avail_event is the suppression.)
            lib.vq_set_kicks(ring, 0)
        used_before = ring.used_idx
        popped = 0
        self._notify_now = False
        try:
            while True:
                slot = spare.pop() if spare else _new_slot()
                got = pop(ring, table, slot[0], direct, consts, answered)
                if got <= 0:
                    spare.append(slot)
                    if got < 0 and got != _NOT_READY:  # not mapped (yet): nothing to take
                        self._break(got)
                    return  # empty, and kicks are on again
                popped += 1
                memory.users += 1
                handler(ChainRequest(self, slot))
        finally:
            self._notify_now = True
            if self._offloaded:
                self._finish_offloaded()
            popped += answered[0]
            answered[0] = 0
            # Anything pushed? (The u16 index comes back to where it was only after 65536.)
            if ring.used_idx != used_before or popped >= 0x10000:
                lib.vq_notify(ring, self._notify_fd)

    # Replies: each puts the chain on the used ring, and its slot back for reuse ----------------

    def complete(self, slot: _Slot, written: int) -> None:
        """Put a popped chain on the used ring with `written` bytes."""
        if self._notify_now:
            err = lib.vq_complete(self.ring, slot[0].head, written, self._notify_fd)
        else:
            err = lib.vq_push(self.ring, slot[0].head, written)
        self._recycle(slot, err)

    def reply(self, slot: _Slot, data: bytes) -> None:
        """Write data at the start of the writable part and complete with len(data).

        Raises ValueError, leaving the chain popped, if it does not fit."""
        err = _vq_reply(self.ring, slot[0], data, len(data), self._notify_now, self._notify_fd)
        if err == _TOO_LONG:
            raise ValueError(f"reply of {len(data)} bytes exceeds the writable part")
        self._recycle(slot, err)

    def reply_file(self, slot: _Slot, unique: int, fd: int, pos: int, size: int) -> None:
        """A successful FUSE reply (fuse_out_header with unique) carrying up to size bytes of
        fd at pos, short at end of file. Raises OSError from the file system, leaving the chain
        popped for an error reply.

        Inside process(), a big read while more requests wait is left to the helper thread
        instead (it answers a read error itself) and completed before process() returns."""
        chain = slot[0]
        if (
            size >= _OFFLOAD_MIN
            and not self._notify_now
            and self._offload
            and (_vq_offload_busy() or _vq_pending(self.ring))
            and _vq_offload_read(chain, fd, pos, size, unique) > 0
        ):
            self._offloaded.append(slot)
            return
        got = self._read_result
        err = _vq_reply_preadv(
            self.ring, chain, fd, pos, size, unique, self._notify_now, self._notify_fd, got
        )
        if err == _READ_FAILED:
            raise OSError(-got[0], os.strerror(-got[0]))
        if err == _TOO_LONG:
            raise ValueError("no room for a fuse_out_header")
        self._recycle(slot, err)

    def reply_pieces(self, slot: _Slot, unique: int, pieces: Sequence[FileSlice | bytes]) -> None:
        """A successful FUSE reply gathered from pieces, each copied straight to guest memory; a
        short file piece (end of file) ends the reply there. Raises OSError from the file
        system, or ValueError if the pieces do not fit, leaving the chain popped."""
        chain = slot[0]
        writable, count, room = chain.iov + chain.nread, chain.nwrite, chain.write_len
        offset = _OUT_HEADER.size
        for piece in pieces:
            if isinstance(piece, FileSlice):
                length = max(0, min(piece.size, room - offset))
                got = lib.vq_iov_preadv(piece.fd, writable, count, offset, length, piece.pos)
                if got < 0:
                    raise OSError(-got, os.strerror(-got))
                offset += got
                if got < piece.size:
                    break
            else:
                if offset + len(piece) > room:
                    raise ValueError(f"reply piece of {len(piece)} bytes does not fit")
                lib.vq_iov_write(writable, count, offset, ffi.from_buffer(piece), len(piece))
                offset += len(piece)
        lib.vq_iov_write(writable, count, 0, _OUT_HEADER.pack(offset, 0, unique), _OUT_HEADER.size)
        self.complete(slot, offset)

    def _recycle(self, slot: _Slot, err: int) -> None:
        """Bookkeeping after a chain went back to the guest (err < 0: it could not)."""
        self._spare_chains.append(slot)
        self.memory.release()
        if err < 0:
            self._break(err)
        if self._idle is not None and self.ring.inflight == 0:
            self._idle.set()
            self._idle = None

    def _finish_offloaded(self) -> None:
        """Wait for the READs handed to the helper and put their chains on the used ring."""
        slots, self._offloaded = self._offloaded, []
        err = lib.vq_offload_finish(self.ring, ffi.NULL)
        self._spare_chains += slots
        for _ in slots:
            self.memory.release()
        if err < 0:
            self._break(err)
        if self._idle is not None and self.ring.inflight == 0:
            self._idle.set()
            self._idle = None

    def _break(self, err: int) -> None:
        log.error(
            "queue %d: bad descriptor chain, ring stopped: %s",
            self.index,
            ffi.string(lib.vq_strerror(err)).decode(),
        )
        if self.kick_fd is not None:
            asyncio.get_running_loop().remove_reader(self.kick_fd)
        self._move(RingEvent.BAD_CHAIN)


def _new_slot() -> _Slot:
    chain = ffi.new("struct vq_chain *")
    return chain, memoryview(ffi.buffer(chain.req))


class ChainRequest:
    """A popped descriptor chain, seen by the FUSE layer as a GuestRequest.

    A thin view: it reads the chain's readable part and hands each reply to its Virtqueue,
    which writes and completes it in one call into C. It only makes sure that happens once."""

    __slots__ = ("_chain", "_done", "_queue", "_slot", "data", "readable_len", "writable_len")

    def __init__(self, queue: Virtqueue, slot: _Slot) -> None:
        self._queue = queue
        self._slot = slot
        chain = self._chain = slot[0]
        self._done = False
        self.data = slot[1][: chain.req_len]
        self.readable_len: int = chain.read_len
        self.writable_len: int = chain.write_len

    @property
    def direct(self) -> DirectReads | None:
        """The table of READs the ring answers in C, which the FUSE layer fills."""
        return self._queue.direct

    def read(self, offset: int, length: int) -> bytes:
        length = max(0, min(length, self.readable_len - offset))
        buf = bytearray(length)
        copied = lib.vq_iov_read(
            self._chain.iov, self._chain.nread, offset, ffi.from_buffer(buf), length
        )
        return bytes(buf[:copied])

    def read_to_file(self, offset: int, fd: int, pos: int, length: int) -> int:
        length = max(0, min(length, self.readable_len - offset))
        moved = lib.vq_iov_pwritev(fd, self._chain.iov, self._chain.nread, offset, length, pos)
        if moved < 0:
            raise OSError(-moved, os.strerror(-moved))
        return int(moved)

    def complete(self, written: int) -> None:
        if self._done:
            raise RuntimeError("request completed twice")
        self._done = True
        self._queue.complete(self._slot, min(written, self.writable_len))

    def send_reply(self, data: bytes) -> None:
        if self._done:
            raise RuntimeError("request completed twice")
        self._queue.reply(self._slot, data)
        self._done = True

    def send_file_reply(self, unique: int, fd: int, pos: int, size: int) -> None:
        if self._done:
            raise RuntimeError("request completed twice")
        self._queue.reply_file(self._slot, unique, fd, pos, size)
        self._done = True

    def send_pieces(self, unique: int, pieces: Sequence[FileSlice | bytes]) -> None:
        if self._done:
            raise RuntimeError("request completed twice")
        self._queue.reply_pieces(self._slot, unique, pieces)
        self._done = True


_vq_reply: Final = lib.vq_reply
# For queues without a table of their own: never enabled, so every chain goes to the handler.
_NO_DIRECT: Final = ffi.new("struct vq_direct *")
_NO_CONST: Final = ffi.new("struct vq_const *")
_vq_reply_preadv: Final = lib.vq_reply_preadv
_vq_offload_read: Final = lib.vq_offload_read
_vq_offload_busy: Final = lib.vq_offload_busy
_vq_pending: Final = lib.vq_pending
_NOT_READY: Final = lib.VQ_ERR_NOT_READY
_TOO_LONG: Final = lib.VQ_REPLY_TOO_LONG
_READ_FAILED: Final = lib.VQ_REPLY_READ_FAILED
# fuse_out_header, which vq_reply_preadv writes in C, for replies gathered from pieces.
_OUT_HEADER: Final = struct.Struct("<IiQ")
# READs this big are worth a hand-off (two extra syscalls: the helper works on a dup of the fd).
_OFFLOAD_MIN: Final = 32 * 1024
_offload_ready: bool | None = None


def _offload_available() -> bool:
    """Start the helper thread on first use; only worth it with a second CPU to copy on."""
    global _offload_ready
    if _offload_ready is None:
        _offload_ready = len(os.sched_getaffinity(0)) > 1 and lib.vq_offload_start() == 0
    return _offload_ready


def stop_offload() -> None:
    """End the helper thread once no ring runs any more (the server is done), so it does not
    outlive the daemon's other resources; the next ring to start starts it again."""
    global _offload_ready
    if _offload_ready:
        err = lib.vq_offload_stop()
        if err:
            log.error("offload helper: cannot stop it: %s", os.strerror(-err))
            return
    _offload_ready = None
