"""What the daemon is asked to do: where to listen and what to mount, as plain data.

The command line builds a DaemonConfig from its flags; later the HTTP API will build
MountConfigs from mount requests. Nothing here opens a file: a config is checked for shape
here and for substance when its mount opens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, TypeAlias

from vhostfs.fs.passthrough.xattrmap import XattrMap
from vhostfs.storage import RafsConfig

CachePolicy: TypeAlias = Literal["auto", "always", "never"]
SeccompMode: TypeAlias = Literal["kill", "log", "none"]


@dataclass(frozen=True, slots=True)
class PassthroughMountConfig:
    """A host directory, exported as virtiofsd exports it: read-write with xattrs unless told
    otherwise. nydusd exports Kata's /containers with writeback=True and xattr=True."""

    shared_dir: str
    cache: CachePolicy = "auto"
    readonly: bool = False
    xattr: bool = True
    writeback: bool = False  # the guest's page cache holds writes (FUSE writeback cache)
    allow_devices: bool = False  # let the guest create block and char devices (not whiteouts)
    killpriv_v2: bool = True  # the daemon clears set-id bits on write/truncate/chown (nydusd's)
    announce_submounts: bool = False  # host mounts below the share are submounts in the guest
    workers: int = 4  # threads for blocking work (fsync, big writes, fallocate, copies)
    xattrmap: XattrMap | None = None  # rename xattrs on the host (virtiofsd's --xattrmap)


@dataclass(frozen=True, slots=True)
class RafsMountConfig:
    """A RAFS/EROFS image and the storage its data comes from."""

    bootstrap: str
    storage: RafsConfig
    # Image paths to warm the cache with, from --prefetch-files (nydusd reads the same list).
    prefetch_files: tuple[bytes, ...] = ()


MountConfig: TypeAlias = PassthroughMountConfig | RafsMountConfig


@dataclass(frozen=True, slots=True)
class SocketPath:
    """Bind and listen here, replacing a stale socket file; removed again at exit."""

    path: str


@dataclass(frozen=True, slots=True)
class InheritedSocket:
    """An already listening socket the launcher passed (virtiofsd's --fd, as Kata uses it)."""

    fd: int


class SandboxError(Exception):
    """The sandbox cannot be entered; the message says which step failed, in one line. (Here,
    not in sandbox.py: a daemon without a sandbox never imports that, nor ctypes.)"""


@dataclass(frozen=True, slots=True)
class SandboxConfig:
    """--sandbox namespace (daemon/sandbox.py): before serving, the daemon moves into its own
    mount, network and IPC namespaces with the root mount's shared_dir as "/", keeps a few
    capabilities and installs a seccomp filter (killing on the deny-list, logging it, or none).
    Only for a root mount that is a PassthroughMountConfig."""

    seccomp: SeccompMode = "kill"


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    """`pseudo_root` False: `mounts` is one file system at "/", the whole export (virtiofsd's
    way). True: the guest sees nydusd's pseudo root, with `mounts` as the initial mounts and
    more added through the API at `api_socket`."""

    listen: SocketPath | InheritedSocket
    mounts: tuple[tuple[str, MountConfig], ...]  # (mountpoint, what to mount there)
    num_request_queues: int = 1
    pseudo_root: bool = False
    api_socket: str | None = None
    sandbox: SandboxConfig | None = None
