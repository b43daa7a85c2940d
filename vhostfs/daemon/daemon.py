"""The composition root: the daemon owns its mount, the vhost-user server and the metrics.

`Daemon.serve()` is the whole life of the process (see state.py for the states):

1. open the mount; a bad image or config fails here, before any socket is bound;
2. listen, then serve one front-end until it leaves or SIGTERM/SIGINT arrives;
3. on every way out (the front-end leaving, a signal, an error) cancel the requests still
   running, log the exit metrics, close the mount and remove the socket file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections import Counter

import uvloop

from vhostfs.daemon.config import DaemonConfig, SocketPath
from vhostfs.daemon.mount import Mount, mount_for
from vhostfs.daemon.state import DaemonState, Lifecycle
from vhostfs.fuse.dispatch import Dispatcher
from vhostfs.vhost.server import inherited_listener, listen_unix
from vhostfs.vhost.server import serve as serve_vhost
from vhostfs.vhost.virtqueue import RequestHandler

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.mount: Mount = mount_for(config.mount)
        self._lifecycle = Lifecycle()
        # One FUSE session per front-end connection; kept for the exit metrics.
        self._sessions: list[Dispatcher] = []

    @property
    def state(self) -> DaemonState:
        return self._lifecycle.state

    async def reached(self, state: DaemonState) -> None:
        """Return once the daemon is, or has been, in `state`; STOPPED comes on every exit."""
        await self._lifecycle.reached(state)

    def run(self) -> None:
        """serve() on a fresh uvloop event loop; returns when the daemon has stopped."""
        uvloop.run(self.serve())

    async def serve(self) -> None:
        """Raises MountError when the mount cannot open, OSError when the socket cannot be
        bound; everything is closed again either way."""
        try:
            await self.mount.open()
            self._lifecycle.move(DaemonState.READY)
            listener = self._listen()
            self._lifecycle.move(DaemonState.RUNNING)
            await serve_vhost(listener, self._new_session, 1 + self.config.num_request_queues)
        finally:
            await self._stop()

    def _listen(self) -> socket.socket:
        listen = self.config.listen
        if isinstance(listen, SocketPath):
            return listen_unix(listen.path)
        return inherited_listener(listen.fd)

    def _new_session(self) -> RequestHandler:
        session = Dispatcher(self.mount.fs)
        self._sessions.append(session)
        return session.handle

    async def _stop(self) -> None:
        for session in self._sessions:
            session.cancel()
            await session.drain()
        if self.state is DaemonState.RUNNING:
            fops: Counter[str] = Counter()
            for session in self._sessions:
                fops.update(session.opcode_counts())
            self.mount.report(fops)
        await self.mount.aclose()
        listen = self.config.listen
        if isinstance(listen, SocketPath) and self.state is DaemonState.RUNNING:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listen.path)
        self._lifecycle.move(DaemonState.STOPPED)
