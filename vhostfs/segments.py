"""Bytes for the guest: the neutral type that file systems, storage and FUSE all speak.

A READ reply is a list of segments in file order. A `FileSlice` is a range of an open host file
that the transport copies straight into guest memory with one preadv, so data that sits in a
file (the chunk cache, a passthrough file, the bootstrap) never passes through Python. `bytes`
carry what exists only in memory (zeros for holes, chunks fetched without a cache).

This module sits below every layer that produces or consumes segments, so storage need not
import FUSE to hand its data up, and FUSE need not import storage to send it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias


@dataclass(frozen=True, slots=True)
class FileSlice:
    """`size` bytes of open file `fd` at `pos`.

    The fd must stay open until the reply is sent, which happens before the next request on
    the same handle could release it."""

    fd: int
    pos: int
    size: int


Segment: TypeAlias = FileSlice | bytes
