"""`vhostfs virtiofs`: nydusd's command line (reference §2.1), so Kata can launch vhostfs as it
launches nydusd: `virtiofs --log-level info --apisock API --sock SOCK [extra args]`.

nydusd's global options (--apisock, --config, --log-level, --log-file, --rlimit-nofile, and the
refused --id/--supervisor/--upgrade) may stand before or after the subcommand; given both
ways, the one after wins. Socket paths are made absolute against the current directory, as
runtime-rs's rootless mode passes bare names. The virtiofsd arguments of Kata's default
`virtio_fs_extra_args` are accepted with one warning, since they mean nothing here.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from vhostfs.cli.common import LOG_LEVELS, given_once, rafs_mount, run_daemon, setup_logging
from vhostfs.daemon import (
    DaemonConfig,
    MountConfig,
    PassthroughMountConfig,
    SocketPath,
)
from vhostfs.daemon.process import raise_nofile_limit

log = logging.getLogger(__name__)

_F = TypeVar("_F", bound=Callable[..., Any])
# Where the daemon listens and what it serves may be given once (see given_once).
_ONCE: dict[str, Any] = {"multiple": True, "callback": given_once}

GLOBAL_OPTIONS = (
    "apisock",
    "config",
    "log_level",
    "log_file",
    "rlimit_nofile",
    "id",
    "supervisor",
    "upgrade",
)


def global_options(command: _F) -> _F:
    """nydusd's global options; applied to the `vhostfs` group and to `virtiofs`."""
    options = [
        click.option(
            "-A", "--apisock", type=click.Path(dir_okay=False), help="HTTP API socket.", **_ONCE
        ),
        click.option(
            "-C",
            "--config",
            type=click.Path(exists=True, dir_okay=False),
            **_ONCE,
            help="Config of the initial --bootstrap mount (nydusd v1 JSON).",
        ),
        click.option("-l", "--log-level", type=click.Choice(LOG_LEVELS), default=None),
        click.option("-L", "--log-file", type=click.Path(dir_okay=False), default=None),
        click.option(
            "--rlimit-nofile",
            type=click.IntRange(min=0),
            default=None,
            help="Open-file limit to raise to (default 1000000, 0: leave it).",
        ),
        click.option("--id", default=None, hidden=True),
        click.option("--supervisor", default=None, hidden=True),
        click.option("--upgrade", is_flag=True, default=None, hidden=True),
    ]
    for option in reversed(options):
        command = option(command)
    return command


@click.command("virtiofs")
@global_options
@click.option(
    "--sock", required=True, type=click.Path(dir_okay=False), help="vhost-user socket.", **_ONCE
)
@click.option("--hybrid-mode", is_flag=True, help="Accepted as nydusd accepts it (no effect).")
@click.option("-B", "--bootstrap", type=click.Path(exists=True, dir_okay=False), **_ONCE)
@click.option("-D", "--localfs-dir", type=click.Path(exists=True, file_okay=False), **_ONCE)
@click.option("-s", "--shared-dir", type=click.Path(exists=True, file_okay=False), **_ONCE)
@click.option("--prefetch-files", type=click.Path(exists=True, dir_okay=False))
@click.option("-m", "--virtual-mountpoint", default="/", show_default=True)
@click.option("--thread-pool-size", hidden=True, default=None)
@click.option("--announce-submounts", is_flag=True, hidden=True, default=None)
@click.pass_context
def virtiofs(ctx: click.Context, /, **flags: Any) -> None:
    """Serve nydusd's pseudo root over vhost-user-fs, with mounts added through the HTTP API
    (as Kata Containers runs nydusd)."""
    given = dict(ctx.obj or {})
    for name, value in flags.items():
        if value is None:
            continue
        if given.get(name) not in (None, value):
            # Before and after the subcommand: which one wins must not be a guess.
            raise click.UsageError(f"--{name.replace('_', '-')} given twice, with two values")
        given[name] = value
    setup_logging(given.get("log_level") or "info", log_file=given.get("log_file"))
    for refused in ("id", "supervisor", "upgrade"):
        if given.get(refused):
            raise click.UsageError(
                f"--{refused}: live upgrade through a supervisor is not supported by vhostfs"
            )
    if given.get("thread_pool_size") is not None or given.get("announce_submounts"):
        log.warning(
            "ignoring virtiofsd arguments (--thread-pool-size, --announce-submounts): "
            "set virtio_fs_extra_args = [] for vhostfs"
        )
    raise_nofile_limit(given.get("rlimit_nofile", 1_000_000))
    # The writable passthrough Kata mounts at /containers creates files with the modes the
    # guest asked for (its umask already applied): ours must not take bits away. Our own
    # sockets and cache directories set their modes themselves.
    os.umask(0)
    mounts = _initial_mount(given)
    mountpoint = given["virtual_mountpoint"]
    apisock = given.get("apisock")
    config = DaemonConfig(
        listen=SocketPath(os.path.abspath(given["sock"])),
        mounts=((mountpoint, mounts),) if mounts is not None else (),
        pseudo_root=mounts is None or mountpoint != "/",
        api_socket=os.path.abspath(apisock) if apisock else None,
    )
    run_daemon(config)


def _initial_mount(given: dict[str, Any]) -> MountConfig | None:
    bootstrap, shared_dir = given.get("bootstrap"), given.get("shared_dir")
    if bootstrap and shared_dir:
        raise click.UsageError("--bootstrap and --shared-dir exclude each other")
    if given.get("prefetch_files") and not bootstrap:
        raise click.UsageError("--prefetch-files needs --bootstrap")
    if given.get("localfs_dir") and given.get("config"):
        raise click.UsageError("--localfs-dir and --config exclude each other")
    if shared_dir:
        return PassthroughMountConfig(shared_dir)
    if not bootstrap:
        return None
    localfs = given.get("localfs_dir")
    return rafs_mount(
        bootstrap,
        given.get("config"),
        localfs,
        (),
        os.path.join(localfs, "cache") if localfs else None,
        given.get("prefetch_files"),
    )
