"""A raw LZ4 block encoder, for `--compressor lz4_block` without an lz4 library.

Greedy and single-probe: a table remembers the last position of each 8-byte sequence, a hit is
extended as far as it goes, and the skip between probes grows the longer no match is found, so
incompressible input passes quickly. Probing 8 bytes rather than the format's minimum of 4
finds fewer, longer matches, which costs some ratio and saves much Python time (a few MB/s:
this is the fallback for when no lz4 library may be used, not a fast path). Slices do the byte
comparisons, so long matches cost C time, not Python time. The output follows the block
format's end rules (the last 5 bytes are literals, no match starts in the last 12), which
decoders rely on.
"""

from __future__ import annotations

_MIN_MATCH = 4  # the format's minimum
_PROBE = 8  # we only look for matches this long: fewer, longer matches cost less Python time
_LAST_LITERALS = 5
_MATCH_START_LIMIT = 12  # no match may start within the last 12 bytes
_MAX_OFFSET = 65535
_SKIP_TRIGGER = 6  # after 2**6 misses in a row the probe step grows by one


def compress_block(data: bytes) -> bytes:
    """`data` as one raw LZ4 block (no size prefix)."""
    size = len(data)
    out = bytearray()
    anchor = 0  # first byte not yet emitted
    if size >= _MATCH_START_LIMIT + 1:
        last_match_start = size - _MATCH_START_LIMIT
        match_end_limit = size - _LAST_LITERALS
        seen: dict[bytes, int] = {}
        position = 0
        misses = 0
        while position < last_match_start:
            sequence = data[position : position + _PROBE]
            candidate = seen.get(sequence)
            seen[sequence] = position
            if (
                candidate is None
                or position - candidate > _MAX_OFFSET
                or position + _PROBE > match_end_limit
            ):
                misses += 1
                position += 1 + (misses >> _SKIP_TRIGGER)
                continue
            length = _match_length(data, candidate, position, match_end_limit)
            _emit(out, data, anchor, position, position - candidate, length)
            position += length
            anchor = position
            misses = 0
    _emit_literals(out, data, anchor, size)
    return bytes(out)


def _match_length(data: bytes, earlier: int, here: int, limit: int) -> int:
    """How far data[here:] repeats data[earlier:], at least the 4 bytes already known equal,
    stopping at `limit`. Doubling then bisecting keeps each comparison a C-level slice compare.
    """
    known = _PROBE
    step = 16
    while here + known < limit:
        end = min(here + known + step, limit)
        width = end - here
        if data[earlier + known : earlier + width] == data[here + known : end]:
            known = width
            step *= 2
            continue
        low, high = known, width  # data matches for `low` bytes, not for `high`
        while high - low > 1:
            middle = (low + high) // 2
            if data[earlier + low : earlier + middle] == data[here + low : here + middle]:
                low = middle
            else:
                high = middle
        return low
    return known


def _emit(out: bytearray, data: bytes, anchor: int, start: int, offset: int, length: int) -> None:
    literals = start - anchor
    match_extra = length - _MIN_MATCH
    out.append((min(literals, 15) << 4) | min(match_extra, 15))
    if literals >= 15:
        _emit_length(out, literals - 15)
    out += data[anchor:start]
    out += offset.to_bytes(2, "little")
    if match_extra >= 15:
        _emit_length(out, match_extra - 15)


def _emit_literals(out: bytearray, data: bytes, anchor: int, end: int) -> None:
    literals = end - anchor
    out.append(min(literals, 15) << 4)
    if literals >= 15:
        _emit_length(out, literals - 15)
    out += data[anchor:end]


def _emit_length(out: bytearray, remainder: int) -> None:
    full, last = divmod(remainder, 255)
    out += b"\xff" * full
    out.append(last)
