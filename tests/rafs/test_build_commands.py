"""The command line: what inspect shows, check catching damage (naming file and chunk),
unpack refusing to overwrite, and every bad input ending in one line and exit status 1."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.rafs.build_support import SMALL_CHUNK, build, run_vhostfs
from vhostfs.rafs import open_image


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, Path, bytes]:
    """An uncompressed image holding /data (3 chunks of 64 KiB + a bit) and a few others."""
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    data = os.urandom(3 * SMALL_CHUNK + 100)
    (tree / "data").write_bytes(data)
    (tree / "sub" / "small").write_bytes(b"small")
    os.link(tree / "sub" / "small", tree / "sub" / "linked")
    os.symlink("data", tree / "link")
    bootstrap, blob = build(
        [tree], tmp_path / "out", "--compressor", "none", "--chunk-size", str(SMALL_CHUNK)
    )
    assert blob is not None
    return bootstrap, blob, data


def one_line_failure(result_output: str, exit_code: int) -> str:
    assert exit_code == 1, result_output
    assert "Traceback" not in result_output
    lines = result_output.strip().splitlines()
    assert len(lines) == 1, result_output
    return lines[0]


def test_inspect_summarises_and_lists_the_tree(image: tuple[Path, Path, bytes]) -> None:
    bootstrap, blob, _ = image
    summary = run_vhostfs("inspect", bootstrap)
    assert summary.exit_code == 0, summary.output
    assert "format: rafs-v6" in summary.output
    assert f"chunk size: {SMALL_CHUNK}" in summary.output
    assert f"[0] {blob.name}: none/blake3, 5 chunks" in summary.output
    assert "directories 2, files 2, hard links 1, symlinks 1" in summary.output
    assert "/data" not in summary.output

    tree = run_vhostfs("inspect", "--tree", bootstrap).output
    assert f"-rw-r--r-- 0/0 {3 * SMALL_CHUNK + 100:>12} /data" in tree
    assert "/link -> data" in tree
    assert "/sub/small (hard link to /sub/linked)" in tree
    assert "drwxr-xr-x" in tree and " /sub\n" in tree


def test_check_names_the_file_and_chunk_with_a_bad_digest(
    image: tuple[Path, Path, bytes],
) -> None:
    bootstrap, blob, _ = image
    with open_image(bootstrap) as opened:
        data = opened.lookup(opened.root_ino, b"data") or 0
        second = opened.chunks(data, SMALL_CHUNK, 1)[0]
    damaged = bytearray(blob.read_bytes())
    damaged[second.compressed_offset + 10] ^= 0xFF
    blob.write_bytes(bytes(damaged))

    result = run_vhostfs("check", bootstrap, "--blob-dir", blob.parent)

    line = one_line_failure(result.output, result.exit_code)
    assert f"/data: chunk 1 (file bytes {SMALL_CHUNK}..{2 * SMALL_CHUNK})" in line
    assert "digest" in line


def test_check_notices_a_blob_meta_that_disagrees(image: tuple[Path, Path, bytes]) -> None:
    bootstrap, blob, _ = image
    damaged = bytearray(blob.read_bytes())
    damaged[-600] ^= 0xFF  # inside the ToC entries, covered by the ToC digest
    blob.write_bytes(bytes(damaged))

    result = run_vhostfs("check", bootstrap, "--blob-dir", blob.parent)

    line = one_line_failure(result.output, result.exit_code)
    assert "/data: chunk 0" in line and "ToC" in line


def test_check_reports_a_short_blob(image: tuple[Path, Path, bytes]) -> None:
    bootstrap, blob, _ = image
    with open(blob, "r+b") as f:
        f.truncate(2 * SMALL_CHUNK)
    result = run_vhostfs("check", bootstrap, "--blob-dir", blob.parent)
    line = one_line_failure(result.output, result.exit_code)
    assert "/data" in line


def test_a_blob_can_be_named_instead_of_found(
    image: tuple[Path, Path, bytes], tmp_path: Path
) -> None:
    bootstrap, blob, data = image
    renamed = tmp_path / "renamed-blob"
    shutil.copyfile(blob, renamed)
    assert run_vhostfs("check", bootstrap, "--blob", renamed).exit_code == 0
    out = tmp_path / "unpacked"
    assert run_vhostfs("unpack", bootstrap, "--blob", renamed, "-o", out).exit_code == 0
    assert (out / "data").read_bytes() == data


def test_missing_blob_fails_in_one_line(image: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    bootstrap, blob, _ = image
    empty = tmp_path / "no-blobs"
    empty.mkdir()
    result = run_vhostfs("check", bootstrap, "--blob-dir", empty)
    assert blob.name in one_line_failure(result.output, result.exit_code)


def test_unpack_refuses_a_non_empty_output(image: tuple[Path, Path, bytes], tmp_path: Path) -> None:
    bootstrap, blob, _ = image
    out = tmp_path / "busy"
    out.mkdir()
    (out / "something").write_bytes(b"")
    result = run_vhostfs("unpack", bootstrap, "--blob-dir", blob.parent, "-o", out)
    assert "not an empty directory" in one_line_failure(result.output, result.exit_code)


@pytest.mark.parametrize("command", ["inspect", "check", "unpack"])
def test_files_that_are_not_images_fail_in_one_line(command: str, tmp_path: Path) -> None:
    junk = tmp_path / "junk"
    junk.write_bytes(os.urandom(8192))
    extra = ["-o", str(tmp_path / "out")] if command == "unpack" else []
    result = run_vhostfs(command, junk, *extra)
    assert "superblock" in one_line_failure(result.output, result.exit_code)


def test_a_truncated_bootstrap_fails_in_one_line(
    image: tuple[Path, Path, bytes], tmp_path: Path
) -> None:
    bootstrap, _, _ = image
    cut = tmp_path / "cut"
    cut.write_bytes(bootstrap.read_bytes()[:8192])
    result = run_vhostfs("inspect", "--tree", cut)
    one_line_failure(result.output, result.exit_code)


def test_commands_are_registered_on_the_vhostfs_group() -> None:
    import click

    from vhostfs.cli import main

    # The group loads its commands lazily: ask it as click's help and dispatch do.
    ctx = click.Context(main)
    names = {"build", "inspect", "check", "unpack"}
    assert names <= set(main.list_commands(ctx))
    assert all(isinstance(main.get_command(ctx, name), click.Command) for name in names)


def test_an_output_directory_inside_the_source_is_left_out(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(b"data")
    bootstrap, _ = build([tree], tree / "out")
    with open_image(bootstrap) as opened:
        assert [entry.name for entry in opened.readdir(opened.root_ino)] == [b".", b"..", b"file"]
