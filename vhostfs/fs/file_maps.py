"""The chunk refs of recently read stretches of image files, decoded from the bootstrap once.

Every READ of an image file needs the refs covering its range. Decoding them from the
bootstrap costs about a third of a cached READ's time in Python, and a file is usually read
many times over one stretch (128 KiB at a time, or at random within it), so the refs of a
whole window of `WINDOW` bytes are decoded on the first read there and kept. Windows bound
the work of one decode whatever the chunk size; the table is bounded by the number of refs it
holds, least recently read windows going first. A read that spans two windows is decoded on
its own. A damaged chunk entry fails every read of its window (EIO, as it would fail a read of
that chunk): a bad image still never yields wrong bytes.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Final

from vhostfs.storage.blob import ChunkRef

WINDOW: Final = 16 << 20
# ~200 bytes a ref: about 3 MiB at most (16 GiB of files with 1 MiB chunks).
REFS_KEPT: Final = 16384


class _Window:
    __slots__ = ("refs", "starts")

    def __init__(self, refs: list[ChunkRef]) -> None:
        self.refs = refs
        self.starts = [ref.file_offset for ref in refs]


class FileMaps:
    def __init__(
        self,
        decode: Callable[[int, int, int], list[ChunkRef]],
        window: int = WINDOW,
        budget: int = REFS_KEPT,
    ) -> None:
        """`decode(ino, offset, size)` returns the refs covering a range of a file, clipped to
        its size, as RafsImage.chunks does; whatever it raises goes to the caller."""
        self._decode = decode
        self._window = window
        self._budget = budget
        self._held = 0
        self._windows: OrderedDict[tuple[int, int], _Window] = OrderedDict()

    def chunks(self, ino: int, offset: int, length: int) -> Sequence[ChunkRef]:
        """The refs covering [offset, offset + length) of file `ino` (length > 0)."""
        number = offset // self._window
        if (offset + length - 1) // self._window != number:
            return self._decode(ino, offset, length)
        key = (ino, number)
        window = self._windows.get(key)
        if window is None:
            window = self._load(key)
        else:
            self._windows.move_to_end(key)
        first = max(bisect_right(window.starts, offset) - 1, 0)
        last = bisect_right(window.starts, offset + length - 1, lo=first)
        return window.refs[first:last]

    def _load(self, key: tuple[int, int]) -> _Window:
        ino, number = key
        window = _Window(self._decode(ino, number * self._window, self._window))
        while self._windows and self._held + len(window.refs) > self._budget:
            _, dropped = self._windows.popitem(last=False)
            self._held -= len(dropped.refs)
        if len(window.refs) <= self._budget:
            self._windows[key] = window
            self._held += len(window.refs)
        return window
