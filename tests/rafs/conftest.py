"""Fixtures shared by the RAFS reader tests (helpers live in tests/rafs/images.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from tests.rafs.images import make_tree, mkfs_erofs


@pytest.fixture(scope="session")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("erofs-source") / "tree"
    make_tree(root)
    return root


@pytest.fixture(scope="session")
def build_erofs(tmp_path_factory: pytest.TempPathFactory, source_tree: Path) -> Callable[..., Path]:
    """build_erofs(*mkfs options) -> image path; images are built once per option set."""
    built: dict[tuple[str, ...], Path] = {}

    def build(*options: str) -> Path:
        if options not in built:
            image = tmp_path_factory.mktemp("erofs-image") / "image.erofs"
            mkfs_erofs(
                image, source_tree, *(o.replace("{dir}", str(image.parent)) for o in options)
            )
            built[options] = image
        return built[options]

    return build
