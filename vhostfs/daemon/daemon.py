"""The composition root: the daemon owns its mounts, the vhost-user server, the API server and
the metrics.

`Daemon.serve()` is the whole life of the process (see state.py for the states), in nydusd's
order (reference §2.1):

1. open the initial mounts; a bad image or config fails here, before any socket is bound;
2. listen on the vhost-user socket (RUNNING from then on), then start the HTTP API, so the
   state an API client first reads is already RUNNING;
   with a sandbox (config.sandbox, sandbox.py) the order of 1 and 2 turns: listen at the
   host path, enter the sandbox, then open the shared dir as "/" inside it;
3. serve one front-end until it leaves, SIGTERM/SIGINT arrives or the API asks to exit;
4. on every way out (those three, or an error) stop the API, cancel the requests still
   running, log the exit metrics, close every mount and remove the socket files.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
from collections import Counter
from typing import Final

import uvloop

from vhostfs.api import ApiServer
from vhostfs.daemon.config import (
    DaemonConfig,
    MountConfig,
    PassthroughMountConfig,
    SandboxConfig,
    SandboxError,
    SocketPath,
)
from vhostfs.daemon.controller import DaemonController
from vhostfs.daemon.events import ErrorEvents
from vhostfs.daemon.mount import RafsMount
from vhostfs.daemon.state import DaemonState, Lifecycle
from vhostfs.daemon.table import MountTable
from vhostfs.fuse.dispatch import Dispatcher
from vhostfs.storage.metrics import READ_LATENCY_CLASSES_NS, READ_SIZE_CLASSES
from vhostfs.vhost.server import inherited_listener, listen_unix
from vhostfs.vhost.server import serve as serve_vhost
from vhostfs.vhost.virtqueue import RequestHandler

log = logging.getLogger(__name__)

_EXIT_SIGNALS: Final = (signal.SIGTERM, signal.SIGINT)


class Daemon:
    def __init__(self, config: DaemonConfig) -> None:
        self.config = config
        self.mounts = MountTable(pseudo_root=config.pseudo_root)
        self._lifecycle = Lifecycle()
        # One FUSE session per front-end connection; kept for the exit metrics.
        self._sessions: list[Dispatcher] = []
        self._api: ApiServer | None = None
        self.events = ErrorEvents()  # recent errors, for the API; attached while serving
        self._exit = asyncio.Event()
        self._exits_process = False  # set by run(): serve() is the process's last job
        self._socket_bound = False  # our socket file is there: remove it at exit
        self._socket_dir: int | None = None  # in the sandbox: where the socket file is

    @property
    def state(self) -> DaemonState:
        return self._lifecycle.state

    async def reached(self, state: DaemonState) -> None:
        """Return once the daemon is, or has been, in `state`; STOPPED comes on every exit."""
        await self._lifecycle.reached(state)

    def run(self) -> None:
        """serve() on a fresh uvloop event loop, as the process's main job; returns when the
        daemon has stopped. A SIGTERM or SIGINT that comes after that (Kata may send one as
        the VMM leaves) must not turn a clean exit into death by signal: the process blocks
        them while it exits."""
        self._exits_process = True
        uvloop.run(self.serve())

    async def serve(self) -> None:
        """Raises MountError when an initial mount cannot open, OSError when a socket cannot be
        bound; everything is closed again either way.

        SIGTERM and SIGINT ask for an exit from the moment serve() starts until it returns: one
        arriving while the daemon already stops (the front-end just left, say) changes nothing,
        so the mounts are always closed and the exit status is 0."""
        loop = asyncio.get_running_loop()
        for signum in _EXIT_SIGNALS:
            loop.add_signal_handler(signum, self.request_exit)
        logging.getLogger().addHandler(self.events)
        try:
            if self.config.sandbox is None:
                for mountpoint, mount in self.config.mounts:
                    await self.mounts.add(mountpoint, mount)
                self._lifecycle.move(DaemonState.READY)
                listener = self._listen()
            else:
                listener = self._listen()
                try:
                    for mountpoint, mount in self._enter_sandbox(self.config.sandbox):
                        await self.mounts.add(mountpoint, mount)
                except BaseException:
                    listener.close()
                    raise
                self._lifecycle.move(DaemonState.READY)
            self._lifecycle.move(DaemonState.RUNNING)
            if self.config.api_socket is not None:
                self._api = ApiServer(DaemonController(self))
                await self._api.start(self.config.api_socket)
            await self._serve_until_exit(listener)
        finally:
            await self._stop()
            if self._exits_process:
                signal.pthread_sigmask(signal.SIG_BLOCK, _EXIT_SIGNALS)
            for signum in _EXIT_SIGNALS:
                loop.remove_signal_handler(signum)

    async def _serve_until_exit(self, listener: socket.socket) -> None:
        """Serve the front-end until it leaves or an exit is asked for."""
        queues = 1 + self.config.num_request_queues
        vhost = asyncio.create_task(serve_vhost(listener, self._new_session, queues))
        exit_asked = asyncio.create_task(self._exit.wait())
        try:
            await asyncio.wait({vhost, exit_asked}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (vhost, exit_asked):
                task.cancel()
            await asyncio.gather(vhost, exit_asked, return_exceptions=True)
        if exit_asked.done() and not exit_asked.cancelled():
            log.info("exiting as asked (signal or API)")
        elif (error := vhost.exception()) is not None:
            raise error

    def request_exit(self) -> None:
        """Stop as SIGTERM does (the API's daemon/exit too); the caller's reply still goes out
        first, since the daemon only stops on its next turn of the event loop."""
        self._exit.set()

    async def mount(self, mountpoint: str, config: MountConfig) -> None:
        await self.mounts.add(mountpoint, config)

    async def umount(self, mountpoint: str) -> None:
        await self.mounts.remove(mountpoint, before_close=self._forget_direct_reads)

    async def remount(self, mountpoint: str, config: MountConfig) -> None:
        await self.mounts.replace(mountpoint, config, before_close=self._forget_direct_reads)

    def _forget_direct_reads(self) -> None:
        """The transport answers READs from the mounts' files by itself: stop that before any
        of those files closes (its counts are folded in first)."""
        self.fold_direct_reads()
        for session in self._sessions:
            session.forget_direct_reads()

    def fold_direct_reads(self) -> None:
        """Add the READs the transport answered by itself to each image mount's metrics."""
        for entry in self.mounts:
            for session in self._sessions:
                account = session.take_direct_reads(entry.tag)
                if account is None or not account.reads:
                    continue
                if isinstance(entry.mount, RafsMount):
                    entry.mount.storage.metrics.observe_direct_reads(
                        account.reads, account.bytes, account.sizes, account.latencies
                    )

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
            listener = listen_unix(listen.path)
            self._socket_bound = True
            return listener
        return inherited_listener(listen.fd)

    def _enter_sandbox(self, config: SandboxConfig) -> list[tuple[str, MountConfig]]:
        """Enter the sandbox (the socket already listens at its host path) and return the
        mounts to open inside it: the shared dir, now "/". The socket's directory is kept
        open, so that the exit can still remove the socket, which no path reaches any more."""
        if len(self.config.mounts) != 1 or not isinstance(
            root := self.config.mounts[0][1], PassthroughMountConfig
        ):
            raise SandboxError("the sandbox takes exactly one mount, a shared directory")
        listen = self.config.listen
        if isinstance(listen, SocketPath):
            directory = os.path.dirname(os.path.abspath(listen.path))
            self._socket_dir = os.open(directory, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        from vhostfs.daemon import sandbox  # ctypes and the preloading, only now

        entered = sandbox.enter(root.shared_dir, xattr=root.xattr, seccomp_mode=config.seccomp)
        log.info(
            "sandbox: namespace (mount, network, IPC) with %s as /, capabilities %#x, seccomp %s",
            root.shared_dir,
            entered.capabilities,
            entered.seccomp,
        )
        return [(self.config.mounts[0][0], dataclasses.replace(root, shared_dir="/"))]

    def _remove_socket(self) -> None:
        listen = self.config.listen
        if not isinstance(listen, SocketPath) or not self._socket_bound:
            return
        with contextlib.suppress(FileNotFoundError):
            if self._socket_dir is None:
                os.unlink(listen.path)
            else:
                os.unlink(os.path.basename(listen.path), dir_fd=self._socket_dir)

    def _new_session(self) -> RequestHandler:
        session = Dispatcher(
            self.mounts.session_fs, read_classes=(READ_SIZE_CLASSES, READ_LATENCY_CLASSES_NS)
        )
        self._sessions.append(session)
        return session.handle

    async def _stop(self) -> None:
        if self._api is not None:
            await self._api.aclose()
        for session in self._sessions:
            session.cancel()
            await session.drain()
        if self.state is DaemonState.RUNNING:
            fops, errors = self.request_counts()
            # Whatever is mounted (a directory export has no counters of its own).
            # ring_reads / ring_constants: of those, what the ring answered in C by itself
            # (vhostfs.vhost.direct): READs, and GETATTR/OPEN/FLUSH/RELEASE of images.
            ring_reads = sum(session.direct_read_count() for session in self._sessions)
            ring_constants = sum(session.constant_reply_count() for session in self._sessions)
            counts = {
                "fops": fops,
                "errors": errors,
                "ring_reads": ring_reads,
                "ring_constants": ring_constants,
            }
            log.info("requests %s", json.dumps(counts))
            # Requests are counted per session, not per mount yet: each mount reports them all.
            self._forget_direct_reads()
            for entry in self.mounts:
                entry.mount.report(fops)
        self._forget_direct_reads()
        await self.mounts.aclose()
        self._remove_socket()
        self._lifecycle.move(DaemonState.STOPPED)
        logging.getLogger().removeHandler(self.events)
