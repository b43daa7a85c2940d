"""The back-end state machine: negotiation, memory, ring lifecycle, and the daemon's lifetime.

Negotiation, memory and ring cases drive the sans-I/O Backend in this process
(InProcessFrontend); the daemon runs only for what needs a process and a socket: the FUSE
session over real rings, exiting on disconnect or SIGTERM, an inherited listening socket."""

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.frontend import Daemon, DaemonGone, Frontend, InProcessFrontend, running_daemon
from tests.support.guest import DriverRing, GuestMemory
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fuse.dispatch import Dispatcher
from vhostfs.vhost import protocol as p
from vhostfs.vhost.backend import Backend
from vhostfs.vhost.codec import Message, ProtocolError
from vhostfs.vhost.virtqueue import _TRANSITIONS, ChainRequest, RingEvent, RingState

INIT_REPLY = fc.OUT_HEADER_SIZE + 64
GETATTR_REPLY = fc.OUT_HEADER_SIZE + 104


def fuse_init(unique: int = 1) -> bytes:
    return fc.init(7, 31, 65536, 0, ext=False, unique=unique)


def getattr_root(unique: int) -> bytes:
    return fc.getattr_(fc.ROOT, unique=unique)


def error_of(reply: bytes) -> int:
    return fc.parse_out_header(reply).error


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


@pytest.fixture
def serving(share: Path) -> Iterator[Backend]:
    """A Backend whose rings feed a FUSE session over a passthrough of share, as the daemon's."""
    fs = Passthrough(share)
    yield Backend(Dispatcher(fs).handle)
    fs.close()


def _never_called(req: ChainRequest) -> None:
    raise AssertionError("no FUSE request expected")


@pytest.fixture
def fe(mem: GuestMemory) -> Iterator[InProcessFrontend]:
    """A front-end for the Backend in this process; no ring starts, so no event loop needed."""
    frontend = InProcessFrontend(Backend(_never_called), mem)
    yield frontend
    frontend.close()


# Negotiation ---------------------------------------------------------------------------------


def test_offers_what_a_virtio_fs_backend_needs_and_not_config(fe: InProcessFrontend) -> None:
    features = fe.get_u64(p.Request.GET_FEATURES)
    assert features == p.OFFERED_FEATURES
    protocol = fe.get_u64(p.Request.GET_PROTOCOL_FEATURES)
    assert protocol & p.ProtocolFeature.MQ and protocol & p.ProtocolFeature.REPLY_ACK
    assert protocol & p.ProtocolFeature.CONFIGURE_MEM_SLOTS
    assert protocol & p.ProtocolFeature.RESET_DEVICE
    assert not protocol & p.ProtocolFeature.CONFIG
    assert fe.get_u64(p.Request.GET_QUEUE_NUM) == 2


def test_unoffered_features_are_refused_with_a_failure_ack(fe: InProcessFrontend) -> None:
    fe.init()
    assert fe.set(p.Request.SET_FEATURES, p.U64.pack(1 << 34)) == 1  # RING_PACKED
    assert fe.backend.features == 0
    assert fe.set(p.Request.SET_FEATURES, p.U64.pack(p.OFFERED_FEATURES)) == 0
    assert fe.backend.features == p.OFFERED_FEATURES


def test_no_ack_without_reply_ack(mem: GuestMemory) -> None:
    """NEED_REPLY means nothing until REPLY_ACK is negotiated (QEMU's pre-REPLY_ACK path)."""
    fe = InProcessFrontend(Backend(_never_called), mem, reply_ack=False)
    fe.init()
    fe.send(p.Request.SET_OWNER, need_reply=True)
    assert fe.pending == b""  # no ack for SET_OWNER
    assert fe.get_u64(p.Request.GET_FEATURES) == p.OFFERED_FEATURES
    fe.close()


def test_unknown_request_with_need_reply_gets_a_failure_ack(fe: InProcessFrontend) -> None:
    fe.init()
    assert fe.set(99) == 1
    assert fe.set(p.Request.SET_CONFIG, b"\0" * 12) == 1
    assert fe.get_u64(p.Request.GET_QUEUE_NUM) == 2


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
    assert error_of(fe.request(1, fuse_init(), INIT_REPLY)) == 0
    assert error_of(fe.request(1, getattr_root(2), GETATTR_REPLY)) == 0
    fe.close()


# Memory --------------------------------------------------------------------------------------


def test_bad_memory_regions_are_refused_and_nothing_is_mapped(fe: InProcessFrontend) -> None:
    fe.init()
    region = fe.mem.regions[0]
    past_end = p.SINGLE_MEM_REGION.pack(0, region.gpa, region.size * 4, region.uva, 0)
    assert fe.set(p.Request.ADD_MEM_REG, past_end, [region.fd]) == 1
    zero = p.SINGLE_MEM_REGION.pack(0, region.gpa, 0, region.uva, 0)
    assert fe.set(p.Request.ADD_MEM_REG, zero, [region.fd]) == 1
    wraps = p.SINGLE_MEM_REGION.pack(0, 2**64 - 4096, 8192, region.uva, 0)
    assert fe.set(p.Request.ADD_MEM_REG, wraps, [region.fd]) == 1
    no_fd = p.SINGLE_MEM_REGION.pack(0, region.gpa, region.size, region.uva, 0)
    assert fe.set(p.Request.ADD_MEM_REG, no_fd) == 1
    assert fe.backend.memory.regions == []
    assert fe.set(p.Request.ADD_MEM_REG, no_fd, [region.fd]) == 0
    [mapped] = fe.backend.memory.regions
    assert (mapped.gpa, mapped.size, mapped.uva) == (region.gpa, region.size, region.uva)
    overlap = p.SINGLE_MEM_REGION.pack(0, region.gpa + 4096, 4096, region.uva, 0)
    assert fe.set(p.Request.ADD_MEM_REG, overlap, [region.fd]) == 1
    table = p.MEM_TABLE_HEAD.pack(2, 0) + p.MEM_REGION.pack(0, 4096, 0, 0) * 2
    assert fe.set(p.Request.SET_MEM_TABLE, table, [region.fd, region.fd]) == 1  # overlapping
    assert fe.set(p.Request.SET_MEM_TABLE, table[:-8], [region.fd]) == 1  # truncated
    assert fe.backend.memory.regions == [mapped]


def test_ring_outside_memory_is_refused(mem: GuestMemory) -> None:
    async def main() -> None:
        fe = InProcessFrontend(Backend(_never_called), mem)
        fe.init()
        fe.start()
        bad = p.VRING_ADDR.pack(1, 0, 0xDEAD0000000, 0xDEAD0001000, 0xDEAD0002000, 0)
        assert fe.set(p.Request.SET_VRING_ADDR, bad) == 1
        ring = fe.rings[1]
        misaligned = p.VRING_ADDR.pack(1, 0, ring.desc_uva + 8, ring.used_uva, ring.avail_uva, 0)
        assert fe.set(p.Request.SET_VRING_ADDR, misaligned) == 1
        assert fe.set(p.Request.SET_VRING_NUM, p.VRING_STATE.pack(1, 100)) == 1  # not 2^n
        assert fe.set(p.Request.SET_VRING_NUM, p.VRING_STATE.pack(7, 128)) == 1  # no such queue
        # Refused addresses leave the ring unmapped: a guest request is not taken.
        fe.rings[1].add_chain([fuse_init()], [INIT_REPLY])
        fe.backend.queues[1].process()
        assert fe.backend.queues[1].inflight == 0 and fe.rings[1].used_idx == 0
        fe.close()

    asyncio.run(main())


def test_regions_change_while_rings_run(serving: Backend, mem: GuestMemory) -> None:
    """Like the BIOS's PAM churn on QEMU: a region goes away and comes back mid-run."""

    async def main() -> None:
        fe = InProcessFrontend(serving, mem)
        fe.init()
        fe.start()
        assert error_of(fe.request(1, fuse_init(), INIT_REPLY)) == 0
        spare = GuestMemory(((8 << 20, 1 << 20),))
        r = spare.regions[0]
        region = p.SINGLE_MEM_REGION.pack(0, r.gpa, r.size, r.uva, 0)
        fe.set_ok(p.Request.ADD_MEM_REG, region, [r.fd])
        assert len(fe.backend.memory.regions) == 3
        assert error_of(fe.request(1, getattr_root(2), GETATTR_REPLY)) == 0
        fe.set_ok(p.Request.REM_MEM_REG, region)
        assert fe.set(p.Request.REM_MEM_REG, region) == 1
        assert len(fe.backend.memory.regions) == 2
        assert error_of(fe.request(1, getattr_root(3), GETATTR_REPLY)) == 0
        fe.close()
        spare.close()

    asyncio.run(main())


# Lifecycle -----------------------------------------------------------------------------------


def test_guest_reboot_is_stop_then_start_and_init_resets_the_session(
    serving: Backend, mem: GuestMemory
) -> None:
    async def main() -> None:
        fe = InProcessFrontend(serving, mem)
        fe.init()
        fe.start()
        assert error_of(fe.request(1, fuse_init(), INIT_REPLY)) == 0
        assert error_of(fe.request(1, getattr_root(2), GETATTR_REPLY)) == 0
        bases = fe.stop()
        assert bases == [0, 2]
        # The rebooted guest's driver starts from fresh rings.
        fe.rings = [type(ring)(mem, fe.queue_size) for ring in fe.rings]
        fe.start(base=0)
        assert error_of(fe.request(1, fuse_init(7), INIT_REPLY)) == 0
        assert error_of(fe.request(1, getattr_root(8), GETATTR_REPLY)) == 0
        fe.close()

    asyncio.run(main())


def test_requests_before_the_ring_is_enabled_wait(mem: GuestMemory) -> None:
    taken: list[ChainRequest] = []

    def answer(req: ChainRequest) -> None:
        taken.append(req)
        req.complete(0)

    async def main() -> None:
        fe = InProcessFrontend(Backend(answer), mem)
        fe.init()
        fe.start()
        queue = fe.backend.queues[1]
        states = [queue.state]
        fe.set_ok(p.Request.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 0))
        states.append(queue.state)
        assert states == [RingState.RUNNING, RingState.STARTED]
        head = fe.rings[1].add_chain([fuse_init()], [INIT_REPLY])
        queue.process()  # what a kick does
        assert taken == [] and fe.rings[1].used_idx == 0
        fe.set_ok(p.Request.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))  # processes at once
        assert len(taken) == 1
        assert fe.rings[1].used_entries() == [(head, 0)]
        fe.close()

    asyncio.run(main())


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
        assert error_of(fe.request(1, fuse_init(), INIT_REPLY)) == 0
        fe.close()
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()


# GET_VRING_BASE and in-flight requests (in-process: needs a handler that suspends) ------------


def test_ring_lifecycle(mem: GuestMemory, caplog: pytest.LogCaptureFixture) -> None:
    """The RingState moves a front-end's messages and a bad chain make, in QEMU's order."""
    states: list[RingState] = []

    async def main() -> None:
        fe = InProcessFrontend(Backend(_never_called), mem, queue_size=16)
        queue = fe.backend.queues[1]
        fe.init()
        fe.start()  # kick fd, then SET_VRING_ENABLE
        states.append(queue.state)
        fe.rings[1].set_avail_idx(100)  # further ahead than the queue is long
        queue.process()
        states.append(queue.state)
        fe.set_ok(p.Request.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
        states.append(queue.state)
        fe.stop()
        states.append(queue.state)
        fe.rings = [DriverRing(mem, 16) for _ in fe.rings]  # the guest driver starts afresh
        fe.set_ok(p.Request.SET_VRING_ENABLE, p.VRING_STATE.pack(1, 1))
        states.append(queue.state)
        fe.start()
        states.append(queue.state)
        fe.close()
        states.append(queue.state)

    with caplog.at_level(logging.ERROR, logger="vhostfs.vhost.virtqueue"):
        asyncio.run(main())
    S = RingState
    assert states == [S.RUNNING, S.BROKEN, S.BROKEN, S.STOPPED, S.ENABLED, S.RUNNING, S.STOPPED]
    assert [r.getMessage() for r in caplog.records] == [
        "queue 1: bad descriptor chain, ring stopped: "
        "avail index ran more than the queue size ahead"
    ]


def test_every_ring_state_answers_every_event() -> None:
    """The front-end may send ring messages in any order, so no (state, event) is refused."""
    for state in RingState:
        assert set(_TRANSITIONS[state]) == set(RingEvent), state


def test_get_vring_base_waits_for_in_flight_requests(mem: GuestMemory) -> None:
    held: list[ChainRequest] = []

    async def scenario() -> None:
        both_held = asyncio.Event()

        def hold(req: ChainRequest) -> None:
            held.append(req)
            if len(held) == 2:
                both_held.set()

        fe = InProcessFrontend(Backend(hold), mem, queue_size=16)
        fe.init()
        fe.start()
        ring = fe.rings[1]
        heads = [ring.add_chain([b"x" * 40], [16]), ring.add_chain([b"y" * 40], [16])]
        fe.kick(1)
        await asyncio.wait_for(both_held.wait(), 10)

        stop = Message(p.Request.GET_VRING_BASE, p.VERSION, p.VRING_STATE.pack(1, 0), [])
        waiting = asyncio.ensure_future(fe.backend.before(stop))
        await asyncio.sleep(0)  # one turn of the loop: the drain starts and waits
        assert not waiting.done()
        held[0].complete(0)
        await asyncio.sleep(0)
        assert not waiting.done()
        held[1].complete(0)
        await asyncio.wait_for(waiting, 10)
        reply = fe.backend.handle(stop)
        assert reply is not None and p.VRING_STATE.unpack(reply[12:]) == (1, 2)
        assert ring.used_entries() == [(heads[0], 0), (heads[1], 0)]
        fe.close()

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
    assert daemon.process.wait(10) == 0
    assert "front-end disconnected" in daemon.log()
