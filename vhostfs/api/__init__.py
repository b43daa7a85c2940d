"""nydusd's HTTP API on a Unix socket, for Kata Containers and nydus-snapshotter.

- `protocol`: HTTP/1.1 on h11, sans-I/O, with limits for hostile clients;
- `routes`: the endpoints, nydusd's status and error rules, and the `Controller` protocol
  the daemon implements;
- `server`: the socket side, one task per client on the daemon's event loop.
"""

from vhostfs.api.routes import ApiError, Controller, MountCommand
from vhostfs.api.server import ApiServer

__all__ = ["ApiError", "ApiServer", "Controller", "MountCommand"]
