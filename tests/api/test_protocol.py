"""The API's HTTP side in memory: requests out of bytes, limits, and nydusd's answers."""

from __future__ import annotations

import json

import pytest

from vhostfs.api.protocol import ApiConnection, ApiRequest, ApiResponse, ClientError


def test_a_get_has_no_body_and_keeps_the_connection() -> None:
    connection = ApiConnection()
    (request,) = connection.receive(b"GET /api/v1/daemon HTTP/1.1\r\nHost: unix\r\n\r\n")
    assert request == ApiRequest("GET", "/api/v1/daemon", {}, None)
    out = connection.send(ApiResponse.json(200, {"state": "RUNNING"}))
    assert out.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Server: Nydus API\r\n" in out and b"Content-Type: application/json\r\n" in out
    assert out.endswith(b'\r\n\r\n{"state": "RUNNING"}')
    assert not connection.must_close
    (again,) = connection.receive(b"GET /api/v1/daemon HTTP/1.1\r\nHost: unix\r\n\r\n")
    assert again.path == "/api/v1/daemon"


@pytest.mark.parametrize(
    "target",
    [
        "/api/v1/mount?mountpoint=/rafs/c1/lowerdir",
        "/api/v1/mount?mountpoint=%2Frafs%2Fc1%2Flowerdir",
    ],
    ids=["raw (Kata Go)", "percent-encoded (runtime-rs)"],
)
def test_mountpoint_queries_raw_and_percent_encoded(target: str) -> None:
    connection = ApiConnection()
    head = f"DELETE {target} HTTP/1.1\r\nHost: unix\r\nContent-Length: 0\r\n\r\n"
    (request,) = connection.receive(head.encode())
    assert request.query == {"mountpoint": "/rafs/c1/lowerdir"}
    assert request.body is None  # an empty DELETE body is no body


def test_a_body_arriving_in_pieces_is_one_request() -> None:
    connection = ApiConnection()
    body = json.dumps({"fs_type": "passthrough_fs", "source": "/srv", "config": ""}).encode()
    head = (
        b"POST /api/v1/mount?mountpoint=/containers HTTP/1.1\r\nHost: unix\r\n"
        b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n"
    )
    assert connection.receive(head + body[:10]) == []
    (request,) = connection.receive(body[10:])
    assert request.body == body


def test_a_204_carries_no_length() -> None:
    connection = ApiConnection()
    connection.receive(b"PUT /api/v1/daemon/start HTTP/1.1\r\nHost: unix\r\n\r\n")
    out = connection.send(ApiResponse(204))
    assert out == b"HTTP/1.1 204 No Content\r\nServer: Nydus API\r\n\r\n"


def test_a_huge_header_is_refused_with_431_and_closes() -> None:
    connection = ApiConnection()
    with pytest.raises(ClientError) as refused:
        connection.receive(b"GET /api/v1/daemon HTTP/1.1\r\nX-Big: " + b"a" * 100_000)
    assert refused.value.status == 431
    out = connection.refusal(refused.value)
    assert out.startswith(b"HTTP/1.1 431 ") and b"Connection: close" in out
    assert connection.must_close


def test_garbage_is_refused_with_400() -> None:
    connection = ApiConnection()
    with pytest.raises(ClientError) as refused:
        connection.receive(b"\x16\x03\x01 not http at all\r\n\r\n")
    assert refused.value.status == 400
    body = connection.refusal(refused.value).split(b"\r\n\r\n", 1)[1]
    assert json.loads(body)["code"] == "UNDEFINED"


def test_a_body_over_the_limit_is_refused_before_it_arrives() -> None:
    connection = ApiConnection(max_body=1000)
    with pytest.raises(ClientError) as refused:
        connection.receive(
            b"POST /api/v1/mount?mountpoint=/x HTTP/1.1\r\n"
            b"Host: unix\r\nContent-Length: 5000\r\n\r\n"
        )
    assert refused.value.status == 413


def test_a_chunked_body_over_the_limit_is_refused() -> None:
    connection = ApiConnection(max_body=1000)
    head = b"POST /api/v1/mount HTTP/1.1\r\nHost: unix\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"%x\r\n" % 800 + b"a" * 800 + b"\r\n"
    connection.receive(head + chunk)
    with pytest.raises(ClientError) as refused:
        connection.receive(chunk)
    assert refused.value.status == 413
