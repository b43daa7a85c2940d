"""A mount: one file system the daemon serves, and everything that file system needs.

A Mount owns its resources outright: `open()` acquires them in order and `aclose()` releases
them in reverse, whatever state the mount got to. Nothing else closes them, so a resource can
be neither leaked nor closed twice.

    PassthroughMount  the host directory's root fd and the fs's handles
    RafsMount         the mapped bootstrap, the storage (backend, cache files, thread pool),
                      the prefetcher, and the fs over them
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from collections import Counter

from vhostfs.daemon.config import MountConfig, PassthroughMountConfig, RafsMountConfig
from vhostfs.fs.passthrough import Passthrough
from vhostfs.fs.rafs import RafsFs
from vhostfs.fuse.ops import Operations
from vhostfs.rafs import RafsError, RafsImage, open_image
from vhostfs.storage import (
    ConfigError,
    ImageStorage,
    Prefetcher,
    StorageError,
    open_storage,
    prefetcher_for,
)

log = logging.getLogger(__name__)


class MountError(Exception):
    """The mount cannot be opened: a bad image, config, blob or directory. The message says
    which, in one line."""


class Mount(ABC):
    """Call `open()` once, serve `fs`, then `aclose()` (also after a failed open)."""

    @property
    @abstractmethod
    def fs(self) -> Operations:
        """The file system to serve; only valid between open() and aclose()."""

    @abstractmethod
    async def open(self) -> None:
        """Acquire everything; raises MountError. Runs on the event loop."""

    @abstractmethod
    async def aclose(self) -> None:
        """Release whatever open() acquired; safe to call more than once."""

    @abstractmethod
    def report(self, fops: Counter[str]) -> None:
        """Log the mount's counters at exit, given the requests its fs served by opcode."""


def mount_for(config: MountConfig) -> Mount:
    if isinstance(config, PassthroughMountConfig):
        return PassthroughMount(config)
    return RafsMount(config)


class PassthroughMount(Mount):
    def __init__(self, config: PassthroughMountConfig) -> None:
        self.config = config
        self._fs: Passthrough | None = None

    @property
    def fs(self) -> Passthrough:
        if self._fs is None:
            raise RuntimeError("mount is not open")
        return self._fs

    async def open(self) -> None:
        try:
            config = self.config
            self._fs = Passthrough(
                config.shared_dir,
                cache=config.cache,
                readonly=config.readonly,
                xattr=config.xattr,
                writeback=config.writeback,
                allow_devices=config.allow_devices,
                killpriv_v2=config.killpriv_v2,
                announce_submounts=config.announce_submounts,
                workers=config.workers,
                xattrmap=config.xattrmap,
            )
        except OSError as e:
            raise MountError(f"{self.config.shared_dir}: {e.strerror}") from None

    async def aclose(self) -> None:
        fs, self._fs = self._fs, None
        if fs is not None:
            fs.close()

    def report(self, fops: Counter[str]) -> None:
        pass  # a directory export has no counters of its own yet (the HTTP API adds them)


class RafsMount(Mount):
    def __init__(self, config: RafsMountConfig) -> None:
        self.config = config
        self._image: RafsImage | None = None
        self._storage: ImageStorage | None = None
        self._prefetcher: Prefetcher | None = None
        self._fs: RafsFs | None = None

    @property
    def fs(self) -> RafsFs:
        if self._fs is None:
            raise RuntimeError("mount is not open")
        return self._fs

    @property
    def image(self) -> RafsImage:
        if self._image is None:
            raise RuntimeError("mount is not open")
        return self._image

    @property
    def storage(self) -> ImageStorage:
        if self._storage is None:
            raise RuntimeError("mount is not open")
        return self._storage

    async def open(self) -> None:
        config = self.config
        try:
            self._image = open_image(config.bootstrap)
            self._storage = open_storage(
                config.storage, self._image.blobs, bootstrap=config.bootstrap
            )
        except (RafsError, StorageError, ConfigError) as e:
            raise MountError(str(e)) from None
        except OSError as e:
            where = f"{e.filename}: " if e.filename else ""
            raise MountError(f"{where}{e.strerror or e}") from None
        self._fs = RafsFs(self._image, self._storage)
        prefetch = config.storage.prefetch
        if prefetch.enable or config.prefetch_files:
            refs = self._fs.prefetch_refs(config.prefetch_files, everything=prefetch.prefetch_all)
            self._prefetcher = prefetcher_for(self._storage, prefetch)
            self._prefetcher.start(refs)

    async def aclose(self) -> None:
        # Reverse order of open: nothing may still read from what is closed next.
        prefetcher, self._prefetcher = self._prefetcher, None
        if prefetcher is not None:
            await prefetcher.stop()
        self._fs = None
        storage, self._storage = self._storage, None
        if storage is not None:
            await storage.aclose()
        image, self._image = self._image, None
        if image is not None:
            image.close()

    def report(self, fops: Counter[str]) -> None:
        if self._storage is None:
            return
        metrics = self._storage.metrics
        metrics.fops.update(fops)
        log.info("metrics %s", json.dumps(metrics.snapshot()))
