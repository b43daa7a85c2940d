"""`vhostfs serve`: the virtiofsd-compatible daemon command."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import click
import uvloop

if TYPE_CHECKING:
    from vhostfs.fuse.ops import Operations

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


@click.command()
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
    help="Host directory to export (read-only for now).",
)
@click.option(
    "--bootstrap",
    type=click.Path(exists=True, dir_okay=False),
    help="RAFS (v5/v6) or EROFS image to serve read-only.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False),
    help="nydusd v1 JSON config for --bootstrap (backend, cache, digest_validate, fs_prefetch).",
)
@click.option(
    "--blob-dir",
    type=click.Path(exists=True, file_okay=False),
    help="Directory holding the image's blobs, named by blob id.",
)
@click.option(
    "--blob",
    "blob_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False),
    help="A blob file, in device-table order (repeatable).",
)
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False),
    help="Work directory for the chunk cache (none: no cache).",
)
@click.option(
    "--prefetch-files",
    type=click.Path(exists=True, dir_okay=False),
    help="File listing image paths to prefetch, one per line.",
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
    shared_dir: str | None,
    bootstrap: str | None,
    config_path: str | None,
    blob_dir: str | None,
    blob_files: tuple[str, ...],
    cache_dir: str | None,
    prefetch_files: str | None,
    cache: str,
    num_request_queues: int,
    log_level: str,
    syslog: bool,
    thread_pool_size: int | None,
    announce_submounts: bool,
) -> None:
    """Serve a host directory or a RAFS image to one VMM over vhost-user-fs, until it
    disconnects."""
    _setup_logging(log_level, syslog)
    if (socket_path is None) == (listen_fd is None):
        raise click.UsageError("give exactly one of --socket/--socket-path and --fd")
    if (shared_dir is None) == (bootstrap is None):
        raise click.UsageError("give exactly one of --shared-dir and --bootstrap")
    from vhostfs.fuse.dispatch import Dispatcher
    from vhostfs.vhost.server import inherited_listener, listen_unix
    from vhostfs.vhost.server import serve as serve_vhost
    from vhostfs.vhost.virtqueue import RequestHandler

    open_fs: Callable[[], Operations]
    report: Callable[[dict[str, int]], None] = lambda fops: None  # noqa: E731
    if shared_dir is not None:
        open_fs = _passthrough(shared_dir, cache)
    else:
        assert bootstrap is not None
        open_fs, report = _rafs(
            bootstrap, config_path, blob_dir, blob_files, cache_dir, prefetch_files
        )
    listener: socket.socket = (
        listen_unix(socket_path) if socket_path is not None else inherited_listener(listen_fd or 0)
    )

    dispatchers: list[Dispatcher] = []

    def make_handler() -> RequestHandler:
        dispatchers.append(Dispatcher(open_fs()))
        return dispatchers[-1].handle

    _run(serve_vhost(listener, make_handler, 1 + num_request_queues))
    report({name: n for d in dispatchers for name, n in d.opcode_counts().items()})
    if socket_path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(socket_path)


def _passthrough(shared_dir: str, cache: str) -> Callable[[], Operations]:
    from vhostfs.fs.passthrough import CachePolicy, Passthrough

    policy: CachePolicy = {"none": "never", "metadata": "auto"}.get(cache, cache)  # type: ignore[assignment]
    return lambda: Passthrough(shared_dir, cache=policy)


def _rafs(
    bootstrap: str,
    config_path: str | None,
    blob_dir: str | None,
    blob_files: tuple[str, ...],
    cache_dir: str | None,
    prefetch_files: str | None,
) -> tuple[Callable[[], Operations], Callable[[dict[str, int]], None]]:
    """Open the image and its storage now, so a bad image or config fails before we listen;
    the file system (and its prefetch) starts once the event loop runs. Also returns what to
    report at exit: the storage metrics, as one JSON log line."""
    from vhostfs.fs.rafs import RafsFs
    from vhostfs.rafs import RafsError, open_image
    from vhostfs.storage import ConfigError, RafsConfig, open_storage, parse_config, prefetcher_for

    try:
        if config_path is not None:
            if blob_dir or cache_dir:
                raise click.UsageError("--config replaces --blob-dir and --cache-dir")
            with open(config_path, "rb") as f:
                config = parse_config(f.read())
        else:
            config = RafsConfig.from_flags(
                blob_dir=blob_dir, blob_files=blob_files, cache_dir=cache_dir
            )
        image = open_image(bootstrap)
        storage = open_storage(config, image.blobs, bootstrap=bootstrap)
        paths = _read_prefetch_list(prefetch_files) if prefetch_files else []
    except (RafsError, ConfigError, OSError) as exc:
        raise click.ClickException(str(exc)) from None

    def open_fs() -> Operations:
        fs = RafsFs(image, storage)
        if config.prefetch.enable or paths:
            refs = fs.prefetch_refs(paths, everything=config.prefetch.prefetch_all)
            prefetcher_for(storage, config.prefetch).start(refs)
        return fs

    def report(fops: dict[str, int]) -> None:
        storage.metrics.fops.update(fops)
        logging.getLogger("vhostfs").info("metrics %s", json.dumps(storage.metrics.snapshot()))

    return open_fs, report


def _read_prefetch_list(path: str) -> list[bytes]:
    with open(path, "rb") as f:
        return [line.strip() for line in f if line.strip()]


def _run(main: Coroutine[Any, Any, None]) -> None:
    uvloop.run(main)

