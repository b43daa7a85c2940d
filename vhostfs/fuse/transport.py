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
        """Readable bytes [offset, offset+length), for arguments beyond `data` (short at the end)."""

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
