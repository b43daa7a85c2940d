"""`vhostfs virtiofs` launched as Kata launches nydusd, and driven through its HTTP API.

Readiness is waited for exactly as Kata's Go runtime does (GET /api/v1/daemon until `state` is
RUNNING, status ignored); mounts are made with the bodies Kata sends; a vhost-user front-end
then reads through the pseudo root.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.frontend import Frontend
from tests.support.guest import GuestMemory
from tests.support.nydusd import Nydusd, runtime_rs_argv

QUEUE = 1


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    directory = tmp_path / "sandbox-shared"
    (directory / "c1" / "rootfs").mkdir(parents=True)
    (directory / "c1" / "config.json").write_text('{"ociVersion": "1.0.2"}')
    return directory


def start(tmp_path: Path, argv: Sequence[str], cwd: Path | None = None) -> Nydusd:
    return Nydusd(argv, cwd or tmp_path, tmp_path / "nydusd-api.sock", tmp_path / "nydusd.log")


@pytest.fixture
def kata_go(tmp_path: Path) -> Iterator[Nydusd]:
    argv = [
        "virtiofs",
        "--log-level",
        "info",
        "--apisock",
        str(tmp_path / "nydusd-api.sock"),
        "--sock",
        str(tmp_path / "vhost-fs.sock"),
        # Kata's default virtio_fs_extra_args, meant for virtiofsd:
        "--thread-pool-size=1",
        "--announce-submounts",
    ]
    daemon = start(tmp_path, argv)
    yield daemon
    daemon.close()


def read_through_guest(socket_path: Path, *path: bytes) -> bytes:
    with GuestMemory(((0x10_0000, 8 << 20),)) as mem:
        frontend = Frontend(socket_path, mem)
        try:
            frontend.init()
            frontend.start()
            assert fc.parse_out_header(frontend.request(QUEUE, fc.init(), 16 + 64)).error == 0
            node = 1
            for name in path:
                reply = frontend.request(QUEUE, fc.lookup(node, name), 16 + 128)
                assert fc.parse_out_header(reply).error == 0, name
                node = fc.parse_entry_out(reply[16:]).nodeid
            opened = frontend.request(QUEUE, fc.open_(node), 16 + 16)
            fh = fc.parse_open_out(opened[16:])[0]
            return frontend.request(QUEUE, fc.read(node, fh, 0, 4096), 16 + 4096)[16:]
        finally:
            frontend.close()


def test_kata_go_sequence(kata_go: Nydusd, shared: Path, tmp_path: Path) -> None:
    info = kata_go.wait_running()
    assert info["id"] is None and isinstance(info["version"], dict)
    assert kata_go.log().count("ignoring virtiofsd arguments") == 1
    assert (tmp_path / "vhost-fs.sock").exists(), "the vhost socket listens before RUNNING"
    # The daemon runs with umask 0 (for the writable passthrough); its sockets stay ours alone.
    for sock in (tmp_path / "vhost-fs.sock", kata_go.apisock):
        assert stat.S_IMODE(os.stat(sock).st_mode) & 0o077 == 0, sock

    body = {"fs_type": "passthrough_fs", "source": str(shared), "config": ""}
    mounted = kata_go.api.post("/api/v1/mount?mountpoint=/containers", json=body)
    assert mounted.status_code == 204, mounted.text
    collection = kata_go.api.get("/api/v1/daemon").json()["backend_collection"]
    assert collection["/containers"]["backend_type"] == "PassthroughFs"

    again = kata_go.api.post("/api/v1/mount?mountpoint=/containers", json=body)
    assert again.status_code == 500 and "already exists" in again.json()["message"]

    data = read_through_guest(tmp_path / "vhost-fs.sock", b"containers", b"c1", b"config.json")
    assert data == b'{"ociVersion": "1.0.2"}'

    # The front-end has gone: like nydusd, the daemon exits with it.
    assert kata_go.process.wait(10) == 0, kata_go.log()
    assert not (tmp_path / "vhost-fs.sock").exists()


def test_mount_umount_and_exit_through_the_api(kata_go: Nydusd, shared: Path) -> None:
    kata_go.wait_running()
    body = {"fs_type": "passthrough_fs", "source": str(shared), "config": ""}
    for mountpoint in ("/containers", "/rafs/c1/lowerdir"):
        assert (
            kata_go.api.post(f"/api/v1/mount?mountpoint={mountpoint}", json=body).status_code == 204
        )
    gone = kata_go.api.delete("/api/v1/mount?mountpoint=%2Frafs%2Fc1%2Flowerdir")
    assert gone.status_code == 204
    collection = kata_go.api.get("/api/v1/daemon").json()["backend_collection"]
    assert sorted(collection) == ["/containers"]
    missing = kata_go.api.delete("/api/v1/mount?mountpoint=/rafs/c1/lowerdir")
    assert missing.status_code == 500 and "not found" in missing.json()["message"]

    began = time.monotonic()
    assert kata_go.api.put("/api/v1/daemon/exit").status_code == 204
    assert kata_go.process.wait(5) == 0
    assert time.monotonic() - began < 5, "Kata waits 5 s before SIGKILL"


def test_sigterm_ends_it_within_kata_s_five_seconds(kata_go: Nydusd) -> None:
    kata_go.wait_running()
    kata_go.process.send_signal(signal.SIGTERM)
    assert kata_go.process.wait(5) == 0
    assert not kata_go.apisock.exists()


def test_runtime_rs_argv_bare_socket_names_in_cwd(tmp_path: Path) -> None:
    jail = tmp_path / "jail"
    jail.mkdir()
    stale = socket.socket(socket.AF_UNIX)  # a dead daemon's socket file where ours goes
    stale.bind(str(jail / "virtiofsd.sock"))
    stale.close()
    argv = runtime_rs_argv()
    daemon = Nydusd(argv, jail, jail / "nydusd-api.sock", tmp_path / "log")
    try:
        response_state = daemon.wait_running()["state"]
        assert response_state == "RUNNING"
        assert daemon.api.get("/api/v1/daemon").status_code == 200  # runtime-rs checks the 200
    finally:
        daemon.close()


def test_global_options_before_the_subcommand(tmp_path: Path) -> None:
    argv = [
        "--apisock",
        str(tmp_path / "nydusd-api.sock"),
        "virtiofs",
        "--sock",
        str(tmp_path / "s"),
    ]
    daemon = start(tmp_path, argv)
    try:
        daemon.wait_running()
    finally:
        daemon.close()


@pytest.mark.parametrize("flag", [["--id", "x"], ["--supervisor", "/s"], ["--upgrade"]])
def test_live_upgrade_flags_are_refused(tmp_path: Path, flag: list[str]) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "vhostfs", "virtiofs", "--sock", str(tmp_path / "s"), *flag],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "not supported by vhostfs" in result.stderr
    assert not os.path.exists(tmp_path / "s")


def test_a_socket_path_taken_by_a_file_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "s").write_text("not a socket")
    result = subprocess.run(
        [sys.executable, "-m", "vhostfs", "virtiofs", "--sock", str(tmp_path / "s")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "exists and is not a socket" in result.stderr
    assert (tmp_path / "s").read_text() == "not a socket"


@pytest.mark.parametrize(
    "argv",
    [
        ["virtiofs", "--sock", "s", "--shared-dir", "a", "--shared-dir", "/"],
        ["virtiofs", "--sock", "s", "--sock", "t"],
        ["--apisock", "api", "virtiofs", "--sock", "s", "--apisock", "other"],
        ["virtiofs", "--sock", "s", "-B", "boot", "--bootstrap", "boot"],
    ],
)
def test_what_is_served_and_where_may_be_given_once(tmp_path: Path, argv: list[str]) -> None:
    """Kata Go appends virtio_fs_extra_args after its own; none may silently win."""
    (tmp_path / "a").mkdir()
    (tmp_path / "boot").write_bytes(b"")
    result = subprocess.run(
        [sys.executable, "-m", "vhostfs", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "given 2 times" in result.stderr or "given twice" in result.stderr
    assert not (tmp_path / "s").exists() and "Traceback" not in result.stderr
