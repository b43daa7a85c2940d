"""The `vhostfs` command line."""

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Coroutine
from typing import Any

import click
import uvloop

LOG_LEVELS = ["error", "warn", "warning", "info", "debug", "trace"]


def _setup_logging(level: str, syslog: bool) -> None:
    name = {"warn": "WARNING", "trace": "DEBUG"}.get(level, level.upper())
    handler: logging.Handler
    if syslog:
        from logging.handlers import SysLogHandler

        handler = SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("vhostfs[%(process)d]: %(levelname)s %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=name, handlers=[handler])


@click.group()
def main() -> None:
    """virtio-fs vhost-user daemon for microVM guests."""


@main.command()
@click.option(
    "--socket",
    "--socket-path",
    "socket_path",
    type=click.Path(dir_okay=False),
    help="Listen on this Unix socket for the VMM (QEMU, cloud-hypervisor).",
)
@click.option(
    "--fd",
    "listen_fd",
    type=int,
    help="Serve on an inherited, already listening socket (as Kata passes --fd=3).",
)
@click.option(
    "--shared-dir",
    type=click.Path(exists=True, file_okay=False),
    required=True,
    help="Host directory to export (read-only for now).",
)
@click.option(
    "--cache",
    type=click.Choice(["auto", "always", "never", "none", "metadata"]),
    default="auto",
    show_default=True,
    help="Guest caching policy, as virtiofsd's.",
)
@click.option("--num-request-queues", type=click.IntRange(1, 16), default=1, show_default=True)
@click.option("--log-level", type=click.Choice(LOG_LEVELS), default="info", show_default=True)
@click.option("--syslog", is_flag=True, help="Log to syslog instead of stderr.")
@click.option(
    "--thread-pool-size",
    type=int,
    hidden=True,
    help="Accepted for virtiofsd compatibility; requests run on the event loop.",
)
@click.option(
    "--announce-submounts", is_flag=True, hidden=True, help="Accepted for virtiofsd compatibility."
)
def serve(
    socket_path: str | None,
    listen_fd: int | None,
    shared_dir: str,
    cache: str,
    num_request_queues: int,
    log_level: str,
    syslog: bool,
    thread_pool_size: int | None,
    announce_submounts: bool,
) -> None:
    """Serve a host directory to one VMM over vhost-user-fs, until it disconnects."""
    _setup_logging(log_level, syslog)
    if (socket_path is None) == (listen_fd is None):
        raise click.UsageError("give exactly one of --socket/--socket-path and --fd")
    from vhostfs.fs.passthrough import CachePolicy, Passthrough
    from vhostfs.fuse.dispatch import Dispatcher
    from vhostfs.vhost.server import inherited_listener, listen_unix
    from vhostfs.vhost.server import serve as serve_vhost
    from vhostfs.vhost.virtqueue import RequestHandler

    policy: CachePolicy = {"none": "never", "metadata": "auto"}.get(cache, cache)  # type: ignore[assignment]
    listener: socket.socket = (
        listen_unix(socket_path) if socket_path is not None else inherited_listener(listen_fd or 0)
    )

    def make_handler() -> RequestHandler:
        return Dispatcher(Passthrough(shared_dir, cache=policy)).handle

    _run(serve_vhost(listener, make_handler, 1 + num_request_queues))
    if socket_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


def _run(main: Coroutine[Any, Any, None]) -> None:
    uvloop.run(main)
