"""Images for the RAFS reader tests: where the nydus fixtures are, and EROFS images that
mkfs.erofs builds from trees generated here.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.support.paths import NYDUS_FIXTURES as FIXTURES
from vhostfs import rafs
from vhostfs.rafs import RafsImage
from vhostfs.rafs.checksum import crc32c
from vhostfs.storage import RafsConfig, SyncStorage

V5_DIR = FIXTURES / "v5"
V5_BLOB_ID = "7334a2594e133cf8ae364189c2276b090fc490c627bcc3fb1077f0419a538e00"
V5_BOOTSTRAPS = ["sha256-nocompress-repeatable", "blake3-lz4_block-non_repeatable"]
V6_DIR = FIXTURES / "v6"
V6_BOOTSTRAP = V6_DIR / "rafs-v6-2.2.boot"
V6_BLOB_ID = "be7d77eeb719f70884758d1aa800ed0fb09d701aaec469964e9d54325f0d5fef"

IS_ROOT = os.geteuid() == 0
BIG_DIRECTORY_ENTRIES = 3000
LONGEST_NAME = 254

needs_mkfs = pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="needs erofs-utils")


def make_tree(root: Path) -> None:
    """A tree with every kind of entry mkfs.erofs lays out differently."""
    root.mkdir()
    (root / "hello").write_bytes(b"hello, world\n")
    (root / "empty").write_bytes(b"")
    (root / "one-block").write_bytes(bytes(range(256)) * 16)
    (root / "inline-tail").write_bytes(os.urandom(4096 + 777))
    (root / "several-blocks").write_bytes(os.urandom(5 * 4096 + 1234))
    (root / "large").write_bytes(os.urandom((1 << 20) + 7))
    with open(root / "sparse", "wb") as f:
        f.seek(3 * 4096 + 5)
        f.write(b"end")
    os.chmod(root / "hello", 0o4755)

    nested = root / "a" / "b" / "c"
    nested.mkdir(parents=True)
    (nested / "deep").write_bytes(b"deep file\n")
    os.chmod(root / "a", 0o1777)

    (root / "links").mkdir()
    os.symlink("../hello", root / "links" / "relative")
    os.symlink("/etc/passwd", root / "links" / "absolute")
    os.symlink("x" * 4000, root / "links" / "long-target")
    os.link(root / "hello", root / "links" / "hard-1")
    os.link(root / "hello", root / "a" / "hard-2")

    (root / "special").mkdir()
    os.mkfifo(root / "special" / "fifo")
    os.mknod(root / "special" / "socket", stat.S_IFSOCK | 0o600)
    if IS_ROOT:
        os.mknod(root / "special" / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        os.mknod(root / "special" / "loop", stat.S_IFBLK | 0o660, os.makedev(7, 0))
        os.mknod(root / "special" / "big-numbers", stat.S_IFCHR | 0o600, os.makedev(300, 70000))
        os.chown(root / "hello", 1234, 5678, follow_symlinks=False)
        os.chown(root / "links" / "relative", 4321, 8765, follow_symlinks=False)

    (root / "x").mkdir()
    for name in ("shared-1", "shared-2", "shared-3", "many", "big-value"):
        (root / "x" / name).write_bytes(name.encode())
    for name in ("shared-1", "shared-2", "shared-3"):
        # The same xattr on several inodes: mkfs.erofs moves it to the shared xattr area.
        os.setxattr(root / "x" / name, "user.common", b"same value everywhere")
        os.setxattr(root / "x" / name, "user.own", name.encode())
    for i in range(20):
        os.setxattr(root / "x" / "many", f"user.attribute-{i:02}", str(i).encode() * i)
    os.setxattr(root / "x" / "big-value", "user.big", os.urandom(1500))
    os.setxattr(root / "x", "user.on-a-directory", b"")

    # mkfs.erofs 1.5 fails on 255-byte names (an off-by-one in its path buffer), so the
    # longest names here are one byte short of NAME_MAX.
    (root / ("n" * LONGEST_NAME)).write_bytes(b"longest name")
    (root / ("d" * 200)).mkdir()
    (root / ("d" * 200) / ("f" * LONGEST_NAME)).write_bytes(b"long name, long-named directory")

    big = root / "big-directory"
    big.mkdir()
    for i in range(BIG_DIRECTORY_ENTRIES):
        # Names of varying length, so block boundaries fall at varying places.
        (big / f"entry-{i:05}-{'z' * (i % 40)}").write_bytes(b"")

    for path in [root, *root.rglob("*")]:
        os.utime(
            path, ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789), follow_symlinks=False
        )


def mkfs_erofs(image: Path, source: Path, *options: str) -> None:
    subprocess.run(
        ["mkfs.erofs", "--quiet", *options, str(image), str(source)],
        check=True,
        capture_output=True,
    )


def fsck_erofs(image: Path, *options: str) -> None:
    result = subprocess.run(
        ["fsck.erofs", *options, str(image)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr


def patched(source: Path, target: Path, patches: dict[int, bytes]) -> Path:
    """A copy of `source` at `target` with bytes overwritten at the given offsets."""
    data = bytearray(source.read_bytes())
    for offset, replacement in patches.items():
        data[offset : offset + len(replacement)] = replacement
    target.write_bytes(bytes(data))
    return target


def resolve(image: RafsImage, path: bytes) -> int:
    """The inode at an absolute path, by lookups from the root."""
    ino = image.root_ino
    for name in path.strip(b"/").split(b"/"):
        if name:
            found = image.lookup(ino, name)
            assert found is not None, path
            ino = found
    return ino


def refresh_erofs_checksum(data: bytearray) -> None:
    """Recompute an EROFS superblock checksum (4 KiB blocks) after patching its block."""
    if len(data) >= 4096:
        block = bytearray(data[1024:4096])
        block[4:8] = bytes(4)
        data[1028:1032] = crc32c(block).to_bytes(4, "little")


def open_blobs(
    image: RafsImage,
    blob_dir: str | os.PathLike[str] | None = None,
    blob_files: Sequence[str | os.PathLike[str]] = (),
    *,
    verify: bool = True,
) -> SyncStorage:
    """The image's storage as `vhostfs check` opens it from --blob-dir / --blob."""
    config = RafsConfig.from_flags(blob_dir=blob_dir, blob_files=blob_files, digest_validate=verify)
    return SyncStorage(config, image.blobs, bootstrap=image.path)


def read_file(
    image: RafsImage,
    ino: int,
    offset: int,
    size: int,
    blobs: SyncStorage | str | os.PathLike[str] | None = None,
    *,
    verify: bool = True,
) -> bytes:
    """File bytes through the storage layer: from an open storage, or from a blob directory
    (None: no directory, no blob files)."""
    if isinstance(blobs, SyncStorage):
        return rafs.read_file(image, blobs, ino, offset, size)
    with open_blobs(image, blobs, verify=verify) as storage:
        return rafs.read_file(image, storage, ino, offset, size)
