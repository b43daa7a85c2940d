"""Validate the guest harness against the reference peer: QEMU 7.2's C virtiofsd.

A real Debian kernel boots in QEMU (TCG unless KVM works), mounts the virtio-fs tag at /mnt and
checksums the shared files; the host compares.  The vhostfs end-to-end tests use the same
helpers with our daemon in place of virtiofsd.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.support.vm import (
    REFERENCE_VIRTIOFSD,
    detect_accel,
    ensure_guest_built,
    reference_virtiofsd,
    require_qemu,
    run_guest,
    short_tempdir,
)

pytestmark = pytest.mark.guest

CHECKSUM_SCRIPT = r"""
set -e
cd /mnt
find . -type f | sort | while IFS= read -r f; do sha256sum "$f"; done
"""


@pytest.fixture(scope="module")
def guest_dir() -> Path:
    require_qemu()
    if not REFERENCE_VIRTIOFSD.exists():
        pytest.skip(f"{REFERENCE_VIRTIOFSD} not installed (qemu-system-common)")
    built = ensure_guest_built()
    detect_accel()  # first run per host boot: KVM probe (cached), before any daemon is started
    return built


def _populate(root: Path) -> dict[str, str]:
    rng = bytes(range(256))
    files = {
        "hello.txt": b"hello from the host\n",
        "empty": b"",
        "all-bytes.bin": rng * 256,  # 64 KiB, every byte value
        "big.bin": os.urandom(3 * 1024 * 1024 + 123),  # several FUSE_READs, odd tail
        "dir/nested/deep.txt": b"deep\n" * 1000,
        "dir with space/file name.txt": b"spaces\n",
    }
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (root / "emptydir").mkdir()
    return {f"./{rel}": hashlib.sha256(data).hexdigest() for rel, data in files.items()}


def _parse_sha256sum(output: str) -> dict[str, str]:
    sums = {}
    for line in output.splitlines():
        digest, name = line.split("  ", 1)
        sums[name] = digest
    return sums


def test_reference_virtiofsd_checksums(guest_dir: Path) -> None:
    with short_tempdir() as tmp:
        share = tmp / "share"
        share.mkdir()
        expected = _populate(share)
        sock = tmp / "vfs.sock"
        with reference_virtiofsd(share, sock):
            res = run_guest(socket=sock, script=CHECKSUM_SCRIPT, timeout=300)
    res.check()
    assert _parse_sha256sum(res.output) == expected


def test_output_is_byte_exact(guest_dir: Path) -> None:
    """Script stdout reaches the host unchanged (no CRLF translation, binary-safe)."""
    data = bytes(range(256)) * 64 + b"\r\n\n\x00tail-without-newline"
    with short_tempdir() as tmp:
        share = tmp / "share"
        share.mkdir()
        (share / "blob").write_bytes(data)
        sock = tmp / "vfs.sock"
        with reference_virtiofsd(share, sock):
            res = run_guest(
                socket=sock, command="cat /mnt/blob; echo to-stderr >&2; exit 3", timeout=300
            )
    assert res.status == 3
    assert res.output_bytes == data
    assert res.output.encode("utf-8", "surrogateescape") == data
    assert res.stderr == "to-stderr\n"
