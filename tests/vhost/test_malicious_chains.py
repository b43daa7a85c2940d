"""Hostile descriptor chains against the real daemon over a real vhost-user socket.

Each bad chain must be refused: the daemon stays up, writes nothing into the chain's buffers,
puts nothing on the used ring, logs one line, and serves again once the front-end resets the
ring, while the other request queue keeps serving throughout.
"""

import errno
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.frontend import GUEST_FEATURES, Daemon, Frontend, running_daemon
from tests.support.guest import DESC_F_INDIRECT, DESC_F_NEXT, DESC_F_WRITE, DriverRing, GuestMemory
from vhostfs.vhost.protocol import VirtioFeature

QUEUE_SIZE = 64
BROKEN_LINE = "bad descriptor chain"


def fuse_init(unique: int = 1) -> bytes:
    return fc.init(7, 31, 65536, 0, ext=False, unique=unique)


def getattr_root(unique: int) -> bytes:
    return fc.getattr_(fc.ROOT, unique=unique)


def reply_header(reply: bytes) -> tuple[int, int, int]:
    header = fc.parse_out_header(reply)
    return header.len, header.error, header.unique


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    share = tmp_path / "share"
    share.mkdir()
    (share / "file").write_bytes(b"data")
    with running_daemon(share, tmp_path, "--num-request-queues", "2") as d:
        yield d


@pytest.fixture
def frontend(daemon: Daemon) -> Iterator[Frontend]:
    with GuestMemory(((0, 1 << 20), (1 << 20, 1 << 20))) as mem:
        fe = Frontend(daemon.socket_path, mem, queue_size=QUEUE_SIZE, num_queues=3)
        fe.init()
        fe.start()
        _, error, _ = reply_header(fe.request(1, fuse_init(), 16 + 64))
        assert error == 0
        yield fe
        fe.close()


def sentinel_buffer(mem: GuestMemory, size: int = 256) -> int:
    gpa = mem.alloc(size)
    mem.write(gpa, b"\xa5" * size)
    return gpa


def loop(ring: DriverRing, mem: GuestMemory) -> int:
    buf = sentinel_buffer(mem)
    ring.write_desc(0, buf, 64, DESC_F_NEXT, 1)
    ring.write_desc(1, buf + 64, 64, DESC_F_NEXT | DESC_F_WRITE, 2)
    ring.write_desc(2, buf + 128, 64, DESC_F_NEXT | DESC_F_WRITE, 1)  # back to 1: a cycle
    return 0


def outside_memory(ring: DriverRing, mem: GuestMemory) -> int:
    ring.write_desc(0, 0x10_0000_0000, 4096, DESC_F_WRITE)
    return 0


def straddles_the_end_of_memory(ring: DriverRing, mem: GuestMemory) -> int:
    ring.write_desc(0, (2 << 20) - 16, 64, DESC_F_WRITE)
    return 0


def length_overflow(ring: DriverRing, mem: GuestMemory) -> int:
    buf = sentinel_buffer(mem)
    ring.write_desc(0, buf, 16, DESC_F_NEXT, 1)
    ring.write_desc(1, buf, 0xFFFF_FFFF, DESC_F_WRITE)
    return 0


def address_wraps(ring: DriverRing, mem: GuestMemory) -> int:
    ring.write_desc(0, 2**64 - 8, 64, DESC_F_WRITE)
    return 0


def nested_indirect(ring: DriverRing, mem: GuestMemory) -> int:
    inner = mem.alloc(32, 16)
    ring.write_desc(0, sentinel_buffer(mem), 64, DESC_F_WRITE, table_gpa=inner)
    outer = mem.alloc(16, 16)
    ring.write_desc(0, inner, 32, DESC_F_INDIRECT, table_gpa=outer)
    ring.write_desc(0, outer, 16, DESC_F_INDIRECT)
    return 0


def indirect_table_length(ring: DriverRing, mem: GuestMemory) -> int:
    table = mem.alloc(64, 16)
    ring.write_desc(0, table, 24, DESC_F_INDIRECT)
    return 0


def writable_before_readable(ring: DriverRing, mem: GuestMemory) -> int:
    buf = sentinel_buffer(mem)
    mem.write(buf + 128, getattr_root(9))
    ring.write_desc(0, buf, 128, DESC_F_WRITE | DESC_F_NEXT, 1)
    ring.write_desc(1, buf + 128, 56, 0)
    return 0


def head_out_of_range(ring: DriverRing, mem: GuestMemory) -> int:
    return QUEUE_SIZE


def next_out_of_range(ring: DriverRing, mem: GuestMemory) -> int:
    ring.write_desc(0, sentinel_buffer(mem), 64, DESC_F_NEXT, QUEUE_SIZE + 3)
    return 0


BAD_CHAINS: dict[str, tuple[Callable[[DriverRing, GuestMemory], int], str]] = {
    "loop": (loop, "loop"),
    "outside-memory": (outside_memory, "outside guest memory"),
    "straddles-end": (straddles_the_end_of_memory, "outside guest memory"),
    "length-overflow": (length_overflow, "2^32"),
    "address-wraps": (address_wraps, "outside guest memory"),
    "nested-indirect": (nested_indirect, "indirect"),
    "indirect-length": (indirect_table_length, "indirect"),
    "writable-before-readable": (writable_before_readable, "after a device-writable"),
    "head-out-of-range": (head_out_of_range, "head"),
    "next-out-of-range": (next_out_of_range, "next"),
}


@pytest.mark.parametrize("case", BAD_CHAINS)
def test_bad_chain_is_refused_and_the_daemon_keeps_serving(
    case: str, daemon: Daemon, frontend: Frontend
) -> None:
    build, reason = BAD_CHAINS[case]
    mem, bad_ring = frontend.mem, frontend.rings[1]
    head = build(bad_ring, mem)
    bad_ring.publish(head)
    before = mem.read(0, 2 << 20)
    frontend.kick(1)

    # The other request queue still serves while queue 1 is broken.
    _, error, unique = reply_header(frontend.request(2, getattr_root(2), 16 + 104))
    assert (error, unique) == (0, 2)

    assert bad_ring.used_entries() == [], "the bad chain was completed"
    after = frontend.mem.read(0, 2 << 20)
    assert _changed_outside_rings(before, after, frontend) == [], "guest memory was written"
    assert daemon.alive()
    broken = daemon.log_lines_once_there(BROKEN_LINE)
    assert len(broken) == 1 and "queue 1" in broken[0] and reason in broken[0], broken

    # A driver reset (stop, then start past the bad entry) brings queue 1 back.
    frontend.stop()
    frontend.start(base=bad_ring.avail_idx)
    _, error, unique = reply_header(frontend.request(1, getattr_root(3), 16 + 104))
    assert (error, unique) == (0, 3)
    assert daemon.alive()


def _changed_outside_rings(before: bytes, after: bytes, frontend: Frontend) -> list[int]:
    """Offsets that changed, other than ring areas the device legitimately writes."""
    allowed: list[tuple[int, int]] = []
    for ring in frontend.rings:
        allowed.append((ring.used_gpa, ring.used_gpa + 6 + 8 * ring.num))
    # Queue 2's request went through: its reply buffer was written too.
    allowed.append((frontend.rings[2].desc_gpa, 2 << 20))
    changed = []
    for offset in range(0, len(before), 4096):
        if before[offset : offset + 4096] != after[offset : offset + 4096]:
            for i in range(offset, offset + 4096):
                if before[i] != after[i] and not any(lo <= i < hi for lo, hi in allowed):
                    changed.append(i)
    return changed


def test_indirect_without_the_feature_breaks_the_ring(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    with running_daemon(share, tmp_path) as daemon, GuestMemory(((0, 1 << 20),)) as mem:
        fe = Frontend(
            daemon.socket_path,
            mem,
            queue_size=QUEUE_SIZE,
            features=GUEST_FEATURES & ~VirtioFeature.RING_INDIRECT_DESC,
        )
        fe.init()
        fe.start()
        ring = fe.rings[1]
        ring.add_chain([fuse_init()], [80], indirect=True)
        fe.kick(1)
        broken = daemon.log_lines_once_there(BROKEN_LINE)
        # Queue 0 still answers (EIO: the INIT never got through).
        _, error, unique = reply_header(fe.request(0, getattr_root(2), 16 + 104))
        assert (error, unique) == (-errno.EIO, 2)
        assert ring.used_entries() == [], "the bad chain was completed"
        assert daemon.alive()
        assert [line.split(" ", 2)[2] for line in broken] == [  # without the date and time
            "ERROR vhostfs.vhost.virtqueue: queue 1: bad descriptor chain, ring stopped: "
            "indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC"
        ], broken
        fe.close()
