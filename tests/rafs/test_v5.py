"""The RAFS v5 fixtures from the nydus repository, read as their .result files describe them.

A .result file is `tree -J` output (the directory tree) followed by `md5sum` lines for every
regular file, so both the tree shape and every byte of every file are checked. The two
bootstraps describe the same tree over the same uncompressed blob, one with sha256 chunk
digests and one with blake3.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import stat
import struct
from pathlib import Path
from typing import Any

import blake3
import pytest
import zstandard

from tests.rafs.images import (
    V5_BLOB_ID,
    V5_BOOTSTRAPS,
    V5_DIR,
    open_blobs,
    patched,
    read_file,
    resolve,
)
from tests.rafs.synthetic_v5 import BLOB_ID, Entry, write_v5
from vhostfs.rafs import CorruptError, RafsImage, open_image
from vhostfs.storage.blob import ZERO_FILL, Compressor, Digester
from vhostfs.storage.errors import BackendError, ChunkDigestError


def read_result(bootstrap: str) -> tuple[dict[str, Any], dict[bytes, str]]:
    text = (V5_DIR / f"{bootstrap}.result").read_text()
    listing, end = json.JSONDecoder().raw_decode(text)
    md5s = {}
    for line in text[end:].split("\n"):
        if line.strip():
            digest, path = line.split(maxsplit=1)
            md5s[path.encode()] = digest
    return listing[0], md5s


def as_tree(image: RafsImage, ino: int, name: str) -> dict[str, Any]:
    """The directory at ino in tree -J's shape."""
    contents: list[dict[str, Any]] = []
    for entry in image.readdir(ino):
        if entry.name in (b".", b".."):
            continue
        mode = image.getattr(entry.ino).mode
        child = entry.name.decode()
        if stat.S_ISDIR(mode):
            contents.append(as_tree(image, entry.ino, child))
        elif stat.S_ISLNK(mode):
            target = image.readlink(entry.ino).decode()
            contents.append({"type": "link", "name": child, "target": target, "contents": []})
        else:
            contents.append({"type": "file", "name": child})
    return {"type": "directory", "name": name, "contents": contents}


@pytest.fixture(params=V5_BOOTSTRAPS)
def bootstrap(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


def test_superblock_and_blob(bootstrap: str) -> None:
    with open_image(V5_DIR / bootstrap) as image:
        assert image.format == "rafs-v5"
        assert image.root_ino == 1
        assert image.statfs().files == 51
        (blob,) = image.blobs
        assert blob.blob_id == V5_BLOB_ID
        assert blob.compressor is Compressor.NONE
        expected = Digester.SHA256 if bootstrap.startswith("sha256") else Digester.BLAKE3
        assert blob.digester is expected
        assert (blob.chunk_count, blob.compressed_size, blob.uncompressed_size) == (
            23,
            3508766,
            3508766,
        )
        assert blob.chunk_size == 1 << 20


def test_tree_matches_result(bootstrap: str) -> None:
    expected, _ = read_result(bootstrap)
    with open_image(V5_DIR / bootstrap) as image:
        assert as_tree(image, image.root_ino, "") == expected


def test_every_file_matches_its_md5(bootstrap: str) -> None:
    _, md5s = read_result(bootstrap)
    assert len(md5s) == 23
    with open_image(V5_DIR / bootstrap) as image, open_blobs(image, V5_DIR) as blobs:
        for path, digest in md5s.items():
            ino = resolve(image, path)
            size = image.getattr(ino).size
            data = read_file(image, ino, 0, size, blobs)
            assert len(data) == size
            assert hashlib.md5(data).hexdigest() == digest, path


def test_both_bootstraps_read_the_same_bytes() -> None:
    sha256_image, blake3_image = (open_image(V5_DIR / name) for name in V5_BOOTSTRAPS)
    with (
        sha256_image,
        blake3_image,
        open_blobs(sha256_image, V5_DIR) as sha256_blobs,
        open_blobs(blake3_image, V5_DIR) as blake3_blobs,
    ):
        walked = [list(image.walk()) for image in (sha256_image, blake3_image)]
        assert [(path, attr) for path, _, attr in walked[0]] == [
            (path, attr) for path, _, attr in walked[1]
        ]
        for path, ino, attr in walked[0]:
            if stat.S_ISREG(attr.mode):
                first = read_file(sha256_image, ino, 0, attr.size, sha256_blobs)
                assert read_file(blake3_image, ino, 0, attr.size, blake3_blobs) == first, path


def test_chunk_digests_are_those_of_the_data(bootstrap: str) -> None:
    hasher = hashlib.sha256 if bootstrap.startswith("sha256") else blake3.blake3
    with open_image(V5_DIR / bootstrap) as image, open_blobs(image, V5_DIR) as blobs:
        ino = resolve(image, b"/normal-file-test/holefiles/head-hole-1")
        refs = image.chunks(ino, 0, 1 << 30)
        assert [ref.file_offset for ref in refs] == [0, 1 << 20, 2 << 20]
        assert [ref.uncompressed_size for ref in refs] == [1 << 20, 1 << 20, 7]
        for ref in refs:
            data = read_file(image, ino, ref.file_offset, ref.uncompressed_size, blobs)
            assert hasher(data).digest() == ref.digest
            assert not ref.compressed and ref.compressed_size == ref.uncompressed_size


def test_hard_links_share_an_inode(bootstrap: str) -> None:
    with open_image(V5_DIR / bootstrap) as image:
        paths = [b"/hardlink-test/foo", b"/hardlink-test/test.sh", b"/normal-file-test/test.sh"]
        inos = {resolve(image, path) for path in paths}
        assert inos == {5}
        assert image.getattr(5).nlink == 3


def test_symlinks_dots_and_attributes(bootstrap: str) -> None:
    with open_image(V5_DIR / bootstrap) as image:
        root = image.getattr(image.root_ino)
        assert stat.S_ISDIR(root.mode) and root.nlink == 5
        link = resolve(image, b"/symlink-test/root-1")
        assert image.readlink(link) == b"/" * 17
        assert image.getattr(link).size == 17
        busybox = resolve(image, b"/normal-file-test/busybox")
        assert image.lookup(busybox, b".") == busybox
        assert image.lookup(busybox, b"..") == resolve(image, b"/normal-file-test")
        assert image.lookup(image.root_ino, b"..") == image.root_ino
        assert image.lookup(busybox, b"absent") is None
        layer = image.getattr(
            resolve(
                image,
                b"/normal-file-test/busybox/1f777dbdd68d1c4d554bc0d20e027bfef9ed2dfe2d8d5f029e958552a0e12475/layer.tar",
            )
        )
        assert layer.size == 1415680 and layer.blocks == 2765
        assert image.listxattr(busybox) == []


def test_readdir_resumes_at_every_offset(bootstrap: str) -> None:
    with open_image(V5_DIR / bootstrap) as image:
        for _, ino, attr in image.walk():
            if stat.S_ISDIR(attr.mode):
                entries = list(image.readdir(ino))
                assert [e.name for e in entries[:2]] == [b".", b".."]
                for i, entry in enumerate(entries):
                    assert list(image.readdir(ino, entry.next_offset)) == entries[i + 1 :]


def test_missing_blob(bootstrap: str, tmp_path: Path) -> None:
    with open_image(V5_DIR / bootstrap) as image:
        ino = resolve(image, b"/hardlink-test/foo")
        with pytest.raises(BackendError, match=V5_BLOB_ID):
            read_file(image, ino, 0, 100, tmp_path)
        with pytest.raises(BackendError, match="no file given for it"):
            read_file(image, ino, 0, 100)


def test_corrupted_blob_fails_the_digest(bootstrap: str, tmp_path: Path) -> None:
    with open_image(V5_DIR / bootstrap) as image:
        ino = resolve(image, b"/hardlink-test/foo")
        (ref,) = image.chunks(ino, 0, 100)
        shutil.copy(V5_DIR / V5_BLOB_ID, tmp_path / V5_BLOB_ID)
        original = (tmp_path / V5_BLOB_ID).read_bytes()[ref.compressed_offset + 10]
        patched(
            tmp_path / V5_BLOB_ID,
            tmp_path / V5_BLOB_ID,
            {ref.compressed_offset + 10: bytes([original ^ 0x40])},
        )
        with pytest.raises(ChunkDigestError, match=rf"blob {V5_BLOB_ID} chunk {ref.chunk_index}"):
            read_file(image, ino, 0, 100, tmp_path)
        # Without verification the flipped byte comes through.
        data = read_file(image, ino, 0, 100, tmp_path, verify=False)
        assert data[10] == original ^ 0x40


# --- Synthetic v5 images: what the fixtures do not contain ---------------------------------

FILE_CONTENT = b"".join(i.to_bytes(2, "little") for i in range(5000))  # 10000 bytes, 3 chunks
SPARSE_CONTENT = bytes(4096) + b"middle".ljust(4096, b"m") + bytes(2000)


def lz4_literals(data: bytes) -> bytes:
    extra = len(data) - 15
    return b"\xf0" + b"\xff" * (extra // 255) + bytes([extra % 255]) + data


COMPRESSIONS = {
    "none": (lambda data: data, 0x1, 0x0),
    "lz4": (lz4_literals, 0x2, 0x1),
    "zstd": (lambda data: zstandard.ZstdCompressor().compress(data), 0x80, 0x1),
    "gzip": (gzip.compress, 0x40, 0x1),
}


def synthetic(tmp_path: Path, compression: str = "zstd") -> Path:
    compress, flag, chunk_flag = COMPRESSIONS[compression]
    entries = [
        Entry(b"dir", stat.S_IFDIR | 0o700),
        Entry(
            b"file",
            stat.S_IFREG | 0o644,
            FILE_CONTENT,
            {b"user.a": b"1", b"security.selinux": b"system_u:object_r", b"user.empty": b""},
        ),
        Entry(b"link", stat.S_IFLNK | 0o777, b"file", {b"user.on-link": b"yes"}),
        Entry(b"sparse", stat.S_IFREG | 0o600, SPARSE_CONTENT, holes={0, 2}),
    ]
    bootstrap, blob = write_v5(entries, compress, flag, chunk_flag)
    (tmp_path / BLOB_ID).write_bytes(blob)
    (tmp_path / "boot").write_bytes(bootstrap)
    return tmp_path / "boot"


@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_synthetic_files_read_back(tmp_path: Path, compression: str) -> None:
    with open_image(synthetic(tmp_path, compression)) as image:
        assert image.blobs[0].compressor.value.startswith(compression)
        file = resolve(image, b"/file")
        assert read_file(image, file, 0, 20000, tmp_path) == FILE_CONTENT
        assert read_file(image, file, 4000, 200, tmp_path) == FILE_CONTENT[4000:4200]
        sparse = resolve(image, b"/sparse")
        assert read_file(image, sparse, 0, 20000, tmp_path) == SPARSE_CONTENT
        assert read_file(image, sparse, 4090, 12, tmp_path) == SPARSE_CONTENT[4090:4102]


def test_synthetic_holes_are_zero_fill_refs(tmp_path: Path) -> None:
    with open_image(synthetic(tmp_path)) as image:
        sparse = resolve(image, b"/sparse")
        refs = image.chunks(sparse, 0, 1 << 20)
        assert [(ref.blob_index, ref.file_offset, ref.uncompressed_size) for ref in refs] == [
            (ZERO_FILL, 0, 4096),
            (0, 4096, 4096),
            (ZERO_FILL, 8192, 2000),
        ]
        assert [ref.file_offset for ref in image.chunks(sparse, 5000, 10)] == [4096]


def test_synthetic_xattrs_and_symlink(tmp_path: Path) -> None:
    with open_image(synthetic(tmp_path)) as image:
        file = resolve(image, b"/file")
        assert image.listxattr(file) == [b"user.a", b"security.selinux", b"user.empty"]
        assert image.getxattr(file, b"security.selinux") == b"system_u:object_r"
        assert image.getxattr(file, b"user.empty") == b""
        assert image.getxattr(file, b"user.b") is None
        link = resolve(image, b"/link")
        assert image.readlink(link) == b"file"
        assert image.getxattr(link, b"user.on-link") == b"yes"
        directory = resolve(image, b"/dir")
        assert list(image.readdir(directory))[1] == (b"..", 1, stat.S_IFDIR >> 12, 2)
        assert image.explicit_uid_gid


def test_synthetic_damage(tmp_path: Path) -> None:
    boot = synthetic(tmp_path)
    data = boot.read_bytes()
    with open_image(boot) as image:
        file = resolve(image, b"/file")
    # The first chunk record of /file: its digest's first byte.
    record = data.index(blake3.blake3(FILE_CONTENT[:4096]).digest())
    patched(boot, tmp_path / "digest", {record: bytes([data[record] ^ 1])})
    with open_image(tmp_path / "digest") as image, pytest.raises(ChunkDigestError):
        read_file(image, file, 0, 10, tmp_path)
    patched(boot, tmp_path / "offset", {record + 64: struct.pack("<Q", 7)})
    with (
        open_image(tmp_path / "offset") as image,
        pytest.raises(CorruptError, match="file_offset 7"),
    ):
        read_file(image, file, 0, 10, tmp_path)
    patched(boot, tmp_path / "blob", {record + 32: struct.pack("<I", 3)})
    with open_image(tmp_path / "blob") as image, pytest.raises(CorruptError, match="blob 3 of 1"):
        read_file(image, file, 0, 10, tmp_path)
    # The root's child_index pointing back at the root would make a loop.
    root = struct.unpack_from("<I", data, 8192)[0] << 3
    patched(boot, tmp_path / "loop", {root + 92: struct.pack("<I", 1)})
    with pytest.raises(CorruptError, match="out of order or range"):
        open_image(tmp_path / "loop")
