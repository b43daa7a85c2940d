"""A real Debian guest in QEMU mounts a host directory through vhostfs and reads it byte for byte.

The tree has over 500 entries: nested directories, empty files, files over 8 MiB, symlinks
(relative, absolute, dangling), hard links, and names with spaces and UTF-8. The guest lists and
checksums everything; the host compares with its own view. Exported with --readonly, writes
must fail with EROFS.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.vm import (
    DaemonProcess,
    assert_directories_without_handles,
    ensure_guest_built,
    listening_daemon,
    require_qemu,
    run_guest,
    short_tempdir,
)

pytestmark = pytest.mark.guest

BIG_FILE_MIB = 256

MANIFEST_SCRIPT = r"""
set -e
cd /mnt
find . -mindepth 1 | while IFS= read -r f; do
    if [ -L "$f" ]; then
        echo "L|$f|$(readlink "$f")"
    elif [ -d "$f" ]; then
        echo "D|$f|$(stat -c %a "$f")"
    else
        echo "F|$f|$(stat -c %a "$f")|$(stat -c %s "$f")|$(sha256sum < "$f" | cut -d' ' -f1)"
    fi
done
"""

WRITE_SCRIPT = r"""
cd /mnt
for attempt in "echo x > new-file" "echo x >> plain-0.txt" "mkdir new-dir" "rm plain-0.txt" \
               "touch plain-0.txt" "ln -s x new-link" "mv plain-0.txt moved" "chmod 600 plain-0.txt"
do
    if sh -c "$attempt" 2>/tmp/err; then
        echo "ALLOWED: $attempt"
    else
        echo "REFUSED: $attempt: $(cat /tmp/err)"
    fi
done
"""

DD_SCRIPT = f"""
set -e
dd if=/mnt/big-{BIG_FILE_MIB}M.bin bs=1M 2>/tmp/dd.err | sha256sum | cut -d' ' -f1
cat /tmp/dd.err >&2
"""


def make_tree(root: Path) -> None:
    rng = random.Random(2026)
    names = ["plain", "with space", "ünïcødé", "файл", "文件 名", "tab\tname", "quote'\"s"]
    for d in range(12):
        sub = root / f"dir {d}" / f"level-{d % 3}" / names[d % len(names)]
        sub.mkdir(parents=True)
        for i in range(40):
            size = rng.choice([0, 1, 100, 4095, 4096, 4097, 65536, 200_000])
            (sub / f"{names[i % len(names)]}-{i}.txt").write_bytes(rng.randbytes(size))
    for i in range(3):
        (root / f"plain-{i}.txt").write_bytes(b"plain %d\n" % i)
        (root / f"empty-{i}").touch()
        (root / f"empty dir {i}").mkdir()
    (root / "large-9M.bin").write_bytes(rng.randbytes(9 * 1024 * 1024 + 17))
    (root / "large-12M.bin").write_bytes(rng.randbytes(12 * 1024 * 1024))
    os.symlink("plain-0.txt", root / "link-relative")
    os.symlink("dir 0/level-0/plain", root / "link-to-dir")
    os.symlink("/etc/passwd", root / "link-absolute")
    os.symlink("does/not/exist", root / "link-dangling")
    os.symlink("../../plain-1.txt", root / "dir 1" / "level-1" / "link up")
    os.link(root / "plain-2.txt", root / "hardlink-to-plain-2")
    os.chmod(root / "plain-1.txt", 0o600)
    os.chmod(root / "empty dir 2", 0o700)
    with open(root / f"big-{BIG_FILE_MIB}M.bin", "wb") as big:
        for _ in range(BIG_FILE_MIB):
            big.write(rng.randbytes(1 << 20))


def host_manifest(root: Path) -> dict[str, str]:
    manifest = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = "./" + str(path.relative_to(root))
            info = path.lstat()
            if path.is_symlink():
                manifest[rel] = f"L|{rel}|{os.readlink(path)}"
            elif path.is_dir():
                manifest[rel] = f"D|{rel}|{info.st_mode & 0o7777:o}"
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                manifest[rel] = f"F|{rel}|{info.st_mode & 0o7777:o}|{info.st_size}|{digest}"
    return manifest


@pytest.fixture(scope="module")
def share() -> Iterator[Path]:
    require_qemu()
    ensure_guest_built()
    with short_tempdir() as tmp:
        root = tmp / "share"
        root.mkdir()
        make_tree(root)
        yield root


@pytest.fixture
def daemon(share: Path) -> Iterator[DaemonProcess]:
    with short_tempdir() as tmp:
        sock = tmp / "vhostfs.sock"
        argv = [
            sys.executable,
            "-m",
            "vhostfs",
            "serve",
            "--socket",
            str(sock),
            "--shared-dir",
            str(share),
            "--readonly",
        ]
        with listening_daemon(argv, sock, log_path=tmp / "daemon.log") as d:
            yield d
            log = d.log()
    assert "Traceback" not in log, log


def test_every_entry_reads_back_identically(share: Path, daemon: DaemonProcess) -> None:
    expected = host_manifest(share)
    assert len(expected) >= 500
    result = run_guest(socket=daemon.socket_path, script=MANIFEST_SCRIPT, timeout=900)
    result.check()
    seen = {line.split("|", 2)[1]: line for line in result.output.splitlines()}
    missing = sorted(set(expected) - set(seen))
    extra = sorted(set(seen) - set(expected))
    wrong = sorted(name for name in expected.keys() & seen.keys() if expected[name] != seen[name])
    assert (missing, extra, wrong) == ([], [], []), [seen.get(n) for n in wrong[:5]]
    assert daemon.process.wait(10) == 0  # it stops when the guest's VMM goes
    fops = assert_directories_without_handles(daemon.log())
    print(f"\nrequests for the walk: {fops}")


def test_writes_are_refused_with_erofs(share: Path, daemon: DaemonProcess) -> None:
    before = host_manifest(share)
    result = run_guest(socket=daemon.socket_path, script=WRITE_SCRIPT, timeout=300)
    result.check()
    lines = result.output.splitlines()
    assert len(lines) == 8 and all(line.startswith("REFUSED") for line in lines), lines
    assert all("Read-only file system" in line for line in lines), lines
    assert host_manifest(share) == before


def test_dd_of_a_256_mib_file_matches_the_host(share: Path, daemon: DaemonProcess) -> None:
    digest = hashlib.sha256()
    with open(share / f"big-{BIG_FILE_MIB}M.bin", "rb") as big:
        while block := big.read(1 << 24):
            digest.update(block)
    result = run_guest(socket=daemon.socket_path, script=DD_SCRIPT, timeout=900)
    result.check()
    assert result.output.strip() == digest.hexdigest()
    print(f"guest dd: {result.stderr.strip().splitlines()[-1]}")


# stat(2) does not trigger an automount on its last component: the submount appears once a
# path goes through it (the cat), after which /mnt/volume/ is the submount's root.
SUBMOUNT_SCRIPT = r"""
set -e
cat /mnt/volume/inside
echo "DEV share=$(stat -c %d /mnt) volume=$(stat -c %d /mnt/volume/) sub=$(stat -c %d /mnt/sub)"
grep -c ' /mnt/volume virtiofs ' /proc/mounts | sed 's/^/MOUNTS /'
echo from-guest > /mnt/volume/written
"""


def test_a_host_mount_below_the_share_is_a_submount_in_the_guest() -> None:
    """--announce-submounts, as Kata passes it: a tmpfs mounted below the share is its own
    virtiofs submount in the guest, with its own st_dev, readable and writable."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")

    with short_tempdir() as tmp:
        share = tmp / "share"
        (share / "volume").mkdir(parents=True)
        (share / "sub").mkdir()
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=4m", "vol", str(share / "volume")], check=True
        )
        try:
            (share / "volume" / "inside").write_text("on the volume\n")
            sock = tmp / "vhostfs.sock"
            argv = [sys.executable, "-m", "vhostfs", "serve", "--socket", str(sock)]
            argv += ["--shared-dir", str(share), "--announce-submounts"]
            with listening_daemon(argv, sock, log_path=tmp / "daemon.log") as d:
                result = run_guest(socket=sock, script=SUBMOUNT_SCRIPT, timeout=300)
                result.check()
                assert d.process.wait(10) == 0
            lines = result.output.splitlines()
            assert lines[0] == "on the volume", lines
            devs = dict(kv.split("=") for kv in lines[1].split()[1:])
            assert devs["share"] == devs["sub"] != devs["volume"], lines
            assert lines[2] == "MOUNTS 1", lines
            assert (share / "volume" / "written").read_text() == "from-guest\n"
        finally:
            subprocess.run(["umount", str(share / "volume")], check=True)
