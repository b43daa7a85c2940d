"""A controller for the API tests: answers like a daemon with one mount, and records calls."""

from __future__ import annotations

from typing import Any

from vhostfs.api.routes import ApiError, MountCommand


class RecordingController:
    """Answers like a daemon with one passthrough mount at /containers."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.mounts = {"/containers"}

    def daemon_info(self, *, with_backends: bool) -> dict[str, Any]:
        info: dict[str, Any] = {"id": None, "state": "RUNNING"}
        if with_backends:
            info["backend_collection"] = {m: {"mountpoint": m} for m in sorted(self.mounts)}
        return info

    def set_log_level(self, level: str) -> None:
        self.calls.append(("log_level", level))

    def events(self) -> dict[str, Any]:
        return {"max_errors": 0, "total_errors": 0, "max_size": 0, "errors": []}

    def backend_info(self, mountpoint: str) -> dict[str, Any]:
        if mountpoint not in self.mounts:
            raise ApiError(404, f"{mountpoint}: not mounted")
        return {"mountpoint": mountpoint}

    def start(self) -> None:
        self.calls.append(("start", None))

    def exit(self) -> None:
        self.calls.append(("exit", None))

    async def mount(self, mountpoint: str, command: MountCommand) -> None:
        if mountpoint in self.mounts:
            raise ApiError(500, f"{mountpoint}: already exists")
        self.mounts.add(mountpoint)
        self.calls.append(("mount", (mountpoint, command)))

    async def remount(self, mountpoint: str, command: MountCommand) -> None:
        self.calls.append(("remount", (mountpoint, command)))

    async def umount(self, mountpoint: str) -> None:
        if mountpoint not in self.mounts:
            raise ApiError(500, f"{mountpoint}: not found")
        self.mounts.remove(mountpoint)
        self.calls.append(("umount", mountpoint))

    def metrics(self, kind: str, mount_id: str | None, latest: bool) -> Any:
        return {"kind": kind, "id": mount_id, "latest": latest}

    def prometheus(self) -> str:
        return "vhostfs_up 1\n"

    def runtime_config(self, mount_id: str | None) -> dict[str, str]:
        return {"registry_auth": ""}

    def set_runtime_config(self, mount_id: str | None, settings: dict[str, str]) -> None:
        self.calls.append(("config", (mount_id, settings)))
