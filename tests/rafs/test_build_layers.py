"""Layered builds: one blob per layer, chunks shared across layers, one merged bootstrap."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vhostfs.rafs.build import BuildOptions, build_image
from vhostfs.rafs.image import open_image
from vhostfs.storage import RafsConfig, SyncStorage

CHUNK = 64 << 10


def read_file(image: Path, blob_dir: Path, *path: bytes) -> bytes:
    config = RafsConfig.from_flags(blob_dir=blob_dir)
    with open_image(image) as opened, SyncStorage(config, opened.blobs, bootstrap=image) as store:
        ino = opened.root_ino
        for name in path:
            found = opened.lookup(ino, name)
            assert found is not None, name
            ino = found
        size = opened.getattr(ino).size
        return store.read(opened.chunks(ino, 0, size), 0, size)


def test_each_layer_gets_a_blob_of_its_new_chunks(tmp_path: Path) -> None:
    shared = os.urandom(4 * CHUNK)
    lower, upper, top = tmp_path / "lower", tmp_path / "upper", tmp_path / "top"
    for layer in (lower, upper, top):
        layer.mkdir()
    (lower / "shared").write_bytes(shared)
    (lower / "replaced").write_bytes(os.urandom(CHUNK))
    (upper / "copy").write_bytes(shared[CHUNK:] + b"x")  # three chunks of lower's, one new
    (upper / "replaced").write_bytes(b"upper's own\n")
    (top / "again").write_bytes(shared)  # nothing new: this layer gets no blob

    options = BuildOptions(chunk_size=CHUNK, blob_per_layer=True)
    result = build_image([lower, upper, top], tmp_path / "out", options)

    assert len(result.blobs) == 2
    lower_blob, upper_blob = result.blobs
    # Only what is in the final tree is stored: lower's "replaced" is hidden by upper's.
    assert lower_blob.chunk_count == 4
    assert upper_blob.chunk_count == 2  # "copy"'s odd last chunk, and upper's "replaced"
    # No copy of lower's chunks went into upper's blob.
    assert upper_blob.compressed_size < lower_blob.compressed_size
    with open_image(result.bootstrap) as opened:
        assert [blob.blob_id for blob in opened.blobs] == [b.blob_id for b in result.blobs]

    out = tmp_path / "out"
    assert read_file(result.bootstrap, out, b"shared") == shared
    assert read_file(result.bootstrap, out, b"copy") == shared[CHUNK:] + b"x"
    assert read_file(result.bootstrap, out, b"replaced") == b"upper's own\n"
    assert read_file(result.bootstrap, out, b"again") == shared


def test_without_blob_per_layer_the_layers_share_one_blob(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / name).write_bytes(os.urandom(CHUNK))
    result = build_image([tmp_path / "a", tmp_path / "b"], tmp_path / "out", BuildOptions(CHUNK))
    assert result.blob is not None and result.blob.chunk_count == 2


def test_prefetch_patterns_become_the_prefetch_table(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    tree = tmp_path / "tree"
    (tree / "usr" / "bin").mkdir(parents=True)
    (tree / "usr" / "bin" / "python3").write_bytes(b"elf")
    (tree / "etc").mkdir()
    (tree / "etc" / "hosts").write_text("127.0.0.1 localhost\n")
    patterns = (b"/usr/bin", b"/etc/hosts", b"/no/such/path", b"/usr/bin/")
    options = BuildOptions(prefetch_patterns=patterns)
    result = build_image([tree], tmp_path / "out", options)
    with open_image(result.bootstrap) as opened:
        usr = opened.lookup(opened.root_ino, b"usr")
        etc = opened.lookup(opened.root_ino, b"etc")
        assert usr is not None and etc is not None
        expected = [opened.lookup(usr, b"bin"), opened.lookup(etc, b"hosts")]
        assert opened.prefetch_table() == expected  # each node once, in pattern order
    assert "/no/such/path" in caplog.text
    plain = build_image([tree], tmp_path / "plain", BuildOptions())
    with open_image(plain.bootstrap) as opened:
        assert opened.prefetch_table() == []
