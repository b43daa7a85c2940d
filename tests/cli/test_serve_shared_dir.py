"""`vhostfs serve --shared-dir`: read-write by default, --readonly as before, over the real
vhost-user socket with the test front-end playing the guest driver."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import resource
import shutil
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.frontend import Frontend, fuse_session
from tests.support.guest import GuestMemory
from tests.support.vm import DaemonProcess, listening_daemon
from vhostfs.fuse.abi import SetattrValid as V

QUEUE = 1
ENTRY_AND_OPEN = 16 + 128 + 16


def _errno(reply: bytes) -> int:
    return -fc.parse_out_header(reply).error


@contextlib.contextmanager
def _serving(tmp_path: Path, *flags: str) -> Iterator[tuple[DaemonProcess, Frontend]]:
    """serve --shared-dir TMP/share FLAGS, a front-end connected and FUSE up; the daemon must
    exit 0 once the front-end leaves."""
    share = tmp_path / "share"
    share.mkdir(exist_ok=True)
    sock = tmp_path / "s.sock"
    argv = [sys.executable, "-m", "vhostfs", "serve", "--socket", str(sock)]
    argv += ["--shared-dir", str(share), *flags]
    with fuse_session(argv, sock, tmp_path / "log") as session:
        yield session


def _session(tmp_path: Path, *flags: str) -> tuple[int, int, int]:
    """Create, write and mkdir once; returns the three errnos."""
    with _serving(tmp_path, *flags) as (_, frontend):
        created = frontend.request(QUEUE, fc.create(fc.ROOT, b"f", os.O_RDWR), ENTRY_AND_OPEN)
        write_err = errno.EBADF
        if _errno(created) == 0:
            node = fc.parse_entry_out(created[16:]).nodeid
            fh = fc.parse_open_out(created, 16 + 128)[0]
            write_err = _errno(frontend.request(QUEUE, fc.write(node, fh, 0, b"hi"), 24))
        made = frontend.request(QUEUE, fc.mkdir(fc.ROOT, b"d"), 16 + 128)
    return _errno(created), write_err, _errno(made)


def test_read_write_by_default(tmp_path: Path) -> None:
    assert _session(tmp_path) == (0, 0, 0)
    assert (tmp_path / "share" / "f").read_bytes() == b"hi"
    assert (tmp_path / "share" / "d").is_dir()


@pytest.mark.parametrize("flag", ["--readonly"])
def test_readonly_refuses_every_change(tmp_path: Path, flag: str) -> None:
    assert _session(tmp_path, flag) == (errno.EROFS, errno.EBADF, errno.EROFS)
    assert list((tmp_path / "share").iterdir()) == []


def test_virtiofsd_and_nydusd_style_flags_are_taken(tmp_path: Path) -> None:
    flags = ("--writeback", "--no-xattr", "--allow-devices", "--thread-pool-size=1")
    assert _session(tmp_path, *flags, "--rlimit-nofile", "4096") == (0, 0, 0)


def test_the_open_file_limit_is_raised_at_start(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    sock = tmp_path / "s.sock"
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # Start it with a low soft limit, so that only raising it can give the figure below.
    argv = ["prlimit", f"--nofile=256:{hard}", sys.executable, "-m", "vhostfs", "serve"]
    argv += ["--socket", str(sock), "--shared-dir", str(share), "--rlimit-nofile", "54321"]
    with listening_daemon(argv, sock, log_path=tmp_path / "log") as daemon:
        limits = Path(f"/proc/{daemon.process.pid}/limits").read_text()
    line = next(line for line in limits.splitlines() if line.startswith("Max open files"))
    # Where even root may not raise the hard limit (a container), the hard limit is the most.
    assert int(line.split()[3]) in (54321, min(54321, hard)), line


def test_directories_are_read_without_handles(tmp_path: Path) -> None:
    """OPENDIR is ENOSYS (the kernel then sends neither it nor RELEASEDIR again), READDIR comes
    with fh 0, and the exit log counts the requests by opcode."""
    share = tmp_path / "share"
    (share / "sub").mkdir(parents=True)
    sock = tmp_path / "s.sock"
    argv = [sys.executable, "-m", "vhostfs", "serve", "--socket", str(sock)]
    argv += ["--shared-dir", str(share)]
    with listening_daemon(argv, sock, log_path=tmp_path / "log") as daemon:
        with GuestMemory(((0x10_0000, 8 << 20),)) as mem:
            frontend = Frontend(sock, mem)
            try:
                frontend.init()
                frontend.start()
                init = fc.parse_init_out(frontend.request(QUEUE, fc.init(), 16 + 64)[16:])
                assert init.flags & fc.NO_OPENDIR_SUPPORT
                assert _errno(frontend.request(QUEUE, fc.opendir(fc.ROOT), 16 + 16)) == errno.ENOSYS
                listing = frontend.request(QUEUE, fc.readdir(fc.ROOT, 0), 16 + 4096)
                assert sorted(d.name for d in fc.parse_dirents(listing[16:])) == [
                    b".",
                    b"..",
                    b"sub",
                ]
            finally:
                frontend.close()
        assert daemon.process.wait(10) == 0, daemon.log()
        line = next(line for line in daemon.log().splitlines() if " requests {" in line)
    counts = json.loads(line.split(" requests ", 1)[1])
    assert counts["fops"] == {"INIT": 1, "OPENDIR": 1, "READDIR": 1}
    assert counts["errors"] == {"OPENDIR": 1}


def test_reads_the_ring_answers_see_the_file_as_it_is_and_end_with_the_handle(
    tmp_path: Path,
) -> None:
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "f").write_bytes(b"A" * 8192)
    with _serving(tmp_path) as (daemon, frontend):
        node = fc.parse_entry_out(frontend.request(QUEUE, fc.lookup(fc.ROOT, b"f"), 144)[16:])
        fh = fc.parse_open_out(frontend.request(QUEUE, fc.open_(node.nodeid), 32)[16:])[0]

        def read() -> bytes:
            return frontend.request(QUEUE, fc.read(node.nodeid, fh, 0, 4096), 16 + 4096)

        assert read()[16:] == b"A" * 4096  # Python serves it and offers the window
        (tmp_path / "share" / "f").write_bytes(b"B" * 8192)  # same inode, new bytes
        assert read()[16:] == b"B" * 4096  # the ring reads the fd, never a copy
        assert _errno(frontend.request(QUEUE, fc.release(node.nodeid, fh), 16)) == 0
        assert _errno(read()) == errno.EBADF  # the handle's window went with it
    counts = [line for line in daemon.log().splitlines() if " requests {" in line]
    assert counts, daemon.log()
    requests = json.loads(counts[-1].split(" requests ", 1)[1])
    assert requests["fops"]["READ"] == 3 and requests["ring_reads"] == 1


# Kata appends "extra arguments" (virtio_fs_extra_args, an annotation away from the pod's
# author) to its own; they must not change what is exported or how (GHSA-rr59-xxvx-96qr).
KATA_VIRTIOFSD_ARGS = ("--cache=auto", "--thread-pool-size=1", "--announce-submounts")


@pytest.mark.parametrize(
    ("extra", "complaint"),
    [
        (["-o", "source=/", "--sandbox=none", "--no-announce-submounts"], "No such option"),
        (["--shared-dir", "/"], "given 2 times"),
        (["--shared-dir=/"], "given 2 times"),
        (["--socket", "/tmp/other.sock"], "given 2 times"),
        (["--readonly", "--shared-dir", "/"], "given 2 times"),
        (["--sandbox", "namespace", "--sandbox=none"], "given 2 times"),
        (["--sandbox", "namespace", "--seccomp", "kill", "--seccomp=none"], "given 2 times"),
    ],
)
def test_extra_arguments_cannot_override_the_share(
    tmp_path: Path, extra: list[str], complaint: str
) -> None:
    share = tmp_path / "share"
    share.mkdir()
    sock = tmp_path / "s.sock"
    argv = [sys.executable, "-m", "vhostfs", "serve", "--socket", str(sock)]
    argv += ["--shared-dir", str(share), *KATA_VIRTIOFSD_ARGS, *extra]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert complaint in result.stderr and "Traceback" not in result.stderr
    assert not sock.exists() and not os.path.exists("/tmp/other.sock")


def test_a_lookup_flood_gets_enfile_and_the_daemon_serves_on(tmp_path: Path) -> None:
    """Attack 39 against the real daemon: with 256 descriptors, the guest may hold 128; past
    that its lookups get ENFILE, never the daemon's own EMFILE, and it keeps serving."""
    share = tmp_path / "share"
    share.mkdir()
    for i in range(200):
        (share / f"f{i}").write_bytes(b"x")
    sock = tmp_path / "s.sock"
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    argv = ["prlimit", f"--nofile=256:{hard}", sys.executable, "-m", "vhostfs", "serve"]
    argv += ["--socket", str(sock), "--shared-dir", str(share), "--rlimit-nofile", "0"]
    with fuse_session(argv, sock, tmp_path / "log") as (_, frontend):
        looked_up = [
            frontend.request(QUEUE, fc.lookup(fc.ROOT, b"f%d" % i), 16 + 128) for i in range(200)
        ]
        errors = [_errno(reply) for reply in looked_up]
        assert errors == [0] * 128 + [errno.ENFILE] * 72
        assert _errno(frontend.request(QUEUE, fc.getattr_(fc.ROOT), 16 + 104)) == 0
        first = fc.parse_entry_out(looked_up[0][16:]).nodeid
        frontend.request(QUEUE, fc.forget(first, 1), 0)
        again = frontend.request(QUEUE, fc.lookup(fc.ROOT, b"f199"), 16 + 128)
        assert _errno(again) == 0


DAEMON_UID = 1234  # an unprivileged user, no entry in /etc/passwd needed


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a daemon as another user needs root")
def test_an_unprivileged_daemon_degrades_as_documented(tmp_path: Path) -> None:
    """Attack 50, without an id map: the daemon runs as an ordinary user. New files are its
    own (it cannot create as the guest's caller), chown to anyone else and device nodes are
    EPERM, nothing crashes, and an xattr map gives overlayfs its trusted.* names anyway."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="vhostfs-unprivileged-"))
    try:
        base.chmod(0o755)
        share, run = base / "share", base / "run"
        for directory in (share, run):
            directory.mkdir()
            os.chown(directory, DAEMON_UID, DAEMON_UID)
        sock = run / "s.sock"
        argv = ["setpriv", f"--reuid={DAEMON_UID}", f"--regid={DAEMON_UID}", "--clear-groups"]
        argv += [sys.executable, "-m", "vhostfs", "serve", "--socket", str(sock)]
        argv += ["--shared-dir", str(share), "--xattrmap", ":map:trusted.:user.virtiofs.:"]
        argv += ["--allow-devices"]  # devices allowed: the host itself refuses a non-root mknod
        with fuse_session(argv, sock, tmp_path / "log") as (_, frontend):

            def ask(raw: bytes, room: int = 256) -> bytes:
                return frontend.request(QUEUE, raw, 16 + room)

            created = ask(fc.create(fc.ROOT, b"f", os.O_RDWR, uid=1000, gid=1000))
            assert _errno(created) == 0
            node = fc.parse_entry_out(created[16:]).nodeid
            assert _errno(ask(fc.setattr_(node, V.UID, uid=0))) == errno.EPERM
            assert _errno(ask(fc.setattr_(node, V.GID, gid=0))) == errno.EPERM
            assert _errno(ask(fc.setattr_(node, V.UID, uid=DAEMON_UID))) == 0
            char = stat.S_IFCHR | 0o600
            null = fc.mknod(fc.ROOT, b"null", char, os.makedev(1, 3))
            assert _errno(ask(null)) == errno.EPERM
            assert _errno(ask(fc.mknod(fc.ROOT, b"fifo", stat.S_IFIFO | 0o600))) == 0
            opaque = fc.setxattr(node, b"trusted.overlay.opaque", b"y", setxattr_flags=0)
            assert _errno(ask(opaque)) == 0
        st = os.stat(share / "f")
        assert (st.st_uid, st.st_gid) == (DAEMON_UID, DAEMON_UID)
        assert stat.S_ISFIFO(os.stat(share / "fifo").st_mode)
        assert not (share / "null").exists()
        assert os.getxattr(share / "f", "user.virtiofs.trusted.overlay.opaque") == b"y"
    finally:
        shutil.rmtree(base)


# --sandbox namespace (reference §2.H: tests 46, 47 and 49). The daemon confines itself before
# serving; the front-end still sees the share as before, and the host sees the daemon from
# outside through /proc/<pid>.

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")
SANDBOX = ("--sandbox", "namespace")
# CHOWN DAC_OVERRIDE FOWNER FSETID SETGID SETUID MKNOD SETFCAP, and SYS_ADMIN (xattrs on).
SANDBOX_CAPS = sum(1 << n for n in (0, 1, 3, 4, 6, 7, 27, 31, 21))


def _status(pid: int) -> dict[str, str]:
    text = Path(f"/proc/{pid}/status").read_text()
    return {k: v.strip() for k, v in (line.split(":", 1) for line in text.splitlines())}


def _lookup(frontend: Frontend, parent: int, name: bytes) -> int:
    reply = frontend.request(QUEUE, fc.lookup(parent, name), 16 + 128)
    assert _errno(reply) == 0, name
    node: int = fc.parse_entry_out(reply[16:]).nodeid
    return node


def _read_file(frontend: Frontend, node: int) -> bytes:
    opened = frontend.request(QUEUE, fc.open_(node), 16 + 16)
    assert _errno(opened) == 0
    fh = fc.parse_open_out(opened[16:])[0]
    data = frontend.request(QUEUE, fc.read(node, fh, 0, 4096), 16 + 4096)[16:]
    frontend.request(QUEUE, fc.release(node, fh), 16)
    return data


@needs_root
def test_a_sandboxed_daemon_serves_the_share_and_sees_nothing_else(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    (share / "old").write_bytes(b"old data")
    with _serving(tmp_path, *SANDBOX) as (daemon, frontend):
        created = frontend.request(QUEUE, fc.create(fc.ROOT, b"new", os.O_RDWR), ENTRY_AND_OPEN)
        assert _errno(created) == 0
        node = fc.parse_entry_out(created[16:]).nodeid
        fh = fc.parse_open_out(created, 16 + 128)[0]
        assert _errno(frontend.request(QUEUE, fc.write(node, fh, 0, b"hello"), 24)) == 0
        read = frontend.request(QUEUE, fc.read(node, fh, 0, 4096), 16 + 4096)
        assert read[16:] == b"hello"
        # The session has SETXATTR_EXT: the 16-byte setxattr_in.
        set_k = fc.setxattr(node, b"user.k", b"v", setxattr_flags=0)
        assert _errno(frontend.request(QUEUE, set_k, 16)) == 0
        got = frontend.request(QUEUE, fc.getxattr(node, b"user.k", 64), 16 + 64)
        assert _errno(got) == 0 and got[16:] == b"v"
        assert _read_file(frontend, _lookup(frontend, fc.ROOT, b"old")) == b"old data"
        # A big write and an fsync run on the worker threads, started inside the sandbox.
        big = frontend.request(QUEUE, fc.write(node, fh, 4096, b"B" * (256 << 10)), 24)
        assert _errno(big) == 0
        assert _errno(frontend.request(QUEUE, fc.fsync(node, fh), 16)) == 0

        pid = daemon.process.pid
        status = _status(pid)
        mountinfo = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        root = sorted(os.listdir(f"/proc/{pid}/root"))
        cwd = os.listdir(f"/proc/{pid}/cwd")
    assert status["NoNewPrivs"] == "1" and status["Seccomp"] == "2"
    assert int(status["Threads"]) > 1  # the workers were started (clone) under the filter
    assert int(status["CapEff"], 16) == SANDBOX_CAPS
    assert int(status["CapPrm"], 16) == SANDBOX_CAPS
    assert int(status["CapBnd"], 16) == SANDBOX_CAPS
    # Only the share, as "/": no /proc, /sys, /dev or host root in its mount namespace.
    assert [line.split()[4] for line in mountinfo] == ["/"], mountinfo
    assert str(share).endswith(mountinfo[0].split()[3])
    assert root == ["new", "old"]
    assert cwd and all(name.isdigit() for name in cwd)  # its own fd directory
    assert (share / "new").read_bytes() == b"hello".ljust(4096, b"\0") + b"B" * (256 << 10)
    assert os.getxattr(share / "new", "user.k") == b"v"
    assert not (tmp_path / "s.sock").exists()  # removed at exit, from inside the sandbox


@needs_root
def test_without_xattrs_the_sandbox_keeps_no_sys_admin(tmp_path: Path) -> None:
    with _serving(tmp_path, *SANDBOX, "--no-xattr", "--seccomp", "log") as (daemon, _):
        status = _status(daemon.process.pid)
    assert int(status["CapEff"], 16) == SANDBOX_CAPS & ~(1 << 21)
    assert status["Seccomp"] == "2"


def _plant_the_interpreter(share: Path) -> list[Path]:
    """What a root guest writes at the daemon's own module paths, which are its paths too
    once the share is "/": modules that leave a marker when run, and FIFOs where the source
    of every vhostfs frame and traceback.py would be read. Returns the markers to look for."""
    import traceback

    stdlib = Path(traceback.__file__).parent
    modules = {
        "json": stdlib / "json" / "__init__.py",
        "idna": stdlib / "encodings" / "idna.py",
        "cp1252": stdlib / "encodings" / "cp1252.py",
        "linecache": stdlib / "linecache.py",
        "xml": stdlib / "xml" / "__init__.py",
        "asyncio": stdlib / "asyncio" / "__init__.py",
    }
    for name, path in modules.items():
        planted = share / str(path).lstrip("/")
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.write_text(f"open('/MARKER-{name}', 'w').write('ran')\n")
    vhostfs_dir = Path(__file__).resolve().parents[2] / "vhostfs"
    for source in [stdlib / "traceback.py", *vhostfs_dir.rglob("*.py")]:
        fifo = share / str(source).lstrip("/")
        fifo.parent.mkdir(parents=True, exist_ok=True)
        os.mkfifo(fifo)
    return [share / f"MARKER-{name}" for name in modules]


# FORGET, INTERRUPT and BATCH_FORGET get no reply; INIT and DESTROY would end the session.
_NO_REPLY_OR_SESSION = {fc.FORGET, fc.INIT, fc.INTERRUPT, fc.DESTROY, fc.BATCH_FORGET}


@needs_root
def test_a_sandboxed_daemon_imports_nothing_from_the_share(tmp_path: Path) -> None:
    import random

    share = tmp_path / "share"
    share.mkdir()
    markers = _plant_the_interpreter(share)
    rnd = random.Random(47)
    with _serving(tmp_path, *SANDBOX) as (_, frontend):
        bad = [
            fc.request(99, fc.ROOT),  # unknown opcodes
            fc.request(4000, fc.ROOT, b"x" * 64),
            fc.lookup(fc.ROOT, b"x", length=20),  # header length shorter than the header
            fc.lookup(fc.ROOT, b"x", length=4096),  # longer than the chain
            fc.request(fc.GETXATTR, fc.ROOT, b"\xff" * 3),  # truncated arguments
            fc.request(fc.SETXATTR, fc.ROOT, struct.pack("<II", 1 << 30, 0) + b"n\0"),
            fc.getattr_(123456789),  # a node that does not exist
            fc.read(fc.ROOT, 987654, 0, 4096),  # a handle that does not exist
            fc.getxattr(fc.ROOT, b"nosuch.namespace", 64),
            fc.mkdir(fc.ROOT, b"a/b"),
            fc.lookup(fc.ROOT, b".."),
        ]
        for _ in range(300):
            body = bytes(rnd.randrange(256) for _ in range(rnd.choice((0, 8, 24, 40, 64))))
            opcode = rnd.choice(sorted(set(range(1, 60)) - _NO_REPLY_OR_SESSION))
            bad.append(fc.request(opcode, rnd.choice((1, 2, 3, 2**64 - 1)), body))
        for request in bad:
            frontend.request(QUEUE, request, 16 + 256)  # an errno, or nothing written
        made = frontend.request(QUEUE, fc.mkdir(fc.ROOT, b"still-serving"), 16 + 128)
        assert _errno(made) == 0
    assert (share / "still-serving").is_dir()
    assert [marker for marker in markers if marker.exists()] == []


def _mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True, capture_output=True)


@needs_root
def test_host_mounts_made_after_start_reach_the_sandbox(tmp_path: Path) -> None:
    """As Kata shares volumes: the share is a shared mount on the host, and volumes are bound
    under it after the daemon started, a read-only one through a private ro bind first (a
    remount to ro would not propagate)."""
    share = tmp_path / "share"
    for name in ("share", "vol-src", "ro-src", "ro-private"):
        (tmp_path / name).mkdir()
    (share / "top").write_bytes(b"top")
    (tmp_path / "vol-src" / "a").write_bytes(b"rw volume")
    (tmp_path / "ro-src" / "b").write_bytes(b"ro volume")
    mounted: list[Path] = []
    try:
        _mount("--bind", str(share), str(share))
        mounted.append(share)
        _mount("--make-shared", str(share))
        with _serving(tmp_path, *SANDBOX) as (daemon, frontend):
            (share / "vol").mkdir()
            (share / "ro").mkdir()
            _mount("--bind", str(tmp_path / "vol-src"), str(share / "vol"))
            mounted.append(share / "vol")
            private = tmp_path / "ro-private"
            _mount("--bind", str(tmp_path / "ro-src"), str(private))
            mounted.append(private)
            _mount("--make-private", str(private))
            _mount("-o", "remount,bind,ro", str(private))
            _mount("--bind", str(private), str(share / "ro"))
            mounted.append(share / "ro")

            vol = _lookup(frontend, fc.ROOT, b"vol")
            ro = _lookup(frontend, fc.ROOT, b"ro")
            a = _lookup(frontend, vol, b"a")
            assert _read_file(frontend, a) == b"rw volume"
            assert _read_file(frontend, _lookup(frontend, ro, b"b")) == b"ro volume"
            made = frontend.request(QUEUE, fc.create(ro, b"new", os.O_RDWR), ENTRY_AND_OPEN)
            assert _errno(made) == errno.EROFS
            made = frontend.request(QUEUE, fc.create(vol, b"new", os.O_RDWR), ENTRY_AND_OPEN)
            assert _errno(made) == 0
            moved = frontend.request(QUEUE, fc.rename(fc.ROOT, b"top", vol, b"top"), 16)
            assert _errno(moved) == errno.EXDEV
            linked = frontend.request(QUEUE, fc.link(a, fc.ROOT, b"a-link"), 16 + 128)
            assert _errno(linked) == errno.EXDEV
            mountpoints = {
                line.split()[4]
                for line in Path(f"/proc/{daemon.process.pid}/mountinfo").read_text().splitlines()
            }
        assert mountpoints == {"/", "/vol", "/ro"}
        assert (tmp_path / "vol-src" / "new").exists()
        assert (share / "top").exists()
    finally:
        for path in reversed(mounted):
            subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@pytest.mark.parametrize(
    "flags",
    [
        ("--bootstrap", "IMAGE", "--sandbox", "namespace"),
        ("--image", "localhost:5000/app:nydus", "--sandbox", "namespace"),
        ("--shared-dir", "SHARE", "--seccomp", "log"),
        ("--shared-dir", "SHARE", "--sandbox", "none", "--seccomp", "kill"),
    ],
)
def test_sandbox_flags_that_cannot_work_are_usage_errors(
    tmp_path: Path, flags: tuple[str, ...]
) -> None:
    (tmp_path / "share").mkdir()
    (tmp_path / "image").write_bytes(b"")
    args = [
        {"IMAGE": str(tmp_path / "image"), "SHARE": str(tmp_path / "share")}.get(f, f)
        for f in flags
    ]
    argv = [sys.executable, "-m", "vhostfs", "serve", "--socket", str(tmp_path / "s.sock")]
    done = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert "--sandbox namespace" in done.stderr
    assert not (tmp_path / "s.sock").exists()


# The checks come before anything is changed, so a child that only pretends (os.geteuid,
# os.uname patched) is refused exactly as a real non-root or non-x86_64 daemon would be.
_PRETEND = """
import os, sys
from vhostfs.cli import main
if sys.argv[1] == "not-root":
    os.geteuid = lambda: 1000
else:
    os.uname = lambda: os.uname_result(("Linux", "h", "6", "#1", "aarch64"))
sys.argv[1:2] = []
main(prog_name="vhostfs")
"""


@pytest.mark.parametrize(
    ("pretend", "message"),
    [
        ("not-root", "--sandbox namespace needs root"),
        ("aarch64", "--sandbox namespace needs x86_64 (its seccomp filter), not aarch64"),
    ],
)
def test_a_sandbox_that_cannot_be_entered_fails_in_one_line(
    tmp_path: Path, pretend: str, message: str
) -> None:
    (tmp_path / "share").mkdir()
    argv = [sys.executable, "-c", _PRETEND, pretend, "serve", "--socket", str(tmp_path / "s.sock")]
    argv += ["--shared-dir", str(tmp_path / "share"), *SANDBOX]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and message in errors[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "s.sock").exists()  # listened, refused, removed
