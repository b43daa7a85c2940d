"""The daemon owns what it opens: every way out leaves no fd, thread or task behind.

The daemon runs in this process, on the main thread's event loop (it installs signal
handlers); a vhost-user front-end plays QEMU's part from a thread of its own.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

from tests.support import fuse_client as fc
from tests.support.frontend import DaemonGone, Frontend
from tests.support.guest import GuestMemory
from tests.support.paths import NYDUS_FIXTURES
from vhostfs.daemon import (
    Daemon,
    DaemonConfig,
    DaemonState,
    MountConfig,
    MountError,
    PassthroughMountConfig,
    RafsMountConfig,
    SocketPath,
)
from vhostfs.storage import PrefetchConfig, RafsConfig
from vhostfs.vhost.virtqueue import stop_offload

V6 = NYDUS_FIXTURES / "v6" / "rafs-v6-2.2.boot"
QUEUE = 1


@pytest.fixture(autouse=True, scope="module")
def uvloop_initialised() -> None:
    """uvloop opens a pipe of its own, once per process, with its first loop: not ours."""
    uvloop.run(asyncio.sleep(0))


def open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def os_threads(expected: int | None = None) -> int:
    """The process's threads. With `expected`, wait up to 2 s for it: asyncio joins its default
    executor from a helper thread of its own, which may still be on its way out."""
    deadline = time.monotonic() + 2
    while True:
        count = len(os.listdir("/proc/self/task"))
        if expected is None or count == expected or time.monotonic() > deadline:
            return count
        time.sleep(0.01)


def rafs_mount(tmp_path: Path) -> RafsMountConfig:
    storage = RafsConfig.from_flags(
        blob_dir=V6.parent,
        cache_dir=tmp_path / "cache",
        prefetch=PrefetchConfig(enable=True, prefetch_all=True),
    )
    return RafsMountConfig(str(V6), storage, prefetch_files=(b"/lib.rs",))


def share(tmp_path: Path) -> PassthroughMountConfig:
    directory = tmp_path / "share"
    directory.mkdir()
    (directory / "file").write_bytes(b"x" * 5000)
    return PassthroughMountConfig(str(directory))


class GuestSession(threading.Thread):
    """A front-end that negotiates, starts the rings, initialises FUSE and reads the root's
    attributes, then does `then` (hang up, or signal the daemon). What it raised, if anything,
    is in `failure` once it has ended."""

    def __init__(self, socket_path: Path, then: Callable[[Frontend], None]) -> None:
        super().__init__(name="test-frontend")
        self.socket_path = socket_path
        self.then = then
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            self._session()
        except BaseException as e:
            self.failure = e

    def _session(self) -> None:
        socket_path, then = self.socket_path, self.then
        with GuestMemory(((0x10_0000, 8 << 20),)) as mem:
            frontend = Frontend(socket_path, mem)
            try:
                frontend.init()
                frontend.start()
                init = frontend.request(QUEUE, fc.init(), 16 + 64)
                assert fc.parse_out_header(init).error == 0
                reply = frontend.request(QUEUE, fc.getattr_(fc.ROOT), 16 + 104)
                assert fc.parse_out_header(reply).error == 0
                then(frontend)
            finally:
                frontend.close()  # also when something failed: the daemon then stops too


def hang_up(frontend: Frontend) -> None:
    pass  # the session closes the connection when this returns


def send_sigterm(frontend: Frontend) -> None:
    os.kill(os.getpid(), signal.SIGTERM)
    with pytest.raises(DaemonGone):
        frontend.receive(0)  # nothing more comes: the daemon closes the connection as it stops


async def serve_one_session(
    daemon: Daemon, socket_path: Path, then: Callable[[Frontend], None]
) -> set[asyncio.Task[object]]:
    serving = asyncio.get_running_loop().create_task(daemon.serve())
    await daemon.reached(DaemonState.RUNNING)
    session = GuestSession(socket_path, then)
    session.start()
    await serving
    session.join()  # the daemon has stopped: the session's last read has returned
    if session.failure is not None:
        raise session.failure
    return {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}


@pytest.mark.parametrize("exit_by", [hang_up, send_sigterm], ids=["frontend-leaves", "sigterm"])
@pytest.mark.parametrize("kind", ["rafs", "passthrough"])
def test_every_exit_path_closes_everything(
    tmp_path: Path, kind: str, exit_by: Callable[[Frontend], None]
) -> None:
    mount: MountConfig = rafs_mount(tmp_path) if kind == "rafs" else share(tmp_path)
    socket_path = tmp_path / "vhostfs.sock"
    daemon = Daemon(DaemonConfig(SocketPath(str(socket_path)), (("/", mount),)))
    stop_offload()  # a helper thread an earlier test started would end inside this one
    fds, threads, py_threads = open_fds(), os_threads(), threading.active_count()

    left = uvloop.run(serve_one_session(daemon, socket_path, exit_by))

    assert left == set()
    assert daemon.state is DaemonState.STOPPED
    assert open_fds() == fds
    assert threading.active_count() == py_threads
    assert os_threads(threads) == threads, "no thread outlives the daemon (the C helper too)"
    assert not socket_path.exists()


def test_an_error_after_the_mount_opened_closes_it(tmp_path: Path) -> None:
    socket_path = tmp_path / "no-such-dir" / "vhostfs.sock"
    daemon = Daemon(DaemonConfig(SocketPath(str(socket_path)), (("/", rafs_mount(tmp_path)),)))
    fds, threads = open_fds(), os_threads()

    with pytest.raises(FileNotFoundError):
        uvloop.run(daemon.serve())

    assert daemon.state is DaemonState.STOPPED
    assert open_fds() == fds
    assert os_threads(threads) == threads


def test_a_bad_image_fails_before_listening(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\0" * 8192)
    socket_path = tmp_path / "vhostfs.sock"
    mount = RafsMountConfig(str(garbage), RafsConfig.from_flags(blob_dir=tmp_path))
    daemon = Daemon(DaemonConfig(SocketPath(str(socket_path)), (("/", mount),)))
    fds = open_fds()

    with pytest.raises(MountError):
        uvloop.run(daemon.serve())

    assert daemon.state is DaemonState.STOPPED
    assert not socket_path.exists()
    assert open_fds() == fds
