"""What the FUSE layer needs from whatever carries its requests.

The virtqueue (vhostfs.vhost) implements this for descriptor chains in guest memory; tests
implement it over plain buffers. Every transport has the same three ways to answer, so the
dispatcher has one reply path: a whole reply in memory (`send_reply`), READ data straight from
a file (`send_file_reply`) or gathered from pieces (`send_pieces`). Each writes the reply and
completes the request in one step; `complete` alone is for requests that get no reply.

Everything behind it is guest-controlled: lengths and contents are hostile until the dispatcher
has checked them.
"""

from collections.abc import Sequence
from typing import Protocol

from vhostfs.segments import FileSlice


class DirectAccount(Protocol):
    """What the READs a transport answered by itself for one tag came to."""

    @property
    def reads(self) -> int: ...
    @property
    def bytes(self) -> int: ...
    @property
    def sizes(self) -> list[int]: ...  # by size class
    @property
    def latencies(self) -> list[int]: ...  # by latency class


class DirectReads(Protocol):
    """READs the transport answers by itself (vhostfs.vhost.direct), from spans the FUSE layer
    vouched for: it adds a span after serving a READ from it, drops a handle's spans before the
    handle is released, and clears them all whenever fds behind them may close. Hits are
    counted per tag (a mount), in the size and latency classes set_classes gave. The same
    table answers requests whose replies never change (add_constant), cleared with it."""

    enabled: bool

    def add(
        self,
        node: int,
        fh: int,
        file_start: int,
        file_end: int,
        eof: int,
        fd: int,
        pos: int,
        tag: int = 0,
    ) -> bool: ...

    def drop(self, node: int, fh: int) -> None: ...

    def clear(self) -> None: ...

    def set_classes(
        self, size_bounds: Sequence[int], latency_bounds_ns: Sequence[int]
    ) -> None: ...

    def take(self, tag: int) -> DirectAccount: ...

    def add_constant(
        self, node: int, opcode: int, args_len: int, arg_mask: int, arg_value: int, payload: bytes
    ) -> bool: ...

    def add_empty_range(self, opcode: int, args_len: int, lo: int, hi: int) -> bool: ...

    def constant_hits(self) -> dict[int, int]: ...

    @property
    def hits(self) -> int: ...


class GuestRequest(Protocol):
    """One request: a readable part (header, args, payload) and a writable part for the reply."""

    @property
    def data(self) -> memoryview:
        """The first bytes of the readable part (at most 8 KiB), already copied out of the guest."""

    @property
    def direct(self) -> DirectReads | None:
        """The transport's table of directly answered READs, if it has one."""

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

    def send_reply(self, data: bytes) -> None:
        """Write data (fuse_out_header and payload) at the start of the writable part and
        complete with len(data). Raises ValueError, leaving the request open, if it does not
        fit."""

    def send_file_reply(self, unique: int, fd: int, pos: int, size: int) -> None:
        """A successful reply (fuse_out_header for unique, then up to size bytes of fd at pos,
        short at end of file), completed.

        Raises OSError from the file system, leaving the request to be answered otherwise. The
        transport may also do the read later and answer a read error itself; fd need only stay
        open until this returns."""

    def send_pieces(self, unique: int, pieces: Sequence[FileSlice | bytes]) -> None:
        """A successful reply (fuse_out_header for unique, then the pieces in order, each file
        piece read straight into the reply; a short one, at end of file, ends it), completed.

        Raises OSError from the file system, or ValueError if the pieces do not fit, leaving
        the request open."""

    def complete(self, written: int) -> None:
        """Hand the request back to the guest with `written` reply bytes already in place.

        Each request is completed exactly once: by this or by one of the send_* methods."""
