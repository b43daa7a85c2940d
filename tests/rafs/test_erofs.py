"""Plain EROFS images from mkfs.erofs read back exactly as the tree they were built from.

Each layout mkfs.erofs can produce without compression is covered: FLAT_PLAIN and FLAT_INLINE
(the default), CHUNK_BASED with the chunks in the image (block map), and CHUNK_BASED with the
chunks on an extra blob device (chunk indexes). fsck.erofs checks each image first, so a
difference is ours to explain.
"""

from __future__ import annotations

import itertools
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.rafs.images import (
    BIG_DIRECTORY_ENTRIES,
    IS_ROOT,
    LONGEST_NAME,
    fsck_erofs,
    mkfs_erofs,
    needs_mkfs,
    open_blobs,
    read_file,
    refresh_erofs_checksum,
    resolve,
)
from vhostfs.rafs import (
    CorruptError,
    InodeTypeError,
    NotDirectoryError,
    UnsupportedError,
    open_image,
)
from vhostfs.storage.blob import IN_BOOTSTRAP, ZERO_FILL

pytestmark = needs_mkfs

VARIANTS = {
    "default": (),
    "fixed-time-all-root": ("-T0", "--all-root"),
    "chunked": ("--chunksize=4096",),
    "blobdev": ("--chunksize=4096", "--blobdev={dir}/blob"),
}


def blob_files(image_path: Path) -> list[Path]:
    """What --blob names for the images whose data sits in a separate device file."""
    blob = image_path.parent / "blob"
    return [blob] if blob.exists() else []


def _is_directory(path: Path) -> bool:
    return stat.S_ISDIR(os.lstat(path).st_mode)


@pytest.fixture(params=list(VARIANTS), scope="module")
def variant(request: pytest.FixtureRequest, build_erofs: Callable[..., Path]) -> tuple[str, Path]:
    name: str = request.param
    image = build_erofs(*VARIANTS[name])
    device = ["--device=" + str(image.parent / "blob")] if name == "blobdev" else []
    fsck_erofs(image, *device)
    return name, image


def test_tree_matches_source(variant: tuple[str, Path], source_tree: Path) -> None:
    name, image_path = variant
    all_root = "--all-root" in VARIANTS[name]
    fixed_time = "-T0" in VARIANTS[name]
    expected = {b"/"} | {
        b"/" + os.fsencode(path.relative_to(source_tree)) for path in source_tree.rglob("*")
    }
    seen = set()
    with (
        open_image(image_path) as image,
        open_blobs(image, blob_files=blob_files(image_path)) as blobs,
    ):
        assert image.format == "erofs"
        for path, ino, attr in image.walk():
            seen.add(path)
            source = source_tree / os.fsdecode(path.lstrip(b"/"))
            st = os.lstat(source)
            assert resolve(image, path) == ino
            assert attr.mode == st.st_mode, path
            assert (attr.uid, attr.gid) == ((0, 0) if all_root else (st.st_uid, st.st_gid))
            mtime_ns = attr.mtime * 10**9 + attr.mtime_nsec
            assert mtime_ns == (0 if fixed_time else st.st_mtime_ns), path
            if not stat.S_ISDIR(st.st_mode):
                assert (attr.size, attr.nlink) == (st.st_size, st.st_nlink), path
            if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                assert attr.rdev == st.st_rdev, path
            if stat.S_ISLNK(st.st_mode):
                assert image.readlink(ino) == os.fsencode(os.readlink(source))
            if stat.S_ISREG(st.st_mode):
                assert read_file(image, ino, 0, attr.size + 100, blobs) == source.read_bytes()
            names = sorted(os.fsencode(n) for n in os.listxattr(source, follow_symlinks=False))
            assert sorted(image.listxattr(ino)) == names, path
            for xattr in names:
                value = os.getxattr(source, xattr, follow_symlinks=False)
                assert image.getxattr(ino, xattr) == value, (path, xattr)
            assert image.getxattr(ino, b"user.absent") is None
    assert seen == expected


def test_directories_list_dot_entries_and_match(
    variant: tuple[str, Path], source_tree: Path
) -> None:
    with open_image(variant[1]) as image:
        for directory in [source_tree, *(p for p in source_tree.rglob("*") if _is_directory(p))]:
            path = b"/" + os.fsencode(directory.relative_to(source_tree))
            ino = resolve(image, path)
            entries = list(image.readdir(ino))
            names = [entry.name for entry in entries]
            assert names == sorted(names)
            assert set(names) == {b".", b".."} | {os.fsencode(n) for n in os.listdir(directory)}
            assert image.lookup(ino, b".") == ino
            for entry in entries:
                if entry.name not in (b".", b".."):
                    assert image.lookup(ino, entry.name) == entry.ino
                    kind = stat.S_IFMT(image.getattr(entry.ino).mode)
                    assert entry.dtype == kind >> 12


def test_dot_dot_and_hard_links(variant: tuple[str, Path]) -> None:
    with open_image(variant[1]) as image:
        root = image.root_ino
        a = resolve(image, b"/a")
        assert image.lookup(root, b"..") == root
        assert image.lookup(resolve(image, b"/a/b"), b"..") == a
        hello = resolve(image, b"/hello")
        assert resolve(image, b"/links/hard-1") == hello == resolve(image, b"/a/hard-2")
        assert image.getattr(hello).nlink == 3


def test_big_directory_spans_blocks(variant: tuple[str, Path]) -> None:
    with open_image(variant[1]) as image:
        big = resolve(image, b"/big-directory")
        assert image.getattr(big).size > 16 * 4096
        entries = list(image.readdir(big))
        assert len(entries) == BIG_DIRECTORY_ENTRIES + 2
        for i, entry in enumerate(entries):
            assert image.lookup(big, entry.name) == entry.ino
            if i % 97 == 0:
                # Resuming from any entry's offset yields exactly the entries after it.
                assert list(image.readdir(big, entry.next_offset)) == entries[i + 1 :]
        assert list(image.readdir(big, entries[-1].next_offset)) == []
        for absent in (b"!", b"entry-", b"entry-00001-", b"entry-00001-zz", b"~", b"zzz"):
            assert image.lookup(big, absent) is None


def test_longest_names(variant: tuple[str, Path]) -> None:
    with (
        open_image(variant[1]) as image,
        open_blobs(image, blob_files=blob_files(variant[1])) as blobs,
    ):
        long_file = resolve(image, b"/" + b"n" * LONGEST_NAME)
        assert read_file(image, long_file, 0, 100, blobs) == b"longest name"
        assert image.lookup(image.root_ino, b"n" * 256) is None
        assert image.lookup(image.root_ino, b"") is None
        assert image.lookup(image.root_ino, b"a/b") is None


def test_shared_and_inline_xattrs(variant: tuple[str, Path]) -> None:
    with open_image(variant[1]) as image:
        many = resolve(image, b"/x/many")
        assert len(image.listxattr(many)) == 20
        assert image.getxattr(many, b"user.attribute-07") == b"7" * 7
        for name in (b"shared-1", b"shared-2", b"shared-3"):
            ino = resolve(image, b"/x/" + name)
            assert image.getxattr(ino, b"user.common") == b"same value everywhere"
            assert image.getxattr(ino, b"user.own") == name
        assert image.getxattr(resolve(image, b"/x"), b"user.on-a-directory") == b""


@pytest.mark.skipif(not IS_ROOT, reason="device nodes and ownership need root")
def test_devices_and_owners(variant: tuple[str, Path], source_tree: Path) -> None:
    with open_image(variant[1]) as image:
        for name, device in [(b"null", (1, 3)), (b"loop", (7, 0)), (b"big-numbers", (300, 70000))]:
            attr = image.getattr(resolve(image, b"/special/" + name))
            assert (os.major(attr.rdev), os.minor(attr.rdev)) == device


def test_partial_reads(variant: tuple[str, Path], source_tree: Path) -> None:
    content = (source_tree / "several-blocks").read_bytes()
    with (
        open_image(variant[1]) as image,
        open_blobs(image, blob_files=blob_files(variant[1])) as blobs,
    ):
        ino = resolve(image, b"/several-blocks")
        for offset, size in [(0, 1), (4095, 2), (4096, 4096), (10000, 20000), (len(content), 5)]:
            expected = content[offset : offset + size]
            assert read_file(image, ino, offset, size, blobs) == expected
        assert read_file(image, ino, len(content) + 10, 10, blobs) == b""


def test_chunk_refs_per_layout(variant: tuple[str, Path]) -> None:
    name, path = variant
    with open_image(path) as image:
        ino = resolve(image, b"/several-blocks")
        size = image.getattr(ino).size
        refs = image.chunks(ino, 0, size)
        assert refs[0].file_offset == 0 and refs[-1].file_end == size
        for ref, following in itertools.pairwise(refs):
            assert ref.file_end == following.file_offset
        if name == "blobdev":
            assert {ref.blob_index for ref in refs} == {0}
            assert len(image.blobs) == 1
        else:
            assert {ref.blob_index for ref in refs} == {IN_BOOTSTRAP}
        if name in ("chunked", "blobdev"):
            assert all(ref.uncompressed_size <= 4096 for ref in refs)
        else:
            assert len(refs) == (2 if size % 4096 else 1)  # full blocks, then the inline tail
        assert image.chunks(ino, size, 10) == []
        sparse = resolve(image, b"/sparse")
        assert all(
            ref.blob_index in (IN_BOOTSTRAP, ZERO_FILL, 0)
            for ref in image.chunks(sparse, 0, 1 << 20)
        )


def test_wrong_inode_kinds(variant: tuple[str, Path]) -> None:
    with open_image(variant[1]) as image:
        hello = resolve(image, b"/hello")
        with pytest.raises(NotDirectoryError):
            image.lookup(hello, b"x")
        with pytest.raises(NotDirectoryError):
            image.readdir(hello)
        with pytest.raises(InodeTypeError):
            image.readlink(hello)
        with pytest.raises(InodeTypeError):
            image.chunks(image.root_ino, 0, 10)
        with pytest.raises(InodeTypeError):
            read_file(image, image.root_ino, 0, 10)


def test_statfs(variant: tuple[str, Path], source_tree: Path) -> None:
    with open_image(variant[1]) as image:
        statfs = image.statfs()
        assert statfs.block_size == 4096 and statfs.name_max == 255
        # Hard links count once; the root counts too.
        unique = {os.lstat(p).st_ino for p in [source_tree, *source_tree.rglob("*")]}
        assert statfs.files == len(unique)


def test_compressed_images_are_refused(tmp_path: Path) -> None:
    image_path = tmp_path / "lz4.erofs"
    compressed = tmp_path / "compressible"
    compressed.mkdir()
    (compressed / "text").write_bytes(b"compress me " * 10000)
    mkfs_erofs(image_path, compressed, "-zlz4")
    with open_image(image_path) as image:
        ino = resolve(image, b"/text")
        assert image.getattr(ino).size == 120000  # metadata is still served
        with pytest.raises(UnsupportedError, match="compressed"):
            read_file(image, ino, 0, 100)


def test_directory_loops_are_refused(build_erofs: Callable[..., Path], tmp_path: Path) -> None:
    """/a/b/c rewritten to name /a: lookup and walk refuse it instead of looping."""
    with open_image(build_erofs()) as image:
        a, b, c = (resolve(image, path) for path in (b"/a", b"/a/b", b"/a/b/c"))
    data = bytearray(build_erofs().read_bytes())
    dirents = b"".join(
        struct.pack("<QHBx", nid, nameoff, 2) for nid, nameoff in ((b, 36), (a, 37), (c, 39))
    )
    position = data.index(dirents)
    data[position + 24 : position + 32] = struct.pack("<Q", a)
    refresh_erofs_checksum(data)
    (tmp_path / "loop.erofs").write_bytes(bytes(data))
    with open_image(tmp_path / "loop.erofs") as image:
        with pytest.raises(CorruptError, match="a loop or a hard-linked directory"):
            image.lookup(b, b"c")
        with pytest.raises(CorruptError, match="leads to directory"):
            list(image.walk())
        assert [entry.name for entry in image.readdir(b)] == [b".", b"..", b"c"]


def test_superblock_checksum(build_erofs: Callable[..., Path], tmp_path: Path) -> None:
    with open_image(build_erofs()) as image:
        files = image.statfs().files
    data = bytearray(build_erofs().read_bytes())
    data[1024 + 16] ^= 1  # s_inos
    (tmp_path / "image").write_bytes(bytes(data))
    with pytest.raises(CorruptError, match="checksum"):
        open_image(tmp_path / "image")
    refresh_erofs_checksum(data)
    (tmp_path / "image").write_bytes(bytes(data))
    with open_image(tmp_path / "image") as image:
        assert image.statfs().files == files ^ 1
