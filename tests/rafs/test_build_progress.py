"""The progress bar: drawn on a terminal, silent otherwise."""

from __future__ import annotations

import io
import os
from pathlib import Path

from vhostfs.rafs.build import BuildOptions, build_image
from vhostfs.rafs.build.progress import Progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_that_ends_on_a_new_line() -> None:
    screen = Terminal()
    with Progress(2_000_000, "build", screen) as progress:
        progress.advance(1_000_000)
    shown = screen.getvalue()
    assert shown.startswith("\rbuild [###############...............]  50% 1.0/2.0 MB")
    assert shown.endswith("\n")


def test_anything_else_gets_nothing() -> None:
    pipe = io.StringIO()
    with Progress(100, "build", pipe) as progress:
        progress.advance(100)
    assert pipe.getvalue() == ""


def test_a_build_on_a_terminal_reaches_100_percent(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "data").write_bytes(os.urandom(300_000))
    screen = Terminal()
    build_image([tree], tmp_path / "out", BuildOptions(chunk_size=65536), progress_stream=screen)
    assert "100% 0.3/0.3 MB" in screen.getvalue().splitlines()[-1]
