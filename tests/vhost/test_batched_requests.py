"""Many requests published with one kick, against the real daemon.

The daemon answers them all in one pass over the ring with one interrupt at the end, and hands
big READs to its copy helper thread while it decodes the rest; the replies must be exactly what
one-at-a-time requests get, in whatever order they come back. A RELEASE and an OPEN in the same
batch as READs on the released handle check that a READ never reads from a descriptor that was
closed or reused meanwhile.
"""

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.frontend import Daemon, Frontend, running_daemon
from tests.support.guest import FixedChain, GuestMemory

QUEUE = 1
PAGE = 4096
SIZE = 128 * 1024


@pytest.fixture
def share(tmp_path: Path) -> Path:
    share = tmp_path / "share"
    share.mkdir()
    (share / "a").write_bytes(os.urandom(2 << 20))
    (share / "b").write_bytes(os.urandom(1 << 20))
    return share


@pytest.fixture
def daemon(share: Path, tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(share, tmp_path) as d:
        yield d


@pytest.fixture
def fe(daemon: Daemon) -> Iterator[Frontend]:
    with GuestMemory(((0x10_0000, 32 << 20),)) as mem:
        frontend = Frontend(daemon.socket_path, mem, queue_size=256)
        frontend.init()
        frontend.start()
        assert fc.parse_out_header(frontend.request(QUEUE, fc.init(), 16 + 64)).error == 0
        yield frontend
        frontend.close()


def call(fe: Frontend, request: bytes, reply_size: int) -> bytes:
    reply = fe.request(QUEUE, request, reply_size)
    assert fc.parse_out_header(reply).error == 0
    return reply[16:]


def chain(fe: Frontend, request: bytes, writable: list[int]) -> FixedChain:
    ring = fe.rings[QUEUE]
    return ring.add_fixed_chain([request[:40], request[40:]], writable, indirect=True, align=PAGE)


def reply_of(fe: Frontend, c: FixedChain) -> tuple[int, int, int, bytes]:
    raw = b"".join(fe.mem.read(gpa, size) for gpa, size in c.writable)
    length, error, unique = struct.unpack_from("<IiQ", raw)
    return length, error, unique, raw[16:length]


def run_batch(fe: Frontend, chains: list[FixedChain]) -> None:
    q = fe.fast_queue(QUEUE)
    try:
        q.submit([c.head for c in chains])
        assert q.wait_all() == len(chains)
        assert q.stalls == 0  # one interrupt came for the whole batch
    finally:
        q.close()


def test_batched_reads_and_metadata(fe: Frontend, share: Path) -> None:
    data = (share / "a").read_bytes()
    node = fc.parse_entry_out(call(fe, fc.lookup(fc.ROOT, b"a"), 16 + 128)).nodeid
    fh, _ = fc.parse_open_out(call(fe, fc.open_(node), 16 + 16))
    expected: dict[int, tuple[int, bytes]] = {}
    chains = []
    for k in range(40):
        unique = 1000 + k
        if k % 5 == 4:
            chains.append(chain(fe, fc.getattr_(node, unique=unique), [16, 104]))
            expected[unique] = (16 + 104, b"")
            continue
        size = SIZE if k % 2 else 40_000
        pos = (k * 77_777) % (len(data) - 1000) if k != 39 else len(data) - 1000  # short
        args = struct.pack("<QQIIQII", fh, pos, size, 0, 0, 0, 0)
        request = fc.request(fc.READ, node, args, unique=unique)
        chains.append(chain(fe, request, [16] + [PAGE] * 32))
        want = data[pos : pos + size]
        expected[unique] = (16 + len(want), want)
    run_batch(fe, chains)
    for c in chains:
        length, error, unique, body = reply_of(fe, c)
        assert error == 0
        want_len, want = expected[unique]
        assert length == want_len
        if want:
            assert body == want


def test_reads_survive_a_release_and_reopen_in_the_same_batch(fe: Frontend, share: Path) -> None:
    a, b = (share / "a").read_bytes(), (share / "b").read_bytes()
    node_a = fc.parse_entry_out(call(fe, fc.lookup(fc.ROOT, b"a"), 16 + 128)).nodeid
    node_b = fc.parse_entry_out(call(fe, fc.lookup(fc.ROOT, b"b"), 16 + 128)).nodeid
    fh, _ = fc.parse_open_out(call(fe, fc.open_(node_a), 16 + 16))
    reads = [chain(fe, fc.read(node_a, fh, k * SIZE, SIZE), [16] + [PAGE] * 32) for k in range(8)]
    release = chain(fe, fc.release(node_a, fh), [16])
    reopen = chain(fe, fc.open_(node_b), [16, 16])  # may get the same descriptor number
    run_batch(fe, [*reads, release, reopen])
    for k, c in enumerate(reads):
        length, error, _, body = reply_of(fe, c)
        assert (length, error) == (16 + SIZE, 0)
        assert body == a[k * SIZE : (k + 1) * SIZE]
    assert reply_of(fe, release)[1] == 0
    new_fh, _ = fc.parse_open_out(reply_of(fe, reopen)[3])
    assert call(fe, fc.read(node_b, new_fh, 0, 100), 16 + 100) == b[:100]
