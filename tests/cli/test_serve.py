"""The `vhostfs serve` command line for images: options, prefetch, and clear errors."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.support.frontend import Frontend
from tests.support.guest import GuestMemory
from tests.support.paths import NYDUS_FIXTURES
from tests.support.vm import DaemonProcess, listening_daemon

V6 = NYDUS_FIXTURES / "v6" / "rafs-v6-2.2.boot"


def serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vhostfs", "serve", *args], capture_output=True, text=True
    )


def exit_metrics(log: str) -> dict[str, int]:
    line = next(line for line in log.splitlines() if " metrics {" in line)
    counters = json.loads(line.split(" metrics ", 1)[1])
    return {name: value for name, value in counters.items() if isinstance(value, int)}


def wait_for_line(daemon: DaemonProcess, text: str, timeout: float = 20) -> str:
    """The daemon's log once a line holding `text` has appeared in it."""
    deadline = time.monotonic() + timeout
    while text not in (log := daemon.log()):
        assert daemon.alive(), log
        assert time.monotonic() < deadline, f"no {text!r} in the log:\n{log}"
        time.sleep(0.05)
    return log


def test_prefetch_files_warm_the_cache_while_the_guest_is_attached(tmp_path: Path) -> None:
    listing = tmp_path / "prefetch"
    listing.write_text("/lib.rs\n/no/such/file\n")
    sock = tmp_path / "s.sock"
    argv = [
        sys.executable,
        "-m",
        "vhostfs",
        "serve",
        "--socket",
        str(sock),
        "--bootstrap",
        str(V6),
        "--blob-dir",
        str(V6.parent),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--prefetch-files",
        str(listing),
    ]
    with listening_daemon(argv, sock, log_path=tmp_path / "log") as daemon, GuestMemory() as mem:
        frontend = Frontend(sock, mem)
        frontend.init()
        frontend.start()
        wait_for_line(daemon, "prefetch done:")
        frontend.close()
        assert daemon.process.wait(10) == 0
        log = daemon.log()
    metrics = exit_metrics(log)
    assert metrics["prefetch_bytes"] == metrics["backend_bytes"] > 0
    assert "prefetch: b'/no/such/file' is not in the image" in log


def test_bad_image_or_config_fails_before_listening(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\0" * 8192)
    result = serve("--socket", str(tmp_path / "s"), "--bootstrap", str(garbage))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert result.stderr.strip(), result
    config = tmp_path / "config.json"
    config.write_text(
        '{"mode": "direct", "device": {"backend": {"type": "localfs", "config": {"dir": 7}}}}'
    )
    result = serve("--socket", str(tmp_path / "s"), "--bootstrap", str(V6), "--config", str(config))
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "device.backend.config.dir" in result.stderr
    assert not (tmp_path / "s").exists()


def test_exactly_one_source(tmp_path: Path) -> None:
    result = serve("--socket", str(tmp_path / "s"))
    assert result.returncode == 2 and "--shared-dir" in result.stderr
