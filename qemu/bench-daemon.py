#!/usr/bin/env python3
"""Daemon-only benchmark: vhostfs against QEMU 7.2's C virtiofsd, without a VM.

The in-process test front-end (tests/support/frontend.py) plays QEMU and the guest driver: it
connects to each daemon's real vhost-user socket, shares memfd guest RAM, negotiates FUSE and
then pushes requests through the request queue. Chains are laid out once and re-published
(DriverRing.add_fixed_chain / FastQueue), split into descriptors as Linux's virtio-fs driver
splits them (header and arguments apart, READ data in 4 KiB pages, indirect tables), and only
the used ring is read back, so the front-end's own cost stays small; it is reported as
"client CPU".

Every server serves the same files in the same run. Each round starts a fresh daemon per
server, then runs every phase on each server in turn (A, B, C, A, B, C, ...), so slow spells
of a shared machine hit all servers alike; medians are over rounds. The phases, each in two
queue-depth modes:

  qd1    one request published, one kick, wait for its interrupt, repeat
  batch  BATCH (32) requests published with one kick, one interrupt when all are back, repeat

  LOOKUP    existing names in the shared directory (the daemon already knows the inodes)
  GETATTR   of looked-up files
  READ 4K   warm host page cache (RAFS: warm chunk cache), file opened once, offsets walking
            the file
  READ 128K the same, 128 KiB per request; also daemon CPU seconds per GiB read
  WRITE 4K  to a second file opened read-write, offsets walking it (host page cache)
  WRITE 128K the same, 128 KiB per request

Servers. The vhostfs ones run as Kata runs nydusd: `python -m vhostfs virtiofs --sock S
--apisock A --log-level info`, the shares mounted into its pseudo root through the HTTP API
(POST /api/v1/mount), and every phase runs below the node the front-end LOOKUPs there first:

  vhostfs       passthrough_fs of the tree at /containers (phases below "containers")
  vhostfs-rafs  the tree built into a zstd RAFS image, mounted as rafs at /rafs/c1/lowerdir
                (localfs blobs, blobcache chunk cache, digests not checked) next to an empty
                passthrough at /containers, as Kata has it: the passthrough before the
                front-end connects, the image after FUSE INIT. Its chunk cache is filled by
                one untimed pass of READs over the data file per round. The image is
                read-only: its WRITE phases are skipped.
  virtiofsd     QEMU 7.2's C virtiofsd with its defaults (-o cache=auto), serving the tree at
                its root; virtiofsd-tp0 adds --thread-pool-size=0, which QEMU 7.2 already
                defaults to, so those two are one configuration measured twice (virtiofsd-tp64,
                the old default, is selectable).

Ratios compare every vhostfs server with the first virtiofsd server listed (> 1: vhostfs is
faster). Daemon CPU comes from /proc/PID/stat (utime+stime, all threads, and forked children
such as virtiofsd's sandbox child), peak RSS from VmHWM in /proc/PID/status at the end of a
round.

    .venv/bin/python qemu/bench-daemon.py [--quick] [--rounds N] [--seconds S] [--json FILE]
        [--servers vhostfs,vhostfs-rafs,virtiofsd,...] [--ops lookup,getattr,read4k,...]
        [--tree NAME=PATH]   # also run vhostfs from another source tree, e.g. before a change:
                             # servers NAME (passthrough) and NAME-rafs (the image)

With the default four servers a run takes about four minutes, --quick about 40 s.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support import fuse_client as fc  # noqa: E402
from tests.support.frontend import FastQueue, Frontend  # noqa: E402
from tests.support.guest import FixedChain, GuestMemory, guest_view  # noqa: E402
from tests.support.vm import REFERENCE_VIRTIOFSD, DaemonProcess, listening_daemon  # noqa: E402

QUEUE = 1  # the first request queue (0 is hiprio)
QUEUE_SIZE = 256
GUEST_RAM = 96 << 20
DATA_FILE = b"data.bin"
DATA_SIZE = 64 << 20
NAMES = [f"file{i:03d}".encode() for i in range(256)]
PAGE = 4096
ENTRY_OUT = 128
ATTR_OUT = 104
CLK_TCK = os.sysconf("SC_CLK_TCK")
KiB = 1024
MiB = 1 << 20
GiB = 1 << 30

WRITE_FILE = b"write.bin"
OPS = ["lookup", "getattr", "read4k", "read128k", "write4k", "write128k"]
OP_TITLES = {
    "lookup": "LOOKUP",
    "getattr": "GETATTR",
    "read4k": "READ 4K",
    "read128k": "READ 128K",
    "write4k": "WRITE 4K",
    "write128k": "WRITE 128K",
}
READ_SIZES = {"read4k": 4 * KiB, "read128k": 128 * KiB}
WRITE_SIZES = {"write4k": 4 * KiB, "write128k": 128 * KiB}
WRITE_OUT = 8
# A Linux guest's INIT flags, roughly (no DAX, no writeback cache).
INIT_FLAGS = (
    fc.ASYNC_READ
    | fc.POSIX_LOCKS
    | fc.ATOMIC_O_TRUNC
    | fc.BIG_WRITES
    | fc.AUTO_INVAL_DATA
    | fc.DO_READDIRPLUS
    | fc.READDIRPLUS_AUTO
    | fc.PARALLEL_DIROPS
    | fc.MAX_PAGES
)


# Servers ---------------------------------------------------------------------------------------


# Where Kata puts things in nydusd's pseudo root: the sandbox's shared directory at /containers,
# each container's image at /rafs/<cid>/lowerdir (as qemu/bench.py mounts them).
KATA_SHARED = "/containers"
KATA_IMAGE = "/rafs/c1/lowerdir"


@dataclass
class Share:
    """What the servers serve: the plain tree, and (when a RAFS server runs) its image."""

    workdir: Path
    tree: Path
    empty: Path  # the passthrough at /containers next to an image
    image: Path | None = None  # OUT of `vhostfs build`: the blobs and OUT/bootstrap


MountList = list[tuple[str, dict[str, str]]]


@dataclass
class Mounts:
    at_start: MountList = field(default_factory=list)
    after_init: MountList = field(default_factory=list)


@dataclass
class Server:
    name: str
    kind: str  # "vhostfs", "vhostfs-rafs" or "virtiofsd"
    extra: list[str] = field(default_factory=list)
    tree: Path | None = None  # vhostfs: run this source tree instead of the installed one

    @property
    def is_vhostfs(self) -> bool:
        return self.kind != "virtiofsd"

    @property
    def writable(self) -> bool:
        return self.kind != "vhostfs-rafs"

    @property
    def base(self) -> list[bytes]:
        """The names the front-end LOOKUPs from the root to reach the served tree."""
        if self.kind == "vhostfs":
            return split_path(KATA_SHARED)
        if self.kind == "vhostfs-rafs":
            return split_path(KATA_IMAGE)
        return []

    def env(self) -> dict[str, str] | None:
        return None if self.tree is None else {"PYTHONPATH": str(self.tree)}

    def cache_dir(self, share: Share) -> Path:
        """The chunk cache: one per server, kept across rounds (each round still reads the
        data file once before timing, so each fresh daemon finds its chunks ready)."""
        return share.workdir / f"{self.name}.cache"

    def argv(
        self, socket_path: Path, api_path: Path, share: Share, sandbox: str | None
    ) -> list[str]:
        if self.is_vhostfs:
            return [
                sys.executable,
                *(["-P"] if self.tree is not None else []),  # PYTHONPATH before the cwd
                "-m",
                "vhostfs",
                "virtiofs",
                "--sock",
                str(socket_path),
                "--apisock",
                str(api_path),
                "--log-level",
                "info",
                *self.extra,
            ]
        argv = [
            str(REFERENCE_VIRTIOFSD),
            f"--socket-path={socket_path}",
            "-o",
            f"source={share.tree}",
            "-o",
            "cache=auto",
            *self.extra,
        ]
        if sandbox:
            argv += ["-o", f"sandbox={sandbox}"]
        return argv

    def mounts(self, share: Share) -> Mounts:
        """The (mountpoint, body) of each POST /api/v1/mount, at the moments Kata makes them:
        the sandbox's shared directory before the guest boots, a container's image once the
        guest's FUSE session is up (so INIT is negotiated without it)."""
        if self.kind == "vhostfs":
            return Mounts([(KATA_SHARED, passthrough_body(share.tree))])
        if self.kind == "vhostfs-rafs":
            assert share.image is not None
            config = {
                "device": {
                    "backend": {"type": "localfs", "config": {"dir": str(share.image)}},
                    "cache": {
                        "type": "blobcache",
                        "config": {"work_dir": str(self.cache_dir(share))},
                    },
                },
                "mode": "direct",
                "digest_validate": False,
            }
            image = {
                "fs_type": "rafs",
                "source": str(share.image / "bootstrap"),
                # The API takes the config as a JSON document inside a string, as nydusd does.
                "config": json.dumps(config),
            }
            return Mounts([(KATA_SHARED, passthrough_body(share.empty))], [(KATA_IMAGE, image)])
        return Mounts()


def split_path(path: str) -> list[bytes]:
    return [os.fsencode(name) for name in path.split("/") if name]


def passthrough_body(source: Path) -> dict[str, str]:
    return {"fs_type": "passthrough_fs", "source": str(source), "config": ""}


SERVERS = {
    "vhostfs": Server("vhostfs", "vhostfs"),
    "vhostfs-rafs": Server("vhostfs-rafs", "vhostfs-rafs"),
    "virtiofsd": Server("virtiofsd", "virtiofsd"),
    "virtiofsd-tp0": Server("virtiofsd-tp0", "virtiofsd", ["--thread-pool-size=0"]),
    "virtiofsd-tp64": Server("virtiofsd-tp64", "virtiofsd", ["--thread-pool-size=64"]),
}


def process_tree(pid: int) -> list[int]:
    """pid and its descendants (virtiofsd's namespace sandbox forks its worker)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
    return out


def cpu_seconds(pid: int) -> float:
    """utime+stime of the process tree, all threads."""
    total = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total / CLK_TCK


def peak_rss_kib(pid: int) -> int:
    """The largest VmHWM in the process tree (a forked child shares, not adds, its pages)."""
    best = 0
    for p in process_tree(pid):
        with contextlib.suppress(OSError), open(f"/proc/{p}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]))
    return best


def threads(pid: int) -> int:
    return sum(len(os.listdir(f"/proc/{p}/task")) for p in process_tree(pid))


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


# A session against one daemon -------------------------------------------------------------------


class Session:
    """A connected front-end with FUSE up, the served tree's node found and the data file
    open (and the write file, where the server can write)."""

    def __init__(
        self,
        server: Server,
        daemon: DaemonProcess,
        mem: GuestMemory,
        after_init: Callable[[], None] | None = None,
    ) -> None:
        self.daemon = daemon
        self.mem = mem
        self.fe = Frontend(daemon.socket_path, mem, queue_size=QUEUE_SIZE, num_queues=2)
        try:
            self._open(server, after_init)
        except BaseException:
            # The front-end's views into guest memory must go before the memory can be
            # unmapped; otherwise that failure would hide this one.
            if hasattr(self, "queue"):
                self.queue.close()
            self.fe.close()
            raise

    def _open(self, server: Server, after_init: Callable[[], None] | None) -> None:
        self.fe.init()
        self.fe.start()
        reply = self.request(fc.init(7, 31, 128 * KiB, INIT_FLAGS, ext=False), 16 + 64)
        check(reply, "INIT")
        if after_init is not None:
            after_init()
        # Walk the pseudo root down to the mount, as the guest does when it opens a path
        # below it; every phase then runs on names in that directory.
        self.base = fc.ROOT
        for name in server.base:
            reply = self.request(fc.lookup(self.base, name), 16 + ENTRY_OUT)
            self.base = fc.parse_entry_out(check(reply, f"LOOKUP {name.decode()}")).nodeid
        reply = self.request(fc.lookup(self.base, DATA_FILE), 16 + ENTRY_OUT)
        self.data_node = fc.parse_entry_out(check(reply, "LOOKUP data")).nodeid
        reply = self.request(fc.open_(self.data_node), 16 + 16)
        self.data_fh, _ = fc.parse_open_out(check(reply, "OPEN data"))
        self.write_node = self.write_fh = 0
        if server.writable:
            reply = self.request(fc.lookup(self.base, WRITE_FILE), 16 + ENTRY_OUT)
            self.write_node = fc.parse_entry_out(check(reply, "LOOKUP write")).nodeid
            reply = self.request(fc.open_(self.write_node, os.O_RDWR), 16 + 16)
            self.write_fh, _ = fc.parse_open_out(check(reply, "OPEN write"))
        self.queue: FastQueue = self.fe.fast_queue(QUEUE)
        if server.kind == "vhostfs-rafs":
            self.read_whole_data_file()

    def read_whole_data_file(self) -> None:
        """One untimed pass of READs over the data file: its chunks land in the chunk cache
        (the first round) and in the host page cache, so READ phases time warm hits, as the
        passthrough servers' do. One fixed chain, moved along the file: guest memory is
        bump-allocated and never freed, so a chain per READ would not fit."""
        size = 128 * KiB
        chain = self.read_chains(1, size)[0]
        offset_gpa = chain.readable[1][0] + 8  # read_in.offset
        for offset in range(0, DATA_SIZE, size):
            self.mem.write(offset_gpa, struct.pack("<Q", offset))
            self.queue.submit((chain.head,))
            self.queue.wait_all()
            length, error = self.out_header(chain)
            if error or length != 16 + size:
                raise RuntimeError(f"READ at {offset} while warming: len {length} error {error}")

    def request(self, req: bytes, reply_size: int) -> bytes:
        return self.fe.request(QUEUE, req, reply_size)

    def close(self) -> None:
        self.queue.close()
        self.fe.close()

    # Fixed chains, split as Linux's virtio-fs driver splits a request into scatterlists.

    def chain(self, req: bytes, writable: list[int], align: int = 8) -> FixedChain:
        ring = self.fe.rings[QUEUE]
        readable = [req[: fc.IN_HEADER_SIZE], req[fc.IN_HEADER_SIZE :]]
        return ring.add_fixed_chain(readable, writable, indirect=True, align=align)

    def lookup_chains(self, n: int) -> list[FixedChain]:
        return [
            self.chain(fc.lookup(self.base, NAMES[i % len(NAMES)]), [16, ENTRY_OUT])
            for i in range(n)
        ]

    def getattr_chains(self, nodes: list[int]) -> list[FixedChain]:
        return [self.chain(fc.getattr_(node), [16, ATTR_OUT]) for node in nodes]

    def read_chains(self, n: int, size: int) -> list[FixedChain]:
        req = fc.read(self.data_node, self.data_fh, 0, size)
        return [self.chain(req, [16] + [PAGE] * (size // PAGE), align=PAGE) for _ in range(n)]

    def write_chains(self, n: int, size: int) -> list[FixedChain]:
        """WRITE chains split as the driver splits them: header, write_in, then data pages."""
        req = fc.write(self.write_node, self.write_fh, 0, os.urandom(size))
        head, args = fc.IN_HEADER_SIZE, fc.IN_HEADER_SIZE + 40
        pages = [req[i : i + PAGE] for i in range(args, len(req), PAGE)]
        ring = self.fe.rings[QUEUE]
        return [
            ring.add_fixed_chain(
                [req[:head], req[head:args], *pages], [16, WRITE_OUT], indirect=True, align=PAGE
            )
            for _ in range(n)
        ]

    def out_header(self, chain: FixedChain) -> tuple[int, int]:
        """(len, error) of the reply in chain's first writable buffer."""
        gpa, _ = chain.writable[0]
        length, error, _ = struct.unpack("<IiQ", self.mem.read(gpa, 16))
        return length, error

    def entry_node(self, chain: FixedChain) -> int:
        gpa, size = chain.writable[1]
        return fc.parse_entry_out(self.mem.read(gpa, size)).nodeid


def check(reply: bytes, what: str) -> bytes:
    header = fc.parse_out_header(reply)
    if header.error:
        raise RuntimeError(f"{what} failed: {os.strerror(-header.error)}")
    return reply[fc.OUT_HEADER_SIZE :]


# Phases ----------------------------------------------------------------------------------------


@dataclass
class Workload:
    """Fixed chains plus, for READs, a patch that moves each request to the next offset."""

    chains: list[FixedChain]
    reply_len: int
    read_size: int = 0  # bytes each request moves (READ or WRITE), 0 for metadata ops
    _offset_views: list[memoryview] = field(default_factory=list)
    _next: int = 0

    def bind(self, mem: GuestMemory) -> None:
        if self.read_size:
            # read_in / write_in is the second readable buffer; its offset sits at byte 8.
            self._offset_views = [
                guest_view(mem, chain.readable[1][0] + 8, 8) for chain in self.chains
            ]

    def unbind(self) -> None:
        """Drop the views into guest memory, so that it can be unmapped."""
        for view in self._offset_views:
            view.release()
        self._offset_views = []

    def retarget(self, i: int) -> None:
        """Point chain i's READ or WRITE at the next offset of the walk through its file."""
        struct.pack_into("<Q", self._offset_views[i], 0, self._next)
        self._next = (self._next + self.read_size) % DATA_SIZE


@dataclass
class PhaseResult:
    ops: int
    seconds: float
    daemon_cpu: float
    client_cpu: float


def run_phase(
    session: Session, work: Workload, mode: str, batch: int, seconds: float
) -> PhaseResult:
    q = session.queue
    chains = work.chains
    n = len(chains)
    heads = [c.head for c in chains[:batch]]
    retarget: Callable[[int], None] | None = work.retarget if work.read_size else None
    pid = session.daemon.process.pid

    def one_round(i: int) -> int:
        """One submit-and-wait; returns requests done and the next chain index."""
        if mode == "qd1":
            if retarget is not None:
                retarget(i)
            q.submit((chains[i].head,))
            q.wait_all()
            return 1
        if retarget is not None:
            for j in range(batch):
                retarget(j)
        q.submit(heads)
        q.wait_all()
        return batch

    # Warm up (and check the replies once).
    deadline = time.perf_counter() + min(0.2, seconds / 4)
    i = 0
    while time.perf_counter() < deadline:
        one_round(i)
        i = (i + 1) % n
    for chain in chains[: batch if mode == "batch" else n]:
        length, error = session.out_header(chain)
        if error or length != work.reply_len:
            raise RuntimeError(f"bad reply: len {length} error {error}")

    ops = 0
    cpu0, self0, t0 = cpu_seconds(pid), self_cpu(), time.perf_counter()
    end = t0 + seconds
    while True:
        ops += one_round(i)
        i = (i + 1) % n
        if time.perf_counter() >= end:
            break
    t1, self1, cpu1 = time.perf_counter(), self_cpu(), cpu_seconds(pid)
    length, error = session.out_header(chains[(i - 1) % n])
    if error or length != work.reply_len:
        raise RuntimeError(f"bad reply: len {length} error {error}")
    return PhaseResult(ops, t1 - t0, cpu1 - cpu0, self1 - self0)


# Rounds ----------------------------------------------------------------------------------------


def make_share(root: Path) -> None:
    root.mkdir()
    with open(root / os.fsdecode(DATA_FILE), "wb") as f:
        # Every MiB different: `vhostfs build` stores identical chunks once, and a RAFS image of
        # one repeated block would serve every READ from a single cached chunk. Hex digits, so
        # zstd halves each chunk as it would real files: chunks stored uncompressed would be
        # served from the blob in place, and the chunk cache would go unused.
        for _ in range(DATA_SIZE // MiB):
            f.write(os.urandom(MiB // 2).hex().encode())
    for name in NAMES:
        (root / os.fsdecode(name)).write_bytes(b"x" * 100)
    (root / os.fsdecode(WRITE_FILE)).write_bytes(b"")
    # Warm the host page cache.
    with open(root / os.fsdecode(DATA_FILE), "rb") as f:
        while f.read(4 * MiB):
            pass


def build_image(tree: Path, out: Path) -> float:
    """`vhostfs build TREE -o OUT --compressor zstd`; returns the seconds it took."""
    t0 = time.monotonic()
    subprocess.run(
        [
            sys.executable,
            "-m",
            "vhostfs",
            "build",
            str(tree),
            "-o",
            str(out),
            "--compressor",
            "zstd",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.monotonic() - t0


DAEMON_CPUS: set[int] | None = None  # --pin: where daemons run (the front-end runs elsewhere)


def api_mount(
    daemon: DaemonProcess, api_path: Path, mounts: list[tuple[str, dict[str, str]]]
) -> None:
    """POST /api/v1/mount for each (mountpoint, body), as Kata fills nydusd's pseudo root.
    Before the front-end connects, as Kata mounts the shared directory before QEMU starts."""
    import httpx  # only the vhostfs servers need it

    deadline = time.monotonic() + 20
    while not api_path.exists():  # the API socket may come up just after the vhost-user one
        if not daemon.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"no API socket at {api_path}; log:\n{daemon.log()}")
        time.sleep(0.02)
    transport = httpx.HTTPTransport(uds=str(api_path))
    with httpx.Client(transport=transport, base_url="http://unix", timeout=60) as api:
        for mountpoint, body in mounts:
            reply = api.post("/api/v1/mount", params={"mountpoint": mountpoint}, json=body)
            if reply.status_code != 204:
                raise RuntimeError(
                    f"mount {mountpoint}: {reply.status_code} {reply.text}; log:\n{daemon.log()}"
                )


@contextlib.contextmanager
def started(server: Server, share: Share, sandbox: str | None) -> Iterator[Session]:
    sock = share.workdir / f"{server.name}.sock"
    api_path = share.workdir / f"{server.name}.api"
    log = share.workdir / f"{server.name}.log"
    argv = server.argv(sock, api_path, share, sandbox)
    if DAEMON_CPUS is not None:
        argv = ["taskset", "-c", ",".join(map(str, sorted(DAEMON_CPUS))), *argv]
    if server.kind == "vhostfs-rafs":
        server.cache_dir(share).mkdir(exist_ok=True)
    with (
        GuestMemory(((0x10_0000, GUEST_RAM),)) as mem,
        listening_daemon(argv, sock, log_path=log, env=server.env()) as daemon,
    ):
        try:
            if server.is_vhostfs:
                mounts = server.mounts(share)
                api_mount(daemon, api_path, mounts.at_start)
                session = Session(
                    server,
                    daemon,
                    mem,
                    after_init=lambda: api_mount(daemon, api_path, mounts.after_init),
                )
            else:
                session = Session(server, daemon, mem)
        except Exception:
            print(f"{server.name} did not come up; log:\n{daemon.log()}", file=sys.stderr)
            raise
        try:
            yield session
        finally:
            session.close()


def prepare(s: Session, batch: int, writable: bool) -> dict[str, Workload]:
    lookups = Workload(s.lookup_chains(batch), 16 + ENTRY_OUT)
    # One pass to learn the node ids of the looked-up files, for GETATTR.
    s.queue.submit([c.head for c in lookups.chains])
    s.queue.wait_all()
    nodes = [s.entry_node(c) for c in lookups.chains]
    workloads = {
        "lookup": lookups,
        "getattr": Workload(s.getattr_chains(nodes), 16 + ATTR_OUT),
        "read4k": Workload(s.read_chains(batch, 4 * KiB), 16 + 4 * KiB, 4 * KiB),
        "read128k": Workload(s.read_chains(batch, 128 * KiB), 16 + 128 * KiB, 128 * KiB),
    }
    if writable:
        workloads["write4k"] = Workload(s.write_chains(batch, 4 * KiB), 16 + WRITE_OUT, 4 * KiB)
        workloads["write128k"] = Workload(
            s.write_chains(batch, 128 * KiB), 16 + WRITE_OUT, 128 * KiB
        )
    for work in workloads.values():
        work.bind(s.mem)
    return workloads


def unbind_all(loads: dict[str, Workload]) -> None:
    for work in loads.values():
        work.unbind()


def figures_of(r: PhaseResult, work: Workload) -> dict[str, float]:
    entry = {
        "ops_per_s": r.ops / r.seconds,
        "daemon_cpu_us_per_op": 1e6 * r.daemon_cpu / r.ops,
        "client_cpu_us_per_op": 1e6 * r.client_cpu / r.ops,
    }
    if work.read_size:
        moved = r.ops * work.read_size
        entry["mb_per_s"] = moved / r.seconds / 1e6
        entry["daemon_cpu_s_per_gib"] = r.daemon_cpu / (moved / GiB)
    return entry


def run_round(
    servers: list[Server],
    ops: list[str],
    share: Share,
    sandbox: str | None,
    batch: int,
    seconds: float,
) -> dict[str, dict[str, Any]]:
    """Start every server, then run each phase on each of them in turn (A, B, C, A, B, C...).
    A server that cannot run a phase (WRITE on a RAFS image) has no entry for it."""
    out: dict[str, dict[str, Any]] = {server.name: {} for server in servers}
    with contextlib.ExitStack() as stack:
        sessions: dict[str, Session] = {}
        loads: dict[str, dict[str, Workload]] = {}
        for server in servers:
            sessions[server.name] = s = stack.enter_context(started(server, share, sandbox))
            loads[server.name] = prepare(s, batch, server.writable)
            stack.callback(unbind_all, loads[server.name])
        for op in ops:
            for mode in ("qd1", "batch"):
                for server in servers:
                    s, work = sessions[server.name], loads[server.name].get(op)
                    if work is None:
                        continue
                    try:
                        r = run_phase(s, work, mode, batch, seconds)
                    except Exception:
                        print(f"{server.name} {op}/{mode} failed; log:\n{s.daemon.log()}")
                        raise
                    out[server.name][f"{op}/{mode}"] = figures_of(r, work)
        for server in servers:
            s = sessions[server.name]
            pid = s.daemon.process.pid
            out[server.name]["threads"] = threads(pid)
            out[server.name]["peak_rss_kib"] = peak_rss_kib(pid)
            out[server.name]["stalls"] = s.queue.stalls
    return out


def pick_sandbox(share: Share) -> str | None:
    """virtiofsd's default namespace sandbox, or chroot where namespaces are not allowed."""
    for sandbox in (None, "chroot"):
        try:
            with started(SERVERS["virtiofsd"], share, sandbox) as s:
                s.request(fc.getattr_(fc.ROOT), 16 + ATTR_OUT)
            return sandbox
        except Exception as exc:
            print(f"virtiofsd with sandbox={sandbox or 'namespace'} failed: {exc}", file=sys.stderr)
    raise SystemExit("virtiofsd does not start here")


# Report ----------------------------------------------------------------------------------------


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt(value: float) -> str:
    if value >= 100_000:
        return f"{value / 1000:.0f}k"
    if value >= 10_000:
        return f"{value / 1000:.1f}k"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def cell(s: dict[str, float]) -> str:
    return f"{fmt(s['median'])} [{fmt(s['min'])}-{fmt(s['max'])}]"


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n{title}")
    line = "  ".join(
        h.ljust(w) if i == 0 else h.rjust(w)
        for i, (h, w) in enumerate(zip(header, widths, strict=True))
    )
    print(line)
    print("-" * len(line))
    for r in rows:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(r, widths, strict=True))
            )
        )


def comparisons(servers: list[Server]) -> tuple[str, list[str]]:
    """(reference, compared): every vhostfs server against the first virtiofsd listed; with no
    virtiofsd, against the last server (e.g. `--servers vhostfs,before`)."""
    refs = [s.name for s in servers if not s.is_vhostfs]
    ref = refs[0] if refs else servers[-1].name
    return ref, [s.name for s in servers if s.is_vhostfs and s.name != ref]


def report(
    results: dict[str, list[dict[str, Any]]], servers: list[Server], ops: list[str]
) -> dict[str, Any]:
    names = [s.name for s in servers]
    figures: dict[str, Any] = {}
    for name in names:
        rounds = results[name]
        fig: dict[str, Any] = {}
        for key in rounds[0]:
            if isinstance(rounds[0][key], dict):
                fig[key] = {m: summary([r[key][m] for r in rounds]) for m in rounds[0][key]}
        fig["peak_rss_kib"] = summary([r["peak_rss_kib"] for r in rounds])
        fig["threads"] = max(r["threads"] for r in rounds)
        fig["stalls"] = sum(r["stalls"] for r in rounds)
        figures[name] = fig

    ref, compared = comparisons(servers)
    ratio_heads = [f"{name}/{ref}" for name in compared]
    skipped = "skipped"  # a RAFS image takes no WRITEs

    def shown(name: str, key: str, metric: str) -> str:
        entry = figures[name].get(key)
        return cell(entry[metric]) if entry else skipped

    def ratio(key: str, metric: str, name: str) -> str:
        if key not in figures[name] or key not in figures[ref]:
            return "-"
        a = figures[name][key][metric]["median"]
        b = figures[ref][key][metric]["median"]
        return f"{a / b:.2f}x"

    for title, metric, phases in (
        ("ops/s (median [min-max]); ratio > 1 means vhostfs is faster", "ops_per_s", ops),
        ("READ MB/s (median [min-max])", "mb_per_s", [op for op in ops if op in READ_SIZES]),
        ("WRITE MB/s (median [min-max])", "mb_per_s", [op for op in ops if op in WRITE_SIZES]),
    ):
        rows = []
        for op in phases:
            for mode in ("qd1", "batch"):
                key = f"{op}/{mode}"
                rows.append(
                    [f"{OP_TITLES[op]} {mode}"]
                    + [shown(n, key, metric) for n in names]
                    + [ratio(key, metric, n) for n in compared]
                )
        if rows:
            print_table(title, ["op", *names, *ratio_heads], rows)

    def rss(name: str) -> float:
        return float(figures[name]["peak_rss_kib"]["median"])

    rows = []
    for mode in ("qd1", "batch") if "read128k" in ops else ():
        key = f"read128k/{mode}"
        rows.append(
            [f"READ 128K {mode}: daemon CPU s/GiB"]
            + [shown(n, key, "daemon_cpu_s_per_gib") for n in names]
            + [ratio(key, "daemon_cpu_s_per_gib", n) for n in compared]
        )
    rows.append(
        ["peak RSS MiB (VmHWM)"]
        + [cell({k: v / 1024 for k, v in figures[n]["peak_rss_kib"].items()}) for n in names]
        + [f"{rss(n) / rss(ref):.2f}x" for n in compared]
    )
    rows.append(["threads"] + [str(figures[n]["threads"]) for n in names] + [""] * len(compared))
    rows.append(
        ["waits without interrupt (1 s each)"]
        + [str(figures[n]["stalls"]) for n in names]
        + [""] * len(compared)
    )
    print_table("Resources (ratio < 1 means vhostfs uses less)", ["", *names, *ratio_heads], rows)

    def us(name: str, key: str, metric: str) -> str:
        entry = figures[name].get(key)
        return fmt(entry[metric]["median"]) if entry else skipped

    rows = []
    for op in ops:
        for mode in ("qd1", "batch"):
            key = f"{op}/{mode}"
            rows.append(
                [f"{OP_TITLES[op]} {mode}"]
                + [us(n, key, "daemon_cpu_us_per_op") for n in names]
                + [us(n, key, "client_cpu_us_per_op") for n in names]
            )
    print_table(
        "CPU microseconds per request (median): daemon, then the benchmark front-end itself",
        ["op", *[f"daemon {n}" for n in names], *[f"client {n}" for n in names]],
        rows,
    )
    return figures


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="short phases (about 40 s in all)")
    ap.add_argument("--rounds", type=int, help="rounds (default 5, quick 3)")
    ap.add_argument(
        "--seconds", type=float, help="length of each measured phase (default 0.7, quick 0.2)"
    )
    ap.add_argument(
        "--batch", type=int, default=32, help="chains per kick in batch mode (default 32)"
    )
    ap.add_argument(
        "--servers",
        default="vhostfs,vhostfs-rafs,virtiofsd,virtiofsd-tp0",
        help="comma-separated; every vhostfs server is compared with the first virtiofsd one; "
        f"from {', '.join(SERVERS)}",
    )
    ap.add_argument(
        "--tree",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="also run vhostfs from the source tree at PATH as servers NAME (passthrough) and "
        "NAME-rafs (the image), e.g. a checkout before a change; list them in --servers",
    )
    ap.add_argument(
        "--pin",
        action="store_true",
        help="run the front-end on the first CPU and the daemons on the others (no effect "
        "with one CPU; cross-CPU wake-ups then cost every QD1 round trip)",
    )
    ap.add_argument(
        "--ops",
        default=",".join(OPS),
        help=f"comma-separated phases to run, from {', '.join(OPS)} (default: all)",
    )
    ap.add_argument("--json", type=Path, help="write the figures here")
    args = ap.parse_args()
    seconds = args.seconds or (0.2 if args.quick else 0.7)
    args.rounds = args.rounds or (3 if args.quick else 5)
    for spec in args.tree:
        name, _, path = spec.partition("=")
        if not name or not path or not (Path(path) / "vhostfs").is_dir():
            ap.error(f"--tree {spec}: want NAME=PATH with PATH/vhostfs")
        SERVERS[name] = Server(name, "vhostfs", tree=Path(path).resolve())
        SERVERS[f"{name}-rafs"] = Server(f"{name}-rafs", "vhostfs-rafs", tree=Path(path).resolve())
    names = args.servers.split(",")
    ops = args.ops.split(",")
    for op in ops:
        if op not in OPS:
            ap.error(f"unknown phase {op}")
    for name in names:
        if name not in SERVERS:
            ap.error(f"unknown server {name}")
    if not REFERENCE_VIRTIOFSD.exists() and any(SERVERS[n].kind == "virtiofsd" for n in names):
        ap.error(f"{REFERENCE_VIRTIOFSD} not found (apt-get install qemu-system-common)")
    if not 1 <= args.batch <= QUEUE_SIZE:
        ap.error(f"--batch must be 1..{QUEUE_SIZE}")

    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) > 1:
        global DAEMON_CPUS
        DAEMON_CPUS = set(cpus[1:])
        os.sched_setaffinity(0, {cpus[0]})
    started_at = time.monotonic()
    results: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    servers = [SERVERS[n] for n in names]
    with tempfile.TemporaryDirectory(prefix="vhostfs-bench-") as tmp:
        workdir = Path(tmp)
        share = Share(workdir, workdir / "share", workdir / "empty")
        make_share(share.tree)
        share.empty.mkdir()
        if any(s.kind == "vhostfs-rafs" for s in servers):
            share.image = workdir / "image"
            took = build_image(share.tree, share.image)
            print(f"RAFS image (zstd) built in {took:.1f} s", flush=True)
        needs_sandbox = any(not s.is_vhostfs for s in servers)
        sandbox = pick_sandbox(share) if needs_sandbox else None
        print(
            f"{args.rounds} rounds x {len(names)} servers, {seconds:g} s per phase, "
            f"batch {args.batch}, queue size {QUEUE_SIZE}"
            + (f", virtiofsd sandbox {sandbox or 'namespace'}" if needs_sandbox else "")
            + f"; {os.cpu_count()} CPUs",
            flush=True,
        )
        for rnd in range(args.rounds):
            t = time.monotonic()
            got = run_round(servers, ops, share, sandbox, args.batch, seconds)
            for name in names:
                results[name].append(got[name])
                print(
                    f"round {rnd + 1} {name}: "
                    + ", ".join(
                        f"{k} {fmt(v['ops_per_s'])}/s"
                        for k, v in got[name].items()
                        if isinstance(v, dict)
                    ),
                    flush=True,
                )
            print(f"round {rnd + 1}: {time.monotonic() - t:.1f} s", flush=True)
    figures = report(results, servers, ops)
    elapsed = time.monotonic() - started_at
    print(f"\nqd1 = one request in flight; batch = {args.batch} chains per kick. {elapsed:.0f} s.")
    if args.json:
        placeholders = Share(Path("W"), Path("D"), Path("E"), Path("IMG"))
        doc = {
            "config": {
                "rounds": args.rounds,
                "seconds_per_phase": seconds,
                "batch": args.batch,
                "ops": ops,
                "queue_size": QUEUE_SIZE,
                # S: vhost-user socket, A: API socket, D: the tree, E: an empty directory,
                # IMG: the image's directory, W: the work directory (chunk caches).
                "servers": {
                    s.name: s.argv(Path("S"), Path("A"), placeholders, sandbox) for s in servers
                },
                "mounts": {
                    s.name: dataclasses.asdict(s.mounts(placeholders))
                    for s in servers
                    if s.is_vhostfs
                },
                "ratios_against": comparisons(servers)[0],
                "cpus": os.cpu_count(),
                "kernel": platform.release(),
                "python": platform.python_version(),
            },
            "summary": figures,
            "rounds": results,
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
