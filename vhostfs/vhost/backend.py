"""The vhost-user back-end state machine, one per front-end connection.

`Backend.handle(message)` applies one decoded message to the device state and returns the bytes to
send back, if any. It does no socket I/O. The one asynchronous step, waiting for a ring's
in-flight requests before GET_VRING_BASE answers, is `Backend.before(message)`, which the socket
layer awaits first.

Rules the handlers follow (vhost-user spec, and what QEMU 7.2 and cloud-hypervisor do):
1. Only features we offered may be acked, and only acked features change behaviour.
2. Requests with a reply of their own always get it; any other request gets a u64 ack (0 = ok)
   when it sets NEED_REPLY and REPLY_ACK was negotiated.
3. A bad payload is refused with a log line (and a failure ack if one is wanted); it never
   tears down the device. A request we cannot answer at all closes the connection.
4. Without PROTOCOL_FEATURES, SET_FEATURES enables every ring; with it, rings wait for
   SET_VRING_ENABLE.
"""

import logging
import os
from collections.abc import Callable

from vhostfs._vring import lib
from vhostfs.vhost import protocol as p
from vhostfs.vhost.codec import (
    Message,
    PayloadError,
    ProtocolError,
    encode_reply,
    encode_u64_reply,
)
from vhostfs.vhost.direct import DirectReads
from vhostfs.vhost.memory import GuestMemory
from vhostfs.vhost.virtqueue import RequestHandler, Virtqueue

log = logging.getLogger(__name__)

# hiprio plus request queues. Linux before 6.11 uses one request queue; later ones spread
# requests over as many as the device has, and QEMU does not check our answer against its own.
DEFAULT_QUEUES = 2

Answer = int | bytes | None  # a u64 reply, a raw payload, or nothing of its own


class Backend:
    def __init__(self, handler: RequestHandler, num_queues: int = DEFAULT_QUEUES) -> None:
        self.memory = GuestMemory()
        self.direct = DirectReads()  # shared by the queues: a file range serves any of them
        self.queues = [Virtqueue(i, self.memory, handler, self.direct) for i in range(num_queues)]
        self.features = 0
        self.protocol_features = 0
        self.owned = False
        self.backend_req_fd: int | None = None
        self._handlers: dict[int, Callable[[Message], Answer]] = {
            p.Request.GET_FEATURES: lambda m: p.OFFERED_FEATURES,
            p.Request.SET_FEATURES: self._set_features,
            p.Request.GET_PROTOCOL_FEATURES: lambda m: p.OFFERED_PROTOCOL_FEATURES,
            p.Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            p.Request.SET_OWNER: self._set_owner,
            p.Request.RESET_OWNER: self._reset,
            p.Request.RESET_DEVICE: self._reset,
            p.Request.GET_QUEUE_NUM: lambda m: len(self.queues),
            p.Request.GET_MAX_MEM_SLOTS: lambda m: int(lib.VQ_MAX_REGIONS),
            p.Request.SET_MEM_TABLE: self._set_mem_table,
            p.Request.ADD_MEM_REG: self._add_mem_reg,
            p.Request.REM_MEM_REG: self._rem_mem_reg,
            p.Request.SET_VRING_NUM: self._set_vring_num,
            p.Request.SET_VRING_ADDR: self._set_vring_addr,
            p.Request.SET_VRING_BASE: self._set_vring_base,
            p.Request.GET_VRING_BASE: self._get_vring_base,
            p.Request.SET_VRING_KICK: self._set_vring_kick,
            p.Request.SET_VRING_CALL: self._set_vring_call,
            p.Request.SET_VRING_ERR: self._set_vring_err,
            p.Request.SET_VRING_ENABLE: self._set_vring_enable,
            p.Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
        }

    # Dispatch ------------------------------------------------------------------------------------

    async def before(self, message: Message) -> None:
        """The asynchronous part of a message, awaited before handle()."""
        if message.request == p.Request.GET_VRING_BASE and len(message.payload) == 8:
            index, _ = message.vring_state()
            if index < len(self.queues):
                await self.queues[index].drain()

    def handle(self, message: Message) -> bytes | None:
        """Apply one message; return the reply bytes to send, if any.

        Raises ProtocolError when the connection cannot go on."""
        handler = self._handlers.get(message.request)
        try:
            if handler is None:
                if not self._acks(message):
                    # The front-end may be waiting for a reply we cannot form.
                    raise ProtocolError(f"unsupported vhost-user {message.name}")
                raise PayloadError(f"unsupported vhost-user {message.name}")
            reply = handler(message)
        except PayloadError as exc:
            log.warning("refused %s: %s", message.name, exc)
            if message.request in _ALWAYS_REPLY:
                raise ProtocolError(f"cannot answer {message.name}: {exc}") from None
            return encode_u64_reply(message.request, 1) if self._acks(message) else None
        finally:
            message.close_fds()
        if isinstance(reply, bytes):
            return encode_reply(message.request, reply)
        if isinstance(reply, int):
            return encode_u64_reply(message.request, reply)
        return encode_u64_reply(message.request, 0) if self._acks(message) else None

    def _acks(self, message: Message) -> bool:
        return message.need_reply and bool(self.protocol_features & p.ProtocolFeature.REPLY_ACK)

    def shutdown(self) -> None:
        """The front-end is gone: stop the rings and let go of every fd and mapping."""
        for queue in self.queues:
            queue.reset()
        self.memory.clear()
        self._set_backend_req(None)

    # Features and ownership ----------------------------------------------------------------------

    def _set_features(self, message: Message) -> Answer:
        features = message.u64()
        unknown = features & ~p.OFFERED_FEATURES
        if unknown:
            raise PayloadError(f"features {unknown:#x} were never offered")
        self.features = features
        for queue in self.queues:
            queue.set_features(
                indirect=bool(features & p.VirtioFeature.RING_INDIRECT_DESC),
                event_idx=bool(features & p.VirtioFeature.RING_EVENT_IDX),
            )
        if not features & p.VirtioFeature.PROTOCOL_FEATURES:
            for queue in self.queues:
                queue.set_enabled(True)
        return None

    def _set_protocol_features(self, message: Message) -> Answer:
        # cloud-hypervisor's reconnect path sends this without a GET first; that is fine.
        features = message.u64()
        unknown = features & ~p.OFFERED_PROTOCOL_FEATURES
        if unknown:
            raise PayloadError(f"protocol features {unknown:#x} were never offered")
        self.protocol_features = features
        return None

    def _set_owner(self, message: Message) -> Answer:
        self.owned = True
        return None

    def _reset(self, message: Message) -> Answer:
        for queue in self.queues:
            queue.reset()
        self.features = 0
        return None

    # Memory --------------------------------------------------------------------------------------

    def _set_mem_table(self, message: Message) -> Answer:
        self.memory.replace(message.mem_regions(), message.take_fds())
        self._remap_rings()
        return None

    def _add_mem_reg(self, message: Message) -> Answer:
        region = message.single_mem_region()
        fds = message.take_fds()
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise PayloadError(f"ADD_MEM_REG carries {len(fds)} fds, expected 1")
        self.memory.add(region, fds[0])
        self._remap_rings()
        return None

    def _rem_mem_reg(self, message: Message) -> Answer:
        self.memory.remove(message.single_mem_region())
        self._remap_rings()
        return None

    def _remap_rings(self) -> None:
        for queue in self.queues:
            try:
                queue.remap()
            except PayloadError as exc:
                # A ring whose memory vanished is unusable until it is set up again.
                log.warning("%s", exc)

    # Rings ---------------------------------------------------------------------------------------

    def _queue(self, index: int) -> Virtqueue:
        if index >= len(self.queues):
            raise PayloadError(f"queue index {index} >= {len(self.queues)} queues")
        return self.queues[index]

    def _set_vring_num(self, message: Message) -> Answer:
        index, num = message.vring_state()
        self._queue(index).set_num(num)
        return None

    def _set_vring_addr(self, message: Message) -> Answer:
        addr = message.vring_addr()
        self._queue(addr.index).set_addr(addr)
        return None

    def _set_vring_base(self, message: Message) -> Answer:
        index, base = message.vring_state()
        self._queue(index).set_base(base)
        return None

    def _get_vring_base(self, message: Message) -> Answer:
        index, _ = message.vring_state()
        base = self._queue(index).stop()
        return p.VRING_STATE.pack(index, base)

    def _vring_fd(self, message: Message) -> tuple[Virtqueue, int | None]:
        value = message.u64()
        if value & ~(p.VRING_FD_INDEX_MASK | p.VRING_FD_NOFD):
            raise PayloadError(f"bad vring fd payload {value:#x}")
        queue = self._queue(value & p.VRING_FD_INDEX_MASK)
        fds = message.take_fds()
        want = 0 if value & p.VRING_FD_NOFD else 1
        if len(fds) != want:
            for fd in fds:
                os.close(fd)
            raise PayloadError(f"{message.name} carries {len(fds)} fds, expected {want}")
        return queue, fds[0] if fds else None

    def _set_vring_kick(self, message: Message) -> Answer:
        queue, fd = self._vring_fd(message)
        if fd is None:
            raise PayloadError("polling a ring without a kick fd is not supported")
        queue.start(fd)
        return None

    def _set_vring_call(self, message: Message) -> Answer:
        queue, fd = self._vring_fd(message)
        queue.set_call(fd)
        return None

    def _set_vring_err(self, message: Message) -> Answer:
        queue, fd = self._vring_fd(message)
        queue.set_err(fd)
        return None

    def _set_vring_enable(self, message: Message) -> Answer:
        index, enable = message.vring_state()
        if enable > 1:
            raise PayloadError(f"SET_VRING_ENABLE with {enable}")
        self._queue(index).set_enabled(bool(enable))
        return None

    def _set_backend_req_fd(self, message: Message) -> Answer:
        fds = message.take_fds()
        if len(fds) != 1:
            for fd in fds:
                os.close(fd)
            raise PayloadError(f"SET_BACKEND_REQ_FD carries {len(fds)} fds, expected 1")
        # We send nothing on this channel (no DAX, no config changes); keep it open so the
        # front-end does not see it closed as an error.
        self._set_backend_req(fds[0])
        return None

    def _set_backend_req(self, fd: int | None) -> None:
        old, self.backend_req_fd = self.backend_req_fd, fd
        if old is not None:
            os.close(old)


_ALWAYS_REPLY = frozenset(
    {
        p.Request.GET_FEATURES,
        p.Request.GET_PROTOCOL_FEATURES,
        p.Request.GET_VRING_BASE,
        p.Request.GET_QUEUE_NUM,
        p.Request.GET_MAX_MEM_SLOTS,
    }
)
