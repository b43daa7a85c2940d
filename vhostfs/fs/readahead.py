"""Which bytes of an image file to fetch before the guest asks for them.

The guest kernel reads ahead only within its own window (128 KiB by default), so a reader
streaming a cold file would stall at every chunk boundary while the next chunk is fetched,
decoded and cached: with 1 MiB chunks that is one stall per MiB. Once a file is read
sequentially, the file system asks the storage for the chunks just past the reader, so they
are ready (or on their way) when it gets there.

A file counts as read sequentially when a READ starts where the previous one ended (give or
take what the guest's page cache skipped). The window then grows, doubling from `first` to
`largest` bytes as the streak goes on, as the kernel's own readahead does; a jump elsewhere
resets it. Only the last `files` files are tracked, so a guest opening millions of files
costs a bounded table.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Final

# What still counts as "where the last read ended": the guest may skip pages it has cached.
SLACK: Final = 128 << 10
FIRST_WINDOW: Final = 1 << 20
LARGEST_WINDOW: Final = 4 << 20
FILES_TRACKED: Final = 256


@dataclass(slots=True)
class _Stream:
    next: int  # where a sequential reader's next READ starts
    ahead: int  # everything below this has been asked for
    window: int  # bytes to keep asked for ahead of the reader


class Readahead:
    def __init__(
        self,
        first: int = FIRST_WINDOW,
        largest: int = LARGEST_WINDOW,
        files: int = FILES_TRACKED,
    ) -> None:
        self._first = first
        self._largest = max(first, largest)
        self._files = files
        self._streams: OrderedDict[int, _Stream] = OrderedDict()

    def after_read(self, ino: int, start: int, end: int, size: int) -> tuple[int, int] | None:
        """Note that file `ino` (of `size` bytes) was read over [start, end); returns the
        byte range [lo, hi) to fetch ahead now, or None when there is nothing to ask for."""
        stream = self._streams.get(ino)
        if stream is None or not stream.next - SLACK <= start <= stream.next + SLACK:
            # A first read or a jump: remember where a sequential reader would go next.
            self._streams[ino] = _Stream(end, end, self._first)
            self._streams.move_to_end(ino)
            if len(self._streams) > self._files:
                self._streams.popitem(last=False)
            return None
        self._streams.move_to_end(ino)
        stream.next = max(stream.next, end)
        # Top up once the reader has used half of what is ahead of it.
        if stream.ahead - stream.next > stream.window // 2 or stream.ahead >= size:
            return None
        lo = max(stream.ahead, stream.next)
        hi = min(size, stream.next + stream.window)
        stream.ahead = max(stream.ahead, hi)
        stream.window = min(stream.window * 2, self._largest)
        return (lo, hi) if lo < hi else None

    def forget(self, ino: int) -> None:
        self._streams.pop(ino, None)
