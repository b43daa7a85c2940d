"""What the FUSE layer needs from whatever carries its requests.

The virtqueue (vhostfs.vhost) implements this for descriptor chains in guest memory; tests may
implement it over plain buffers. Everything behind it is guest-controlled: lengths and contents
are hostile until the dispatcher has checked them.
"""

from typing import Protocol, TypeAlias

BytesLike: TypeAlias = bytes | bytearray | memoryview


class GuestRequest(Protocol):
    """One request: a readable part (header, args, payload) and a writable part for the reply."""

    @property
    def data(self) -> memoryview:
        """The first bytes of the readable part (at most 8 KiB), already copied out of the guest."""

    @property
    def readable_len(self) -> int:
        """Length of the whole readable part, which may exceed len(data)."""

    @property
    def writable_len(self) -> int:
        """Room for the reply."""

    def read(self, offset: int, length: int) -> bytes:
        """Readable bytes [offset, offset+length) beyond `data`; short at the end."""

    def read_to_file(self, offset: int, fd: int, pos: int, length: int) -> int:
        """pwritev readable bytes starting at offset to fd at pos. Returns bytes written.

        Raises OSError from the file system."""

    def write_reply(self, offset: int, data: BytesLike) -> None:
        """Copy data into the writable part at offset. Raises ValueError if it does not fit."""

    def reply_from_file(self, offset: int, fd: int, pos: int, length: int) -> int:
        """preadv up to length bytes of fd at pos into the writable part at offset.

        Returns the bytes read (short at end of file). Raises OSError from the file system."""

    def complete(self, written: int) -> None:
        """Hand the chain back to the guest with `written` reply bytes, and notify it if needed.

        Must be called exactly once per request, also for requests that get no reply."""


class FastGuestRequest(GuestRequest, Protocol):
    """A GuestRequest that can also write a whole reply and complete in one step.

    The dispatcher uses these when a transport's request type has them (the virtqueue does each
    in one call into C) and write_reply/reply_from_file + complete otherwise."""

    def send_reply(self, data: bytes) -> None:
        """write_reply(0, data), then complete(len(data)). Raises ValueError if it does not fit."""

    def send_file_reply(self, unique: int, fd: int, pos: int, size: int) -> None:
        """A successful reply (fuse_out_header for unique, then up to size bytes of fd at pos,
        short at end of file), completed.

        Raises OSError from the file system, leaving the request to be answered otherwise. The
        transport may also do the read later and answer a read error itself; fd need only stay
        open until this returns."""
