"""`vhostfs serve`: the virtiofsd-compatible daemon command."""

from __future__ import annotations

import os

import click

from vhostfs.cli.common import LOG_LEVELS, given_once, rafs_mount, run_daemon, setup_logging
from vhostfs.daemon import (
    DaemonConfig,
    InheritedSocket,
    MountConfig,
    PassthroughMountConfig,
    SocketPath,
)
from vhostfs.daemon.config import CachePolicy, SandboxConfig, SeccompMode
from vhostfs.daemon.process import raise_nofile_limit
from vhostfs.fs.passthrough.xattrmap import XattrMap


@click.command()
@click.option(
    "--socket",
    "--socket-path",
    "socket_path",
    multiple=True,
    callback=given_once,
    type=click.Path(dir_okay=False),
    help="Listen on this Unix socket for the VMM (QEMU, cloud-hypervisor).",
)
@click.option(
    "--fd",
    "listen_fd",
    multiple=True,
    callback=given_once,
    type=int,
    help="Serve on an inherited, already listening socket (as Kata passes --fd=3).",
)
@click.option(
    "--shared-dir",
    multiple=True,
    callback=given_once,
    type=click.Path(exists=True, file_okay=False),
    help="Host directory to export, read-write unless --readonly.",
)
@click.option("--readonly", is_flag=True, help="Export --shared-dir read-only (EROFS to writes).")
@click.option(
    "--writeback/--no-writeback",
    default=False,
    show_default=True,
    help="Let the guest's page cache hold writes (FUSE writeback cache), as nydusd does.",
)
@click.option(
    "--xattr/--no-xattr",
    default=True,
    show_default=True,
    help="Serve extended attributes (user.*, trusted.*, security.* as far as privileges go).",
)
@click.option(
    "--killpriv-v2/--no-killpriv-v2",
    default=True,
    show_default=True,
    help="Clear set-id bits on write, truncate and chown in the daemon (FUSE killpriv_v2), "
    "rather than have the guest send the chmod.",
)
@click.option(
    "--xattrmap",
    callback=lambda _ctx, _param, value: _xattrmap(value),
    metavar="MAP",
    help="Rename xattrs on the host, in virtiofsd's rule syntax (e.g. "
    "':map:trusted.:user.virtiofs.:' where trusted.* is not allowed).",
)
@click.option(
    "--allow-devices",
    is_flag=True,
    help="Let the guest create block and char devices in --shared-dir (whiteouts always).",
)
@click.option(
    "--rlimit-nofile",
    type=click.IntRange(min=0),
    default=1_000_000,
    show_default=True,
    help="Raise the open-file limit to this (capped by fs.nr_open; 0 leaves it alone).",
)
@click.option(
    "--bootstrap",
    multiple=True,
    callback=given_once,
    type=click.Path(exists=True, dir_okay=False),
    help="RAFS (v5/v6) or EROFS image to serve read-only.",
)
@click.option(
    "--image",
    "image_ref",
    multiple=True,
    callback=given_once,
    help="A nydus image in a registry (e.g. localhost:5000/app:nydus): its bootstrap is "
    "fetched, its data read lazily. Credentials from docker's config.json.",
)
@click.option(
    "--insecure", is_flag=True, help="With --image: skip TLS verification, HTTP if need be."
)
@click.option(
    "--config",
    "config_path",
    multiple=True,
    callback=given_once,
    type=click.Path(exists=True, dir_okay=False),
    help="nydusd v1 JSON config for --bootstrap (backend, cache, digest_validate, fs_prefetch).",
)
@click.option(
    "--blob-dir",
    multiple=True,
    callback=given_once,
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
    multiple=True,
    callback=given_once,
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
    type=click.IntRange(min=0),
    help="Threads for the passthrough's blocking work (fsync, big writes); default 4.",
)
@click.option(
    "--sandbox",
    type=click.Choice(["none", "namespace"]),
    multiple=True,
    callback=given_once,
    help="none (default), or namespace (root, x86_64, --shared-dir only): serve from own "
    "mount, network and IPC namespaces with the shared dir as /, few capabilities and a "
    "seccomp filter.",
)
@click.option(
    "--seccomp",
    type=click.Choice(["kill", "log", "none"]),
    multiple=True,
    callback=given_once,
    help="With --sandbox namespace: kill the process on a denied system call (default), "
    "log it, or install no filter.",
)
@click.option(
    "--announce-submounts",
    is_flag=True,
    help="Show host mounts below --shared-dir to the guest as submounts (own st_dev), as "
    "virtiofsd does and Kata asks.",
)
def serve(
    socket_path: str | None,
    listen_fd: int | None,
    shared_dir: str | None,
    readonly: bool,
    writeback: bool,
    xattr: bool,
    killpriv_v2: bool,
    xattrmap: XattrMap | None,
    allow_devices: bool,
    rlimit_nofile: int,
    bootstrap: str | None,
    image_ref: str | None,
    insecure: bool,
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
    sandbox: str | None,
    seccomp: str | None,
    announce_submounts: bool,
) -> None:
    """Serve a host directory or a RAFS image to one VMM over vhost-user-fs, until it
    disconnects."""
    setup_logging(log_level, syslog)
    if (socket_path is None) == (listen_fd is None):
        raise click.UsageError("give exactly one of --socket/--socket-path and --fd")
    if [shared_dir, bootstrap, image_ref].count(None) != 2:
        raise click.UsageError("give exactly one of --shared-dir, --bootstrap and --image")
    if xattrmap is not None and (shared_dir is None or not xattr):
        raise click.UsageError("--xattrmap needs --shared-dir with xattrs on")
    if sandbox == "namespace" and shared_dir is None:
        # An image's blobs, cache and bootstrap live outside any one directory to pivot into.
        raise click.UsageError("--sandbox namespace works with --shared-dir only")
    if seccomp is not None and sandbox != "namespace":
        raise click.UsageError("--seccomp needs --sandbox namespace")
    mount: MountConfig
    if shared_dir is not None:
        mount = PassthroughMountConfig(
            shared_dir,
            _CACHE_POLICIES[cache],
            readonly=readonly,
            xattr=xattr,
            writeback=writeback,
            allow_devices=allow_devices,
            killpriv_v2=killpriv_v2,
            announce_submounts=announce_submounts,
            workers=max(1, thread_pool_size or 4),
            xattrmap=xattrmap,
        )
        if not readonly:
            # Modes arrive with the guest caller's umask applied; ours must not add to it.
            os.umask(0)
    elif image_ref is not None:
        if config_path or blob_dir or blob_files:
            raise click.UsageError("--image takes its backend from the image reference")
        from vhostfs.cli.remote_image import image_mount  # the registry client, only now

        mount = image_mount(image_ref, insecure, cache_dir, prefetch_files)
    else:
        assert bootstrap is not None
        mount = rafs_mount(bootstrap, config_path, blob_dir, blob_files, cache_dir, prefetch_files)
    config = DaemonConfig(
        listen=SocketPath(socket_path)
        if socket_path is not None
        else InheritedSocket(listen_fd or 0),
        mounts=(("/", mount),),
        num_request_queues=num_request_queues,
        sandbox=SandboxConfig(_SECCOMP_MODES[seccomp or "kill"])
        if sandbox == "namespace"
        else None,
    )
    raise_nofile_limit(rlimit_nofile)
    run_daemon(config)


# virtiofsd's --cache spellings, as the passthrough's three policies.
_CACHE_POLICIES: dict[str, CachePolicy] = {
    "auto": "auto",
    "always": "always",
    "never": "never",
    "none": "never",
    "metadata": "auto",
}
_SECCOMP_MODES: dict[str, SeccompMode] = {"kill": "kill", "log": "log", "none": "none"}


def _xattrmap(value: str | None) -> XattrMap | None:
    """--xattrmap, parsed here so that a bad map is a usage error before anything starts."""
    try:
        return None if value is None else XattrMap.parse(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
