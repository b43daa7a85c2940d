"""What the HTTP API does to the daemon: the `Controller` that vhostfs.api.routes calls.

Answers follow nydusd's (reference §2.2-2.3): DaemonInfo with `state`, `version` and the
mounts in `backend_collection` (secrets never shown), 204 for mount changes, and 500 with the
reason for a mount that cannot be made or removed, which is what nydusd answers and what Kata
reports to the user.
"""

from __future__ import annotations

import datetime
import logging
from typing import TYPE_CHECKING, Any, Final

from vhostfs import __version__
from vhostfs.api import ApiError, MountCommand
from vhostfs.daemon import metrics
from vhostfs.daemon.config import MountConfig, PassthroughMountConfig, RafsMountConfig
from vhostfs.daemon.mount import MountError, RafsMount
from vhostfs.daemon.state import DaemonState
from vhostfs.daemon.table import MountedFs, MountpointError
from vhostfs.storage import ConfigError, parse_config
from vhostfs.storage.backend import Reauthenticating

if TYPE_CHECKING:
    from vhostfs.daemon.daemon import Daemon

_LOG_LEVELS: Final = {
    "trace": logging.DEBUG,
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class DaemonController:
    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    # --- The daemon ------------------------------------------------------------------------

    def daemon_info(self, *, with_backends: bool) -> dict[str, Any]:
        info: dict[str, Any] = {
            "version": {
                "package_ver": __version__,
                "git_commit": "",
                "build_time": "",
                "profile": "release",
                "rustc": "",  # Kata's runtime-rs requires all five fields to be strings
            },
            "id": None,
            "supervisor": None,
            "state": self._daemon.state.value,
        }
        if with_backends:
            info["backend_collection"] = {
                entry.mountpoint: _backend(entry) for entry in self._daemon.mounts
            }
        return info

    def set_log_level(self, level: str) -> None:
        number = _LOG_LEVELS.get(level.lower())
        if number is None:
            raise ApiError(400, f"log_level {level!r}: expected one of {', '.join(_LOG_LEVELS)}")
        logging.getLogger().setLevel(number)

    def events(self) -> dict[str, Any]:
        return self._daemon.events.snapshot()

    def backend_info(self, mountpoint: str) -> dict[str, Any]:
        entry = self._mounted(mountpoint)
        if not isinstance(entry.mount, RafsMount):
            raise ApiError(400, f"{mountpoint}: not a RAFS mount")
        image = entry.mount.image
        return {
            "format": image.format,
            "root_inode": image.root_ino,
            "inodes_count": image.statfs().files,
            "blobs": [blob.blob_id for blob in image.blobs],
        }

    def start(self) -> None:
        if self._daemon.state is not DaemonState.RUNNING:
            raise ApiError(400, f"UnexpectedEvent: the daemon is {self._daemon.state.value}")

    def exit(self) -> None:
        self._daemon.request_exit()

    # --- Mounts ----------------------------------------------------------------------------

    async def mount(self, mountpoint: str, command: MountCommand) -> None:
        config = _mount_config(command)
        await _as_api_error(self._daemon.mount(mountpoint, config))

    async def remount(self, mountpoint: str, command: MountCommand) -> None:
        if command.fs_type != "rafs":
            raise ApiError(500, f"{mountpoint}: only RAFS mounts can be remounted")
        config = _mount_config(command)
        await _as_api_error(self._daemon.remount(mountpoint, config))

    async def umount(self, mountpoint: str) -> None:
        await _as_api_error(self._daemon.umount(mountpoint))

    # --- Metrics ---------------------------------------------------------------------------

    def metrics(self, kind: str, mount_id: str | None, latest: bool) -> Any:
        self._daemon.fold_direct_reads()
        entry = self._rafs_mount(mount_id)
        assert isinstance(entry.mount, RafsMount)
        storage = entry.mount.storage
        if kind == "fops":
            requests, errors = self._daemon.request_counts()
            return metrics.fs_metrics(entry.mountpoint, storage, requests, errors)
        if kind == "backend":
            return metrics.backend_metrics(storage)
        if kind == "blobcache":
            return metrics.blobcache_metrics(storage)
        raise ApiError(404, f"metrics: {kind} are not collected (iostats_files, access_pattern)")

    def prometheus(self) -> str:
        self._daemon.fold_direct_reads()
        lines = [f'vhostfs_up{{state="{self._daemon.state.value}"}} 1']
        requests, errors = self._daemon.request_counts()
        lines += metrics.prometheus_requests(requests, errors)
        for entry in self._daemon.mounts:
            if isinstance(entry.mount, RafsMount):
                lines += metrics.prometheus_lines(entry.mountpoint, entry.mount.storage)
        return "\n".join(lines) + "\n"

    def runtime_config(self, mount_id: str | None) -> dict[str, str]:
        backend = self._rafs_backend(mount_id)
        return {"registry_auth": ""} if isinstance(backend, Reauthenticating) else {}

    def set_runtime_config(self, mount_id: str | None, settings: dict[str, str]) -> None:
        unknown = sorted(set(settings) - {"registry_auth"})
        if unknown:
            raise ApiError(400, f"config: unknown keys {', '.join(unknown)} (registry_auth only)")
        backend = self._rafs_backend(mount_id)
        if not isinstance(backend, Reauthenticating):
            raise ApiError(400, "config: registry_auth needs a registry backend")
        try:
            backend.update_auth(settings.get("registry_auth") or None)
        except ConfigError as e:
            raise ApiError(400, str(e)) from None

    def _rafs_backend(self, mount_id: str | None) -> object:
        entry = self._rafs_mount(mount_id)
        assert isinstance(entry.mount, RafsMount)
        return entry.mount.storage.backend

    def _rafs_mount(self, mount_id: str | None) -> MountedFs:
        """The RAFS mount `mount_id` names (its mountpoint), or the first one, as nydusd."""
        for entry in self._daemon.mounts:
            if isinstance(entry.mount, RafsMount) and mount_id in (None, entry.mountpoint):
                return entry
        raise ApiError(404, f"no RAFS mount {mount_id or ''}".rstrip())

    def _mounted(self, mountpoint: str) -> MountedFs:
        entry = self._daemon.mounts.get(mountpoint)
        if entry is None:
            raise ApiError(404, f"{mountpoint}: not mounted")
        return entry


def _mount_config(command: MountCommand) -> MountConfig:
    if command.fs_type == "passthrough":
        # As nydusd exports it (reference §2.3): read-write, xattrs on, the writeback cache.
        return PassthroughMountConfig(command.source, writeback=True)
    try:
        storage = parse_config(command.config)
    except ConfigError as e:
        raise ApiError(500, f"Mount(config: {e})") from None
    paths = tuple(path.encode() for path in command.prefetch_files)
    return RafsMountConfig(command.source, storage, paths)


async def _as_api_error(change: Any) -> None:
    try:
        await change
    except (MountError, MountpointError) as e:
        raise ApiError(500, f"Mount({e})") from None


def _backend(entry: MountedFs) -> dict[str, Any]:
    config = entry.config
    shown: Any = None
    if isinstance(config, RafsMountConfig):
        shown = config.storage.redacted()  # credentials blanked, as nydusd's DaemonInfo
    mounted = datetime.datetime.fromtimestamp(entry.mounted_time, datetime.UTC)
    return {
        "backend_type": "Rafs" if isinstance(config, RafsMountConfig) else "PassthroughFs",
        "mountpoint": entry.mountpoint,
        "mounted_time": mounted.isoformat(),
        "config": shown,
    }
