"""`vhostfs virtiofs` as a process, with an HTTP API client, the way Kata drives nydusd."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import httpx


class Nydusd:
    """A `vhostfs virtiofs` process and an API client for it."""

    def __init__(self, argv: Sequence[str], cwd: Path, apisock: Path, log: Path) -> None:
        self.apisock = apisock
        self.log_path = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "vhostfs", *argv],
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.api = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(apisock)), base_url="http://unix", timeout=5
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_running(self, timeout: float = 20) -> dict[str, object]:
        """Kata Go's readiness loop: the socket file, then GET until state is RUNNING."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, self.log()
            if self.apisock.exists():
                try:
                    info: dict[str, object] = self.api.get("/api/v1/daemon").json()
                except (httpx.HTTPError, json.JSONDecodeError):
                    info = {}
                if info.get("state") == "RUNNING":
                    return info
            time.sleep(0.02)
        raise AssertionError(f"not RUNNING in {timeout} s:\n{self.log()}")

    def close(self) -> None:
        self.api.close()
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def kata_go_argv(
    sandbox: Path, sock: str, extra: Sequence[str] = (), debug: bool = False
) -> list[str]:
    """Kata Go's nydusd.go: virtiofs --log-level L --apisock A --sock S, then the extra args."""
    return [
        "virtiofs",
        "--log-level",
        "debug" if debug else "info",
        "--apisock",
        str(sandbox / "nydusd-api.sock"),
        "--sock",
        str(sandbox / sock),
        *extra,
    ]


def runtime_rs_argv(sock: str = "virtiofsd.sock", extra: Sequence[str] = ()) -> list[str]:
    """runtime-rs, rootless: --hybrid-mode and bare socket names; run it with the cwd set to
    the directory they should be in."""
    return [
        "virtiofs",
        "--hybrid-mode",
        "--log-level",
        "info",
        "--apisock",
        "nydusd-api.sock",
        "--sock",
        sock,
        *extra,
    ]
