"""The API on a real Unix socket: a real HTTP client, and clients that misbehave."""

from __future__ import annotations

import asyncio
import os
import stat
import time
from pathlib import Path

import httpx

from tests.api.controller import RecordingController
from vhostfs.api.server import ApiServer


async def started(path: Path, idle_timeout: float = 30.0) -> ApiServer:
    server = ApiServer(RecordingController(), idle_timeout=idle_timeout)
    await server.start(str(path))
    return server


def client(path: Path) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(path)), base_url="http://unix"
    )


async def raw(path: Path, data: bytes) -> bytes:
    """Send `data` on a fresh connection and return everything until the server closes."""
    reader, writer = await asyncio.open_unix_connection(str(path))
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return answer


def test_a_real_client_polls_like_kata(tmp_path: Path) -> None:
    async def scenario() -> None:
        sock = tmp_path / "api.sock"
        server = await started(sock)
        async with client(sock) as http:
            for _ in range(3):  # keep-alive: one connection, several requests
                response = await http.get("/api/v1/daemon")
                assert response.status_code == 200 and response.json()["state"] == "RUNNING"
                assert response.headers["server"] == "Nydus API"
            mounted = await http.post(
                "/api/v1/mount",
                params={"mountpoint": "/rafs/c1/lowerdir"},
                json={"fs_type": "rafs", "source": "/b", "config": ""},
            )
            assert mounted.status_code == 204
            assert (
                await http.delete("/api/v1/mount?mountpoint=/rafs/c1/lowerdir")
            ).status_code == 204
        assert stat.S_IMODE(os.stat(sock).st_mode) & 0o077 == 0, "only our own user may connect"
        await server.aclose()
        assert not sock.exists()

    asyncio.run(scenario())


def test_a_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    async def scenario() -> None:
        sock = tmp_path / "api.sock"
        first = await started(sock)
        assert first._server is not None
        first._server.close()  # a dead daemon leaves its socket file behind
        second = await started(sock)
        async with client(sock) as http:
            assert (await http.get("/api/v1/daemon")).status_code == 200
        await second.aclose()

    asyncio.run(scenario())


def test_misbehaving_clients_block_nobody(tmp_path: Path) -> None:
    async def scenario() -> None:
        sock = tmp_path / "api.sock"
        server = await started(sock, idle_timeout=1.0)
        silent_reader, silent_writer = await asyncio.open_unix_connection(str(sock))
        slow_reader, slow_writer = await asyncio.open_unix_connection(str(sock))
        slow_writer.write(b"GET /api/v1/daemon HTTP/1.1\r\nHost: un")  # and then nothing
        await slow_writer.drain()

        garbage = asyncio.create_task(raw(sock, b"\x00\xff garbage \r\n\r\n"))
        huge = asyncio.create_task(raw(sock, b"GET / HTTP/1.1\r\nX-Big: " + b"a" * 100_000))
        began = time.monotonic()
        async with client(sock) as http:
            response = await http.get("/api/v1/daemon")
        assert response.status_code == 200
        assert time.monotonic() - began < 1.0, "a well-behaved client waited for the others"
        assert (await garbage).startswith(b"HTTP/1.1 400 ")
        assert (await huge).startswith(b"HTTP/1.1 431 ")
        # The idle ones are dropped once they have said nothing for the idle timeout.
        assert await asyncio.wait_for(silent_reader.read(), 5) == b""
        assert await asyncio.wait_for(slow_reader.read(), 5) == b""
        silent_writer.close()
        slow_writer.close()
        await server.aclose()

    asyncio.run(scenario())


def test_aclose_drops_connected_clients(tmp_path: Path) -> None:
    async def scenario() -> None:
        sock = tmp_path / "api.sock"
        server = await started(sock)
        reader, writer = await asyncio.open_unix_connection(str(sock))
        await asyncio.sleep(0)  # let the server accept it
        await asyncio.wait_for(server.aclose(), 5)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

    asyncio.run(scenario())
