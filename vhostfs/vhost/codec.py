"""Sans-I/O vhost-user message codec.

`MessageReader` is fed bytes and file descriptors as the socket layer receives them and hands out
complete `Message`s; `encode_reply` turns an answer into bytes. Nothing here touches a socket, so
the socket layer, tests and fuzzers drive it the same way.

The header check follows rust-vmm: version must be 1, no reserved flag bits, payload at most one
page, fds only with the first byte of a header.
"""

import os
from dataclasses import dataclass, field

from vhostfs.vhost import protocol as p


class ProtocolError(Exception):
    """The front-end sent something we cannot parse; the connection cannot continue."""


class PayloadError(Exception):
    """A well-framed message whose payload is wrong for its request; answered with a failure."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & p.FLAG_NEED_REPLY)

    @property
    def name(self) -> str:
        try:
            return p.Request(self.request).name
        except ValueError:
            return f"request {self.request}"

    def take_fds(self) -> list[int]:
        """Hand the fds over to the caller, which then owns (and must close) them."""
        fds, self.fds = self.fds, []
        return fds

    def close_fds(self) -> None:
        for fd in self.take_fds():
            os.close(fd)

    # Payload decoders. Each checks the size exactly: a short or long payload is a front-end bug.

    def _expect(self, size: int) -> None:
        if len(self.payload) != size:
            raise PayloadError(
                f"{self.name}: payload of {len(self.payload)} bytes, expected {size}"
            )

    def u64(self) -> int:
        self._expect(p.U64.size)
        (value,) = p.U64.unpack(self.payload)
        return int(value)

    def vring_state(self) -> tuple[int, int]:
        self._expect(p.VRING_STATE.size)
        index, num = p.VRING_STATE.unpack(self.payload)
        return int(index), int(num)

    def vring_addr(self) -> "VringAddr":
        self._expect(p.VRING_ADDR.size)
        return VringAddr(*p.VRING_ADDR.unpack(self.payload))

    def mem_regions(self) -> list["MemRegion"]:
        if len(self.payload) < p.MEM_TABLE_HEAD.size:
            raise PayloadError("SET_MEM_TABLE: payload shorter than its header")
        count, _ = p.MEM_TABLE_HEAD.unpack_from(self.payload)
        self._expect(p.MEM_TABLE_HEAD.size + count * p.MEM_REGION.size)
        return [
            MemRegion(*p.MEM_REGION.unpack_from(self.payload, p.MEM_TABLE_HEAD.size + i * 32))
            for i in range(count)
        ]

    def single_mem_region(self) -> "MemRegion":
        self._expect(p.SINGLE_MEM_REGION.size)
        return MemRegion(*p.SINGLE_MEM_REGION.unpack(self.payload)[1:])


@dataclass(frozen=True)
class VringAddr:
    index: int
    flags: int
    desc_uva: int
    used_uva: int
    avail_uva: int
    log_gpa: int


@dataclass(frozen=True)
class MemRegion:
    gpa: int
    size: int
    uva: int
    mmap_offset: int


class MessageReader:
    """Reassembles messages from a byte stream plus the fds that arrived with it."""

    def __init__(self) -> None:
        self._buffer = bytearray()
        self._fds: list[int] = []

    def header_bytes_missing(self) -> int:
        """How much to receive next so that fds land with a header, never with a payload."""
        if len(self._buffer) < p.HEADER.size:
            return p.HEADER.size - len(self._buffer)
        _, _, size = p.HEADER.unpack_from(self._buffer)
        return int(size) + p.HEADER.size - len(self._buffer)

    def feed(self, data: bytes, fds: list[int]) -> None:
        if fds and len(self._buffer) >= p.HEADER.size:
            for fd in fds:
                os.close(fd)
            raise ProtocolError("file descriptors arrived with a payload, not with a header")
        self._buffer += data
        self._fds += fds

    def next_message(self) -> Message | None:
        """The next complete message, or None. Raises ProtocolError on a bad header."""
        if len(self._buffer) < p.HEADER.size:
            return None
        request, flags, size = p.HEADER.unpack_from(self._buffer)
        if flags & p.VERSION_MASK != p.VERSION or flags & ~p.KNOWN_FLAGS or flags & p.FLAG_REPLY:
            self.close()
            raise ProtocolError(f"bad header flags {flags:#x} on request {request}")
        if size > p.MAX_PAYLOAD:
            self.close()
            raise ProtocolError(f"payload of {size} bytes on request {request} is too large")
        end = p.HEADER.size + size
        if len(self._buffer) < end:
            return None
        message = Message(request, flags, bytes(self._buffer[p.HEADER.size : end]), self._fds)
        del self._buffer[:end]
        self._fds = []
        return message

    def close(self) -> None:
        for fd in self._fds:
            os.close(fd)
        self._fds = []
        self._buffer.clear()


def encode_reply(request: int, payload: bytes) -> bytes:
    return p.HEADER.pack(request, p.VERSION | p.FLAG_REPLY, len(payload)) + payload


def encode_u64_reply(request: int, value: int) -> bytes:
    return encode_reply(request, p.U64.pack(value))
