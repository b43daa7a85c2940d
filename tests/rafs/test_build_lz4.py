"""The LZ4 block encoder: the reader's C decoder gives back every input, the format's end
rules hold, and repetitive data actually shrinks."""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from vhostfs.rafs.build.lz4block import compress_block
from vhostfs.storage.codec import decompress_lz4_block

# Inputs with repeats at every distance, so matches of all lengths and offsets show up.
repetitive = st.builds(
    lambda pieces, order: b"".join(pieces[i % len(pieces)] for i in order),
    st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=8),
    st.lists(st.integers(0, 7), max_size=300),
)


def sequences(block: bytes) -> list[tuple[int, int, int]]:
    """(literal count, match offset, match length) of each sequence; the last has no match."""
    found = []
    position = 0
    while True:
        token = block[position]
        position += 1
        literals = token >> 4
        if literals == 15:
            while True:
                literals += block[position]
                position += 1
                if block[position - 1] != 255:
                    break
        position += literals
        if position == len(block):
            found.append((literals, 0, 0))
            return found
        offset = int.from_bytes(block[position : position + 2], "little")
        position += 2
        length = (token & 15) + 4
        if token & 15 == 15:
            while True:
                length += block[position]
                position += 1
                if block[position - 1] != 255:
                    break
        found.append((literals, offset, length))


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(min_size=1, max_size=5000), repetitive.filter(bool)))
def test_round_trip_through_the_reader(data: bytes) -> None:
    block = compress_block(data)
    assert decompress_lz4_block(block, len(data)) == data
    # The end rules other decoders rely on: the last 5 bytes are literals, and no match
    # starts within the last 12 bytes.
    parts = sequences(block)
    assert parts[-1][2] == 0
    assert len(data) < 5 or parts[-1][0] >= 5
    produced = 0
    for literals, _, length in parts[:-1]:
        produced += literals
        assert produced <= len(data) - 12
        produced += length


def test_repetitive_data_shrinks_and_random_data_barely_grows() -> None:
    text = b"the quick brown fox jumps over the lazy dog\n" * 5000
    assert len(compress_block(text)) < len(text) // 20
    assert len(compress_block(bytes(1 << 20))) < 5000
    noise = os.urandom(1 << 16)
    assert len(compress_block(noise)) <= len(noise) + len(noise) // 255 + 16


def test_empty_input_is_a_lone_token() -> None:
    assert compress_block(b"") == b"\x00"
