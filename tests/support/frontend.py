"""A vhost-user front-end for tests: plays QEMU's part against a real vhostfs daemon.

It talks to the daemon over its real Unix socket, in the message order observed from QEMU 7.2
(see the reference notes), with guest RAM in memfds (tests.support.guest) and real eventfds for
kicks and calls. Tests use it for protocol cases and for chains no real guest driver would
build; it is not a stand-in for the end-to-end tests with a real guest.

`InProcessFrontend` plays the same sequences against a `Backend` in the test's own process:
each message goes straight to the sans-I/O `Backend.handle`, the way h11's tests drive a
`Connection`, so negotiation cases need no daemon and no socket.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from tests.support import fuse_client as fc
from tests.support.guest import DriverRing, GuestMemory
from tests.support.vm import DaemonProcess, listening_daemon
from vhostfs.vhost import protocol as p
from vhostfs.vhost.backend import Backend
from vhostfs.vhost.codec import Message

# QEMU's vhost-user-fs acks what the guest acked plus PROTOCOL_FEATURES.
GUEST_FEATURES = (
    p.VirtioFeature.VERSION_1 | p.VirtioFeature.RING_INDIRECT_DESC | p.VirtioFeature.RING_EVENT_IDX
)


class DaemonGone(Exception):
    pass


Daemon = DaemonProcess


@contextlib.contextmanager
def running_daemon(shared_dir: Path, workdir: Path, *extra: str) -> Iterator[DaemonProcess]:
    """A vhostfs daemon process serving shared_dir on workdir/vhostfs.sock."""
    socket_path = workdir / "vhostfs.sock"
    argv = [
        sys.executable,
        "-m",
        "vhostfs",
        "serve",
        "--socket",
        str(socket_path),
        "--shared-dir",
        str(shared_dir),
        "--log-level",
        "debug",
        *extra,
    ]
    with listening_daemon(argv, socket_path, log_path=workdir / "daemon.log") as daemon:
        yield daemon


class Frontend:
    def __init__(
        self,
        socket_path: Path,
        mem: GuestMemory,
        *,
        queue_size: int = 128,
        num_queues: int = 2,
        features: int = GUEST_FEATURES,
        reply_ack: bool = True,
    ) -> None:
        self._configure(mem, queue_size, num_queues, features, reply_ack)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.sock.connect(str(socket_path))

    def _configure(
        self, mem: GuestMemory, queue_size: int, num_queues: int, features: int, reply_ack: bool
    ) -> None:
        self.mem = mem
        self.queue_size = queue_size
        self.num_queues = num_queues
        self.features = features | p.VirtioFeature.PROTOCOL_FEATURES
        self.reply_ack = reply_ack
        self.rings = [DriverRing(mem, queue_size) for _ in range(num_queues)]
        self.kick_fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(num_queues)]
        self.call_fds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(num_queues)]
        self._memory_sent = False

    def close(self) -> None:
        self.sock.close()
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in self.kick_fds + self.call_fds:
            os.close(fd)

    # Messages ----------------------------------------------------------------------------------

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
        flags: int | None = None,
    ) -> None:
        if flags is None:
            flags = p.VERSION | (p.FLAG_NEED_REPLY if need_reply else 0)
        header = p.HEADER.pack(request, flags, len(payload))
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))]
        # fds travel with the header's first byte, as QEMU sends them.
        self.sock.sendmsg([header], ancillary if fds else [])
        if payload:
            self.sock.sendall(payload)

    def receive(self, request: int) -> bytes:
        header = self._recv_exact(p.HEADER.size)
        got, flags, size = p.HEADER.unpack(header)
        assert got == request, f"reply to {got}, expected {request}"
        assert flags == p.VERSION | p.FLAG_REPLY
        return self._recv_exact(size)

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise DaemonGone("daemon closed the connection")
            data += chunk
        return data

    def get_u64(self, request: int) -> int:
        self.send(request)
        return int(p.U64.unpack(self.receive(request))[0])

    def set(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> int | None:
        """Send a request without a reply of its own; with REPLY_ACK, return the ack."""
        self.send(request, payload, fds, need_reply=self.reply_ack)
        if self.reply_ack:
            return int(p.U64.unpack(self.receive(request))[0])
        return None

    def set_ok(self, request: int, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        ack = self.set(request, payload, fds)
        assert ack in (0, None), f"{p.Request(request).name} refused"

    # QEMU's sequences --------------------------------------------------------------------------

    def init(self) -> None:
        offered = self.get_u64(p.Request.GET_FEATURES)
        assert offered & self.features == self.features
        offered_protocol = self.get_u64(p.Request.GET_PROTOCOL_FEATURES)
        protocol = offered_protocol & (
            p.ProtocolFeature.MQ
            | p.ProtocolFeature.CONFIGURE_MEM_SLOTS
            | (p.ProtocolFeature.REPLY_ACK if self.reply_ack else 0)
        )
        self.send(p.Request.SET_PROTOCOL_FEATURES, p.U64.pack(protocol))
        assert self.get_u64(p.Request.GET_QUEUE_NUM) >= self.num_queues
        self.get_u64(p.Request.GET_MAX_MEM_SLOTS)
        self.set_ok(p.Request.SET_OWNER)

    def start(self, base: int = 0) -> None:
        for i in range(self.num_queues):
            self.set_vring_fd(p.Request.SET_VRING_CALL, i, self.call_fds[i])
        self.set_ok(p.Request.SET_FEATURES, p.U64.pack(self.features))
        # QEMU sends ADD_MEM_REG only when the map changed, i.e. at the first start.
        for region in [] if self._memory_sent else self.mem.regions:
            payload = p.SINGLE_MEM_REGION.pack(
                0, region.gpa, region.size, region.uva, region.mmap_offset
            )
            self.set_ok(p.Request.ADD_MEM_REG, payload, [region.fd])
        self._memory_sent = True
        for i, ring in enumerate(self.rings):
            self.set_ok(p.Request.SET_VRING_NUM, p.VRING_STATE.pack(i, self.queue_size))
            self.set_ok(p.Request.SET_VRING_BASE, p.VRING_STATE.pack(i, base))
            self.set_ok(
                p.Request.SET_VRING_ADDR,
                p.VRING_ADDR.pack(
                    i, 0, ring.desc_uva, ring.used_uva, ring.avail_uva, ring.used_gpa
                ),
            )
            self.set_vring_fd(p.Request.SET_VRING_KICK, i, self.kick_fds[i])
        for i in range(self.num_queues):
            self.set_ok(p.Request.SET_VRING_ENABLE, p.VRING_STATE.pack(i, 1))

    def init_cloud_hypervisor(self, *, ask_protocol_features: bool = True) -> None:
        """cloud-hypervisor's connect: SET_OWNER first; a reconnect skips GET_PROTOCOL_FEATURES."""
        self.send(p.Request.SET_OWNER)
        assert self.get_u64(p.Request.GET_FEATURES) & self.features == self.features
        if ask_protocol_features:
            self.get_u64(p.Request.GET_PROTOCOL_FEATURES)
        protocol = p.ProtocolFeature.MQ | p.ProtocolFeature.CONFIGURE_MEM_SLOTS
        protocol |= p.ProtocolFeature.REPLY_ACK
        # From here on cloud-hypervisor sets NEED_REPLY on every request.
        self.set_ok(p.Request.SET_PROTOCOL_FEATURES, p.U64.pack(protocol))
        assert self.get_u64(p.Request.GET_QUEUE_NUM) >= self.num_queues

    def start_cloud_hypervisor(self) -> None:
        """cloud-hypervisor's activate: the full memory table, and ring bases from guest memory."""
        self.set_ok(p.Request.SET_FEATURES, p.U64.pack(self.features))
        table = p.MEM_TABLE_HEAD.pack(len(self.mem.regions), 0) + b"".join(
            p.MEM_REGION.pack(r.gpa, r.size, r.uva, r.mmap_offset) for r in self.mem.regions
        )
        self.set_ok(p.Request.SET_MEM_TABLE, table, self.mem.fds())
        for i in range(self.num_queues):
            self.set_ok(p.Request.SET_VRING_NUM, p.VRING_STATE.pack(i, self.queue_size))
        for i, ring in enumerate(self.rings):
            addr = p.VRING_ADDR.pack(i, 0, ring.desc_uva, ring.used_uva, ring.avail_uva, 0)
            self.set_ok(p.Request.SET_VRING_ADDR, addr)
            self.set_ok(p.Request.SET_VRING_BASE, p.VRING_STATE.pack(i, ring.avail_idx))
            self.set_vring_fd(p.Request.SET_VRING_CALL, i, self.call_fds[i])
            self.set_vring_fd(p.Request.SET_VRING_KICK, i, self.kick_fds[i])
        for i in range(self.num_queues):
            self.set_ok(p.Request.SET_VRING_ENABLE, p.VRING_STATE.pack(i, 1))

    def stop(self) -> list[int]:
        for i in range(self.num_queues):
            self.set_ok(p.Request.SET_VRING_ENABLE, p.VRING_STATE.pack(i, 0))
        bases = []
        for i in range(self.num_queues):
            self.send(p.Request.GET_VRING_BASE, p.VRING_STATE.pack(i, 0))
            index, base = p.VRING_STATE.unpack(self.receive(p.Request.GET_VRING_BASE))
            assert index == i
            bases.append(base)
        return bases

    def set_vring_fd(self, request: int, index: int, fd: int) -> None:
        self.set_ok(request, p.U64.pack(index), [fd])

    # Requests ----------------------------------------------------------------------------------

    def kick(self, queue: int) -> None:
        os.eventfd_write(self.kick_fds[queue], 1)

    def wait_used(self, queue: int, count: int = 1, timeout: float = 10) -> list[tuple[int, int]]:
        """Wait until `count` chains come back on the used ring; (head, written) each."""
        ring = self.rings[queue]
        entries: list[tuple[int, int]] = []
        deadline = time.monotonic() + timeout
        while len(entries) < count:
            entries += ring.used_entries()
            if len(entries) >= count:
                break
            # Ask for an interrupt at the next completion, as Linux's driver does with EVENT_IDX.
            ring.used_event = ring.last_used
            entries += ring.used_entries()
            if len(entries) >= count:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"queue {queue}: {len(entries)} of {count} chains came back")
            readable, _, _ = select.select([self.call_fds[queue]], [], [], min(left, 0.2))
            if readable:
                os.eventfd_read(self.call_fds[queue])
        return entries

    def request(
        self,
        queue: int,
        request: bytes,
        reply_size: int,
        *,
        indirect: bool = False,
        timeout: float = 10,
    ) -> bytes:
        """Send one request chain (readable: request, writable: reply_size) and return the reply."""
        ring = self.rings[queue]
        head = ring.add_chain([request], [reply_size] if reply_size else [], indirect=indirect)
        buffers = ring.writable_buffers(head)
        self.kick(queue)
        ((used_head, written),) = self.wait_used(queue, 1, timeout)
        assert used_head == head
        return b"".join(self.mem.read(gpa, size) for gpa, size in buffers)[:written]

    # Benchmark fast path -------------------------------------------------------------------------

    def fast_queue(self, queue: int) -> FastQueue:
        """Drive `queue` with pre-built chains (DriverRing.add_fixed_chain), for benchmarks."""
        return FastQueue(self, queue)


class FastQueue:
    """Publish fixed chains with one kick, then sleep on the call eventfd until all are back.

    The interrupt is asked for only when the last outstanding chain completes: used_event is
    set before the chains are published, so the device cannot complete them without seeing it
    (no lost wake-up, no store-load fence needed on our side). Every submit kicks: the device is
    idle by then, since a benchmark waits for its previous batch before publishing the next."""

    def __init__(self, frontend: Frontend, queue: int) -> None:
        self.ring = frontend.rings[queue].fast()
        self.kick_fd = frontend.kick_fds[queue]
        self.call_fd = frontend.call_fds[queue]
        self._poll = select.poll()
        self._poll.register(self.call_fd, select.POLLIN)
        self.stall_ms = 1000
        self.stalls = 0  # waits that ended without an interrupt

    def close(self) -> None:
        """Release the views into guest memory (before it is unmapped)."""
        self.ring.close()

    def submit(self, heads: Sequence[int]) -> None:
        ring = self.ring
        ring.set_used_event(ring.ring.avail_idx + len(heads) - 1)
        ring.publish(heads)
        os.eventfd_write(self.kick_fd, 1)

    def wait_all(self, timeout: float = 10) -> int:
        """Block until every published chain is on the used ring; returns how many came back."""
        ring = self.ring
        target = ring.ring.avail_idx
        got = ring.reap()
        deadline = 0.0
        while ring.ring.last_used != target:
            if self._poll.poll(self.stall_ms):
                with contextlib.suppress(BlockingIOError):
                    os.eventfd_read(self.call_fd)
                got += ring.reap()
                continue
            # No interrupt for a while: look anyway, and remember that it happened.
            self.stalls += 1
            got += ring.reap()
            deadline = deadline or time.monotonic() + timeout
            if time.monotonic() > deadline:
                raise TimeoutError(f"{ring.outstanding()} chains did not come back")
        return got


class InProcessFrontend(Frontend):
    """Frontend's messages and sequences, handed to a Backend in this process.

    Replies queue up as the bytes the socket would carry, and receive() reads them in order, so
    every Frontend method works unchanged; a ProtocolError (the daemon would hang up) reaches the
    caller. fds are duplicated as SCM_RIGHTS would, the Backend owning its copies. Starting a
    ring watches its kick fd, so run inside an event loop; a ring's process() runs right inside
    the message that enables or starts it, and inside kick(), so request() returns the reply of
    a handler that does not suspend without the loop having to run."""

    def __init__(
        self,
        backend: Backend,
        mem: GuestMemory,
        *,
        queue_size: int = 128,
        num_queues: int = 2,
        features: int = GUEST_FEATURES,
        reply_ack: bool = True,
    ) -> None:
        self._configure(mem, queue_size, num_queues, features, reply_ack)
        self.backend = backend
        self._replies = bytearray()

    def close(self) -> None:
        self.backend.shutdown()
        self._close_fds()

    @property
    def pending(self) -> bytes:
        """Reply bytes sent back and not yet received."""
        return bytes(self._replies)

    def send(
        self,
        request: int,
        payload: bytes = b"",
        fds: Sequence[int] = (),
        *,
        need_reply: bool = False,
        flags: int | None = None,
    ) -> None:
        if flags is None:
            flags = p.VERSION | (p.FLAG_NEED_REPLY if need_reply else 0)
        message = Message(request, flags, payload, [os.dup(fd) for fd in fds])
        waiting = self.backend.before(message)
        try:
            waiting.send(None)
        except StopIteration:
            pass
        else:  # it would wait for in-flight requests: a test drives that itself
            waiting.close()
            message.close_fds()
            raise AssertionError(f"{message.name} would wait for in-flight requests")
        reply = self.backend.handle(message)
        if reply is not None:
            self._replies += reply

    def kick(self, queue: int) -> None:
        self.backend.queues[queue].process()  # what the kick fd's reader does

    def _recv_exact(self, n: int) -> bytes:
        if len(self._replies) < n:
            raise AssertionError(f"expected a {n}-byte reply, have {len(self._replies)} bytes")
        data = bytes(self._replies[:n])
        del self._replies[:n]
        return data


@contextlib.contextmanager
def fuse_session(
    argv: Sequence[str], socket_path: Path, log_path: Path
) -> Iterator[tuple[DaemonProcess, Frontend]]:
    """Start the daemon argv (listening on socket_path), connect a front-end with 8 MiB of guest
    RAM, start the rings and bring FUSE up on request queue 1; yields both. When the body is
    done the front-end leaves, and the daemon must then exit 0."""
    with listening_daemon(argv, socket_path, log_path=log_path) as daemon, GuestMemory(
        ((0x10_0000, 8 << 20),)
    ) as mem:
        frontend = Frontend(socket_path, mem)
        try:
            frontend.init()
            frontend.start()
            reply = frontend.request(1, fc.init(), 16 + 64)
            assert fc.parse_out_header(reply).error == 0, daemon.log()
            yield daemon, frontend
        finally:
            frontend.close()
        assert daemon.process.wait(10) == 0, daemon.log()
