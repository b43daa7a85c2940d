"""The sans-I/O vhost-user codec: framing, header checks and payload decoding."""

import os
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vhostfs.vhost import protocol as p
from vhostfs.vhost.codec import (
    Message,
    MessageReader,
    PayloadError,
    ProtocolError,
    encode_u64_reply,
)


def frame(request: int, payload: bytes = b"", flags: int = p.VERSION) -> bytes:
    return p.HEADER.pack(request, flags, len(payload)) + payload


def test_reader_reassembles_split_messages() -> None:
    reader = MessageReader()
    data = frame(p.Request.SET_FEATURES, struct.pack("<Q", 5)) + frame(p.Request.GET_FEATURES)
    for i in range(len(data)):
        reader.feed(data[i : i + 1], [])
    first = reader.next_message()
    second = reader.next_message()
    assert first is not None and first.request == p.Request.SET_FEATURES and first.u64() == 5
    assert second is not None and second.request == p.Request.GET_FEATURES
    assert reader.next_message() is None


def test_reader_asks_for_header_then_payload_only() -> None:
    reader = MessageReader()
    assert reader.header_bytes_missing() == 12
    reader.feed(frame(p.Request.SET_VRING_NUM, b"\0" * 8)[:12], [])
    assert reader.header_bytes_missing() == 8


def test_fds_attach_to_the_message_whose_header_carried_them() -> None:
    reader = MessageReader()
    r, w = os.pipe()
    reader.feed(frame(p.Request.SET_VRING_KICK, b"\0" * 8)[:12], [r])
    reader.feed(b"\0" * 8, [])
    message = reader.next_message()
    assert message is not None and message.fds == [r]
    message.close_fds()
    os.close(w)


def test_fds_with_payload_bytes_are_refused_and_closed() -> None:
    reader = MessageReader()
    reader.feed(frame(p.Request.SET_VRING_KICK, b"\0" * 8)[:12], [])
    r, w = os.pipe()
    with pytest.raises(ProtocolError):
        reader.feed(b"\0" * 8, [r])
    with pytest.raises(OSError):
        os.fstat(r)
    os.close(w)


@pytest.mark.parametrize(
    "flags",
    [0, 2, p.VERSION | p.FLAG_REPLY, p.VERSION | 0x10, p.VERSION | 0x80000000],
)
def test_bad_header_flags_are_protocol_errors(flags: int) -> None:
    reader = MessageReader()
    reader.feed(frame(p.Request.GET_FEATURES, flags=flags), [])
    with pytest.raises(ProtocolError):
        reader.next_message()


def test_oversized_payload_is_refused_before_it_is_buffered() -> None:
    reader = MessageReader()
    reader.feed(p.HEADER.pack(p.Request.SET_MEM_TABLE, p.VERSION, p.MAX_PAYLOAD + 1), [])
    with pytest.raises(ProtocolError, match="too large"):
        reader.next_message()


def test_payload_sizes_are_checked_exactly() -> None:
    with pytest.raises(PayloadError):
        Message(p.Request.SET_FEATURES, p.VERSION, b"\0" * 7).u64()
    with pytest.raises(PayloadError):
        Message(p.Request.SET_VRING_ADDR, p.VERSION, b"\0" * 41).vring_addr()
    table = struct.pack("<II", 2, 0) + b"\0" * 32
    with pytest.raises(PayloadError):
        Message(p.Request.SET_MEM_TABLE, p.VERSION, table).mem_regions()


def test_mem_table_decodes_every_region() -> None:
    regions = [(0, 0xA0000, 0x7F0000000000, 0), (0x100000, 0x3FF00000, 0x7F0000100000, 0x100000)]
    payload = struct.pack("<II", 2, 0) + b"".join(struct.pack("<QQQQ", *r) for r in regions)
    decoded = Message(p.Request.SET_MEM_TABLE, p.VERSION, payload).mem_regions()
    assert [(r.gpa, r.size, r.uva, r.mmap_offset) for r in decoded] == regions


def test_reply_encoding() -> None:
    assert encode_u64_reply(p.Request.GET_FEATURES, 7) == struct.pack("<IIIQ", 1, 5, 8, 7)


@given(st.binary(max_size=300))
def test_arbitrary_streams_only_ever_yield_messages_or_protocol_errors(data: bytes) -> None:
    reader = MessageReader()
    reader.feed(data, [])
    try:
        while reader.next_message() is not None:
            pass
    except ProtocolError:
        pass
