"""The localfs backend: where it finds blobs, and what it says when it cannot."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from tests.storage.blobs import run
from vhostfs.storage.blob import blob_names
from vhostfs.storage.errors import BackendError
from vhostfs.storage.localfs import LocalFsBackend


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path, Path]:
    main, alt1, alt2 = (tmp_path / name for name in ("main", "alt1", "alt2"))
    for directory in (main, alt1, alt2):
        directory.mkdir()
    (main / "a").write_bytes(b"main-a")
    (alt1 / "a").write_bytes(b"alt1-a")
    (alt1 / "b").write_bytes(b"alt1-b")
    (alt2 / "b").write_bytes(b"alt2-b")
    (alt2 / "c").write_bytes(b"alt2-c")
    (tmp_path / "explicit").write_bytes(b"explicit")
    return main, alt1, alt2


def test_lookup_order(tmp_path: Path, dirs: tuple[Path, Path, Path]) -> None:
    main, alt1, alt2 = dirs
    backend = LocalFsBackend(dir=main, alt_dirs=[alt1, alt2], files={"c": tmp_path / "explicit"})
    assert backend.path_of("a") == str(main / "a")
    assert backend.path_of("b") == str(alt1 / "b")
    assert backend.path_of("c") == str(tmp_path / "explicit")
    with pytest.raises(BackendError, match="blob d: not found in"):
        backend.path_of("d")

    async def scenario() -> None:
        assert await backend.read("b", 2, 4) == b"t1-b"
        assert await backend.read("c", 0, 8) == b"explicit"

    run(scenario())
    run(backend.aclose())


def test_blob_file_serves_any_id(tmp_path: Path, dirs: tuple[Path, Path, Path]) -> None:
    backend = LocalFsBackend(dir=dirs[0], blob_file=tmp_path / "explicit")
    assert backend.path_of("a") == str(tmp_path / "explicit")
    assert backend.path_of("anything") == str(tmp_path / "explicit")
    run(backend.aclose())


@pytest.mark.parametrize("blob_id", ["", ".", "..", "../main/a", "x/y", "a\0"])
def test_ids_that_are_not_file_names_are_refused(
    dirs: tuple[Path, Path, Path], blob_id: str
) -> None:
    backend = LocalFsBackend(dir=dirs[0])
    with pytest.raises(BackendError, match="not a file name"):
        backend.path_of(blob_id)
    run(backend.aclose())


def test_no_directory_and_no_file(tmp_path: Path) -> None:
    backend = LocalFsBackend()
    with pytest.raises(BackendError, match="blob a: no file given for it"):
        backend.path_of("a")
    run(backend.aclose())


def test_errors_name_the_blob_and_range(tmp_path: Path, dirs: tuple[Path, Path, Path]) -> None:
    backend = LocalFsBackend(dir=dirs[0])

    async def scenario() -> None:
        with pytest.raises(BackendError, match=r"blob a: bytes 4\.\.10 run past the end .*6 bytes"):
            await backend.read("a", 4, 6)
        with pytest.raises(BackendError, match="blob zz: not found"):
            await backend.read("zz", 0, 1)
        with pytest.raises(BackendError, match="blob a: -1\\+1 is not a file range"):
            await backend.read("a", -1, 1)
        assert await backend.read("a", 6, 0) == b""

    run(scenario())
    run(backend.aclose())


def test_reads_run_off_the_event_loop(tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(b"x" * 100)
    backend = LocalFsBackend(dir=tmp_path, threads=2)
    reader_threads: set[str] = set()
    original = backend._pread

    def spy(blob_id: str, offset: int, size: int) -> bytes:
        reader_threads.add(threading.current_thread().name)
        return original(blob_id, offset, size)

    backend._pread = spy  # type: ignore[method-assign]

    async def scenario() -> None:
        results = await asyncio.gather(*(backend.read("blob", i, 10) for i in range(20)))
        assert results == [b"x" * 10] * 20

    run(scenario())
    assert reader_threads and threading.main_thread().name not in reader_threads
    run(backend.aclose())


def test_local_file_is_opened_once(tmp_path: Path) -> None:
    (tmp_path / "blob").write_bytes(b"y" * 10)
    backend = LocalFsBackend(dir=tmp_path)
    first = backend.local_file("blob")
    assert backend.local_file("blob") == first and first.size == 10
    run(backend.aclose())


def test_blob_names() -> None:
    assert blob_names(["a", "", "b", "a", "c"]) == [
        "<device 0>",
        "<device 1>",
        "b",
        "<device 3>",
        "c",
    ]
