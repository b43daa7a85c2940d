"""One split virtqueue: the ring state the front-end configures, its kick loop, and its requests.

The walking, translating and used-ring pushes happen in C (csrc/vring.c); this class owns the
fds and the lifecycle. Replies are written and completed in one C call each, and big READs that
arrive in a burst are copied by a C helper thread while the next requests are decoded (the
helper only fills guest buffers; every ring update stays on the event loop thread).

A ring *starts* when its kick fd arrives, *runs* while also enabled, and *stops* on
GET_VRING_BASE. A bad chain *breaks* it: one log line, and no more processing until the
front-end sets it up again.
"""

import asyncio
import logging
import os
from collections.abc import Callable
from typing import Any, Final, TypeAlias

from vhostfs._vring import ffi, lib
from vhostfs.vhost.codec import PayloadError, VringAddr
from vhostfs.vhost.memory import GuestMemory

log = logging.getLogger(__name__)

BytesLike: TypeAlias = bytes | bytearray | memoryview
# Structurally a vhostfs.fuse.transport.GuestRequest; the transport does not import the FUSE layer.
RequestHandler = Callable[["ChainRequest"], None]
# A chain struct and a view of its whole request buffer, made once and reused.
_Slot: TypeAlias = tuple[Any, memoryview]


class Virtqueue:
    def __init__(self, index: int, memory: GuestMemory, handler: RequestHandler) -> None:
        self.index = index
        self.memory = memory
        self.handler = handler
        self.ring = ffi.new("struct vq_ring *")
        self.addr: VringAddr | None = None
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self._event_idx = False  # mirrors VQ_F_EVENT_IDX in ring.features
        self.broken: str | None = None
        self._spare_chains: list[_Slot] = []
        self._idle: asyncio.Event | None = None
        # For the C calls that complete a chain: notify the guest now (1), or not (0) while
        # process() runs, which notifies once at its end; and the call fd, -1 for none.
        self.notify_now = 1
        self.call_arg = -1
        # Big READs while more requests wait go to the C helper thread (vq_offload_*), which
        # copies while we decode the next requests; process() finishes them before it returns.
        self.offload = False  # set when the ring starts
        self._offloaded: list[_Slot] = []
        self.read_result = ffi.new("int64_t *")  # vq_reply_preadv's bytes read or -errno

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
        self.broken = None
        self.remap()

    def remap(self) -> None:
        """Derive host pointers again: after SET_VRING_ADDR and after every memory change."""
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
            self.ring.desc = ffi.NULL
            raise PayloadError(
                f"queue {self.index}: ring addresses not in guest memory "
                f"({ffi.string(lib.vq_strerror(err)).decode()})"
            )

    def set_call(self, fd: int | None) -> None:
        # QEMU swaps between its masked notifier and the guest irqfd while the ring runs.
        old, self.call_fd = self.call_fd, fd
        self.call_arg = -1 if fd is None else fd
        if old is not None:
            os.close(old)

    def set_err(self, fd: int | None) -> None:
        old, self.err_fd = self.err_fd, fd
        if old is not None:
            os.close(old)

    def start(self, kick_fd: int) -> None:
        self.offload = _offload_available()
        self._stop_kicks()
        os.set_blocking(kick_fd, False)
        self.kick_fd = kick_fd
        self.broken = None
        asyncio.get_running_loop().add_reader(kick_fd, self._on_kick)
        self.process()  # the guest may have queued requests before we listened

    def set_enabled(self, enabled: bool) -> None:
        self.enabled = enabled
        if enabled:
            self.process()

    def stop(self) -> int:
        """GET_VRING_BASE: stop the ring and return where the next avail entry is."""
        self._stop_kicks()
        self.enabled = False
        return int(self.ring.last_avail)

    def reset(self) -> None:
        self.stop()
        self.set_call(None)
        self.set_err(None)
        self.addr = None
        self.ring.desc = ffi.NULL
        self.ring.num = 0
        self.ring.last_avail = 0
        self.broken = None

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
        if self.kick_fd is None or not self.enabled or self.broken or self.ring.desc == ffi.NULL:
            return
        ring, table, handler, memory = self.ring, self.memory.table, self.handler, self.memory
        spare, pop = self._spare_chains, lib.vq_pop_or_arm
        if not self._event_idx:
            # (With EVENT_IDX this is a no-op in C: not moving avail_event is the suppression.)
            lib.vq_set_kicks(ring, 0)
        used_before = ring.used_idx
        popped = 0
        self.notify_now = 0
        try:
            while True:
                slot = spare.pop() if spare else _new_slot()
                got = pop(ring, table, slot[0])
                if got <= 0:
                    spare.append(slot)
                    if got < 0:
                        self._break(got)
                    return  # empty, and kicks are on again
                popped += 1
                memory.users += 1
                handler(ChainRequest(self, slot))
        finally:
            self.notify_now = 1
            if self._offloaded:
                self._finish_offloaded()
            # Anything pushed? (The u16 index comes back to where it was only after 65536.)
            if ring.used_idx != used_before or popped >= 0x10000:
                lib.vq_notify(ring, self.call_arg)

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

    def complete(self, slot: _Slot, written: int) -> None:
        """Put a popped chain on the used ring with `written` bytes; the slot is free again."""
        if self.notify_now:
            err = lib.vq_complete(self.ring, slot[0].head, written, self.call_arg)
        else:
            err = lib.vq_push(self.ring, slot[0].head, written)
        self._spare_chains.append(slot)
        self.finished(err)

    def finished(self, err: int) -> None:
        """Bookkeeping after a chain went back to the guest (err < 0: it could not)."""
        self.memory.release()
        if err < 0:
            self._break(err)
        if self._idle is not None and self.ring.inflight == 0:
            self._idle.set()
            self._idle = None

    def _break(self, err: int) -> None:
        self.broken = ffi.string(lib.vq_strerror(err)).decode()
        log.error("queue %d: bad descriptor chain, ring stopped: %s", self.index, self.broken)
        if self.kick_fd is not None:
            asyncio.get_running_loop().remove_reader(self.kick_fd)


def _new_slot() -> _Slot:
    chain = ffi.new("struct vq_chain *")
    return chain, memoryview(ffi.buffer(chain.req))


class ChainRequest:
    """A popped descriptor chain, seen by the FUSE layer as a GuestRequest.

    Besides the GuestRequest methods it has send_reply/send_file_reply, which write the whole
    reply and complete the chain in one call into C."""

    __slots__ = ("_chain", "_done", "_queue", "_slot", "data", "readable_len", "writable_len")

    def __init__(self, queue: Virtqueue, slot: _Slot) -> None:
        self._queue = queue
        self._slot = slot
        chain = self._chain = slot[0]
        self._done = False
        self.data = slot[1][: chain.req_len]
        self.readable_len: int = chain.read_len
        self.writable_len: int = chain.write_len

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

    def write_reply(self, offset: int, data: BytesLike) -> None:
        if offset < 0 or offset + len(data) > self.writable_len:
            raise ValueError(f"reply of {len(data)} bytes at {offset} exceeds the writable part")
        chain = self._chain
        lib.vq_iov_write(
            chain.iov + chain.nread, chain.nwrite, offset, ffi.from_buffer(data), len(data)
        )

    def reply_from_file(self, offset: int, fd: int, pos: int, length: int) -> int:
        length = max(0, min(length, self.writable_len - offset))
        chain = self._chain
        moved = lib.vq_iov_preadv(fd, chain.iov + chain.nread, chain.nwrite, offset, length, pos)
        if moved < 0:
            raise OSError(-moved, os.strerror(-moved))
        return int(moved)

    def complete(self, written: int) -> None:
        if self._done:
            raise RuntimeError("request completed twice")
        self._done = True
        self._queue.complete(self._slot, min(written, self.writable_len))

    def send_reply(self, data: bytes) -> None:
        """write_reply(0, data), then complete(len(data)). Raises ValueError if it does not fit."""
        if self._done:
            raise RuntimeError("request completed twice")
        if len(data) > self.writable_len:
            raise ValueError(f"reply of {len(data)} bytes exceeds the writable part")
        self._done = True
        q = self._queue
        err = _vq_reply(q.ring, self._chain, data, len(data), q.notify_now, q.call_arg)
        q._spare_chains.append(self._slot)
        q.finished(err)

    def send_file_reply(self, unique: int, fd: int, pos: int, size: int) -> None:
        """A successful reply (fuse_out_header with unique) carrying up to size bytes of fd at
        pos, short at end of file; completes the request. Raises OSError from the file system,
        leaving the request to be answered otherwise.

        Inside process(), a big read while more requests wait is left to the helper thread
        instead (it answers a read error itself) and completed before process() returns."""
        if self._done:
            raise RuntimeError("request completed twice")
        q = self._queue
        if (
            size >= _OFFLOAD_MIN
            and not q.notify_now
            and q.offload
            and (_vq_offload_busy() or _vq_pending(q.ring))
            and _vq_offload_read(self._chain, fd, pos, size, unique) > 0
        ):
            self._done = True
            q._offloaded.append(self._slot)
            return
        got = q.read_result
        err = _vq_reply_preadv(
            q.ring, self._chain, fd, pos, size, unique, q.notify_now, q.call_arg, got
        )
        if err == _READ_FAILED:
            raise OSError(-got[0], os.strerror(-got[0]))
        self._done = True
        q._spare_chains.append(self._slot)
        q.finished(err)


_vq_reply: Final = lib.vq_reply
_vq_reply_preadv: Final = lib.vq_reply_preadv
_vq_offload_read: Final = lib.vq_offload_read
_vq_offload_busy: Final = lib.vq_offload_busy
_vq_pending: Final = lib.vq_pending
# READs this big are worth a hand-off (two extra syscalls: the helper works on a dup of the fd).
_OFFLOAD_MIN: Final = 32 * 1024
_offload_ready: bool | None = None


def _offload_available() -> bool:
    """Start the helper thread on first use; only worth it with a second CPU to copy on."""
    global _offload_ready
    if _offload_ready is None:
        _offload_ready = len(os.sched_getaffinity(0)) > 1 and lib.vq_offload_start() == 0
    return _offload_ready

_READ_FAILED: Final = lib.VQ_REPLY_READ_FAILED
