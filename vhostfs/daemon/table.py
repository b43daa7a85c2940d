"""The mount table: which Mount serves which mountpoint, and what the guest's FUSE session sees.

Two arrangements, as nydusd and virtiofsd have them:

- a root mount (`vhostfs serve`, or `vhostfs virtiofs` with an initial mount at "/"): one file
  system is the whole export, served without a VFS in between; nothing can be mounted beside it;
- a pseudo root (`vhostfs virtiofs`, as Kata runs it): a Vfs whose mounts come and go at
  runtime through the API.

The table owns every Mount it holds: a mount that fails to open is closed before the error
leaves, an unmounted one is closed after the VFS has let go of it, and `aclose()` closes the rest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from vhostfs.daemon.config import MountConfig
from vhostfs.daemon.mount import Mount, MountError, mount_for
from vhostfs.fs.pseudo import PathError
from vhostfs.fs.vfs import MountTableFull, Vfs
from vhostfs.fuse.ops import Operations

log = logging.getLogger(__name__)

ROOT = "/"



def _nothing() -> None:
    return None

class MountpointError(Exception):
    """The mountpoint is taken, missing or not usable; the message says which."""


@dataclass(slots=True)
class MountedFs:
    mountpoint: str
    mount: Mount
    config: MountConfig
    mounted_time: float  # seconds since the epoch
    tag: int = 0  # its index in the VFS (0: the root mount), which READ accounts go by


class MountTable:
    def __init__(self, *, pseudo_root: bool) -> None:
        self._vfs = Vfs() if pseudo_root else None
        self._mounts: dict[str, MountedFs] = {}

    @property
    def session_fs(self) -> Operations:
        """What the FUSE session serves: the VFS, or the root mount's file system."""
        if self._vfs is not None:
            return self._vfs
        root = self._mounts.get(ROOT)
        if root is None:
            raise MountpointError("nothing is mounted at /")
        return root.mount.fs

    def __iter__(self) -> Iterator[MountedFs]:
        return iter(list(self._mounts.values()))

    def get(self, mountpoint: str) -> MountedFs | None:
        return self._mounts.get(mountpoint)

    async def add(self, mountpoint: str, config: MountConfig) -> MountedFs:
        """Open a mount and put it at `mountpoint`. Raises MountError or MountpointError; on
        either, nothing stays open."""
        self._check_free(mountpoint)
        mount = mount_for(config)
        tag = 0
        try:
            await mount.open()
            if self._vfs is not None:
                tag = await self._vfs.mount(mountpoint, mount.fs)
        except (PathError, MountTableFull) as e:
            await mount.aclose()
            raise MountpointError(str(e)) from None
        except BaseException:
            await mount.aclose()
            raise
        entry = MountedFs(mountpoint, mount, config, time.time(), tag)
        self._mounts[mountpoint] = entry
        log.info("mounted %s at %s", type(mount).__name__, mountpoint)
        return entry

    async def remove(self, mountpoint: str, before_close: Callable[[], None] = _nothing) -> None:
        """Unmount; `before_close` runs once the guest can no longer reach the mount and
        before its files close."""
        entry = self._mounts.get(mountpoint)
        if entry is None:
            raise MountpointError(f"{mountpoint}: not found")
        if self._vfs is None:
            raise MountpointError(f"{mountpoint}: the root mount cannot be removed")
        self._vfs.umount(mountpoint)
        del self._mounts[mountpoint]
        before_close()
        # Requests of this mount still in flight fail cleanly once its storage is closed.
        await entry.mount.aclose()
        log.info("unmounted %s", mountpoint)

    async def replace(
        self, mountpoint: str, config: MountConfig, before_close: Callable[[], None] = _nothing
    ) -> None:
        """Remount: the new config is opened first, so a bad one leaves the old mount serving.
        `before_close` runs as for remove, before the old mount's files close."""
        old = self._mounts.get(mountpoint)
        if old is None:
            raise MountpointError(f"{mountpoint}: not found")
        if self._vfs is None:
            raise MountpointError(f"{mountpoint}: the root mount cannot be replaced")
        mount = mount_for(config)
        try:
            await mount.open()
        except BaseException:
            await mount.aclose()
            raise
        self._vfs.umount(mountpoint)
        tag = await self._vfs.mount(mountpoint, mount.fs)
        self._mounts[mountpoint] = MountedFs(mountpoint, mount, config, time.time(), tag)
        before_close()
        await old.mount.aclose()

    async def aclose(self) -> None:
        mounts, self._mounts = list(self._mounts.values()), {}
        for entry in mounts:
            if self._vfs is not None:
                self._vfs.umount(entry.mountpoint)
            await entry.mount.aclose()

    def _check_free(self, mountpoint: str) -> None:
        if mountpoint in self._mounts:
            raise MountpointError(f"{mountpoint}: already exists")
        if self._vfs is None:
            if mountpoint != ROOT:
                raise MountpointError(f"{mountpoint}: this daemon serves one file system at /")
            if self._mounts:
                raise MountpointError("/: already exists")
        elif mountpoint == ROOT:
            raise MountpointError("/: the pseudo root takes mounts below it, not at it")


__all__ = ["MountError", "MountTable", "MountedFs", "MountpointError"]
