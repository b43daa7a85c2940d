"""READs the ring answers in C (vq_pop_direct, vq_direct_*): what it answers, and everything it
leaves to Python: other opcodes, malformed or hostile requests, ranges it was not given, fds
that are no longer the file they were."""

from __future__ import annotations

import os
import struct
import tempfile
from collections.abc import Callable, Iterator

import pytest

from tests.csrc.test_vring import Harness
from vhostfs._vring import ffi, lib
from vhostfs.vhost.direct import WINDOW, DirectReads

IN_HEADER = struct.Struct("<IIQQIIIHH")
READ_IN = struct.Struct("<QQIIQII")
OUT = struct.Struct("<IiQ")
READ = 15
NODE, FH = 7, 3


def read_request(
    node: int = NODE, fh: int = FH, offset: int = 0, size: int = 4096, **header: int
) -> bytes:
    fields = {"len": 80, "opcode": READ, "unique": 99, "extlen": 0, **header}
    head = IN_HEADER.pack(
        fields["len"], fields["opcode"], fields["unique"], node, 0, 0, 0, fields["extlen"], 0
    )
    return head + READ_IN.pack(fh, offset, size, 0, 0, 0, 0)


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness(((0x10_0000, 8 << 20),), num=64)
    yield harness
    harness.close()


@pytest.fixture
def data() -> Iterator[tuple[int, bytes]]:
    content = os.urandom(200_000)
    with tempfile.TemporaryFile() as f:
        f.write(content)
        f.flush()
        yield f.fileno(), content


@pytest.fixture
def direct() -> DirectReads:
    table = DirectReads()
    sizes = [1 << 10, 4 << 10, 16 << 10, 64 << 10, 128 << 10, 512 << 10, 1 << 20]
    table.set_classes(sizes, [10**9 * (i + 1) for i in range(7)])
    table.enabled = True
    return table


def serve(h: Harness, direct: DirectReads) -> tuple[int, int]:
    """One vq_pop_direct: (its result, READs it answered)."""
    answered = ffi.new("uint32_t *")
    pop = lib.vq_pop_direct(h.ring, h.table, h.chain, direct.table, direct.consts, answered)
    return int(pop), answered[0]


def chain(h: Harness, request: bytes, room: int = 16 + 4096) -> int:
    return h.drv.add_chain([request[:40], request[40:]], [16, room - 16])


def reply(h: Harness, head: int) -> tuple[tuple[int, int, int], bytes]:
    raw = h.drv.read_writable(head)
    return OUT.unpack_from(raw), raw[16:]


def test_a_covered_read_is_answered_and_the_next_chain_handed_over(
    h: Harness, direct: DirectReads, data: tuple[int, bytes]
) -> None:
    fd, content = data
    assert direct.add(NODE, FH, 0, WINDOW, -1, fd, 0, tag=5)
    first = chain(h, read_request(offset=1000, size=4096))
    other = chain(h, read_request(node=NODE + 1))
    assert serve(h, direct) == (1, 1)  # the first answered, the second is Python's
    assert h.chain.head == other
    (length, error, unique), body = reply(h, first)
    assert (length, error, unique) == (16 + 4096, 0, 99)
    assert body[:4096] == content[1000:5096]
    account = direct.take(5)
    assert (account.reads, account.bytes, account.sizes[2]) == (1, 4096, 1)
    assert direct.take(5).reads == 0


def test_reads_are_clipped_to_the_room_and_to_a_known_end_of_file(
    h: Harness, direct: DirectReads, data: tuple[int, bytes]
) -> None:
    fd, content = data
    assert direct.add(NODE, FH, 0, 150_000, 150_000, fd, 50_000)
    small = chain(h, read_request(offset=0, size=65536), room=16 + 100)
    tail = chain(h, read_request(offset=149_000, size=65536), room=16 + 65536)
    assert serve(h, direct) == (0, 2)
    assert reply(h, small)[0][0] == 16 + 100
    (length, _, _), body = reply(h, tail)
    assert length == 16 + 1000 and body[:1000] == content[199_000:200_000]


@pytest.mark.parametrize(
    ("request_bytes", "eof"),
    [
        (read_request(opcode=14), -1),  # not a READ
        (read_request(len=81), -1),  # header length disagrees with the chain
        (read_request(extlen=1), -1),  # extensions: Python's to check
        (read_request(offset=-4096 & (1 << 64) - 1), -1),  # negative offset
        (read_request(offset=WINDOW - 100, size=4096), -1),  # runs past the span
        (read_request(offset=WINDOW), -1),  # another window
        (read_request(fh=FH + 1), -1),  # another handle
        (read_request(offset=300_000), 200_000),  # at or past the known end of file
    ],
)
def test_anything_else_goes_to_python_untouched(
    h: Harness, direct: DirectReads, data: tuple[int, bytes], request_bytes: bytes, eof: int
) -> None:
    fd, _ = data
    assert direct.add(NODE, FH, 0, WINDOW, eof, fd, 0)
    head = chain(h, request_bytes)
    assert serve(h, direct) == (1, 0)
    assert h.chain.head == head
    assert h.drv.used_entries() == []


def test_a_short_request_is_never_read_past_its_end(h: Harness, direct: DirectReads) -> None:
    head = h.drv.add_chain([read_request()[:60]], [4096])
    assert serve(h, direct) == (1, 0) and h.chain.head == head


def test_a_reused_fd_is_noticed_and_the_entry_dropped(
    h: Harness, direct: DirectReads, data: tuple[int, bytes]
) -> None:
    fd, _ = data
    assert direct.add(NODE, FH, 0, WINDOW, -1, fd, 0)
    saved = os.dup(fd)
    try:
        with tempfile.TemporaryFile() as impostor:
            os.dup2(impostor.fileno(), fd)  # fd names another file now, as after close + reuse
            first = chain(h, read_request())
            assert serve(h, direct) == (1, 0) and h.chain.head == first
            assert lib.vq_push(h.ring, first, 0) == 0
        os.dup2(saved, fd)
        # Dropped for good: the right file behind the number again is not trusted either.
        again = chain(h, read_request())
        assert serve(h, direct) == (1, 0) and h.chain.head == again
    finally:
        os.close(saved)


def test_disabled_drop_and_clear_hand_everything_to_python(
    h: Harness, direct: DirectReads, data: tuple[int, bytes]
) -> None:
    fd, _ = data

    def disable() -> None:
        direct.enabled = False

    def drop() -> None:
        direct.drop(NODE, FH)

    forgets: list[Callable[[], None]] = [disable, drop, direct.clear]
    for forget in forgets:
        direct.enabled = True
        assert direct.add(NODE, FH, 0, WINDOW, -1, fd, 0)
        forget()
        head = chain(h, read_request())
        assert serve(h, direct) == (1, 0) and h.chain.head == head
        assert lib.vq_push(h.ring, head, 0) == 0


def test_spans_that_are_empty_cross_a_window_or_name_a_bad_tag_are_refused(
    direct: DirectReads, data: tuple[int, bytes]
) -> None:
    fd, _ = data
    assert not direct.add(NODE, FH, 100, 100, -1, fd, 0)
    assert not direct.add(NODE, FH, WINDOW - 1, WINDOW + 1, -1, fd, 0)
    assert not direct.add(NODE, FH, 0, 10, -1, fd, 0, tag=int(lib.VQ_DIRECT_TAGS))
    assert not direct.add(NODE, FH, 0, 10, -1, 10_000, 0)  # not an open fd


# --- Constant replies -------------------------------------------------------------------------

GETATTR, OPEN, FLUSH = 3, 14, 25


def request(opcode: int, args: bytes, node: int = NODE, **header: int) -> bytes:
    fields = {"len": 40 + len(args), "unique": 42, "extlen": 0, **header}
    return (
        IN_HEADER.pack(fields["len"], opcode, fields["unique"], node, 0, 0, 0, fields["extlen"], 0)
        + args
    )


def test_a_constant_reply_is_given_for_requests_shaped_like_the_first(
    h: Harness, direct: DirectReads
) -> None:
    attr = bytes(range(104))
    assert direct.add_constant(NODE, GETATTR, 16, 0, 0, attr)
    assert direct.add_constant(NODE, OPEN, 8, 0o1003, 0, b"\x00" * 8 + b"\x02\x00\x00\x00" * 2)
    assert direct.add_constant(NODE, FLUSH, 24, 0, 0, b"")
    got = h.drv.add_chain([request(GETATTR, bytes(16))], [16 + 104])
    opened = h.drv.add_chain([request(OPEN, struct.pack("<II", os.O_RDONLY, 0))], [32])
    flushed = h.drv.add_chain([request(FLUSH, bytes(24))], [16])
    python = h.drv.add_chain([request(OPEN, struct.pack("<II", os.O_WRONLY, 0))], [32])
    assert serve(h, direct) == (1, 3) and h.chain.head == python
    assert reply(h, got) == ((16 + 104, 0, 42), attr)
    assert reply(h, opened)[0] == (32, 0, 42)
    assert reply(h, flushed)[0] == (16, 0, 42)
    assert direct.constant_hits() == {GETATTR: 1, OPEN: 1, FLUSH: 1}


@pytest.mark.parametrize(
    "request_bytes",
    [
        request(GETATTR, bytes(16), node=NODE + 1),  # another node
        request(GETATTR, bytes(24)),  # in-args of another length
        request(GETATTR, bytes(16), len=57),  # header length disagrees with the chain
        request(GETATTR, bytes(16), extlen=2),  # extensions
        request(FLUSH, bytes(24)),  # no entry for the opcode
    ],
)
def test_other_requests_go_to_python(
    h: Harness, direct: DirectReads, request_bytes: bytes
) -> None:
    assert direct.add_constant(NODE, GETATTR, 16, 0, 0, bytes(104))
    head = h.drv.add_chain([request_bytes], [16 + 104])
    assert serve(h, direct) == (1, 0) and h.chain.head == head


def test_no_room_for_the_reply_goes_to_python_and_clear_forgets(
    h: Harness, direct: DirectReads
) -> None:
    assert direct.add_constant(NODE, GETATTR, 16, 0, 0, bytes(104))
    small = h.drv.add_chain([request(GETATTR, bytes(16))], [16 + 50])
    assert serve(h, direct) == (1, 0) and h.chain.head == small
    assert lib.vq_push(h.ring, small, 0) == 0
    direct.clear()
    again = h.drv.add_chain([request(GETATTR, bytes(16))], [16 + 104])
    assert serve(h, direct) == (1, 0) and h.chain.head == again


def test_bad_constant_entries_are_refused(direct: DirectReads) -> None:
    assert not direct.add_constant(NODE, 0, 16, 0, 0, b"")
    assert not direct.add_constant(NODE, int(lib.VQ_CONST_OPCODES), 16, 0, 0, b"")
    assert not direct.add_constant(NODE, GETATTR, 16, 0, 0, bytes(int(lib.VQ_CONST_PAYLOAD) + 1))
    assert not direct.add_constant(NODE, OPEN, 2, 3, 0, b"")  # a mask but no u32 to apply it to


def test_a_range_of_nodes_gets_empty_replies_for_its_opcode_only(
    h: Harness, direct: DirectReads
) -> None:
    assert direct.add_empty_range(FLUSH, 24, 1 << 56, (2 << 56) - 1)
    assert direct.add_empty_range(FLUSH, 24, 1 << 56, (2 << 56) - 1)  # once is enough
    inside = h.drv.add_chain([request(FLUSH, bytes(24), node=1 << 56 | 5)], [16])
    outside = h.drv.add_chain([request(FLUSH, bytes(24), node=2 << 56 | 5)], [16])
    assert serve(h, direct) == (1, 1) and h.chain.head == outside
    assert reply(h, inside)[0] == (16, 0, 42)
    assert lib.vq_push(h.ring, outside, 0) == 0
    others = [request(GETATTR, bytes(16), node=1 << 56), request(FLUSH, bytes(8), node=1 << 56)]
    for other in others:
        head = h.drv.add_chain([other], [16 + 104])
        assert serve(h, direct) == (1, 0) and h.chain.head == head
        assert lib.vq_push(h.ring, head, 0) == 0
    direct.clear()
    head = h.drv.add_chain([request(FLUSH, bytes(24), node=1 << 56 | 5)], [16])
    assert serve(h, direct) == (1, 0) and h.chain.head == head


def test_empty_ranges_are_bounded(direct: DirectReads) -> None:
    ranges = int(lib.VQ_CONST_RANGES)
    assert all(direct.add_empty_range(FLUSH, 24, n, n) for n in range(ranges))
    assert not direct.add_empty_range(FLUSH, 24, ranges, ranges)
    assert not direct.add_empty_range(FLUSH, 24, 10, 9)
