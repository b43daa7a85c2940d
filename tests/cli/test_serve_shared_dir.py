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
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.frontend import Frontend
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
    with (
        listening_daemon(argv, sock, log_path=tmp_path / "log") as daemon,
        GuestMemory(((0x10_0000, 8 << 20),)) as mem,
    ):
        frontend = Frontend(sock, mem)
        try:
            frontend.init()
            frontend.start()
            assert _errno(frontend.request(QUEUE, fc.init(), 16 + 64)) == 0
            yield daemon, frontend
        finally:
            frontend.close()
        assert daemon.process.wait(10) == 0, daemon.log()


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
    with (
        listening_daemon(argv, sock, log_path=tmp_path / "log") as daemon,
        GuestMemory(((0x10_0000, 8 << 20),)) as mem,
    ):
        frontend = Frontend(sock, mem)
        try:
            frontend.init()
            frontend.start()
            assert _errno(frontend.request(QUEUE, fc.init(), 16 + 64)) == 0
            looked_up = [
                frontend.request(QUEUE, fc.lookup(fc.ROOT, b"f%d" % i), 16 + 128)
                for i in range(200)
            ]
            errors = [_errno(reply) for reply in looked_up]
            assert errors == [0] * 128 + [errno.ENFILE] * 72
            assert _errno(frontend.request(QUEUE, fc.getattr_(fc.ROOT), 16 + 104)) == 0
            first = fc.parse_entry_out(looked_up[0][16:]).nodeid
            frontend.request(QUEUE, fc.forget(first, 1), 0)
            again = frontend.request(QUEUE, fc.lookup(fc.ROOT, b"f199"), 16 + 128)
            assert _errno(again) == 0
        finally:
            frontend.close()
        assert daemon.process.wait(10) == 0, daemon.log()


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
        with (
            listening_daemon(argv, sock, log_path=tmp_path / "log") as daemon,
            GuestMemory(((0x10_0000, 8 << 20),)) as mem,
        ):
            frontend = Frontend(sock, mem)
            try:
                frontend.init()
                frontend.start()
                assert _errno(frontend.request(QUEUE, fc.init(), 16 + 64)) == 0

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
            finally:
                frontend.close()
            assert daemon.process.wait(10) == 0, daemon.log()
        st = os.stat(share / "f")
        assert (st.st_uid, st.st_gid) == (DAEMON_UID, DAEMON_UID)
        assert stat.S_ISFIFO(os.stat(share / "fifo").st_mode)
        assert not (share / "null").exists()
        assert os.getxattr(share / "f", "user.virtiofs.trusted.overlay.opaque") == b"y"
    finally:
        shutil.rmtree(base)
