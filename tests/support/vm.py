"""Boot a real Linux guest in QEMU against a vhost-user-fs daemon (pytest helper).

A thin layer over qemu/guestvm.py (stdlib-only, shared with qemu/run-guest.py):

    from tests.support.vm import ensure_guest_built, require_qemu, run_guest

    require_qemu()                      # pytest.skip when qemu-system-x86_64 is absent
    ensure_guest_built()                # -> Path of the kernel/initramfs dir (built once, cached)
    res = run_guest(socket=sock, script="sha256sum /mnt/f", timeout=300)
    assert res.status == 0, res.stderr  # res.output: script stdout; res.check() raises with logs

The daemon must already be listening on ``socket``; ``listening_daemon`` starts an arbitrary
daemon command and waits until its socket accepts connections without connecting to it (the
daemons serve a single front-end connection, so a test connect would use it up).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

REPO_ROOT = Path(__file__).resolve().parents[2]
GUESTVM_PATH = REPO_ROOT / "qemu" / "guestvm.py"


def _load_guestvm() -> ModuleType:
    # qemu/ is not a package; run-guest.py imports the same file as "guestvm".
    mod = sys.modules.get("guestvm")
    if mod is not None and Path(getattr(mod, "__file__", "")).resolve() == GUESTVM_PATH:
        return mod
    spec = importlib.util.spec_from_file_location("guestvm", GUESTVM_PATH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["guestvm"] = mod
    spec.loader.exec_module(mod)
    return mod


_guestvm = _load_guestvm()

if TYPE_CHECKING:  # the same file, seen by mypy as a namespace-package module
    from qemu.guestvm import (
        DEFAULT_TAG,
        GuestError,
        GuestResult,
        GuestTimeout,
        detect_accel,
        ensure_guest_built,
        make_cpio,
        qemu_available,
        run_guest,
    )
else:
    GuestResult = _guestvm.GuestResult
    GuestError = _guestvm.GuestError
    GuestTimeout = _guestvm.GuestTimeout
    run_guest = _guestvm.run_guest
    ensure_guest_built = _guestvm.ensure_guest_built
    detect_accel = _guestvm.detect_accel
    make_cpio = _guestvm.make_cpio
    qemu_available = _guestvm.qemu_available
    DEFAULT_TAG = _guestvm.DEFAULT_TAG

REFERENCE_VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")

__all__ = [
    "DEFAULT_TAG",
    "REFERENCE_VIRTIOFSD",
    "DaemonProcess",
    "GuestError",
    "GuestResult",
    "GuestTimeout",
    "detect_accel",
    "ensure_guest_built",
    "listening_daemon",
    "make_cpio",
    "qemu_available",
    "reference_virtiofsd",
    "require_qemu",
    "run_guest",
    "short_tempdir",
    "wait_listening",
]


def require_qemu() -> None:
    """pytest.skip() the calling test when QEMU is not installed."""
    if not qemu_available():
        import pytest

        pytest.skip(f"{_guestvm.QEMU_BINARY} not installed (apt-get install qemu-system-x86)")


@contextlib.contextmanager
def short_tempdir(prefix: str = "vhostfs-") -> Iterator[Path]:
    """A temp dir with a short path: Unix socket paths are limited to 107 bytes and pytest's
    tmp_path can get long."""
    with tempfile.TemporaryDirectory(prefix=prefix) as d:
        yield Path(d)


def _is_listening(path: Path) -> bool:
    """True once a socket bound at ``path`` is in the LISTEN state, per /proc/net/unix (flag
    __SO_ACCEPTCON); falls back to "the socket file exists" when that is unreadable."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(st.st_mode):
        return False
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return True
    wanted = {str(path), str(path.resolve()), os.path.abspath(path)}
    for line in lines:
        fields = line.split()
        if len(fields) >= 8 and fields[7] in wanted and int(fields[3], 16) & 0x10000:
            return True
    return False


def wait_listening(
    socket_path: str | os.PathLike[str],
    process: subprocess.Popen[bytes] | None,
    timeout: float = 20.0,
    log: Path | None = None,
) -> None:
    """Wait until ``socket_path`` is a listening Unix socket; fail early if ``process`` exits."""
    path = Path(socket_path)
    deadline = time.monotonic() + timeout
    while not _is_listening(path):
        why = None
        if process is not None and process.poll() is not None:
            why = f"exited with status {process.returncode}"
        elif time.monotonic() > deadline:
            why = f"not listening on {path} after {timeout:g} s"
        if why:
            text = log.read_text(errors="replace") if log is not None and log.exists() else ""
            raise RuntimeError(f"daemon {why}\n{text}")
        time.sleep(0.02)


@dataclass
class DaemonProcess:
    process: subprocess.Popen[bytes]
    socket_path: Path
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_lines_once_there(self, text: str, timeout: float = 10.0) -> list[str]:
        """The log lines holding text, as soon as there is one (the daemon logs it from its own
        loop, in its own time); AssertionError if none comes within timeout."""
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.log().splitlines() if text in line]
            if lines:
                return lines
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the daemon log after {timeout:g} s")
            time.sleep(0.01)

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self, timeout: float = 10.0) -> int:
        if self.alive():
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def exit_requests(log: str) -> dict[str, dict[str, int]]:
    """The FUSE requests ("fops") and errors by opcode that a daemon logged when it stopped."""
    lines = [line for line in log.splitlines() if " requests {" in line]
    assert lines, log[-3000:]
    counts: dict[str, dict[str, int]] = json.loads(lines[-1].split(" requests ", 1)[1])
    return counts


def assert_directories_without_handles(log: str) -> dict[str, int]:
    """The session read directories with fh 0: at most one OPENDIR (answered ENOSYS, after
    which Linux sends none) and no RELEASEDIR. Returns the request counts."""
    fops = exit_requests(log)["fops"]
    assert fops.get("OPENDIR", 0) <= 1, fops
    assert "RELEASEDIR" not in fops, fops
    return fops


@contextlib.contextmanager
def listening_daemon(
    argv: Sequence[str],
    socket_path: str | os.PathLike[str],
    *,
    log_path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
) -> Iterator[DaemonProcess]:
    """Start ``argv`` (which must create a listening socket at ``socket_path``), wait for the
    socket, yield, and terminate the process afterwards."""
    sock = Path(socket_path)
    log = Path(log_path) if log_path is not None else sock.with_suffix(".log")
    with open(log, "wb") as logf:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=subprocess.STDOUT,
            env=None if env is None else {**os.environ, **env},
        )
    daemon = DaemonProcess(proc, sock, log)
    try:
        wait_listening(sock, proc, timeout, log)
        yield daemon
    finally:
        daemon.stop()


@contextlib.contextmanager
def reference_virtiofsd(
    source: str | os.PathLike[str],
    socket_path: str | os.PathLike[str],
    *options: str,
    sandbox: str | None = None,
    binary: Path = REFERENCE_VIRTIOFSD,
) -> Iterator[DaemonProcess]:
    """Run QEMU 7.2's C virtiofsd on ``source``.  ``options`` are extra ``-o`` values (e.g.
    "cache=none").  Sandbox: "namespace" (its default; works as root here), falling back to
    "chroot" when namespaces are not permitted (containers)."""
    if not binary.exists():
        raise FileNotFoundError(f"{binary} not found (apt-get install qemu-system-common)")
    opts = [f"source={source}", "cache=auto", *options]
    attempts = [sandbox] if sandbox else ["namespace", "chroot"]
    last: Exception | None = None
    for mode in attempts:
        argv = [str(binary), f"--socket-path={socket_path}"]
        for o in [*opts, f"sandbox={mode}"]:
            argv += ["-o", o]
        with contextlib.ExitStack() as stack:
            try:
                daemon = stack.enter_context(listening_daemon(argv, socket_path))
            except RuntimeError as exc:
                last = exc
                Path(socket_path).unlink(missing_ok=True)
                continue
            yield daemon
            return
    raise RuntimeError(f"virtiofsd did not start: {last}")
