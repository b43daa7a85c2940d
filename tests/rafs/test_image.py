"""Opening images: format detection, refusals, and that opening costs the same whatever the
image's size (inodes are decoded on demand, never up front).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.rafs.images import V5_BOOTSTRAPS, V5_DIR, V6_BOOTSTRAP, mkfs_erofs, needs_mkfs
from vhostfs.rafs import CorruptError, RafsError, UnsupportedError, open_image

DIRECTORIES = 10
FILES_PER_DIRECTORY = 10_000


@needs_mkfs
def test_detects_each_format(build_erofs: Callable[..., Path]) -> None:
    with open_image(build_erofs()) as image:
        assert image.format == "erofs"
    with open_image(V5_DIR / V5_BOOTSTRAPS[0]) as image:
        assert image.format == "rafs-v5"
    with open_image(V6_BOOTSTRAP) as image:
        assert image.format == "rafs-v6"
        assert image.path == str(V6_BOOTSTRAP)


@pytest.mark.parametrize(
    "content",
    [b"", b"\0", bytes(8192), os.urandom(20000), b"RAFS" + bytes(100)],
    ids=["empty", "one-byte", "zeros", "random", "wrong-endian-magic"],
)
def test_other_files_are_not_images(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "file").write_bytes(content)
    with pytest.raises(CorruptError, match="neither a RAFS v5 nor an EROFS"):
        open_image(tmp_path / "file")


def test_unknown_rafs_version(tmp_path: Path) -> None:
    data = bytearray((V5_DIR / V5_BOOTSTRAPS[0]).read_bytes())
    data[4:8] = (0x600).to_bytes(4, "little")
    (tmp_path / "boot").write_bytes(bytes(data))
    with pytest.raises(UnsupportedError, match="version 0x600"):
        open_image(tmp_path / "boot")


def test_missing_file_is_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        open_image(tmp_path / "absent")


def test_errors_carry_an_errno() -> None:
    assert CorruptError("x").errno == 5  # EIO
    assert UnsupportedError("x").errno == 95  # EOPNOTSUPP
    assert issubclass(UnsupportedError, RafsError)


@pytest.fixture(scope="session")
def many_inodes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An EROFS image of 100,000 empty files in ten directories (built once, a few seconds)."""
    image = tmp_path_factory.mktemp("many-inodes") / "image.erofs"
    # Creating 100,000 files is several times faster on tmpfs than on a disk file system.
    scratch_parent = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=scratch_parent) as scratch:
        for d in range(DIRECTORIES):
            directory = Path(scratch) / f"d{d}"
            directory.mkdir()
            for i in range(FILES_PER_DIRECTORY):
                os.close(os.open(directory / f"file-{i:05}", os.O_CREAT | os.O_WRONLY, 0o644))
        mkfs_erofs(image, Path(scratch), "-T0", "--all-root")
    return image


@needs_mkfs
def test_opening_a_large_image_is_cheap(many_inodes: Path) -> None:
    times = []
    for _ in range(5):
        start = time.perf_counter()
        with open_image(many_inodes):
            times.append(time.perf_counter() - start)
    assert statistics.median(times) < 0.050

    tracemalloc.start()
    try:
        image = open_image(many_inodes)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A Python object per inode would take megabytes; opening decodes the root and little else.
    assert peak < 256 << 10
    with image:
        statfs = image.statfs()
        assert statfs.files == DIRECTORIES * FILES_PER_DIRECTORY + DIRECTORIES + 1
        directory = image.lookup(image.root_ino, b"d7")
        assert directory is not None
        for i in range(0, FILES_PER_DIRECTORY, 997):
            ino = image.lookup(directory, f"file-{i:05}".encode())
            assert ino is not None and image.getattr(ino).size == 0
        assert image.lookup(directory, b"file-10000") is None
        assert sum(1 for _ in image.readdir(directory)) == FILES_PER_DIRECTORY + 2
