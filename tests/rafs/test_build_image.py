"""Images built from a directory read back as the directory: through our reader and `vhostfs
unpack` for every compressor and digester, and through erofs-utils for uncompressed builds.
Also: the bytes nydusd checks, determinism, deduplication, and size limits."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest

from tests.rafs.build_support import (
    IS_ROOT,
    SMALL_CHUNK,
    Entry,
    assert_same_tree,
    build,
    make_rootfs_tree,
    run_vhostfs,
    snapshot,
)
from tests.rafs.images import V6_BLOB_ID, V6_DIR, open_blobs
from vhostfs.rafs import layout as L
from vhostfs.rafs import open_image
from vhostfs.rafs.blobmeta import read_chunk_digests, read_chunk_infos, read_toc
from vhostfs.rafs.build.blob_writer import Chunk, chunk_info_v1, ci_header, tar_header
from vhostfs.rafs.build.bootstrap import ImageSettings, write_bootstrap
from vhostfs.rafs.build.tree import Node, number_inodes
from vhostfs.rafs.v6 import RafsV6Image
from vhostfs.storage.blob import Compressor, Digester

needs_erofs_utils = pytest.mark.skipif(
    shutil.which("fsck.erofs") is None, reason="needs erofs-utils"
)
COMBINATIONS = [
    (compressor, digester)
    for compressor in ("zstd", "none", "lz4_block")
    for digester in ("blake3", "sha256")
]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("build-source") / "tree"
    make_rootfs_tree(root)
    return root


@pytest.fixture(scope="module", params=COMBINATIONS, ids=["-".join(c) for c in COMBINATIONS])
def image(
    request: pytest.FixtureRequest, source: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, Path]:
    compressor, digester = request.param
    out = tmp_path_factory.mktemp(f"build-{compressor}-{digester}")
    bootstrap, blob = build(
        [source],
        out,
        "--compressor",
        compressor,
        "--digester",
        digester,
        "--chunk-size",
        str(SMALL_CHUNK),
    )
    assert blob is not None
    return bootstrap, blob


@pytest.fixture(scope="module")
def uncompressed(source: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    bootstrap, blob = build([source], tmp_path_factory.mktemp("none"), "--compressor", "none")
    assert blob is not None
    return bootstrap, blob


def test_unpack_gives_back_the_source(
    image: tuple[Path, Path], source: Path, tmp_path: Path
) -> None:
    bootstrap, blob = image
    result = run_vhostfs("unpack", bootstrap, "--blob-dir", blob.parent, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert_same_tree(snapshot(source, owners=IS_ROOT), snapshot(tmp_path / "out", owners=IS_ROOT))


def test_check_reads_and_verifies_everything(image: tuple[Path, Path]) -> None:
    bootstrap, blob = image
    result = run_vhostfs("check", bootstrap, "--blob-dir", blob.parent)
    assert result.exit_code == 0, result.output
    assert "ok:" in result.output and "note:" not in result.output


def test_blob_meta_agrees_with_the_chunk_table(image: tuple[Path, Path]) -> None:
    bootstrap, blob = image
    with open_image(bootstrap) as opened, open_blobs(opened, blob.parent) as store:
        (info,) = opened.blobs
        names = [entry.name for entry in read_toc(store, info)]
        infos = read_chunk_infos(store, info)
        digests = read_chunk_digests(store, info)
        assert isinstance(opened, RafsV6Image)
        table = bootstrap.read_bytes()[
            opened.ext.chunk_table_offset : opened.ext.chunk_table_offset
            + opened.ext.chunk_table_size
        ]
    assert names == ["image.blob", "blob.meta", "blob.meta.header", "blob.digest"]
    records = list(L.CHUNK_INFO.iter_unpack(table))
    assert len(records) == len(infos) == len(digests) == info.chunk_count
    for digest, blob_index, flags, csize, usize, coffset, uoffset, _, index, _ in records:
        entry = infos[index]
        assert blob_index == 0 and digests[index] == digest
        assert (entry.compressed_offset, entry.compressed_size) == (coffset, csize)
        assert (entry.uncompressed_offset, entry.uncompressed_size) == (uoffset, usize)
        assert entry.compressed == bool(flags & L.CHUNK_COMPRESSED)
    assert [r[0] for r in records] == sorted(r[0] for r in records)  # digest order, as nydus


def test_superblocks_and_tables_are_what_nydusd_checks(image: tuple[Path, Path]) -> None:
    bootstrap, blob = image
    data = bootstrap.read_bytes()
    blob_bytes = blob.read_bytes()
    sb = L.EROFS_SUPER.unpack_from(data, L.EROFS_SUPER_OFFSET)
    magic, checksum, compat, blkszbits, extslots, root_nid, inos = sb[:7]
    blocks, meta_blkaddr, xattr_blkaddr = sb[9:12]
    incompat, s_u, extra_devices, devt_slotoff = sb[14:]
    assert (magic, checksum, compat, blkszbits, extslots) == (L.EROFS_MAGIC, 0, 0x4000_0000, 12, 0)
    assert (incompat, s_u, extra_devices, devt_slotoff, xattr_blkaddr) == (0xC, 0, 1, 11, 0)
    assert root_nid == 128 and inos > 0 and len(data) % 4096 == 0
    assert meta_blkaddr * 4096 + root_nid * 32 > 4096 + 256  # inodes after the blob table
    flags, bt_offset, bt_size, chunk_size, ct_offset, ct_size, pt_offset, pt_size = (
        L.RAFS_V6_EXT_SUPER.unpack_from(data, L.RAFS_V6_EXT_SUPER_OFFSET)
    )
    assert (bt_offset, bt_size, chunk_size, pt_offset, pt_size) == (4096, 256, SMALL_CHUNK, 0, 0)
    wanted = L.FLAG_EXPLICIT_UID_GID | L.FLAG_HAS_XATTR | L.FLAG_INLINED_CHUNK_DIGEST
    assert flags & wanted == wanted and flags & L.FLAG_ENCRYPTION_NONE == 0
    assert ct_offset % 4096 == 0 and ct_size % 80 == 0 and ct_offset + ct_size <= len(data)
    tag, device_blocks, mapped_blkaddr = L.DEVICE_SLOT.unpack_from(data, 1408)
    entry = L.RAFS_V6_BLOB_ENTRY.unpack_from(data, 4096)
    blob_id = hashlib.sha256(blob_bytes).hexdigest()
    assert tag == entry[0] == blob_id.encode() == blob.name.encode()
    uncompressed_size = entry[8]
    assert device_blocks == blocks == uncompressed_size // 4096
    assert mapped_blkaddr * 4096 >= len(data) and mapped_blkaddr * 4096 % 0x80000 == 0
    assert entry[1:3] == (0, SMALL_CHUNK)
    assert entry[6] == 0x7000_0021  # ALIGNED, INLINED_CHUNK_DIGEST, tar headers, ToC
    assert entry[7] == len(blob_bytes)
    toc_size, toc_digest = entry[9], entry[14]
    assert hashlib.sha256(blob_bytes[-toc_size:]).digest() == toc_digest
    ci_compressed, ci_uncompressed = entry[12], entry[13]
    assert ci_compressed <= ci_uncompressed == entry[3] * 16


def test_uncompressed_blob_data_sits_at_its_uncompressed_offsets(
    uncompressed: tuple[Path, Path], source: Path
) -> None:
    """What the kernel needs to use the blob as an EROFS device: each chunk at blkaddr * 4096,
    and the device covering the last chunk's whole last block."""
    bootstrap, blob = uncompressed
    blob_bytes = blob.read_bytes()
    with open_image(bootstrap) as opened:
        assert isinstance(opened, RafsV6Image)
        ext = opened.ext
        (info,) = opened.blobs
        assert info.uncompressed_size is not None
        assert len(blob_bytes) >= info.uncompressed_size
        for path in ("multi-chunk", "sparse", "usr/lib/deep/lib.so"):
            ino = opened.root_ino
            for name in path.split("/"):
                ino = opened.lookup(ino, name.encode()) or 0
            original = (source / path).read_bytes()
            for ref in opened.chunks(ino, 0, len(original)):
                at = ref.uncompressed_offset
                assert at % 4096 == 0
                assert (
                    blob_bytes[at : at + ref.uncompressed_size]
                    == original[ref.file_offset : ref.file_end]
                )
    table = bootstrap.read_bytes()[
        ext.chunk_table_offset : ext.chunk_table_offset + ext.chunk_table_size
    ]
    for record in L.CHUNK_INFO.iter_unpack(table):
        flags, csize, usize, coffset, uoffset = record[2:7]
        assert (flags, csize, coffset) == (0, usize, uoffset)
        assert uoffset + usize <= info.uncompressed_size


@needs_erofs_utils
def test_fsck_erofs_extracts_the_source(
    uncompressed: tuple[Path, Path], source: Path, tmp_path: Path
) -> None:
    bootstrap, blob = uncompressed
    out = tmp_path / "extracted"
    subprocess.run(
        ["fsck.erofs", f"--device={blob}", f"--extract={out}", str(bootstrap)],
        check=True,
        capture_output=True,
    )

    # fsck.erofs 1.5 writes neither xattrs nor hard links (each name gets its own copy), and
    # it sets modes before owners, so chown clears the set-id bits it just wrote.
    def seen_by_fsck(root: Path) -> dict[bytes, Entry]:
        tree = snapshot(root, owners=IS_ROOT, xattrs=False, hard_links=False)
        return {path: replace(entry, mode=entry.mode & ~0o6000) for path, entry in tree.items()}

    assert_same_tree(seen_by_fsck(source), seen_by_fsck(out))
    with open_image(bootstrap) as opened:
        setuid = opened.lookup(opened.root_ino, b"setuid") or 0
        assert opened.getattr(setuid).mode & 0o7777 == 0o4755  # the image itself has them


@needs_erofs_utils
def test_dump_erofs_reads_the_layout(uncompressed: tuple[Path, Path], source: Path) -> None:
    bootstrap, blob = uncompressed

    def dump(*options: str) -> str:
        done = subprocess.run(
            ["dump.erofs", f"--device={blob}", *options, str(bootstrap)],
            capture_output=True,
            text=True,
            errors="surrogateescape",  # one of the names is not UTF-8
        )
        assert done.returncode == 0 and "<E>" not in done.stderr, done.stderr
        return done.stdout

    assert "chunked_file device_table" in dump("-s")
    assert "root nid:                          128" in dump("-s")
    dump("-S")
    # Hard links are one inode: every name shows the same nid and the full link count.
    nids = {
        line
        for name in ("small", "names/links/hard-1", "usr/hard-2")
        for line in dump(f"--path=/{name}").splitlines()
        if line.startswith("NID:")
    }
    assert len(nids) == 1 and "Links: 3" in nids.pop()
    listing = dump("--path=/names", "--ls")
    assert "ünïcødé" in listing and "x" * 255 in listing


def test_builds_are_deterministic(source: Path, tmp_path: Path) -> None:
    copy = tmp_path / "elsewhere" / "copy"
    copy.parent.mkdir()
    subprocess.run(["cp", "-a", str(source), str(copy)], check=True)
    for compressor in ("zstd", "lz4_block", "none"):
        outputs = [
            build([tree], tmp_path / f"{compressor}-{n}", "--compressor", compressor)
            for n, tree in enumerate([source, source, copy])
        ]
        first_bootstrap, first_blob = outputs[0]
        assert first_blob is not None
        for bootstrap, blob in outputs[1:]:
            assert blob is not None and blob.name == first_blob.name
            assert bootstrap.read_bytes() == first_bootstrap.read_bytes()
            assert blob.read_bytes() == first_blob.read_bytes()


def test_identical_chunks_are_stored_once(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    original = os.urandom(1 << 20)
    for n in range(8):
        (tree / f"copy-{n}").write_bytes(original)
    block = os.urandom(SMALL_CHUNK)
    (tree / "same-chunk-repeated").write_bytes(block * 10)
    (tree / "copy-then-block").write_bytes(original + block)

    bootstrap, blob = build([tree], tmp_path / "out", "--compressor", "none", "--chunk-size", "64K")

    assert blob is not None
    with open_image(bootstrap) as opened:
        (info,) = opened.blobs
    assert info.chunk_count == (1 << 20) // SMALL_CHUNK + 1
    assert info.uncompressed_size == (1 << 20) + SMALL_CHUNK
    assert blob.stat().st_size < (1 << 20) + SMALL_CHUNK + 16 * 1024  # data + meta and ToC
    result = run_vhostfs("build", tree, "-o", tmp_path / "again", "--chunk-size", "64K")
    assert f"deduplicated: {8 * (1 << 20) + 10 * SMALL_CHUNK} bytes" in result.output


def test_a_directory_of_100000_entries(tmp_path: Path) -> None:
    # Made in memory: creating and scanning 100,000 files would only time the file system.
    names = [f"entry-{n:06}-{'x' * (n % 50)}".encode() for n in range(100_000)]
    big = Node(stat.S_IFDIR | 0o755, mtime=1)
    big.entries = {name: Node(stat.S_IFREG | 0o644) for name in names}
    root = Node(stat.S_IFDIR | 0o755, entries={b"big": big})
    bootstrap = tmp_path / "bootstrap"
    settings = ImageSettings(1 << 20, Compressor.NONE, Digester.BLAKE3)
    write_bootstrap(bootstrap, number_inodes(root), {}, [], [], settings)

    with open_image(bootstrap) as opened:
        directory = opened.lookup(opened.root_ino, b"big")
        assert directory is not None
        assert [entry.name for entry in opened.readdir(directory)] == [b".", b"..", *names]
        for name in (names[0], names[50_000], names[-1]):
            assert opened.lookup(directory, name) is not None
        assert opened.lookup(directory, b"entry-100000-") is None
        assert opened.statfs().files == 100_002
    if shutil.which("dump.erofs"):
        listing = subprocess.run(
            ["dump.erofs", "--path=/big", "--ls", str(bootstrap)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert listing.count("entry-") == 100_000


def test_a_tree_without_file_data_has_no_blob(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "dir").mkdir(parents=True)
    (tree / "dir" / "empty").write_bytes(b"")
    os.symlink("dir/empty", tree / "link")
    bootstrap, blob = build([tree], tmp_path / "out")

    assert blob is None
    sb = L.EROFS_SUPER.unpack_from(bootstrap.read_bytes(), L.EROFS_SUPER_OFFSET)
    assert sb[9] == 0 and sb[16] == 0  # s_blocks and extra_devices: nydusd wants both 0 here
    assert run_vhostfs("check", bootstrap).exit_code == 0
    result = run_vhostfs("unpack", bootstrap, "-o", tmp_path / "out-tree")
    assert result.exit_code == 0, result.output
    assert_same_tree(snapshot(tree), snapshot(tmp_path / "out-tree"))


@pytest.mark.parametrize("size", ["4K", "4096", "16M", "0x100000"])
def test_chunk_sizes_from_4k_to_16m_are_accepted(size: str, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_bytes(os.urandom(10_000))
    bootstrap, _ = build([tree], tmp_path / "out", "--chunk-size", size)
    expected = {"4K": 4096, "4096": 4096, "16M": 16 << 20, "0x100000": 1 << 20}[size]
    with open_image(bootstrap) as opened:
        assert isinstance(opened, RafsV6Image)
        assert opened.chunk_size == expected


@pytest.mark.parametrize("size", ["3000", "2K", "32M", "abc", "0"])
def test_other_chunk_sizes_are_refused(size: str, tmp_path: Path) -> None:
    result = run_vhostfs("build", tmp_path, "-o", tmp_path / "out", "--chunk-size", size)
    assert result.exit_code != 0
    assert "Traceback" not in result.output


def test_part_tar_headers_are_byte_for_byte_what_nydus_writes() -> None:
    fixture = (V6_DIR / V6_BLOB_ID).read_bytes()
    # In the v2.2 fixture: image.blob ends at 7802, blob.meta at 12442, blob.digest at 13018.
    for name, size, at in [(b"image.blob", 7802, 7802), (b"blob.meta", 4128, 12442)]:
        assert tar_header(name, size) == fixture[at : at + 512]
    assert tar_header(L.TOC_NAME, 512) == fixture[-512:]


def test_chunk_info_array_and_header_are_byte_for_byte_what_nydus_writes() -> None:
    fixture = (V6_DIR / V6_BLOB_ID).read_bytes()
    # The fixture's two zstd chunks (reference notes, worked example), CI array at 8314.
    chunks = [
        Chunk(0, b"", uncompressed_offset=0, uncompressed_size=16931),
        Chunk(1, b"", uncompressed_offset=20480, uncompressed_size=13400),
    ]
    chunks[0].compressed_offset, chunks[0].compressed_size = 0, 4828
    chunks[1].compressed_offset, chunks[1].compressed_size = 4828, 2974
    assert b"".join(chunk_info_v1(c) for c in chunks) == fixture[8314:8346]
    assert ci_header(Compressor.NONE, 2, 8314, 32, 32) == fixture[8346:12442]
