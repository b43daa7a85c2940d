"""The C engine's one-call replies (csrc/vring.c): vq_reply, vq_reply_preadv, vq_notify,
vq_pop_or_arm, and READ replies offloaded to the helper thread (vq_offload_*)."""

from __future__ import annotations

import errno
import os
import struct
import tempfile
from collections.abc import Iterator
from typing import Any

import pytest

from tests.csrc.test_vring import Harness
from tests.support.guest import AVAIL_F_NO_INTERRUPT, USED_F_NO_NOTIFY
from vhostfs._vring import ffi, lib

OUT = struct.Struct("<IiQ")  # fuse_out_header


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = Harness(((0x10_0000, 8 << 20),), num=64, features=lib.VQ_F_INDIRECT)
    yield harness
    harness.close()


@pytest.fixture
def eventfd() -> Iterator[int]:
    fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
    yield fd
    os.close(fd)


@pytest.fixture(scope="module")
def datafile() -> Iterator[tuple[int, bytes]]:
    data = os.urandom(300_000)
    with tempfile.TemporaryFile() as f:
        f.write(data)
        f.flush()
        yield f.fileno(), data


def interrupts(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:
        return 0


class TestReply:
    def test_writes_pushes_and_notifies(self, h: Harness, eventfd: int) -> None:
        head = h.drv.add_chain([b"req"], [5, 20])
        assert h.pop() == 1
        assert lib.vq_reply(h.ring, h.chain, b"0123456789", 10, 1, eventfd) == 1
        assert h.drv.used_entries() == [(head, 10)]
        assert interrupts(eventfd) == 1
        assert h.ring.inflight == 0

    def test_reply_bytes_span_buffers(self, h: Harness) -> None:
        head = h.drv.add_chain([b"req"], [5, 20])
        assert h.pop() == 1
        assert lib.vq_reply(h.ring, h.chain, b"0123456789", 10, 0, -1) == 0
        assert h.drv.read_writable(head) == b"0123456789" + bytes(15)

    def test_without_notify_the_decision_waits(self, h: Harness, eventfd: int) -> None:
        heads = [h.drv.add_chain([b"req"], [16]) for _ in range(3)]
        for _ in heads:
            assert h.pop() == 1
            assert lib.vq_reply(h.ring, h.chain, b"x" * 16, 16, 0, eventfd) == 0
        assert interrupts(eventfd) == 0
        assert lib.vq_notify(h.ring, eventfd) == 1  # one interrupt for all three
        assert interrupts(eventfd) == 1
        assert [entry[0] for entry in h.drv.used_entries()] == heads

    def test_notify_honours_no_interrupt(self, h: Harness, eventfd: int) -> None:
        h.drv.add_chain([b"req"], [16])
        assert h.pop() == 1
        h.drv.avail_flags = AVAIL_F_NO_INTERRUPT
        assert lib.vq_reply(h.ring, h.chain, b"x" * 16, 16, 1, eventfd) == 0
        assert interrupts(eventfd) == 0

    def test_too_long_does_nothing(self, h: Harness) -> None:
        h.drv.add_chain([b"req"], [8])
        assert h.pop() == 1
        assert lib.vq_reply(h.ring, h.chain, b"x" * 9, 9, 1, -1) == lib.VQ_REPLY_TOO_LONG
        assert h.ring.inflight == 1 and h.drv.used_idx == 0

    def test_bad_head_is_a_push_error(self, h: Harness) -> None:
        h.drv.add_chain([b"req"], [8])
        assert h.pop() == 1
        h.chain.head = 200
        assert lib.vq_reply(h.ring, h.chain, b"x", 1, 1, -1) == lib.VQ_ERR_USED_HEAD

    def test_strerror_knows_too_long(self) -> None:
        text = ffi.string(lib.vq_strerror(lib.VQ_REPLY_TOO_LONG))
        assert text != b"unknown vring error"


class TestReplyPreadv:
    def reply(self, h: Harness, head: int) -> tuple[tuple[int, int, int], bytes]:
        raw = h.drv.read_writable(head)
        return OUT.unpack_from(raw), raw[16:]

    @pytest.mark.parametrize(
        ("size", "pos", "expect"),
        [(4096, 0, 4096), (131072, 100, 131072), (5000, 299_000, 1000), (100, 400_000, 0)],
    )
    def test_reads_into_the_reply(
        self, h: Harness, datafile: tuple[int, bytes], size: int, pos: int, expect: int
    ) -> None:
        fd, data = datafile
        head = h.drv.add_chain([b"req"], [16] + [4096] * 32)
        assert h.pop() == 1
        got = ffi.new("int64_t *")
        assert lib.vq_reply_preadv(h.ring, h.chain, fd, pos, size, 77, 1, -1, got) == 0
        assert got[0] == expect
        (length, error, unique), body = self.reply(h, head)
        assert (length, error, unique) == (16 + expect, 0, 77)
        assert body[:expect] == data[pos : pos + expect]
        assert h.drv.used_entries() == [(head, 16 + expect)]

    def test_size_is_clipped_to_the_room(self, h: Harness, datafile: tuple[int, bytes]) -> None:
        fd, data = datafile
        head = h.drv.add_chain([b"req"], [10, 30])
        assert h.pop() == 1
        got = ffi.new("int64_t *")
        assert lib.vq_reply_preadv(h.ring, h.chain, fd, 0, 1000, 5, 1, -1, got) == 0
        assert got[0] == 24
        (length, error, _), body = self.reply(h, head)
        assert (length, error) == (40, 0) and body == data[:24]

    def test_read_error_leaves_the_chain(self, h: Harness) -> None:
        h.drv.add_chain([b"req"], [16, 4096])
        assert h.pop() == 1
        r, w = os.pipe()
        got = ffi.new("int64_t *")
        try:
            status = lib.vq_reply_preadv(h.ring, h.chain, r, 0, 100, 5, 1, -1, got)
            assert status == lib.VQ_REPLY_READ_FAILED
            assert got[0] == -29  # ESPIPE
        finally:
            os.close(r)
            os.close(w)
        assert h.ring.inflight == 1 and h.drv.used_idx == 0

    def test_no_room_for_the_header(self, h: Harness, datafile: tuple[int, bytes]) -> None:
        h.drv.add_chain([b"req"], [8])
        assert h.pop() == 1
        got = ffi.new("int64_t *", 99)
        status = lib.vq_reply_preadv(h.ring, h.chain, datafile[0], 0, 1, 5, 1, -1, got)
        assert status == lib.VQ_REPLY_TOO_LONG
        assert got[0] == 0
        assert h.ring.inflight == 1

    def test_a_push_failure_is_the_result_and_the_read_stays_apart(
        self, h: Harness, datafile: tuple[int, bytes]
    ) -> None:
        h.drv.add_chain([b"req"], [16, 100])
        assert h.pop() == 1
        h.ring.inflight = 0  # as if the chain had been pushed already
        got = ffi.new("int64_t *")
        status = lib.vq_reply_preadv(h.ring, h.chain, datafile[0], 0, 100, 5, 1, -1, got)
        assert status == lib.VQ_ERR_USED_HEAD
        assert got[0] == 100
        assert h.drv.used_idx == 0

    def test_notifies_and_takes_no_result(
        self, h: Harness, datafile: tuple[int, bytes], eventfd: int
    ) -> None:
        head = h.drv.add_chain([b"req"], [16, 100])
        assert h.pop() == 1
        fd = datafile[0]
        assert lib.vq_reply_preadv(h.ring, h.chain, fd, 0, 50, 5, 1, eventfd, ffi.NULL) == 1
        assert h.drv.used_entries() == [(head, 66)]
        assert interrupts(eventfd) == 1

    def test_strerror_knows_read_failed(self) -> None:
        text = ffi.string(lib.vq_strerror(lib.VQ_REPLY_READ_FAILED))
        assert text != b"unknown vring error"


class TestPopOrArm:
    def test_flag_mode(self, h: Harness) -> None:
        chain = h.chain
        h.drv.add_chain([b"x"])
        lib.vq_set_kicks(h.ring, 0)
        assert lib.vq_pop_or_arm(h.ring, h.table, chain) == 1
        assert h.drv.used_flags & USED_F_NO_NOTIFY  # still off while busy
        assert lib.vq_pop_or_arm(h.ring, h.table, chain) == 0
        assert h.drv.used_flags == 0  # armed when empty

    def test_event_idx_mode(self) -> None:
        h = Harness(features=lib.VQ_F_EVENT_IDX)
        try:
            h.drv.add_chain([b"x"])
            assert lib.vq_pop_or_arm(h.ring, h.table, h.chain) == 1
            assert lib.vq_pop_or_arm(h.ring, h.table, h.chain) == 0
            assert h.drv.avail_event == 1
        finally:
            h.close()

    def test_errors_pass_through(self, h: Harness) -> None:
        h.drv.set_avail_idx(100)  # more than the queue size ahead
        assert lib.vq_pop_or_arm(h.ring, h.table, h.chain) == lib.VQ_ERR_AVAIL_IDX


class TestOffload:
    @pytest.fixture(autouse=True)
    def stopped_after(self) -> Iterator[None]:
        """Each test starts the helper as it needs; none leaves it running for the next."""
        yield
        assert lib.vq_offload_busy() == 0
        assert lib.vq_offload_stop() == 0

    def pop_all(self, h: Harness, n: int, writable: list[int]) -> list[tuple[int, Any]]:
        heads = [h.drv.add_chain([b"req"], writable, indirect=True) for _ in range(n)]
        chains = []
        for head in heads:
            chain = ffi.new("struct vq_chain *")
            assert lib.vq_pop(h.ring, h.table, chain) == 1
            assert chain.head == head
            chains.append((head, chain))
        return chains

    def test_many_reads(self, h: Harness, datafile: tuple[int, bytes]) -> None:
        assert lib.vq_offload_start() == 0
        fd, data = datafile
        chains = self.pop_all(h, 20, [16] + [4096] * 32)
        spans = [(i * 13_000, 131072 if i % 3 else 40_000) for i in range(len(chains))]
        for k, ((_, chain), (pos, size)) in enumerate(zip(chains, spans, strict=True)):
            assert lib.vq_offload_read(chain, fd, pos, size, 1000 + k) == k + 1
        assert lib.vq_offload_busy() == 1
        results = ffi.new("int64_t[]", lib.VQ_OFFLOAD_MAX)
        assert lib.vq_offload_finish(h.ring, results) == len(chains)
        assert lib.vq_offload_busy() == 0
        used = h.drv.used_entries()
        assert [head for head, _ in used] == [head for head, _ in chains]  # queue order
        for k, ((head, _), (pos, size)) in enumerate(zip(chains, spans, strict=True)):
            expect = max(0, min(size, len(data) - pos))
            assert results[k] == expect
            assert used[k] == (head, 16 + expect)

    def test_stop_joins_the_helper_and_start_brings_it_back(
        self, h: Harness, datafile: tuple[int, bytes]
    ) -> None:
        base = len(os.listdir("/proc/self/task"))
        assert lib.vq_offload_start() == 0
        assert len(os.listdir("/proc/self/task")) == base + 1
        fd, _ = datafile
        ((_, chain),) = self.pop_all(h, 1, [16, 4096])
        assert lib.vq_offload_read(chain, fd, 0, 4096, 7) == 1
        assert lib.vq_offload_stop() == -errno.EBUSY, "a queued job keeps it running"
        assert lib.vq_offload_finish(h.ring, ffi.NULL) == 1
        assert lib.vq_offload_stop() == 0
        assert len(os.listdir("/proc/self/task")) == base
        assert lib.vq_offload_read(chain, fd, 0, 4096, 8) == -1, "no helper: reply yourself"
        assert lib.vq_offload_start() == 0, "and it starts again"

    def test_reply_contents_and_errors(self, h: Harness, datafile: tuple[int, bytes]) -> None:
        assert lib.vq_offload_start() == 0
        fd, data = datafile
        heads = [h.drv.add_chain([b"req"], [16, 8192]) for _ in range(3)]
        chains = []
        for _ in heads:
            chain = ffi.new("struct vq_chain *")
            assert lib.vq_pop(h.ring, h.table, chain) == 1
            chains.append(chain)
        r, w = os.pipe()
        try:
            assert lib.vq_offload_read(chains[0], fd, 5, 8192, 1) == 1
            assert lib.vq_offload_read(chains[1], r, 0, 100, 2) == 2  # ESPIPE in the helper
            assert lib.vq_offload_read(chains[2], fd, 299_990, 8192, 3) == 3  # short at EOF
        finally:
            os.close(r)  # the jobs hold their own duplicates
            os.close(w)
        results = ffi.new("int64_t[]", 3)
        writable = {head: h.drv.writable_buffers(head) for head in heads}
        assert lib.vq_offload_finish(h.ring, results) == 3
        assert list(results) == [8192, -29, 10]

        def reply(head: int) -> bytes:
            return b"".join(h.mem.read(gpa, size) for gpa, size in writable[head])

        assert OUT.unpack_from(reply(heads[0])) == (16 + 8192, 0, 1)
        assert reply(heads[0])[16:] == data[5 : 5 + 8192]
        assert OUT.unpack_from(reply(heads[1])) == (16, -29, 2)
        assert OUT.unpack_from(reply(heads[2])) == (26, 0, 3)
        assert reply(heads[2])[16:26] == data[299_990:]
        assert h.drv.used_entries() == [(heads[0], 8208), (heads[1], 16), (heads[2], 26)]

    def test_refusals(self, h: Harness, datafile: tuple[int, bytes]) -> None:
        assert lib.vq_offload_start() == 0
        ((_, small),) = self.pop_all(h, 1, [8])
        ((_, ok),) = self.pop_all(h, 1, [16, 100])
        assert lib.vq_offload_read(small, datafile[0], 0, 10, 1) == -1  # no room for a header
        assert lib.vq_offload_read(ok, 999_999, 0, 10, 1) == -1  # bad fd: cannot dup
        assert lib.vq_offload_busy() == 0
        assert lib.vq_offload_finish(h.ring, ffi.NULL) == 0
