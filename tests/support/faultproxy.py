"""A reverse proxy that breaks on purpose, in front of a real registry.

Each request that matches `only` (a substring of the path) takes the next fault from the
queue; the others pass through untouched. Faults:

    "500" / "503" / "429"    answer that status (Retry-After from `retry_after` on 503 and 429)
    "403"                    answer 403 (an expired presigned URL)
    "expired-token"          answer 401 with Harbor's `Basic realm="harbor"`, as Harbor answers a
                             bearer token that has expired
    "reset"                  close the connection without answering
    "truncate"               send the head with the full Content-Length, then half the body
    "stall"                  say nothing for `stall` seconds
    "flip"                   pass the answer through with one body byte inverted
    "redirect"               answer 307 to the same path on `redirect_to` (another server)
    "redirect-relative"      answer 307 with a relative Location back to this proxy
    "ignore-range"           forward without the Range header (the upstream answers 200)

It runs on its own thread and event loop, so a test can drive a client with asyncio.run.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import h11
import httpx


@dataclass
class FaultProxy:
    upstream: str  # http://host:port
    only: str = "/blobs/"
    retry_after: str = "1"
    stall: float = 10.0
    redirect_to: str = ""
    faults: deque[str] = field(default_factory=deque)
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    port: int = 0

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def inject(self, *faults: str) -> None:
        self.faults.extend(faults)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = h11.Connection(h11.SERVER)
        try:
            while True:
                request, body = await _read_request(connection, reader)
                if request is None:
                    return
                if not await self._answer(connection, writer, request, body):
                    return
                if connection.our_state is h11.MUST_CLOSE:
                    return
                connection.start_next_cycle()
        except (ConnectionError, h11.ProtocolError):
            pass
        finally:
            writer.close()

    async def _answer(
        self,
        connection: h11.Connection,
        writer: asyncio.StreamWriter,
        request: h11.Request,
        body: bytes,
    ) -> bool:
        method, target = request.method.decode(), request.target.decode()
        headers = {k.decode().lower(): v.decode() for k, v in request.headers}
        fault = self.faults.popleft() if self.only in target and self.faults else ""
        self.seen.append((method, target, headers))
        if fault in ("500", "503", "429", "403"):
            extra = [("Retry-After", self.retry_after)] if fault in ("503", "429") else []
            _respond(connection, writer, int(fault), extra, b"{}")
            return True
        if fault == "expired-token":
            _respond(connection, writer, 401, [("WWW-Authenticate", 'Basic realm="harbor"')], b"{}")
            return True
        if fault == "reset":
            return False
        if fault == "stall":
            await asyncio.sleep(self.stall)
            return False
        if fault.startswith("redirect"):
            base = self.redirect_to if fault == "redirect" else ""
            _respond(connection, writer, 307, [("Location", base + target)], b"")
            return True
        if fault == "ignore-range":
            headers.pop("range", None)
        forwarded = {k: v for k, v in headers.items() if k not in ("host", "content-length")}
        async with httpx.AsyncClient(follow_redirects=False) as upstream:
            response = await upstream.request(
                method, self.upstream + target, headers=forwarded, content=body or None
            )
        data = response.content
        out_headers = [
            (k, v)
            for k, v in response.headers.items()
            if k.lower()
            not in ("content-length", "transfer-encoding", "connection", "content-encoding")
        ]
        if fault == "flip" and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if fault == "truncate":
            out_headers.append(("Content-Length", str(len(data))))
            head = h11.Response(status_code=response.status_code, headers=out_headers)
            writer.write(connection.send(head) or b"")
            writer.write(data[: len(data) // 2])
            await writer.drain()
            return False
        _respond(connection, writer, response.status_code, out_headers, data)
        await writer.drain()
        return True


async def _read_request(
    connection: h11.Connection, reader: asyncio.StreamReader
) -> tuple[h11.Request | None, bytes]:
    request: h11.Request | None = None
    body = bytearray()
    while True:
        event = connection.next_event()
        if event is h11.NEED_DATA:
            data = await reader.read(65536)
            connection.receive_data(data)
            if not data and request is None:
                return None, b""
            continue
        if isinstance(event, h11.Request):
            request = event
        elif isinstance(event, h11.Data):
            body += event.data
        elif isinstance(event, h11.EndOfMessage):
            return request, bytes(body)
        elif isinstance(event, h11.ConnectionClosed):
            return None, b""


def _respond(
    connection: h11.Connection,
    writer: asyncio.StreamWriter,
    status: int,
    headers: list[tuple[str, str]],
    body: bytes,
) -> None:
    all_headers = [*headers, ("Content-Length", str(len(body)))]
    writer.write(connection.send(h11.Response(status_code=status, headers=all_headers)) or b"")
    if body:
        writer.write(connection.send(h11.Data(data=body)) or b"")
    writer.write(connection.send(h11.EndOfMessage()) or b"")


@contextlib.contextmanager
def fault_proxy(upstream: str, **kw: object) -> Iterator[FaultProxy]:
    proxy = FaultProxy(upstream, **kw)  # type: ignore[arg-type]
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    server: asyncio.Server | None = None

    async def start() -> None:
        nonlocal server
        server = await asyncio.start_server(proxy._serve, "127.0.0.1", 0)
        proxy.port = server.sockets[0].getsockname()[1]
        ready.set()

    def run() -> None:
        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield proxy
    finally:

        async def stop() -> None:
            assert server is not None
            server.close()
            for task in asyncio.all_tasks():
                if task is not asyncio.current_task():
                    task.cancel()

        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
