"""What the daemon commands share: logging, an image mount from flags, running the daemon.

The registry client is not imported here (an image named by reference is `remote_image`'s
job): the daemons import only what serving local images needs, so they start faster and hold
less memory (httpx and ssl alone are ~18 MiB of RSS).
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import click

from vhostfs.daemon import Daemon, DaemonConfig, MountError, RafsMountConfig, SandboxError
from vhostfs.storage import ConfigError, RafsConfig, parse_config

LOG_LEVELS = ["error", "warn", "warning", "info", "debug", "trace"]


def given_once(_ctx: click.Context, param: click.Parameter, values: tuple[Any, ...]) -> Any:
    """Callback for an option declared multiple=True that may still be given only once.

    Click lets the last of repeated options win. For what the daemon exports, where it listens
    and how it is confined, a runtime that appends "extra arguments" to the operator's (Kata's
    virtio_fs_extra_args, GHSA-rr59-xxvx-96qr) must not be able to override them silently."""
    if len(values) > 1:
        raise click.BadParameter(
            f"given {len(values)} times; it may be given once", param=param
        )
    return values[0] if values else None


def setup_logging(level: str, syslog: bool = False, log_file: str | None = None) -> None:
    name = {"warn": "WARNING", "trace": "DEBUG"}.get(level, level.upper())
    handler: logging.Handler
    if syslog:
        from logging.handlers import SysLogHandler

        handler = SysLogHandler(address="/dev/log")
        handler.setFormatter(logging.Formatter("vhostfs[%(process)d]: %(levelname)s %(message)s"))
    elif log_file is not None:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=name, handlers=[handler])


def rafs_mount(
    bootstrap: str,
    config_path: str | None,
    blob_dir: str | None,
    blob_files: tuple[str, ...],
    cache_dir: str | None,
    prefetch_files: str | None,
) -> RafsMountConfig:
    """The image mount the flags describe; a config or list that cannot be read or parsed
    fails here, before anything opens."""
    try:
        if config_path is not None:
            if blob_dir or cache_dir:
                raise click.UsageError("--config replaces --blob-dir and --cache-dir")
            with open(config_path, "rb") as f:
                storage = parse_config(f.read())
        else:
            storage = RafsConfig.from_flags(
                blob_dir=blob_dir, blob_files=blob_files, cache_dir=cache_dir
            )
        paths = read_prefetch_list(prefetch_files) if prefetch_files else ()
    except (ConfigError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    return RafsMountConfig(bootstrap, storage, paths)


def read_prefetch_list(path: str) -> tuple[bytes, ...]:
    with open(path, "rb") as f:
        return tuple(line.strip() for line in f if line.strip())


def run_daemon(config: DaemonConfig) -> None:
    """Run the daemon until it stops; a mount that cannot open, a socket that cannot be bound
    or a sandbox that cannot be entered ends the command with its one-line message, never a
    traceback."""
    try:
        Daemon(config).run()
    except (MountError, SandboxError, OSError) as e:
        raise click.ClickException(str(e)) from None
