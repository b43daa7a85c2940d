"""A real Linux guest mounts an uncompressed build with the kernel's own EROFS driver.

The bootstrap is /dev/vda and the blob /dev/vdb: `mount -t erofs -o device=/dev/vdb /dev/vda`.
The kernel reads each chunk index's blkaddr straight off the blob device, so this proves the
blob's uncompressed layout and the chunk indexes are right without any nydus code involved.
The guest lists the tree with checksums, modes, owners and mtimes; the host compares.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
from pathlib import Path

import pytest

from tests.rafs.build_support import build, make_rootfs_tree
from tests.support.vm import ensure_guest_built, require_qemu, run_guest, short_tempdir

pytestmark = pytest.mark.guest

SECTOR = 512

MANIFEST_SCRIPT = r"""
set -e
mount -t erofs -o device=/dev/vdb /dev/vda /mnt
cd /mnt
find . | sort | while IFS= read -r f; do
    meta="$(stat -c '%f|%u|%g|%Y' "$f")"
    if [ -L "$f" ]; then
        echo "$f|$meta|$(readlink "$f")"
    elif [ -f "$f" ]; then
        echo "$f|$meta|$(stat -c %s "$f"):$(sha256sum < "$f" | cut -d' ' -f1)"
    elif [ -b "$f" ] || [ -c "$f" ]; then
        echo "$f|$meta|$(stat -c '%t:%T' "$f")"
    else
        echo "$f|$meta|"
    fi
done
"""


def host_manifest(root: Path) -> list[str]:
    """What MANIFEST_SCRIPT prints for the same tree, computed on the host."""
    lines = []
    for path in sorted(_all_paths(root)):
        full = root / path
        info = os.lstat(full)
        meta = f"{info.st_mode:x}|{info.st_uid}|{info.st_gid}|{int(info.st_mtime)}"
        kind = stat.S_IFMT(info.st_mode)
        if kind == stat.S_IFLNK:
            detail = os.readlink(full)
        elif kind == stat.S_IFREG:
            detail = f"{info.st_size}:{hashlib.sha256(full.read_bytes()).hexdigest()}"
        elif kind in (stat.S_IFCHR, stat.S_IFBLK):
            detail = f"{os.major(info.st_rdev):x}:{os.minor(info.st_rdev):x}"
        else:
            detail = ""
        lines.append(f"{path}|{meta}|{detail}")
    return lines


def _all_paths(root: Path) -> list[str]:
    paths = ["."]
    for directory, dirnames, filenames in os.walk(root):
        for name in [*dirnames, *filenames]:
            paths.append("./" + os.path.relpath(os.path.join(directory, name), root))
    return paths


def padded_copy(source: Path, target: Path) -> Path:
    """virtio-blk sizes disks in 512-byte sectors: pad a copy to a whole number of them."""
    shutil.copyfile(source, target)
    with open(target, "r+b") as f:
        f.truncate(-(-source.stat().st_size // SECTOR) * SECTOR)
    return target


def test_kernel_erofs_mounts_uncompressed_build() -> None:
    require_qemu()
    ensure_guest_built()
    with short_tempdir() as work:
        source = work / "tree"
        make_rootfs_tree(source)
        # The guest's output is decoded as UTF-8: leave out the one name that is not.
        (source / "names" / os.fsdecode(b"\xff\xfe-not-utf8")).unlink()
        (source / "big").write_bytes(os.urandom(3 << 20 | 1234))  # several 1 MiB chunks
        bootstrap, blob = build([source], work / "out", "--compressor", "none")
        assert blob is not None
        disks = [padded_copy(bootstrap, work / "vda.img"), padded_copy(blob, work / "vdb.img")]

        result = run_guest(script=MANIFEST_SCRIPT, disks=disks, mount=None, timeout=300)

        assert result.status == 0, result.stderr
        guest = result.output.splitlines()
        expected = host_manifest(source)
        missing = sorted(set(expected) - set(guest))
        extra = sorted(set(guest) - set(expected))
        assert not missing and not extra, f"missing: {missing[:10]}\nextra: {extra[:10]}"
