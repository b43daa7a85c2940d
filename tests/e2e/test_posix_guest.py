"""The POSIX conformance check (posix/posixcheck.c) in a real guest, as root and as uid 1000,
on the writable passthrough and on QEMU's C virtiofsd (-o xattr) in the same run.

vhostfs must fail no more of its assertions than virtiofsd does. Both scores are printed, with
the assertions each one fails, for the notes.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.vm import (
    REFERENCE_VIRTIOFSD,
    assert_directories_without_handles,
    detect_accel,
    ensure_guest_built,
    listening_daemon,
    reference_virtiofsd,
    require_qemu,
    run_guest,
    short_tempdir,
)

pytestmark = pytest.mark.guest

SOURCE = Path(__file__).parent / "posix" / "posixcheck.c"
SCRIPT = "mkdir -p /mnt/check && /vhostfs/posixcheck /mnt/check\n"


@pytest.fixture(scope="module")
def posixcheck() -> bytes:
    require_qemu()
    if not REFERENCE_VIRTIOFSD.exists():
        pytest.skip(f"{REFERENCE_VIRTIOFSD} not installed (qemu-system-common)")
    ensure_guest_built()
    detect_accel()
    with short_tempdir() as tmp:
        exe = tmp / "posixcheck"
        subprocess.run(["gcc", "-O2", "-static", "-o", str(exe), str(SOURCE)], check=True)
        return exe.read_bytes()


@pytest.fixture
def tmp() -> Iterator[Path]:
    with short_tempdir() as path:
        yield path


def score(label: str, socket: Path, program: bytes) -> tuple[set[str], set[str]]:
    """(passed, failed) assertion ids from one guest run."""
    result = run_guest(
        socket=socket, script=SCRIPT, files={"/vhostfs/posixcheck": (program, 0o755)}, timeout=600
    )
    result.check()
    lines = result.output.splitlines()
    assert lines and lines[-1] == "DONE", result.output[-2000:]
    passed = {line.split()[1] for line in lines if line.startswith("PASS ")}
    failed = {line.split()[1].rstrip(":") for line in lines if line.startswith("FAIL ")}
    for line in lines:
        if line.startswith("FAIL "):
            print(f"  {label}: {line}")
    return passed, failed


def vhostfs_score(
    label: str, share: Path, tmp: Path, program: bytes, *flags: str
) -> tuple[tuple[set[str], set[str]], dict[str, int]]:
    """One guest run against `vhostfs serve --shared-dir share FLAGS`: the score, and the
    requests the daemon logged at exit."""
    sock = tmp / f"{label}.sock"
    argv = [sys.executable, "-m", "vhostfs", "serve", "--socket", str(sock)]
    argv += ["--shared-dir", str(share), *flags]
    with listening_daemon(argv, sock, log_path=tmp / f"{label}.log") as daemon:
        ours = score(label, sock, program)
        assert daemon.process.wait(10) == 0  # it stops when the guest's VMM goes
        log = daemon.log()
    assert "Traceback" not in log, log
    return ours, assert_directories_without_handles(log)


def test_vhostfs_fails_no_more_posix_assertions_than_virtiofsd(
    posixcheck: bytes, tmp: Path
) -> None:
    """Also with --sandbox namespace, which must change no result: the guest's requests all
    pass the seccomp filter, need no import and reach nothing the plain daemon does not."""
    names = ("vhostfs", "vhostfs-sandbox", "virtiofsd")
    shares = {name: tmp / name for name in names}
    for share in shares.values():
        share.mkdir()
        share.chmod(0o755)
    ours, fops = vhostfs_score("vhostfs", shares["vhostfs"], tmp, posixcheck)
    sandboxed, _ = vhostfs_score(
        "vhostfs-sandbox", shares["vhostfs-sandbox"], tmp, posixcheck, "--sandbox", "namespace"
    )
    ref_sock = tmp / "virtiofsd.sock"
    with reference_virtiofsd(shares["virtiofsd"], ref_sock, "xattr"):
        theirs = score("virtiofsd", ref_sock, posixcheck)
    total = len(ours[0] | ours[1])
    print(
        f"\nPOSIX check: vhostfs {len(ours[0])}/{total} passed, "
        f"with --sandbox namespace {len(sandboxed[0])}/{len(sandboxed[0] | sandboxed[1])}, "
        f"virtiofsd {len(theirs[0])}/{len(theirs[0] | theirs[1])} passed"
    )
    print(f"  only vhostfs fails: {sorted(ours[1] - theirs[1])}")
    print(f"  only virtiofsd fails: {sorted(theirs[1] - ours[1])}")
    print(f"  vhostfs requests: {fops}")
    assert total >= 100
    assert len(ours[1]) <= len(theirs[1]), sorted(ours[1] - theirs[1])
    assert sandboxed == ours, (sorted(sandboxed[1] - ours[1]), sorted(ours[1] - sandboxed[1]))
