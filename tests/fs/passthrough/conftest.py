"""Fixtures for the writable passthrough: a tree, the fs over it, and a guest."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.passthrough_guest import Guest, build_tree
from vhostfs.fs import Passthrough


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    root = build_tree(tmp_path)
    root.chmod(0o777)  # unprivileged callers may create here
    (tmp_path / "outside-dir").mkdir()
    (tmp_path / "outside-dir" / "victim").write_bytes(b"victim")
    (tmp_path / "outside-dir" / "victim").chmod(0o644)
    return root


@pytest.fixture
def rw(tree: Path) -> Iterator[Passthrough]:
    fs = Passthrough(tree)
    yield fs
    fs.close()


@pytest.fixture
def w(rw: Passthrough) -> Guest:
    return Guest(rw)
