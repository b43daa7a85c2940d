"""The C LZ4 block decoder (csrc/lz4_block.c): real lz4 output decodes exactly, sequences
built by hand decode as the format says, and no input makes it read or write out of bounds.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vhostfs.storage.codec import decompress_lz4_block

LEGACY_MAGIC = 0x184C2102


def lz4_cli_block(data: bytes, level: str) -> bytes:
    """One raw block from the lz4 tool's legacy format (one block up to 8 MiB of input)."""
    frame = subprocess.run(
        ["lz4", "-l", level, "-c"], input=data, capture_output=True, check=True
    ).stdout
    magic, size = struct.unpack_from("<II", frame)
    assert magic == LEGACY_MAGIC and len(frame) == 8 + size
    return frame[8:]


@pytest.mark.skipif(shutil.which("lz4") is None, reason="needs the lz4 tool")
@pytest.mark.parametrize("level", ["-1", "-9"])
@pytest.mark.parametrize(
    "data",
    [
        b"a",
        b"hello world " * 1000,
        bytes(100_000),
        os.urandom(70_000),
        b"".join(i.to_bytes(4, "little") for i in range(50_000)),
        (b"abc" * 7 + os.urandom(5)) * 3000,
    ],
    ids=["one", "text", "zeros", "random", "counter", "mixed"],
)
def test_decodes_lz4_tool_output(data: bytes, level: str) -> None:
    block = lz4_cli_block(data, level)
    assert decompress_lz4_block(block, len(data)) == data
    with pytest.raises(ValueError, match="more bytes than expected"):
        decompress_lz4_block(block, len(data) - 1)
    with pytest.raises(ValueError, match=f"decodes to {len(data)} bytes"):
        decompress_lz4_block(block, len(data) + 1)


@dataclass(frozen=True)
class Lz4Sequence:
    literals: bytes
    offset: int  # 0: the final, literals-only sequence
    match: int


def _length_bytes(extra: int) -> bytes:
    return b"\xff" * (extra // 255) + bytes([extra % 255])


def encode(sequences: list[Lz4Sequence]) -> bytes:
    """Sequences in LZ4 block syntax: token, literal length, literals, offset, match length."""
    out = bytearray()
    for sequence in sequences:
        literal_nibble = min(len(sequence.literals), 15)
        match_nibble = min(sequence.match - 4, 15) if sequence.offset else 0
        out.append(literal_nibble << 4 | match_nibble)
        if literal_nibble == 15:
            out += _length_bytes(len(sequence.literals) - 15)
        out += sequence.literals
        if sequence.offset:
            out += struct.pack("<H", sequence.offset)
            if match_nibble == 15:
                out += _length_bytes(sequence.match - 19)
    return bytes(out)


def expand(sequences: list[Lz4Sequence]) -> bytes:
    out = bytearray()
    for sequence in sequences:
        out += sequence.literals
        for _ in range(sequence.match if sequence.offset else 0):
            out.append(out[-sequence.offset])
    return bytes(out)


@st.composite
def valid_blocks(draw: st.DrawFn) -> list[Lz4Sequence]:
    sequences = []
    produced = 0
    for _ in range(draw(st.integers(0, 8))):
        literals = draw(st.binary(min_size=0 if produced else 1, max_size=300))
        produced += len(literals)
        offset = draw(st.integers(1, min(produced, 65535)))
        match = draw(st.integers(4, 600))
        sequences.append(Lz4Sequence(literals, offset, match))
        produced += match
    sequences.append(Lz4Sequence(draw(st.binary(max_size=300)), 0, 0))
    return sequences


@settings(max_examples=300, deadline=None)
@given(valid_blocks())
def test_hand_built_sequences_decode_as_specified(sequences: list[Lz4Sequence]) -> None:
    expected = expand(sequences)
    assert decompress_lz4_block(encode(sequences), len(expected)) == expected


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=2000), st.integers(0, 5000))
def test_arbitrary_input_never_overruns(block: bytes, size: int) -> None:
    try:
        data = decompress_lz4_block(block, size)
    except ValueError:
        return
    assert len(data) == size


@settings(max_examples=300, deadline=None)
@given(valid_blocks(), st.data())
def test_damaged_valid_blocks_fail_cleanly(
    sequences: list[Lz4Sequence], data: st.DataObject
) -> None:
    block = bytearray(encode(sequences))
    expected = expand(sequences)
    position = data.draw(st.integers(0, len(block) - 1))
    block[position] ^= data.draw(st.integers(1, 255))
    cut = data.draw(st.integers(0, len(block)))
    try:
        out = decompress_lz4_block(bytes(block[:cut]), len(expected))
    except ValueError:
        return
    assert len(out) == len(expected)


@pytest.mark.parametrize(
    ("block", "size", "message"),
    [
        (b"", 0, "empty input"),
        (b"\x50abc", 5, "inside a sequence"),  # 5 literals promised, 3 present
        (b"\xf0", 20, "inside a sequence"),  # literal length continues past the end
        (b"\x10a\x00\x00\x00", 10, "match offset"),  # offset 0
        (b"\x10a\x02\x00\x00", 10, "match offset"),  # offset before the output start
        (b"\x10a\x01\x00", 10, "inside a sequence"),  # ends after a match
        (b"\x10a\x01", 10, "inside a sequence"),  # offset cut in half
        (b"\x1fa\x01\x00", 100, "inside a sequence"),  # match length continues past the end
        (b"\x60abcdef", 3, "more bytes than expected"),
    ],
)
def test_malformed_blocks(block: bytes, size: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        decompress_lz4_block(block, size)


def test_overlapping_matches_repeat_a_pattern() -> None:
    # "ab", then a 30-byte match at offset 2, then an empty last sequence.
    block = b"\x2f" + b"ab" + b"\x02\x00" + bytes([30 - 19]) + b"\x00"
    assert decompress_lz4_block(block, 32) == b"ab" * 16
    assert decompress_lz4_block(b"\x00", 0) == b""
