"""schemathesis against the real daemon, driven by the OpenAPI description vhostfs ships.

The API listens on a Unix socket only; a small TCP-to-Unix forwarder lets schemathesis reach
it. Every generated request must get an answer that conforms to the description (status,
content type, body schema), and the daemon must keep serving afterwards. Two of
schemathesis's checks do not apply, because Kata's clients rely on nydusd's answers: a failed
mount is a documented 500, and a method a path does not take is 400 (not 405).
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nydusd import Nydusd

SPEC = Path(__file__).resolve().parents[2] / "vhostfs" / "api" / "openapi.json"
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")


@contextlib.contextmanager
def tcp_to_unix(unix_path: Path) -> Iterator[int]:
    """A loopback TCP port whose connections are piped to `unix_path`."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port = 0

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_unix_connection(str(unix_path))
        except OSError:
            writer.close()
            return
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    async def start() -> asyncio.Server:
        nonlocal port
        server = await asyncio.start_server(accept, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        ready.set()
        return server

    server = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def test_the_api_answers_every_generated_request_as_described(tmp_path: Path) -> None:
    if not SCHEMATHESIS.exists() and shutil.which("schemathesis") is None:
        pytest.fail("schemathesis is a test dependency (pip install -e '.[test]')")
    shared = tmp_path / "shared"
    shared.mkdir()
    argv = ["virtiofs", "--apisock", str(tmp_path / "api.sock"), "--sock", str(tmp_path / "s")]
    daemon = Nydusd(argv, tmp_path, tmp_path / "api.sock", tmp_path / "daemon.log")
    try:
        daemon.wait_running()
        body = {"fs_type": "passthrough_fs", "source": str(shared), "config": ""}
        assert daemon.api.post("/api/v1/mount?mountpoint=/containers", json=body).status_code == 204
        with tcp_to_unix(tmp_path / "api.sock") as port:
            result = subprocess.run(
                [
                    str(SCHEMATHESIS),
                    "run",
                    str(SPEC),
                    "--url",
                    f"http://127.0.0.1:{port}",
                    "--max-examples",
                    "25",
                    "--seed",
                    "1",
                    "--exclude-path",
                    "/api/v1/daemon/exit",  # it would end the run
                    "--exclude-checks",
                    # Documented 500s are nydusd's answer to a failed mount, and nydusd answers
                    # a method a path does not take with 400, not 405: clients expect both.
                    "not_a_server_error,unsupported_method",
                    "--request-timeout",
                    "10",
                    "--no-color",
                ],
                capture_output=True,
                text=True,
                timeout=600,
                cwd=tmp_path,
            )
        assert result.returncode == 0, result.stdout[-30000:] + result.stderr[-2000:]
        assert daemon.process.poll() is None, daemon.log()
        assert daemon.api.get("/api/v1/daemon").json()["state"] == "RUNNING"
        assert "Traceback" not in daemon.log()
    finally:
        daemon.close()
