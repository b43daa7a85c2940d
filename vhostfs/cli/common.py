"""What the daemon commands share: logging, and an image mount from flags or a reference."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

import click

from vhostfs.daemon import Daemon, DaemonConfig, MountError, RafsMountConfig
from vhostfs.rafs.build.nydus_image import NydusImageError
from vhostfs.rafs.build.remote import default_platform, fetch_bootstrap, open_client
from vhostfs.storage import ConfigError, RafsConfig, parse_config
from vhostfs.storage.config import CacheConfig, RegistryConfig
from vhostfs.storage.registry import Credentials, RegistryError
from vhostfs.storage.registry.docker_config import docker_credentials
from vhostfs.storage.registry.reference import (
    ImageReference,
    ImageReferenceError,
    parse_reference,
)
from vhostfs.storage.secret import Secret

LOG_LEVELS = ["error", "warn", "warning", "info", "debug", "trace"]


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
        paths = _read_prefetch_list(prefetch_files) if prefetch_files else ()
    except (ConfigError, OSError) as exc:
        raise click.ClickException(str(exc)) from None
    return RafsMountConfig(bootstrap, storage, paths)


def image_mount(
    image: str, insecure: bool, cache_dir: str | None, prefetch_files: str | None
) -> RafsMountConfig:
    """The mount of the nydus image `image` names: its bootstrap fetched now (kept under the
    cache dir, or ~/.cache/vhostfs/bootstraps, by manifest digest), its blobs read lazily
    from the registry with the credentials docker's config.json holds for it."""
    try:
        reference = parse_reference(image)
        credentials = docker_credentials(reference.host)
        digest, bootstrap, scheme = asyncio.run(_fetch(reference, credentials, insecure))
        directory = Path(cache_dir) if cache_dir else _bootstrap_cache()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{digest.removeprefix('sha256:')}.boot"
        partial = path.with_suffix(".partial")
        partial.write_bytes(bootstrap)
        os.replace(partial, path)
        paths = _read_prefetch_list(prefetch_files) if prefetch_files else ()
    except (ImageReferenceError, RegistryError, NydusImageError, OSError) as exc:
        raise click.ClickException(f"--image {image}: {exc}") from None
    backend = RegistryConfig(
        host=reference.api_host,
        repo=reference.repo,
        scheme=scheme,
        auth=Secret(credentials.basic) if credentials.basic else None,
        skip_verify=insecure,
        retry_limit=2,
    )
    storage = RafsConfig(
        backend=backend,
        cache=CacheConfig(cache_dir) if cache_dir else None,
        digest_validate=True,
        enable_xattr=True,
    )
    return RafsMountConfig(str(path), storage, paths)


async def _fetch(
    reference: ImageReference, credentials: Credentials, insecure: bool
) -> tuple[str, bytes, str]:
    async with await open_client(reference, credentials, insecure=insecure) as client:
        manifest, bootstrap = await fetch_bootstrap(client, reference.reference, default_platform())
        return manifest.digest, bootstrap, client.options.scheme


def _bootstrap_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "vhostfs" / "bootstraps"


def _read_prefetch_list(path: str) -> tuple[bytes, ...]:
    with open(path, "rb") as f:
        return tuple(line.strip() for line in f if line.strip())


def run_daemon(config: DaemonConfig) -> None:
    """Run the daemon until it stops; a mount that cannot open or a socket that cannot be
    bound ends the command with its one-line message, never a traceback."""
    try:
        Daemon(config).run()
    except (MountError, OSError) as e:
        raise click.ClickException(str(e)) from None
