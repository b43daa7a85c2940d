"""ChainRequest, the FUSE layer's view of a popped chain: each way to answer, and its refusals.

A handler in the test decides the reply; the chain comes from a ring driven in this process, and
the reply is read back from guest memory as the guest driver would read it.
"""

import asyncio
import errno
import os
import struct
import tempfile
from collections.abc import Callable, Iterator

import pytest

from tests.support.frontend import InProcessFrontend
from tests.support.guest import GuestMemory
from vhostfs.segments import FileSlice
from vhostfs.vhost.backend import Backend
from vhostfs.vhost.virtqueue import ChainRequest

OUT = struct.Struct("<IiQ")  # fuse_out_header
DATA = bytes(range(256)) * 64  # 16 KiB


@pytest.fixture
def datafile() -> Iterator[int]:
    with tempfile.TemporaryFile() as f:
        f.write(DATA)
        f.flush()
        yield f.fileno()


def answered(answer: Callable[[ChainRequest], None], writable: list[int]) -> tuple[int, bytes]:
    """One chain with writable buffers of these sizes, through a ring whose handler is answer.

    Returns what the guest gets back: the length on the used ring, and the writable part."""
    got: list[tuple[int, bytes]] = []

    async def main() -> None:
        with GuestMemory(((0, 1 << 20),)) as mem:
            fe = InProcessFrontend(Backend(answer), mem)
            fe.init()
            fe.start()
            ring = fe.rings[1]
            head = ring.add_chain([b"r" * 40], writable)
            fe.kick(1)
            reply = ring.read_writable(head)
            [(used, written)] = ring.used_entries()
            assert used == head
            got.append((written, reply))
            fe.close()

    asyncio.run(main())
    return got[0]


def test_send_reply_writes_across_buffers_and_completes() -> None:
    def answer(req: ChainRequest) -> None:
        assert (req.readable_len, req.writable_len) == (40, 30)
        req.send_reply(b"0123456789" * 2)

    assert answered(answer, [16, 14]) == (20, b"0123456789" * 2 + bytes(10))


def test_a_reply_too_long_is_refused_and_the_request_stays_open() -> None:
    def answer(req: ChainRequest) -> None:
        with pytest.raises(ValueError, match="exceeds the writable part"):
            req.send_reply(b"x" * 17)
        req.send_reply(b"y" * 16)
        with pytest.raises(RuntimeError, match="completed twice"):
            req.send_reply(b"z")
        with pytest.raises(RuntimeError, match="completed twice"):
            req.complete(0)

    assert answered(answer, [16]) == (16, b"y" * 16)


def test_send_file_reply_reads_into_the_reply(datafile: int) -> None:
    def answer(req: ChainRequest) -> None:
        req.send_file_reply(77, datafile, 100, 1000)

    written, reply = answered(answer, [16, 4096])
    assert written == 16 + 1000
    assert OUT.unpack_from(reply) == (16 + 1000, 0, 77)
    assert reply[16 : 16 + 1000] == DATA[100:1100]


def test_a_file_read_error_is_an_oserror_and_the_request_stays_open() -> None:
    r, w = os.pipe()

    def answer(req: ChainRequest) -> None:
        with pytest.raises(OSError) as failed:
            req.send_file_reply(5, r, 0, 100)  # a pipe has no position: ESPIPE
        assert failed.value.errno == errno.ESPIPE
        req.send_reply(OUT.pack(16, -errno.ESPIPE, 5))

    try:
        written, reply = answered(answer, [16, 4096])
    finally:
        os.close(r)
        os.close(w)
    assert written == 16 and OUT.unpack_from(reply) == (16, -errno.ESPIPE, 5)


def test_send_pieces_gathers_files_and_bytes_and_stops_at_end_of_file(datafile: int) -> None:
    def answer(req: ChainRequest) -> None:
        tail = len(DATA) - 10
        pieces: list[FileSlice | bytes] = [
            FileSlice(datafile, 0, 20),
            b"-gap-",
            FileSlice(datafile, tail, 50),
            b"never",
        ]
        req.send_pieces(9, pieces)

    written, reply = answered(answer, [16, 24, 100])
    assert written == 16 + 20 + 5 + 10
    assert OUT.unpack_from(reply) == (written, 0, 9)
    assert reply[16:written] == DATA[:20] + b"-gap-" + DATA[-10:]


def test_pieces_that_do_not_fit_are_refused_and_the_request_stays_open(datafile: int) -> None:
    def answer(req: ChainRequest) -> None:
        with pytest.raises(ValueError, match="does not fit"):
            req.send_pieces(9, [FileSlice(datafile, 0, 10), b"x" * 100])
        req.complete(0)

    assert answered(answer, [16, 20])[0] == 0


def test_complete_clips_to_the_writable_part() -> None:
    def answer(req: ChainRequest) -> None:
        req.complete(1000)

    assert answered(answer, [16, 8])[0] == 24
