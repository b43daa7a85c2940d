"""nydusd's HTTP API, sans-I/O: bytes in, whole requests out; responses in, bytes out.

An `ApiConnection` wraps one h11 server connection. `receive()` takes whatever arrived on the
socket and returns the requests it completed, each with its body; `send()` encodes a response.
Nothing here touches a socket or a clock, so every limit can be tested in memory.

Limits, because a client is not trusted to be well-behaved:

- a request head (request line and headers) larger than `max_head` bytes is refused with 431;
- a body larger than `max_body` bytes is refused with 413 as soon as its length is known;
- anything h11 cannot parse is refused with 400.

After a refusal the connection must be closed: `must_close` says so. Idle timeouts are the I/O
side's job (server.py), since only it knows about time.
"""

from __future__ import annotations

import http
import json
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

import h11

MAX_HEAD: Final = 16 * 1024
MAX_BODY: Final = 1 << 20  # a mount request's config string is a few KiB
SERVER_NAME: Final = b"Nydus API"  # what nydusd sends; clients only log it


@dataclass(frozen=True, slots=True)
class ApiRequest:
    method: str
    path: str
    query: dict[str, str]  # percent-decoded; the last of repeated keys wins
    body: bytes | None  # None: the request carried no body at all


@dataclass(frozen=True, slots=True)
class ApiResponse:
    status: int
    body: bytes = b""
    headers: tuple[tuple[bytes, bytes], ...] = field(default=())

    @classmethod
    def json(cls, status: int, document: Any) -> ApiResponse:
        return cls(status, json.dumps(document).encode())

    @classmethod
    def error(cls, status: int, message: str) -> ApiResponse:
        """nydusd's error body: a code nobody interprets and a message people read."""
        return cls.json(status, {"code": "UNDEFINED", "message": message})


class ClientError(Exception):
    """The client broke HTTP or a limit; answer `status` and close."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class ApiConnection:
    def __init__(self, *, max_head: int = MAX_HEAD, max_body: int = MAX_BODY) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=max_head)
        self._max_body = max_body
        self._head: h11.Request | None = None
        self._body = bytearray()
        self._has_body = False
        self.must_close = False

    def receive(self, data: bytes) -> list[ApiRequest]:
        """The requests `data` completes (b"" means the client closed its side).

        Raises ClientError for a request that must be refused; then send `refusal()` of it
        and close."""
        self._h11.receive_data(data)
        completed: list[ApiRequest] = []
        while True:
            try:
                event = self._h11.next_event()
            except h11.RemoteProtocolError as e:
                self.must_close = True
                # h11 reports an oversized head as "Receive buffer too long".
                status = 431 if "too long" in str(e) else 400
                raise ClientError(status, f"BadRequest: {e}") from None
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return completed
            if isinstance(event, h11.ConnectionClosed):
                self.must_close = True
                return completed
            if isinstance(event, h11.Request):
                self._start(event)
            elif isinstance(event, h11.Data):
                self._body += event.data
                self._has_body = True
                if len(self._body) > self._max_body:
                    self.must_close = True
                    raise ClientError(413, f"BadRequest: body over {self._max_body} bytes")
            elif isinstance(event, h11.EndOfMessage):
                completed.append(self._finish())

    def _start(self, head: h11.Request) -> None:
        self._head = head
        self._body = bytearray()
        length = dict(head.headers).get(b"content-length")
        self._has_body = bool(length and length != b"0") or _is_chunked(head)
        if length is not None and length.isdigit() and int(length) > self._max_body:
            self.must_close = True
            raise ClientError(413, f"BadRequest: body of {int(length)} bytes is too large")

    def _finish(self) -> ApiRequest:
        head = self._head
        assert head is not None
        self._head = None
        target = urlsplit(head.target.decode("latin-1"))
        query = dict(parse_qsl(target.query, keep_blank_values=True))
        body = bytes(self._body) if self._has_body else None
        return ApiRequest(head.method.decode("latin-1"), target.path, query, body)

    def send(self, response: ApiResponse) -> bytes:
        """The bytes of `response`; afterwards the connection is ready for the next request,
        unless must_close is set."""
        headers = [(b"Server", SERVER_NAME), *response.headers]
        if response.status != 204:  # a 204 carries no Content-Length (RFC 9110 8.6)
            headers.append((b"Content-Length", str(len(response.body)).encode()))
        if response.body and not any(name.lower() == b"content-type" for name, _ in headers):
            headers.append((b"Content-Type", b"application/json"))
        if self.must_close:
            headers.append((b"Connection", b"close"))
        head = h11.Response(
            status_code=response.status, headers=headers, reason=_reason(response.status)
        )
        out = self._h11.send(head) or b""
        if response.body:
            out += self._h11.send(h11.Data(data=response.body)) or b""
        out += self._h11.send(h11.EndOfMessage()) or b""
        if self._h11.our_state is h11.MUST_CLOSE or self.must_close:
            self.must_close = True
        else:
            self._h11.start_next_cycle()
        return out

    def refusal(self, error: ClientError) -> bytes:
        """The response to a request refused by receive(), if HTTP still allows one."""
        self.must_close = True
        if self._h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return b""
        body = json.dumps({"code": "UNDEFINED", "message": error.message}).encode()
        headers = [
            (b"Server", SERVER_NAME),
            (b"Content-Type", b"application/json"),
            (b"Content-Length", str(len(body)).encode()),
            (b"Connection", b"close"),
        ]
        try:
            return (
                (
                    self._h11.send(
                        h11.Response(
                            status_code=error.status, headers=headers, reason=_reason(error.status)
                        )
                    )
                    or b""
                )
                + (self._h11.send(h11.Data(data=body)) or b"")
                + (self._h11.send(h11.EndOfMessage()) or b"")
            )
        except h11.LocalProtocolError:
            return b""


def _is_chunked(head: h11.Request) -> bool:
    return any(
        name == b"transfer-encoding" and b"chunked" in value.lower() for name, value in head.headers
    )


def _reason(status: int) -> bytes:
    try:
        return http.HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
