"""nydusd's API endpoints: which request goes where, and what each answers.

The routing follows nydusd's rules (reference §2.2-2.3), since Kata's two runtimes and
nydus-snapshotter are written against them:

- the path alone routes (the Host header is ignored); an unknown path is 404 `NoRoute`;
- a method the path does not take is 400 `BadRequest`, and so is a body where none belongs
  (GET, DELETE, daemon/start, daemon/exit) or no body where one is required (PUT, POST);
- success is 200 with a JSON body, or 204 with none;
- a failure is `{"code": "UNDEFINED", "message": ...}` with the status the Controller chose.

What the daemon does for each endpoint sits behind the `Controller` protocol, which the daemon
implements; this module only decodes requests and encodes answers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final, Literal, Protocol

from vhostfs.api.protocol import ApiRequest, ApiResponse

log = logging.getLogger(__name__)

FsType = Literal["rafs", "passthrough"]

# nydusd's spellings of the two file-system types a mount request may name.
_FS_TYPES: Final[dict[str, FsType]] = {
    "rafs": "rafs",
    "passthrough": "passthrough",
    "passthroughfs": "passthrough",
    "passthrough_fs": "passthrough",
}


class ApiError(Exception):
    """Answer this request with `status` and nydusd's error body."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class MountCommand:
    """A mount request's body: what to mount, and the config string for RAFS."""

    fs_type: FsType
    source: str
    config: str
    prefetch_files: tuple[str, ...] = ()

    @classmethod
    def from_body(cls, body: bytes) -> MountCommand:
        document = _json_object(body)
        fs_type = _FS_TYPES.get(str(document.get("fs_type") or ""))
        if fs_type is None:
            raise ApiError(
                500, f"fs_type {document.get('fs_type')!r}: expected rafs or passthrough_fs"
            )
        source = document.get("source")
        if not isinstance(source, str) or not source:
            raise ApiError(400, "ParseBody: source: expected a non-empty string")
        config = document.get("config", "")
        if not isinstance(config, str):
            raise ApiError(400, "ParseBody: config: expected a string")
        prefetch = document.get("prefetch_files") or []
        if not isinstance(prefetch, list) or not all(isinstance(p, str) for p in prefetch):
            raise ApiError(400, "ParseBody: prefetch_files: expected a list of strings")
        for path in prefetch:
            if not path.startswith("/"):
                raise ApiError(500, f"prefetch_files: {path!r} is not an absolute path")
        return cls(fs_type, source, config, tuple(prefetch))


class Controller(Protocol):
    """What the API asks of the daemon. Methods raise ApiError to fail a request."""

    def daemon_info(self, *, with_backends: bool) -> dict[str, Any]: ...

    def set_log_level(self, level: str) -> None: ...

    def events(self) -> dict[str, Any]: ...

    def backend_info(self, mountpoint: str) -> dict[str, Any]: ...

    def start(self) -> None: ...

    def exit(self) -> None:
        """Begin a graceful exit, after the 204 has gone out."""

    async def mount(self, mountpoint: str, command: MountCommand) -> None: ...

    async def remount(self, mountpoint: str, command: MountCommand) -> None: ...

    async def umount(self, mountpoint: str) -> None: ...

    def metrics(self, kind: str, mount_id: str | None, latest: bool) -> Any:
        """kind: "fops", "files", "pattern", "backend" or "blobcache"."""

    def prometheus(self) -> str:
        """Every counter in Prometheus' text exposition format."""

    def runtime_config(self, mount_id: str | None) -> dict[str, str]:
        """A mount's runtime-changeable settings (registry_auth), credentials blanked."""

    def set_runtime_config(self, mount_id: str | None, settings: dict[str, str]) -> None: ...


_Handler = Callable[[Controller, ApiRequest], Awaitable[ApiResponse]]
_Body = Literal["none", "required", "any"]


@dataclass(frozen=True, slots=True)
class _Route:
    handler: _Handler
    body: _Body


_ROUTES: dict[tuple[str, str], _Route] = {}


def _route(path: str, method: str, body: _Body) -> Callable[[_Handler], _Handler]:
    def register(handler: _Handler) -> _Handler:
        _ROUTES[(path, method)] = _Route(handler, body)
        return handler

    return register


async def handle(controller: Controller, request: ApiRequest) -> ApiResponse:
    """The answer to one request; never raises for anything the client sent."""
    route = _ROUTES.get((request.path, request.method))
    if route is None:
        if request.path in _paths():
            return ApiResponse.error(400, f"BadRequest: {request.method} is not allowed here")
        return ApiResponse.error(404, "NoRoute")
    has_body = bool(request.body)
    if route.body == "none" and has_body:
        return ApiResponse.error(400, "BadRequest: this request takes no body")
    if route.body == "required" and not has_body:
        return ApiResponse.error(400, "BadRequest: this request needs a body")
    try:
        return await route.handler(controller, request)
    except ApiError as e:
        return ApiResponse.error(e.status, e.message)
    except Exception as e:  # a bug of ours must not cost the client its answer
        log.exception("API %s %s failed", request.method, request.path)
        return ApiResponse.error(500, f"{type(e).__name__}: {e}")


def _paths() -> frozenset[str]:
    return frozenset(path for path, _ in _ROUTES)


def _json_object(body: bytes | None) -> dict[str, Any]:
    try:
        document = json.loads(body or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"ParseBody: {e}") from None
    if not isinstance(document, dict):
        raise ApiError(400, "ParseBody: expected a JSON object")
    return document


def _mountpoint(request: ApiRequest) -> str:
    mountpoint = request.query.get("mountpoint")
    if not mountpoint:
        raise ApiError(400, "QueryString(\"'mountpoint' should be specified in query string\")")
    return mountpoint


# --- The daemon ----------------------------------------------------------------------------


@_route("/api/v1/daemon", "GET", "none")
async def _daemon_info(controller: Controller, request: ApiRequest) -> ApiResponse:
    return ApiResponse.json(200, controller.daemon_info(with_backends=True))


@_route("/api/v2/daemon", "GET", "none")
async def _daemon_info_v2(controller: Controller, request: ApiRequest) -> ApiResponse:
    return ApiResponse.json(200, controller.daemon_info(with_backends=False))


@_route("/api/v1/daemon", "PUT", "required")
@_route("/api/v2/daemon", "PUT", "required")
async def _configure_daemon(controller: Controller, request: ApiRequest) -> ApiResponse:
    level = _json_object(request.body).get("log_level")
    if not isinstance(level, str):
        raise ApiError(400, "ParseBody: log_level: expected a string")
    controller.set_log_level(level)
    return ApiResponse(204)


@_route("/api/v1/daemon/events", "GET", "none")
async def _events(controller: Controller, request: ApiRequest) -> ApiResponse:
    return ApiResponse.json(200, controller.events())


@_route("/api/v1/daemon/backend", "GET", "none")
async def _backend(controller: Controller, request: ApiRequest) -> ApiResponse:
    return ApiResponse.json(200, controller.backend_info(_mountpoint(request)))


@_route("/api/v1/daemon/start", "PUT", "none")
async def _start(controller: Controller, request: ApiRequest) -> ApiResponse:
    controller.start()
    return ApiResponse(204)


@_route("/api/v1/daemon/exit", "PUT", "none")
async def _exit(controller: Controller, request: ApiRequest) -> ApiResponse:
    controller.exit()
    return ApiResponse(204)


@_route("/api/v1/daemon/fuse/sendfd", "PUT", "any")
@_route("/api/v1/daemon/fuse/takeover", "PUT", "any")
@_route("/api/v1/metrics/inflight", "GET", "any")
@_route("/api/v2/blobs", "GET", "any")  # blob-cache objects: nydusd's singleton/fscache modes
@_route("/api/v2/blobs", "PUT", "any")
@_route("/api/v2/blobs", "DELETE", "any")
async def _not_in_virtiofs(controller: Controller, request: ApiRequest) -> ApiResponse:
    raise ApiError(501, "Unsupported: not available in virtiofs mode")


# --- Mounts --------------------------------------------------------------------------------


@_route("/api/v1/mount", "POST", "required")
async def _mount(controller: Controller, request: ApiRequest) -> ApiResponse:
    mountpoint = _mountpoint(request)
    assert request.body is not None
    await controller.mount(mountpoint, MountCommand.from_body(request.body))
    return ApiResponse(204)


@_route("/api/v1/mount", "PUT", "required")
async def _remount(controller: Controller, request: ApiRequest) -> ApiResponse:
    mountpoint = _mountpoint(request)
    assert request.body is not None
    await controller.remount(mountpoint, MountCommand.from_body(request.body))
    return ApiResponse(204)


@_route("/api/v1/mount", "DELETE", "none")
async def _umount(controller: Controller, request: ApiRequest) -> ApiResponse:
    await controller.umount(_mountpoint(request))
    return ApiResponse(204)


# --- Metrics -------------------------------------------------------------------------------

_METRICS: Final = {
    "/api/v1/metrics": "fops",
    "/api/v1/metrics/files": "files",
    "/api/v1/metrics/pattern": "pattern",
    "/api/v1/metrics/backend": "backend",
    "/api/v1/metrics/blobcache": "blobcache",
}


async def _metrics(controller: Controller, request: ApiRequest) -> ApiResponse:
    kind = _METRICS[request.path]
    latest = request.query.get("latest", "").lower() == "true"
    return ApiResponse.json(200, controller.metrics(kind, request.query.get("id"), latest))


for _path in _METRICS:
    _route(_path, "GET", "none")(_metrics)


@_route("/api/v1/config", "GET", "none")
async def _runtime_config(controller: Controller, request: ApiRequest) -> ApiResponse:
    return ApiResponse.json(200, controller.runtime_config(request.query.get("id")))


@_route("/api/v1/config", "PUT", "required")
async def _set_runtime_config(controller: Controller, request: ApiRequest) -> ApiResponse:
    settings = _json_object(request.body)
    if not all(isinstance(value, str) for value in settings.values()):
        raise ApiError(400, "ParseBody: expected a map of strings")
    controller.set_runtime_config(request.query.get("id"), settings)
    return ApiResponse(204)


@_route("/metrics", "GET", "none")
async def _prometheus(controller: Controller, request: ApiRequest) -> ApiResponse:
    text = controller.prometheus().encode()
    return ApiResponse(200, text, ((b"Content-Type", b"text/plain; version=0.0.4"),))
