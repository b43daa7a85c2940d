"""nydusd's routing rules and error bodies, against a controller that records its calls."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from tests.api.controller import RecordingController
from vhostfs.api.protocol import ApiRequest, ApiResponse
from vhostfs.api.routes import MountCommand, handle


def call(
    controller: RecordingController,
    method: str,
    path: str,
    body: bytes | None = None,
    **query: str,
) -> ApiResponse:
    return asyncio.run(handle(controller, ApiRequest(method, path, query, body)))


def error_of(response: ApiResponse) -> str:
    document = json.loads(response.body)
    assert document["code"] == "UNDEFINED"
    message: str = document["message"]
    return message


def test_daemon_info() -> None:
    response = call(RecordingController(), "GET", "/api/v1/daemon")
    assert response.status == 200
    assert json.loads(response.body)["state"] == "RUNNING"
    v2 = json.loads(call(RecordingController(), "GET", "/api/v2/daemon").body)
    assert "backend_collection" not in v2


def test_unknown_path_is_404_noroute() -> None:
    response = call(RecordingController(), "GET", "/api/v1/nothing")
    assert response.status == 404 and error_of(response) == "NoRoute"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/api/v1/daemon", b"{}"),  # wrong method
        ("GET", "/api/v1/daemon", b"{}"),  # a GET with a body
        ("PUT", "/api/v1/daemon/exit", b"{}"),  # exit takes no body
        ("PUT", "/api/v1/daemon", None),  # PUT needs one
        ("POST", "/api/v1/mount", None),
        ("DELETE", "/api/v1/mount", b"x"),
    ],
)
def test_method_and_body_rules_give_400(method: str, path: str, body: bytes | None) -> None:
    controller = RecordingController()
    response = call(controller, method, path, body, mountpoint="/x")
    assert response.status == 400 and error_of(response).startswith("BadRequest")
    assert controller.calls == []


def test_mount_and_umount() -> None:
    controller = RecordingController()
    body = json.dumps({"fs_type": "rafs", "source": "/img/boot", "config": "{}"}).encode()
    response = call(controller, "POST", "/api/v1/mount", body, mountpoint="/rafs/c1/lowerdir")
    assert response.status == 204 and response.body == b""
    assert controller.calls == [
        ("mount", ("/rafs/c1/lowerdir", MountCommand("rafs", "/img/boot", "{}")))
    ]
    again = call(controller, "POST", "/api/v1/mount", body, mountpoint="/rafs/c1/lowerdir")
    assert again.status == 500 and "already exists" in error_of(again)
    assert call(controller, "DELETE", "/api/v1/mount", mountpoint="/rafs/c1/lowerdir").status == 204
    gone = call(controller, "DELETE", "/api/v1/mount", mountpoint="/rafs/c1/lowerdir")
    assert gone.status == 500 and "not found" in error_of(gone)


def test_a_mount_needs_its_mountpoint() -> None:
    body = json.dumps({"fs_type": "passthrough_fs", "source": "/srv"}).encode()
    response = call(RecordingController(), "POST", "/api/v1/mount", body)
    assert response.status == 400
    assert error_of(response) == "QueryString(\"'mountpoint' should be specified in query string\")"


@pytest.mark.parametrize("fs_type", ["passthrough", "passthroughfs", "passthrough_fs"])
def test_every_passthrough_spelling(fs_type: str) -> None:
    controller = RecordingController()
    body = json.dumps({"fs_type": fs_type, "source": "/srv", "config": ""}).encode()
    assert call(controller, "POST", "/api/v1/mount", body, mountpoint="/shared").status == 204
    assert controller.calls[0][1][1].fs_type == "passthrough"


@pytest.mark.parametrize(
    ("body", "status", "says"),
    [
        (b"not json", 400, "ParseBody"),
        (b"[1, 2]", 400, "ParseBody"),
        (b'{"fs_type": "ext4", "source": "/x"}', 500, "fs_type"),
        (b'{"source": "/x"}', 500, "fs_type"),
        (b'{"fs_type": "rafs", "source": ""}', 400, "source"),
        (b'{"fs_type": "rafs", "source": "/b", "config": 7}', 400, "config"),
        (b'{"fs_type": "rafs", "source": "/b", "prefetch_files": ["rel"]}', 500, "absolute"),
    ],
)
def test_bad_mount_bodies(body: bytes, status: int, says: str) -> None:
    controller = RecordingController()
    response = call(controller, "POST", "/api/v1/mount", body, mountpoint="/m")
    assert response.status == status and says in error_of(response)
    assert controller.calls == []


def test_log_level_start_exit() -> None:
    controller = RecordingController()
    assert call(controller, "PUT", "/api/v1/daemon", b'{"log_level": "debug"}').status == 204
    assert call(controller, "PUT", "/api/v1/daemon/start").status == 204
    assert call(controller, "PUT", "/api/v1/daemon/exit").status == 204
    assert controller.calls == [("log_level", "debug"), ("start", None), ("exit", None)]


def test_metrics_endpoints_pass_id_and_latest() -> None:
    controller = RecordingController()
    files = call(controller, "GET", "/api/v1/metrics/files", id="/rafs/c1/lowerdir", latest="true")
    assert json.loads(files.body) == {"kind": "files", "id": "/rafs/c1/lowerdir", "latest": True}
    for path, kind in [
        ("/api/v1/metrics", "fops"),
        ("/api/v1/metrics/pattern", "pattern"),
        ("/api/v1/metrics/backend", "backend"),
        ("/api/v1/metrics/blobcache", "blobcache"),
    ]:
        assert json.loads(call(controller, "GET", path).body)["kind"] == kind
    inflight = call(controller, "GET", "/api/v1/metrics/inflight")
    assert inflight.status == 501
    for method in ("GET", "PUT", "DELETE"):
        assert call(controller, method, "/api/v2/blobs").status == 501


def test_prometheus_text() -> None:
    response = call(RecordingController(), "GET", "/metrics")
    assert response.status == 200 and response.body == b"vhostfs_up 1\n"
    assert (b"Content-Type", b"text/plain; version=0.0.4") in response.headers


class BrokenController(RecordingController):
    def metrics(self, kind: str, mount_id: str | None, latest: bool) -> Any:
        raise RuntimeError("boom")


def test_a_failing_controller_gives_500_not_a_crash(caplog: pytest.LogCaptureFixture) -> None:
    controller = BrokenController()
    response = call(controller, "GET", "/api/v1/metrics")
    assert response.status == 500 and error_of(response) == "RuntimeError: boom"
    assert "API GET /api/v1/metrics failed" in caplog.text
