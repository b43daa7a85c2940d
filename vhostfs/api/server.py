"""The API's socket side: a Unix socket on the daemon's event loop, one task per client.

Each client gets its own task and its own ApiConnection, so a client that stalls, sends
garbage or floods headers costs only its own connection: reads are bounded by the protocol's
limits, and a client that sends nothing for `idle_timeout` seconds is dropped. Requests on one
connection are answered in order, as HTTP/1.1 requires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
from typing import Final

from vhostfs.api.protocol import ApiConnection, ClientError
from vhostfs.api.routes import Controller, handle

log = logging.getLogger(__name__)

IDLE_TIMEOUT: Final = 30.0
_READ_SIZE: Final = 64 * 1024


class ApiServer:
    def __init__(self, controller: Controller, *, idle_timeout: float = IDLE_TIMEOUT) -> None:
        self._controller = controller
        self._idle_timeout = idle_timeout
        self._server: asyncio.Server | None = None
        self._clients: set[asyncio.Task[None]] = set()
        self.path: str | None = None

    async def start(self, path: str) -> None:
        """Listen at `path`, replacing a stale socket file as nydusd does."""
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            os.unlink(path)
        # Whoever can connect can mount host directories into the guest: only our own user,
        # from the moment the socket exists (a writable passthrough runs with umask 0).
        old_umask = os.umask(0o077)
        try:
            self._server = await asyncio.start_unix_server(self._serve_client, path)
        finally:
            os.umask(old_umask)
        self.path = path

    async def aclose(self) -> None:
        """Stop listening, drop every client, and remove the socket file."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for client in list(self._clients):
            client.cancel()
        await asyncio.gather(*self._clients, return_exceptions=True)
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        try:
            if self._server is not None:  # accepted just before aclose(): hang up at once
                await self._converse(reader, writer)
        except (ConnectionError, TimeoutError, asyncio.CancelledError):
            pass  # the client went away, idled out, or we are closing: nothing to answer
        finally:
            self._clients.discard(task)
            writer.close()
            with contextlib.suppress(ConnectionError, asyncio.CancelledError):
                await writer.wait_closed()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = ApiConnection()
        while not connection.must_close:
            async with asyncio.timeout(self._idle_timeout):
                data = await reader.read(_READ_SIZE)
            try:
                requests = connection.receive(data)
            except ClientError as e:
                log.warning("API client refused: %s", e.message)
                writer.write(connection.refusal(e))
                await writer.drain()
                return
            for request in requests:
                response = await handle(self._controller, request)
                writer.write(connection.send(response))
                await writer.drain()
            if not data:
                return
