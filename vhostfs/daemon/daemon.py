"""The composition root: the daemon owns its mounts, the vhost-user server, the API server and
the metrics.

`Daemon.serve()` is the whole life of the process (see state.py for the states), in nydusd's
order (reference §2.1):

1. open the initial mounts; a bad image or config fails here, before any socket is bound;
2. listen on the vhost-user socket (RUNNING from then on), then start the HTTP API, so the
   state an API client first reads is already RUNNING;
3. serve one front-end until it leaves, SIGTERM/SIGINT arrives or the API asks to exit;
4. on every way out (those three, or an error) stop the API, cancel the requests still
   running, log the exit metrics, close every mount and remove the socket files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from collections import Counter

import uvloop

from vhostfs.api import ApiServer
from vhostfs.daemon.config import DaemonConfig, MountConfig, SocketPath
from vhostfs.daemon.controller import DaemonController
from vhostfs.daemon.events import ErrorEvents
from vhostfs.daemon.state import DaemonState, Lifecycle
from vhostfs.daemon.table import MountTable
from vhostfs.fuse.dispatch import Dispatcher
from vhostfs.vhost.server import inherited_listener, listen_unix
from vhostfs.vhost.server import serve as serve_vhost
from vhostfs.vhost.virtqueue import RequestHandler

log = logging.getLogger(__name__)


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.mounts = MountTable(pseudo_root=config.pseudo_root)
        self._lifecycle = Lifecycle()
        # One FUSE session per front-end connection; kept for the exit metrics.
        self._sessions: list[Dispatcher] = []
        self._api: ApiServer | None = None
        self.events = ErrorEvents()  # recent errors, for the API; attached while serving
        self._serving: asyncio.Task[None] | None = None

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
        """Raises MountError when an initial mount cannot open, OSError when a socket cannot be
        bound; everything is closed again either way."""
        self._serving = asyncio.current_task()
        logging.getLogger().addHandler(self.events)
        try:
            for mountpoint, mount in self.config.mounts:
                await self.mounts.add(mountpoint, mount)
            self._lifecycle.move(DaemonState.READY)
            listener = self._listen()
            self._lifecycle.move(DaemonState.RUNNING)
            if self.config.api_socket is not None:
                self._api = ApiServer(DaemonController(self))
                await self._api.start(self.config.api_socket)
            await serve_vhost(listener, self._new_session, 1 + self.config.num_request_queues)
        finally:
            await self._stop()

    def request_exit(self) -> None:
        """Stop as SIGTERM would, from inside the event loop (the API's daemon/exit)."""
        if self._serving is not None:
            # On the next turn, so the caller's reply goes out first.
            asyncio.get_running_loop().call_soon(self._serving.cancel)

    async def mount(self, mountpoint: str, config: MountConfig) -> None:
        await self.mounts.add(mountpoint, config)

    async def umount(self, mountpoint: str) -> None:
        await self.mounts.remove(mountpoint)

    async def remount(self, mountpoint: str, config: MountConfig) -> None:
        await self.mounts.replace(mountpoint, config)

    def request_counts(self) -> tuple[Counter[str], Counter[str]]:
        """FUSE requests seen and requests answered with an errno, by opcode name, over every
        session so far."""
        requests: Counter[str] = Counter()
        errors: Counter[str] = Counter()
        for session in self._sessions:
            requests.update(session.opcode_counts())
            errors.update(session.error_counts())
        return requests, errors

    def _listen(self) -> socket.socket:
        listen = self.config.listen
        if isinstance(listen, SocketPath):
            return listen_unix(listen.path)
        return inherited_listener(listen.fd)

    def _new_session(self) -> RequestHandler:
        session = Dispatcher(self.mounts.session_fs)
        self._sessions.append(session)
        return session.handle

    async def _stop(self) -> None:
        if self._api is not None:
            await self._api.aclose()
        for session in self._sessions:
            session.cancel()
            await session.drain()
        if self.state is DaemonState.RUNNING:
            fops, _ = self.request_counts()
            # Requests are counted per session, not per mount yet: each mount reports them all.
            for entry in self.mounts:
                entry.mount.report(fops)
        await self.mounts.aclose()
        listen = self.config.listen
        if isinstance(listen, SocketPath) and self.state is DaemonState.RUNNING:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(listen.path)
        self._lifecycle.move(DaemonState.STOPPED)
        logging.getLogger().removeHandler(self.events)
