"""One split virtqueue: the ring state the front-end configures, its kick loop, and its requests.

The walking, translating and used-ring pushes happen in C (csrc/vring.c); this class owns the
fds and the lifecycle. A ring *starts* when its kick fd arrives, *runs* while also enabled, and
*stops* on GET_VRING_BASE. A bad chain *breaks* it: one log line, and no more processing until
the front-end sets it up again.
"""

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any, TypeAlias

from vhostfs._vring import ffi, lib
from vhostfs.vhost.codec import PayloadError, VringAddr
from vhostfs.vhost.memory import GuestMemory

log = logging.getLogger(__name__)

BytesLike: TypeAlias = bytes | bytearray | memoryview
# Structurally a vhostfs.fuse.transport.GuestRequest; the transport does not import the FUSE layer.
RequestHandler = Callable[["ChainRequest"], None]


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
        self.broken: str | None = None
        self._spare_chains: list[Any] = []
        self._idle: asyncio.Event | None = None

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
        if old is not None:
            os.close(old)

    def set_err(self, fd: int | None) -> None:
        old, self.err_fd = self.err_fd, fd
        if old is not None:
            os.close(old)

    def start(self, kick_fd: int) -> None:
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

    def _on_kick(self) -> None:
        assert self.kick_fd is not None
        with contextlib.suppress(BlockingIOError):
            os.read(self.kick_fd, 8)
        self.process()

    def process(self) -> None:
        if self.kick_fd is None or not self.enabled or self.broken or self.ring.desc == ffi.NULL:
            return
        while True:
            lib.vq_set_kicks(self.ring, 0)
            while True:
                chain = (
                    self._spare_chains.pop() if self._spare_chains else ffi.new("struct vq_chain *")
                )
                got = lib.vq_pop(self.ring, self.memory.table, chain)
                if got <= 0:
                    self._spare_chains.append(chain)
                    if got < 0:
                        self._break(got)
                        return
                    break
                self.memory.users += 1
                self.handler(ChainRequest(self, chain))
            # Re-enabling kicks races with the guest adding more: check again afterwards.
            if not lib.vq_set_kicks(self.ring, 1):
                return

    def complete(self, chain: Any, written: int) -> None:
        call_fd = -1 if self.call_fd is None else self.call_fd
        err = lib.vq_complete(self.ring, chain.head, written, call_fd)
        self._spare_chains.append(chain)
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


class ChainRequest:
    """A popped descriptor chain, seen by the FUSE layer as a GuestRequest."""

    __slots__ = ("_chain", "_done", "_queue", "_writable", "data", "readable_len", "writable_len")

    def __init__(self, queue: Virtqueue, chain: Any) -> None:
        self._queue = queue
        self._chain = chain
        self._writable = chain.iov + chain.nread
        self._done = False
        self.data = memoryview(ffi.buffer(chain.req, chain.req_len))
        self.readable_len = int(chain.read_len)
        self.writable_len = int(chain.write_len)

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
        lib.vq_iov_write(
            self._writable, self._chain.nwrite, offset, ffi.from_buffer(data), len(data)
        )

    def reply_from_file(self, offset: int, fd: int, pos: int, length: int) -> int:
        length = max(0, min(length, self.writable_len - offset))
        moved = lib.vq_iov_preadv(fd, self._writable, self._chain.nwrite, offset, length, pos)
        if moved < 0:
            raise OSError(-moved, os.strerror(-moved))
        return int(moved)

    def complete(self, written: int) -> None:
        if self._done:
            raise RuntimeError("request completed twice")
        self._done = True
        self._queue.complete(self._chain, min(written, self.writable_len))
