"""`sandbox.enter`, run in child interpreters (reference §2.H, tests 46 and 47): each child
confines itself to a temporary share exactly as the daemon does, then tries what a compromised
daemon would try. A call on the seccomp deny-list must kill it with SIGSYS (or only be logged
in log mode); paths must end in the share; the fd directory must not lead to other processes;
imports and source lines must never come from the guest-writable share."""

from __future__ import annotations

import json
import linecache
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest

import vhostfs

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the sandbox needs root")

WORKTREE = Path(vhostfs.__file__).resolve().parents[1]
# The allow-list, spelled out independently of the code: CHOWN 0, DAC_OVERRIDE 1, FOWNER 3,
# FSETID 4, SETGID 6, SETUID 7, MKNOD 27, SETFCAP 31, and SYS_ADMIN 21 with xattrs.
BASE_CAPS = sum(1 << n for n in (0, 1, 3, 4, 6, 7, 27, 31))
XATTR_CAPS = BASE_CAPS | 1 << 21

PRELUDE = """
import ctypes, json, os, socket, sys, threading
from vhostfs.daemon import sandbox
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
share, mode, xattr = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
entered = sandbox.enter(share, xattr=xattr, seccomp_mode=mode)
"""

FORBIDDEN = {
    "execve": "os.execv('/bin/true', ['true'])",
    "execveat": "libc.syscall(322, -100, b'/bin/true', None, None, 0)",
    "socket_inet": "socket.socket(socket.AF_INET, socket.SOCK_STREAM)",
    "socket_inet6": "socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)",
    "fork": "os.fork() or None",
    "ptrace": "libc.syscall(101, 0x4206, 1, 0, 0)",  # PTRACE_SEIZE pid 1
    "mount": "libc.mount(b'none', b'/', b'tmpfs', 0, None)",
    "pivot_root": "libc.syscall(155, b'.', b'.')",
    "unshare": "libc.syscall(272, 0x00020000)",
    "bpf": "libc.syscall(321, 0, 0, 0)",
    "keyctl": "libc.syscall(250, 0, 0, 0, 0, 0)",
    "open_by_handle_at": "libc.syscall(304, 0, 0, 0)",
    "x32_getpid": "libc.syscall(0x40000000 | 39)",
}


def _child(
    tmp_path: Path, body: str, *, mode: str = "kill", xattr: bool = False, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run PRELUDE + body in a fresh interpreter, from a script file (so that its frames have
    a real source path, which the share may shadow)."""
    share = tmp_path / "share"
    share.mkdir(exist_ok=True)
    script = tmp_path / "child.py"
    script.write_text(PRELUDE + body)
    argv = [sys.executable, str(script), str(share), mode, "1" if xattr else "0"]
    env = {**os.environ, "PYTHONPATH": str(WORKTREE)}
    return subprocess.run(
        argv, cwd=WORKTREE, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("call", sorted(FORBIDDEN))
def test_a_denied_call_kills_the_process(tmp_path: Path, call: str) -> None:
    # SYS_ADMIN kept (xattrs on), so nothing but the filter stops mount, unshare, pivot_root.
    body = f"print('before', flush=True)\n{FORBIDDEN[call]}\nprint('survived', flush=True)\n"
    done = _child(tmp_path, body, xattr=True)
    assert done.returncode == -signal.SIGSYS, (done.returncode, done.stdout, done.stderr)
    assert done.stdout == "before\n"


@pytest.mark.parametrize("call", sorted(set(FORBIDDEN) - {"fork", "x32_getpid"}))
def test_log_mode_lets_the_denied_calls_run(tmp_path: Path, call: str) -> None:
    body = f"try:\n    {FORBIDDEN[call]}\nexcept OSError:\n    pass\nprint('survived')\n"
    done = _child(tmp_path, body, mode="log")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "survived\n"


def test_calls_from_another_abi_kill_even_in_log_mode(tmp_path: Path) -> None:
    done = _child(tmp_path, FORBIDDEN["x32_getpid"] + "\nprint('survived')\n", mode="log")
    assert done.returncode == -signal.SIGSYS, done.stderr


def test_what_the_daemon_needs_still_works_under_the_filter(tmp_path: Path) -> None:
    """Threads (clone with CLONE_THREAD, after clone3's ENOSYS), Unix sockets, files and the
    descriptor paths the passthrough uses."""
    (tmp_path / "share").mkdir()
    (tmp_path / "share" / "f").write_bytes(b"data")
    body = """
results = []
t = threading.Thread(target=lambda: results.append(threading.get_native_id()))
t.start(); t.join()
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
a.sendall(b"x"); assert b.recv(1) == b"x"
u = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); u.close()
# io_uring_setup(8, NULL): ENOSYS, not death (libuv tries it, then uses its thread pool).
assert libc.syscall(425, 8, None) == -1 and ctypes.get_errno() == 38
fd = os.open("/f", os.O_PATH)
with open(str(fd), "rb") as f:  # the fd directory is the working directory
    data = f.read()
print(json.dumps({"thread": bool(results), "data": data.decode()}))
"""
    done = _child(tmp_path, body)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"thread": True, "data": "data"}


def test_paths_end_in_the_share_and_the_fd_directory_leads_nowhere(tmp_path: Path) -> None:
    share = tmp_path / "share"
    (share / "etc").mkdir(parents=True)
    (share / "etc" / "shadow").write_text("the share's own\n")
    (share / "f").write_text("f")
    body = """
def errno_of(call):
    try:
        call()
    except OSError as e:
        return e.errno
    return 0

out = {
    "root": sorted(os.listdir("/")),
    "shadow": open("/etc/shadow").read(),
    "passwd": errno_of(lambda: open("/etc/passwd")),
    "mountinfo": errno_of(lambda: open("/proc/self/mountinfo")),
    "up_mem": errno_of(lambda: os.open("../mem", os.O_RDONLY, dir_fd=entered.fd_directory)),
    "up_pid1": errno_of(lambda: os.open("../../1/root", os.O_PATH, dir_fd=entered.fd_directory)),
    "up_up": os.stat("../..", dir_fd=entered.fd_directory).st_ino
        == os.fstat(entered.fd_directory).st_ino,
    "cwd": all(name.isdigit() for name in os.listdir(".")),
    "status": os.pread(entered.status_fd, 1 << 16, 0).decode(),
}
print(json.dumps(out))
"""
    done = _child(tmp_path, body, xattr=True)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["root"] == ["etc", "f"]
    assert out["shadow"] == "the share's own\n"
    assert out["passwd"] == out["mountinfo"] == 2  # ENOENT: no /proc, no host /etc
    assert out["up_mem"] == 2  # ".." of the fd directory is the fd directory itself
    assert out["up_pid1"] != 0
    assert out["up_up"] and out["cwd"]
    status = dict(line.split(":\t", 1) for line in out["status"].splitlines() if ":\t" in line)
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"
    for field in ("CapEff", "CapPrm", "CapBnd"):
        assert int(status[field], 16) == XATTR_CAPS, (field, status[field])
    assert int(status["CapInh"], 16) & ~XATTR_CAPS == 0
    assert int(status["CapAmb"], 16) == 0


def test_without_xattrs_sys_admin_goes_too(tmp_path: Path) -> None:
    body = "print(os.pread(entered.status_fd, 1 << 16, 0).decode())\n"
    done = _child(tmp_path, body, mode="none")
    assert done.returncode == 0, done.stderr
    status = dict(line.split(":\t", 1) for line in done.stdout.splitlines() if ":\t" in line)
    assert int(status["CapEff"], 16) == BASE_CAPS
    assert status["Seccomp"].strip() == "0"  # --seccomp none
    assert status["NoNewPrivs"].strip() == "1"


def _plant(share: Path, path: str, text: str) -> Path:
    planted = share / path.lstrip("/")
    planted.parent.mkdir(parents=True, exist_ok=True)
    planted.write_text(text)
    return planted


def _fifo(share: Path, path: str) -> None:
    planted = share / path.lstrip("/")
    planted.parent.mkdir(parents=True, exist_ok=True)
    if planted.exists():
        planted.unlink()
    os.mkfifo(planted)


def test_no_import_and_no_source_line_comes_from_the_share(tmp_path: Path) -> None:
    """The guest plants modules at the interpreter's own paths inside the share and FIFOs
    where the frames' source files would be; the child then imports what it never imported,
    looks up a codec it never used, and formats exceptions every way CPython does."""
    share = tmp_path / "share"
    share.mkdir()
    stdlib = Path(traceback.__file__).parent
    marker = "open('/MARKER-{name}', 'w').write('ran')\n"
    planted = {
        "xml": stdlib / "xml" / "__init__.py",
        "cp1252": stdlib / "encodings" / "cp1252.py",
        "idna": stdlib / "encodings" / "idna.py",
        "json": stdlib / "json" / "__init__.py",
        "linecache": Path(linecache.__file__),
        "tracemalloc": stdlib / "tracemalloc.py",
    }
    for name, path in planted.items():
        _plant(share, str(path), marker.format(name=name))
    for fifo in [Path(traceback.__file__), tmp_path / "child.py", *_vhostfs_sources()]:
        _fifo(share, str(fifo))
    body = """
import logging, warnings
logging.basicConfig(level="INFO")
seen = {"visible": os.path.exists(sys.argv[4])}  # the planted xml: an import would find it
try:
    import xml
except ImportError as e:
    seen["xml"] = str(e)
try:
    b"x".decode("cp1252")
except LookupError as e:
    seen["cp1252"] = str(e)
seen["idna"] = "b\u00fccher".encode("idna").decode()

def fail():
    raise ValueError("boom")

try:
    fail()
except ValueError:
    seen["format_exc"] = __import__("traceback").format_exc()
    logging.exception("logged")
warnings.warn("a warning")

class Bad:
    def __del__(self):
        raise RuntimeError("in __del__")

Bad()
t = threading.Thread(target=fail, name="worker")
t.start(); t.join()
print(json.dumps(seen), flush=True)
fail()
"""
    script_body = body.replace("sys.argv[4]", repr(str(planted["xml"])))
    done = _child(tmp_path, script_body, timeout=30)
    assert done.returncode == 1, (done.returncode, done.stderr)  # the uncaught ValueError
    seen = json.loads(done.stdout)
    assert seen["visible"] is True
    assert "xml" in seen["xml"]
    assert "cp1252" in seen["cp1252"]
    assert seen["idna"] == "xn--bcher-kva"
    assert 'child.py", line' in seen["format_exc"] and "ValueError: boom" in seen["format_exc"]
    assert 'raise ValueError("boom")' not in seen["format_exc"]  # no source line
    err = done.stderr
    for expected in ("logged", "a warning", "in __del__", "Exception in thread worker"):
        assert expected in err, err
    assert err.count("ValueError: boom") == 3  # logged, the thread's, the uncaught one
    assert 'raise ValueError("boom")' not in err
    assert not list(share.glob("MARKER-*"))


def _vhostfs_sources() -> list[Path]:
    return sorted(Path(vhostfs.__file__).parent.rglob("*.py"))


def test_refuses_when_not_single_threaded(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    code = (
        "import threading, time, sys\n"
        "from vhostfs.daemon import sandbox\n"
        "threading.Thread(target=time.sleep, args=(5,), daemon=True).start()\n"
        "try:\n"
        "    sandbox.enter(sys.argv[1])\n"
        "except sandbox.SandboxError as e:\n"
        "    print(e)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(share)],
        cwd=WORKTREE,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "single-threaded" in done.stdout, done.stderr


def test_syslog_never_reconnects_to_the_guests_socket() -> None:
    """--syslog's handler connected before the pivot; a reconnect by path afterwards would
    reach a socket the guest bound at the same path inside the share."""
    import shutil
    import tempfile

    # Short paths: a Unix socket's path is at most 107 bytes.
    top = Path(tempfile.mkdtemp(prefix="sb", dir="/tmp"))
    try:
        _syslog_child(top)
    finally:
        shutil.rmtree(top)


def _syslog_child(top: Path) -> None:
    import socket

    share = top / "share"
    host_log = top / "log"
    guest_log = share / str(host_log).lstrip("/")
    guest_log.parent.mkdir(parents=True)
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as host,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as guest,
    ):
        host.bind(str(host_log))
        guest.bind(str(guest_log))
        guest.setblocking(False)
        # The handler exists before enter(), as --syslog's does.
        script = (
            "import logging, logging.handlers\n"
            f"handler = logging.handlers.SysLogHandler(address={str(host_log)!r})\n"
            "logging.getLogger().addHandler(handler)\n"
            + PRELUDE
            + "logging.getLogger().warning('before the restart')\n"
            "handler.socket.close()  # as when the host's syslog daemon restarts\n"
            "logging.getLogger().warning('after the restart')\n"
        )
        (top / "child.py").write_text(script)
        argv = [sys.executable, str(top / "child.py"), str(share), "kill", "0"]
        env = {**os.environ, "PYTHONPATH": str(WORKTREE)}
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert b"before the restart" in host.recv(4096)
        with pytest.raises(BlockingIOError):
            guest.recv(4096)
    assert "no syslog reconnect from inside the sandbox" in done.stderr
