"""The back-end state machine: negotiation, memory, ring lifecycle, and the daemon's lifetime."""

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.frontend import Daemon, DaemonGone, Frontend, running_daemon
from tests.support.guest import GuestMemory
from vhostfs.vhost import protocol as p
from vhostfs.vhost.backend import Backend
from vhostfs.vhost.codec import Message, ProtocolError
from vhostfs.vhost.virtqueue import ChainRequest

FUSE_INIT, FUSE_GETATTR = 26, 3


def fuse_request(opcode: int, unique: int, nodeid: int, args: bytes) -> bytes:
    return struct.pack("<IIQQIIIHH", 40 + len(args), opcode, unique, nodeid, 0, 0, 0, 0, 0) + args


def fuse_init(unique: int = 1) -> bytes:
    return fuse_request(FUSE_INIT, unique, 0, struct.pack("<IIII", 7, 31, 65536, 0))


def getattr_root(unique: int) -> bytes:
    return fuse_request(FUSE_GETATTR, unique, 1, struct.pack("<IIQ", 0, 0, 0))


def error_of(reply: bytes) -> int:
    return int(struct.unpack_from("<i", reply, 4)[0])


@pytest.fixture
def share(tmp_path: Path) -> Path:
    share = tmp_path / "share"
    share.mkdir()
    (share / "hello").write_text("hello\n")
    return share


@pytest.fixture
def daemon(share: Path, tmp_path: Path) -> Iterator[Daemon]:
    with running_daemon(share, tmp_path) as d:
        yield d


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory(((0, 1 << 20), (1 << 20, 1 << 20))) as m:
        yield m


# Negotiation ---------------------------------------------------------------------------------


def test_offers_what_a_virtio_fs_backend_needs_and_not_config(
    daemon: Daemon, mem: GuestMemory
) -> None:
    fe = Frontend(daemon.socket_path, mem)
    features = fe.get_u64(p.Request.GET_FEATURES)
    assert features == p.OFFERED_FEATURES
    protocol = fe.get_u64(p.Request.GET_PROTOCOL_FEATURES)
    assert protocol & p.ProtocolFeature.MQ and protocol & p.ProtocolFeature.REPLY_ACK
    assert protocol & p.ProtocolFeature.CONFIGURE_MEM_SLOTS
    assert protocol & p.ProtocolFeature.RESET_DEVICE
    assert not protocol & p.ProtocolFeature.CONFIG
    assert fe.get_u64(p.Request.GET_QUEUE_NUM) == 2
    fe.close()


def test_unoffered_features_are_refused_with_a_failure_ack(
    daemon: Daemon, mem: GuestMemory
) -> None:
    fe = Frontend(daemon.socket_path, mem)
    fe.init()
    assert fe.set(p.Request.SET_FEATURES, p.U64.pack(1 << 34)) == 1  # RING_PACKED
    assert fe.set(p.Request.SET_FEATURES, p.U64.pack(p.OFFERED_FEATURES)) == 0
    fe.close()
    assert daemon.alive() or daemon.process.returncode == 0


def test_no_ack_without_reply_ack(daemon: Daemon, mem: GuestMemory) -> None:
    """NEED_REPLY means nothing until REPLY_ACK is negotiated (QEMU's pre-REPLY_ACK path)."""
    fe = Frontend(daemon.socket_path, mem, reply_ack=False)
    fe.init()
    fe.send(p.Request.SET_OWNER, need_reply=True)
    # The next reply on the wire must be GET_FEATURES', not an ack for SET_OWNER.
    assert fe.get_u64(p.Request.GET_FEATURES) == p.OFFERED_FEATURES
    fe.close()


def test_unknown_request_with_need_reply_gets_a_failure_ack(
    daemon: Daemon, mem: GuestMemory
) -> None:
    fe = Frontend(daemon.socket_path, mem)
    fe.init()
    assert fe.set(99) == 1
    assert fe.set(p.Request.SET_CONFIG, b"\0" * 12) == 1
    assert fe.get_u64(p.Request.GET_QUEUE_NUM) == 2
    fe.close()


def test_unanswerable_request_closes_the_connection_and_the_daemon_exits(
    daemon: Daemon, mem: GuestMemory
) -> None:
    fe = Frontend(daemon.socket_path, mem)
    fe.send(p.Request.GET_CONFIG, b"\0" * 12)  # would need a reply we cannot give
    with pytest.raises(DaemonGone):
        fe.receive(p.Request.GET_CONFIG)
    assert daemon.process.wait(10) == 0
    assert "closing the front-end connection" in daemon.log()
    assert "Traceback" not in daemon.log()
    fe.close()


@pytest.mark.parametrize(
    "raw",
    [
        p.HEADER.pack(p.Request.GET_FEATURES, 0x2, 0),  # version 2
        p.HEADER.pack(p.Request.GET_FEATURES, 0x1 | 0x40, 0),  # reserved flag
        p.HEADER.pack(p.Request.SET_MEM_TABLE, 0x1, 1 << 20),  # huge payload
    ],
    ids=["version", "reserved-flag", "huge-payload"],
)
def test_malformed_headers_close_the_connection_without_a_traceback(
    raw: bytes, daemon: Daemon, mem: GuestMemory
) -> None:
    fe = Frontend(daemon.socket_path, mem)
    fe.sock.sendall(raw)
    assert daemon.process.wait(10) == 0
    assert "Traceback" not in daemon.log()
    fe.close()


@pytest.mark.parametrize("reconnect", [False, True], ids=["connect", "reconnect"])
def test_cloud_hypervisor_sequence(reconnect: bool, daemon: Daemon, mem: GuestMemory) -> None:
    """NEED_REPLY on everything, SET_MEM_TABLE with CONFIGURE_MEM_SLOTS, bases from the ring, and
    (on reconnect) SET_PROTOCOL_FEATURES without a GET first."""
    fe = Frontend(daemon.socket_path, mem)
    fe.init_cloud_hypervisor(ask_protocol_features=not reconnect)
    fe.start_cloud_hypervisor()
    assert error_of(fe.request(1, fuse_init(), 80)) == 0
    assert error_of(fe.request(1, getattr_root(2), 16 + 104)) == 0
    fe.close()


# Memory --------------------------------------------------------------------------------------


def test_bad_memory_regions_are_refused_and_nothing_is_mapped(
    daemon: Daemon, mem: GuestMemory
) -> None:
    fe = Frontend(daemon.socket_path, mem)
    fe.init()
    region = mem.regions[0]
    past_end = p.SINGLE_MEM_REGION.pack(0, region.gpa, region.size * 4, region.uva, 0)
    assert fe.set(p.Request.ADD_MEM_REG, past_end, [region.fd]) == 1
    zero = p.SINGLE_MEM_REGION.pack(0, region.gpa, 0, region.uva, 0)
    assert fe.set(p.Request.ADD_MEM_REG, zero, [region.fd]) == 1
    wraps = p.SINGLE_MEM_REGION.pack(0, 2**64 - 4096, 8192, region.uva, 0)
    assert fe.set(p.Request.ADD_MEM_REG, wraps, [region.fd]) == 1
    no_fd = p.SINGLE_MEM_REGION.pack(0, region.gpa, region.size, region.uva, 0)
    assert fe.set(p.Request.ADD_MEM_REG, no_fd) == 1
    assert fe.set(p.Request.ADD_MEM_REG, no_fd, [region.fd]) == 0
    overlap = p.SINGLE_MEM_REGION.pack(0, region.gpa + 4096, 4096, region.uva, 0)
    assert fe.set(p.Request.ADD_MEM_REG, overlap, [region.fd]) == 1
    table = p.MEM_TABLE_HEAD.pack(2, 0) + p.MEM_REGION.pack(0, 4096, 0, 0) * 2
    assert fe.set(p.Request.SET_MEM_TABLE, table, [region.fd, region.fd]) == 1  # overlapping
    assert fe.set(p.Request.SET_MEM_TABLE, table[:-8], [region.fd]) == 1  # truncated
    assert daemon.alive()
    fe.close()


def test_ring_outside_memory_is_refused(daemon: Daemon, mem: GuestMemory) -> None:
    fe = Frontend(daemon.socket_path, mem)
    fe.init()
    fe.start()
    bad = p.VRING_ADDR.pack(1, 0, 0xDEAD0000000, 0xDEAD0001000, 0xDEAD0002000, 0)
    assert fe.set(p.Request.SET_VRING_ADDR, bad) == 1
    misaligned = p.VRING_ADDR.pack(
        1, 0, fe.rings[1].desc_uva + 8, fe.rings[1].used_uva, fe.rings[1].avail_uva, 0
    )
    assert fe.set(p.Request.SET_VRING_ADDR, misaligned) == 1
    assert fe.set(p.Request.SET_VRING_NUM, p.VRING_STATE.pack(1, 100)) == 1  # not a power of 2
    assert fe.set(p.Request.SET_VRING_NUM, p.VRING_STATE.pack(7, 128)) == 1  # no such queue
    assert daemon.alive()
    fe.close()


def test_regions_change_while_rings_run(daemon: Daemon, mem: GuestMemory) -> None:
    """Like the BIOS's PAM churn on QEMU: a region goes away and comes back mid-run."""
    fe = Frontend(daemon.socket_path, mem)
    fe.init()
    fe.start()
    assert error_of(fe.request(1, fuse_init(), 80)) == 0
    spare = GuestMemory(((8 << 20, 1 << 20),))
    r = spare.regions[0]
    fe.set_ok(p.Request.ADD_MEM_REG, p.SINGLE_MEM_REGION.pack(0, r.gpa, r.size, r.uva, 0), [r.fd])
    assert error_of(fe.request(1, getattr_root(2), 16 + 104)) == 0
    fe.set_ok(p.Request.REM_MEM_REG, p.SINGLE_MEM_REGION.pack(0, r.gpa, r.size, r.uva, 0))
    assert fe.set(p.Request.REM_MEM_REG, p.SINGLE_MEM_REGION.pack(0, r.gpa, r.size, r.uva, 0)) == 1
    assert error_of(fe.request(1, getattr_root(3), 16 + 104)) == 0
    spare.close()
    fe.close()


# Lifecycle -----------------------------------------------------------------------------------


def test_guest_reboot_is_stop_then_start_and_init_resets_the_session(
    daemon: Daemon, mem: GuestMemory
) -> None:
    fe = Frontend(daemon.socket_path, mem)
    fe.init()
    fe.start()
    assert error_of(fe.request(1, fuse_init(), 80)) == 0
    assert error_of(fe.request(1, getattr_root(2), 16 + 104)) == 0
    bases = fe.stop()
    assert bases == [0, 2]
    # The rebooted guest's driver starts from fresh rings.
    fe.rings = [type(ring)(mem, fe.queue_size) for ring in fe.rings]
    fe.start(base=0)
    assert error_of(fe.request(1, fuse_init(7), 80)) == 0
    assert error_of(fe.request(1, getattr_root(8), 16 + 104)) == 0
    fe.close()


def test_requests_before_the_ring_is_enabled_wait(daemon: Daemon, mem: GuestMemory) -> None:
    fe = Frontend(daemon.socket_path, mem)
    fe.init()
    fe.start()
    fe.set_ok(p.Request.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 0))
    fe.rings[1].add_chain([fuse_init()], [80])
    fe.kick(1)
    with pytest.raises(TimeoutError):
        fe.wait_used(1, 1, timeout=0.5)
    fe.set_ok(p.Request.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
    assert len(fe.wait_used(1, 1)) == 1
    fe.close()


def test_sigterm_exits_cleanly_and_removes_the_socket(daemon: Daemon) -> None:
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(10) == 0
    assert not daemon.socket_path.exists()


def test_inherited_listening_socket(share: Path, tmp_path: Path, mem: GuestMemory) -> None:
    """Kata hands virtiofsd a bound, listening socket as fd 3."""
    path = tmp_path / "kata.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "vhostfs",
            "serve",
            "--fd=3",
            f"--shared-dir={share}",
            "--thread-pool-size=1",
            "--announce-submounts",
            "--cache=auto",
        ],
        pass_fds=[listener.fileno()] if listener.fileno() == 3 else [],
        preexec_fn=None if listener.fileno() == 3 else lambda: os.dup2(listener.fileno(), 3),
        close_fds=False,
    )
    listener.close()
    try:
        fe = Frontend(path, mem)
        fe.init()
        fe.start()
        assert error_of(fe.request(1, fuse_init(), 80)) == 0
        fe.close()
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()


# GET_VRING_BASE and in-flight requests (in-process: needs a handler that suspends) ------------


def test_get_vring_base_waits_for_in_flight_requests(mem: GuestMemory) -> None:
    held: list[ChainRequest] = []
    backend = Backend(held.append)

    def message(request: int, payload: bytes = b"", fds: list[int] | None = None) -> Message:
        return Message(request, p.VERSION, payload, fds or [])

    async def scenario() -> None:
        from tests.support.guest import DriverRing

        ring = DriverRing(mem, 16)
        kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        backend.handle(message(p.Request.SET_FEATURES, p.U64.pack(p.OFFERED_FEATURES)))
        table = p.MEM_TABLE_HEAD.pack(len(mem.regions), 0) + b"".join(
            p.MEM_REGION.pack(r.gpa, r.size, r.uva, r.mmap_offset) for r in mem.regions
        )
        backend.handle(message(p.Request.SET_MEM_TABLE, table, [os.dup(r.fd) for r in mem.regions]))
        backend.handle(message(p.Request.SET_VRING_NUM, p.VRING_STATE.pack(1, 16)))
        backend.handle(
            message(
                p.Request.SET_VRING_ADDR,
                p.VRING_ADDR.pack(1, 0, ring.desc_uva, ring.used_uva, ring.avail_uva, 0),
            )
        )
        backend.handle(message(p.Request.SET_VRING_CALL, p.U64.pack(1), [call]))
        backend.handle(message(p.Request.SET_VRING_KICK, p.U64.pack(1), [os.dup(kick)]))
        backend.handle(message(p.Request.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1)))
        heads = [ring.add_chain([b"x" * 40], [16]), ring.add_chain([b"y" * 40], [16])]
        os.eventfd_write(kick, 1)
        while len(held) < 2:
            await asyncio.sleep(0.01)

        stop = message(p.Request.GET_VRING_BASE, p.VRING_STATE.pack(1, 0))
        waiting = asyncio.ensure_future(backend.before(stop))
        await asyncio.sleep(0.05)
        assert not waiting.done()
        held[0].complete(0)
        await asyncio.sleep(0.05)
        assert not waiting.done()
        held[1].complete(0)
        await asyncio.wait_for(waiting, 1)
        reply = backend.handle(stop)
        assert reply is not None and p.VRING_STATE.unpack(reply[12:]) == (1, 2)
        assert ring.used_entries() == [(heads[0], 0), (heads[1], 0)]
        backend.shutdown()
        os.close(kick)

    asyncio.run(scenario())


def test_unknown_request_without_need_reply_is_a_protocol_error() -> None:
    backend = Backend(lambda request: None)
    with pytest.raises(ProtocolError):
        backend.handle(Message(99, p.VERSION, b""))


def test_disconnect_ends_the_daemon(daemon: Daemon, mem: GuestMemory) -> None:
    fe = Frontend(daemon.socket_path, mem)
    fe.init()
    fe.start()
    fe.close()
    deadline = time.monotonic() + 10
    while daemon.alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert daemon.process.returncode == 0
    assert "front-end disconnected" in daemon.log()
