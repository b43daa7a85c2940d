"""Images mkfs.erofs writes with its chunks on a separate blob device read back as their
source through `vhostfs unpack --blob`, `check` and `inspect`: device slots there carry no blob
id, so the blob is named on the command line."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.rafs.build_support import (
    IS_ROOT,
    assert_same_tree,
    make_rootfs_tree,
    run_vhostfs,
    set_mtimes,
    snapshot,
)

pytestmark = pytest.mark.skipif(shutil.which("mkfs.erofs") is None, reason="needs erofs-utils")


@pytest.fixture(scope="module")
def mkfs_image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    work = tmp_path_factory.mktemp("mkfs")
    source = work / "tree"
    make_rootfs_tree(source)
    # mkfs.erofs 1.5 fails on a 255-byte name ("Could not format the device"); ours are tested
    # elsewhere.
    longest = source / "names" / ("x" * 255)
    longest.rename(longest.with_name("x" * 254))
    set_mtimes(source)
    image, blob = work / "image.erofs", work / "blob"
    subprocess.run(
        ["mkfs.erofs", "--quiet", "--chunksize=4096", f"--blobdev={blob}", str(image), str(source)],
        check=True,
        capture_output=True,
    )
    return source, image, blob


def test_unpack_with_blob_gives_back_the_source(
    mkfs_image: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    source, image, blob = mkfs_image
    out = tmp_path / "out"
    result = run_vhostfs("unpack", image, "--blob", blob, "-o", out)
    assert result.exit_code == 0, result.output
    assert_same_tree(snapshot(source, owners=IS_ROOT), snapshot(out, owners=IS_ROOT))


def test_check_reads_every_file_and_says_nothing_was_digest_checked(
    mkfs_image: tuple[Path, Path, Path],
) -> None:
    _, image, blob = mkfs_image
    result = run_vhostfs("check", image, "--blob", blob)
    assert result.exit_code == 0, result.output
    assert "note: blob 0 records no chunk digests" in result.output


def test_without_the_blob_reading_fails_cleanly(mkfs_image: tuple[Path, Path, Path]) -> None:
    _, image, _ = mkfs_image
    result = run_vhostfs("check", image)
    assert result.exit_code == 1
    assert "no file given for it" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_inspect_lists_the_anonymous_device(mkfs_image: tuple[Path, Path, Path]) -> None:
    _, image, blob = mkfs_image
    result = run_vhostfs("inspect", image, "--blob", blob)
    assert result.exit_code == 0, result.output
    assert "format: erofs" in result.output
    assert f"file {blob}" in result.output
