"""The daemon: what owns the mounts, the vhost-user server and their lifecycle.

- `config`: DaemonConfig and the mount configs, as plain data built by the command line;
- `state`: the INIT / READY / RUNNING / STOPPED lifecycle and its transitions;
- `mount`: Mount, which owns an image, its storage, its prefetcher and its file system;
- `daemon`: Daemon, the composition root that runs them;
- `sandbox`, `preload`, `seccomp`: `--sandbox namespace`, which confines the daemon to the
  shared dir before it serves.
"""

from vhostfs.daemon.config import (
    DaemonConfig,
    InheritedSocket,
    MountConfig,
    PassthroughMountConfig,
    RafsMountConfig,
    SandboxConfig,
    SandboxError,
    SocketPath,
)
from vhostfs.daemon.daemon import Daemon
from vhostfs.daemon.mount import Mount, MountError
from vhostfs.daemon.state import DaemonState

__all__ = [
    "Daemon",
    "DaemonConfig",
    "DaemonState",
    "InheritedSocket",
    "Mount",
    "MountConfig",
    "MountError",
    "PassthroughMountConfig",
    "RafsMountConfig",
    "SandboxConfig",
    "SandboxError",
    "SocketPath",
]
