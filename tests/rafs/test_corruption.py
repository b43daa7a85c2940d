"""Damaged bootstraps never make the reader crash or hang.

Thousands of mutated copies (bit flips, overwritten bytes and fields, zeroed runs, truncation)
of the nydus fixtures and of small mkfs.erofs images are opened and explored with every
operation. Each operation must either answer consistently or raise RafsError (or, for file
data read through the storage layer, StorageError or ConfigError); anything else
(IndexError, struct.error, OverflowError, MemoryError...) fails the test, as does a case that
runs over its time budget. The seeded loop reports the seed of a failing case so it can be
replayed; hypothesis shrinks its own failures to a minimal set of patches.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rafs.images import (
    V5_BOOTSTRAPS,
    V5_DIR,
    V6_BOOTSTRAP,
    V6_DIR,
    mkfs_erofs,
    needs_mkfs,
    refresh_erofs_checksum,
)
from tests.rafs.synthetic_v5 import BLOB_ID, Entry, write_v5
from vhostfs.rafs import DirEntry, InodeAttr, RafsError, RafsImage, open_image, read_file
from vhostfs.storage import ConfigError, RafsConfig, StorageError, SyncStorage

CASES_PER_TARGET = 1000
TIME_BUDGET = 2.0  # seconds per case; a healthy case takes milliseconds
MAX_OPERATIONS = 3000
READ_LIMIT = 64 << 10

T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    name: str
    data: bytes
    hot: list[tuple[int, int]]  # where the metadata is: most mutations land there
    blobs: Callable[[bool], RafsConfig]  # how to find the blobs, with or without digest checks
    erofs_checksum: bool = False


class OverBudget(Exception):
    pass


@contextmanager
def time_budget(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise OverBudget(f"case ran longer than {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def attempt(operation: Callable[..., T], *arguments: object) -> T | None:
    """The operation's result, or None if it refused with one of the errors that say "this
    input is bad"; anything else escapes."""
    try:
        return operation(*arguments)
    except (RafsError, StorageError, ConfigError):
        return None


class Storages:
    """An image's storage, opened on first use, once with and once without digest checks."""

    def __init__(self, image: RafsImage, config: Callable[[bool], RafsConfig]) -> None:
        self._image = image
        self._config = config
        self._opened: dict[bool, SyncStorage | None] = {}

    def get(self, verify: bool) -> SyncStorage | None:
        """None when the damaged image's blob table cannot even be opened."""
        if verify not in self._opened:
            self._opened[verify] = attempt(self._open, verify)
        return self._opened[verify]

    def _open(self, verify: bool) -> SyncStorage:
        return SyncStorage(self._config(verify), self._image.blobs, bootstrap=self._image.path)

    def close(self) -> None:
        for storage in self._opened.values():
            if storage is not None:
                storage.close()


def listing(image: RafsImage, ino: int, offset: int = 0) -> list[DirEntry]:
    return list(itertools.islice(image.readdir(ino, offset), 1000))


def walk(image: RafsImage) -> list[tuple[bytes, int, InodeAttr]]:
    return list(itertools.islice(image.walk(), MAX_OPERATIONS))


def explore(image: RafsImage, blobs: Storages) -> None:
    """Every operation on every inode reachable from the root, checking what answers agree."""
    attempt(image.statfs)
    attempt(walk, image)
    pending = [image.root_ino]
    seen: set[int] = set()
    while pending and len(seen) < MAX_OPERATIONS:
        ino = pending.pop()
        if ino in seen:
            continue
        seen.add(ino)
        attr = attempt(image.getattr, ino)
        if attr is None:
            continue
        for name in (attempt(image.listxattr, ino) or [])[:20]:
            attempt(image.getxattr, ino, name)
        if stat.S_ISDIR(attr.mode):
            explore_directory(image, ino, pending)
        elif stat.S_ISLNK(attr.mode):
            target = attempt(image.readlink, ino)
            assert target is None or len(target) == attr.size
        elif stat.S_ISREG(attr.mode):
            explore_file(image, ino, attr.size, blobs)


def explore_directory(image: RafsImage, ino: int, pending: list[int]) -> None:
    entries = attempt(listing, image, ino) or []
    for entry in entries:
        found = attempt(image.lookup, ino, entry.name)
        if found is not None and entry.name not in (b".", b".."):
            assert found == entry.ino
        pending.append(entry.ino)
    if entries:
        rest = attempt(listing, image, ino, entries[0].next_offset)
        assert rest is None or rest == entries[1 : 1 + len(rest)]


def explore_file(image: RafsImage, ino: int, size: int, blobs: Storages) -> None:
    length = min(size, READ_LIMIT)
    refs = attempt(image.chunks, ino, 0, length)
    if refs:
        assert refs[0].file_offset == 0 and refs[-1].file_end >= length
        for ref, following in itertools.pairwise(refs):
            assert ref.file_end == following.file_offset
    # Verifying a digest hashes the whole chunk (up to 1 MiB); keep that to small files.
    storage = blobs.get(verify=size <= READ_LIMIT)
    data = None if storage is None else attempt(read_file, image, storage, ino, 0, length)
    assert data is None or len(data) == length


def run_case(target: Target, data: bytes, scratch: Path) -> None:
    scratch.write_bytes(data)
    with time_budget(TIME_BUDGET):
        image = attempt(open_image, scratch)
        if image is not None:
            storages = Storages(image, target.blobs)
            try:
                with image:
                    explore(image, storages)
            finally:
                storages.close()


def mutate(target: Target, rng: random.Random) -> bytes:
    data = bytearray(target.data)
    for _ in range(rng.randint(1, 4)):
        if rng.random() < 0.85:
            start, end = rng.choice(target.hot)
        else:
            start, end = 0, len(data)
        offset = rng.randrange(start, end)
        kind = rng.choice(("flip", "byte", "field", "zeros"))
        if kind == "flip":
            data[offset] ^= 1 << rng.randrange(8)
        elif kind == "byte":
            data[offset] = rng.choice((0, 1, 0x7F, 0x80, 0xFF, rng.randrange(256)))
        elif kind == "field":
            width = rng.choice((2, 4, 8))
            top = 1 << (8 * width)
            value = (
                rng.choice(
                    (0, 1, top - 1, top // 2, len(data), len(data) // 32, rng.randrange(top))
                )
                % top
            )
            data[offset : offset + width] = value.to_bytes(width, "little")
        else:
            length = rng.randint(1, 64)
            data[offset : offset + length] = bytes(len(data[offset : offset + length]))
    if target.erofs_checksum and rng.random() < 0.7:
        refresh_erofs_checksum(data)
    if rng.random() < 0.1:
        del data[rng.randrange(len(data)) :]
    return bytes(data[: len(target.data)])


def small_tree(root: Path) -> None:
    root.mkdir()
    (root / "inline").write_bytes(b"tail " * 900)
    (root / "blocks").write_bytes(bytes(range(256)) * 40)
    (root / "empty").write_bytes(b"")
    (root / "dir").mkdir()
    for i in range(150):
        (root / "dir" / f"entry-{i:03}-{'x' * (i % 17)}").write_bytes(b"")
    (root / "dir" / "sub").mkdir()
    (root / "dir" / "sub" / "leaf").write_bytes(b"leaf\n")
    (root / "link").symlink_to("inline")
    (root / "dir" / "hard").hardlink_to(root / "inline")
    for name in ("inline", "blocks", "empty"):
        (root / name).chmod(0o640)
        os.setxattr(root / name, "user.shared", b"value")
        os.setxattr(root / name, "user.own", name.encode())


def blob_file_store(blob: Path) -> Callable[[bool], RafsConfig]:
    return lambda verify: RafsConfig.from_flags(blob_files=[blob], digest_validate=verify)


def blob_directory_store(directory: Path) -> Callable[[bool], RafsConfig]:
    return lambda verify: RafsConfig.from_flags(blob_dir=directory, digest_validate=verify)


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Target]:
    v6_data = V6_BOOTSTRAP.read_bytes()
    found = {
        "v5": Target(
            "v5",
            (V5_DIR / V5_BOOTSTRAPS[0]).read_bytes(),
            [(0, 80), (8192, 18648)],
            blob_directory_store(V5_DIR),
        ),
        "v6": Target(
            "v6",
            v6_data,
            [(1024, 1536), (4096, 4352), (12288, 12800), (16384, 16544)],
            blob_directory_store(V6_DIR),
        ),
    }
    base = tmp_path_factory.mktemp("corruption")
    bootstrap, blob_data = write_v5(
        [
            Entry(b"dir", stat.S_IFDIR | 0o755),
            Entry(b"file", stat.S_IFREG | 0o644, os.urandom(9000), {b"user.x": b"1" * 40}),
            Entry(b"link", stat.S_IFLNK | 0o777, b"file", {b"trusted.y": b""}),
            Entry(b"sparse", stat.S_IFREG | 0o600, bytes(4096) + b"data" * 1024, holes={0}),
        ],
        lambda data: zstandard.ZstdCompressor().compress(data),
        0x80,
    )
    (base / BLOB_ID).write_bytes(blob_data)
    found["v5-synthetic"] = Target(
        "v5-synthetic",
        bootstrap,
        [(0, 80), (8192, len(bootstrap))],
        blob_directory_store(base),
    )
    small_tree(base / "tree")
    for name, options in (("erofs", ()), ("erofs-blobdev", ("--chunksize=4096",))):
        image = base / f"{name}.img"
        blob = base / f"{name}.blob"
        extra = (f"--blobdev={blob}",) if options else ()
        mkfs_erofs(image, base / "tree", *options, *extra)
        data = image.read_bytes()
        found[name] = Target(
            name,
            data,
            [(1024, 1280), (1280, min(len(data), 24576))],
            blob_file_store(blob),
            erofs_checksum=True,
        )
    return found


@needs_mkfs
@pytest.mark.parametrize("name", ["v5", "v5-synthetic", "v6", "erofs", "erofs-blobdev"])
def test_seeded_mutations(name: str, targets: dict[str, Target], tmp_path: Path) -> None:
    target = targets[name]
    run_case(target, target.data, tmp_path / "pristine")  # the original explores cleanly
    for seed in range(CASES_PER_TARGET):
        rng = random.Random(f"{name}-{seed}")
        mutated = mutate(target, rng)
        try:
            run_case(target, mutated, tmp_path / "image")
        except Exception as e:
            raise AssertionError(
                f"{name} seed {seed}: {type(e).__name__}: {e} (replay: "
                f"mutate(targets[{name!r}], random.Random({f'{name}-{seed}'!r})))"
            ) from e


@needs_mkfs
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.data())
def test_hypothesis_patches(
    targets: dict[str, Target], tmp_path: Path, data: st.DataObject
) -> None:
    target = targets[data.draw(st.sampled_from(sorted(targets)), label="target")]
    image = bytearray(target.data)
    patches = data.draw(
        st.lists(
            st.tuples(
                st.one_of(
                    *(st.integers(start, end - 1) for start, end in target.hot),
                    st.integers(0, len(image) - 1),
                ),
                st.binary(min_size=1, max_size=8),
            ),
            min_size=1,
            max_size=6,
        ),
        label="patches",
    )
    for offset, value in patches:
        image[offset : offset + len(value)] = value
    if target.erofs_checksum and data.draw(st.booleans(), label="fix checksum"):
        refresh_erofs_checksum(image)
    cut = data.draw(st.integers(len(image) // 2, len(image)), label="length")
    run_case(target, bytes(image[:cut]), tmp_path / "hypothesis.img")
