"""The layer contract in pyproject.toml holds for the tree, and fails on a wrong-way import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess[str]:
    """The contracts of the repo's pyproject.toml, checked on the vhostfs found first in
    `package_parent`."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", str(REPO / "pyproject.toml")],
        cwd=package_parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_tree_keeps_its_layers() -> None:
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 2 kept, 0 broken." in result.stdout


def test_an_import_pointing_up_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(REPO / "vhostfs", tmp_path / "vhostfs", ignore=shutil.ignore_patterns("*.so"))
    with open(tmp_path / "vhostfs" / "storage" / "cache.py", "a") as module:
        module.write("\nimport vhostfs.fuse.ops  # storage must not know the transport\n")

    result = lint_imports(tmp_path)

    assert result.returncode != 0
    assert "vhostfs.storage is not allowed to import vhostfs.fuse" in result.stdout
    assert "vhostfs.storage.cache -> vhostfs.fuse.ops" in result.stdout
