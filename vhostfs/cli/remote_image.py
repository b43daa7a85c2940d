"""`serve --image REF`: the mount of a nydus image named by its registry reference."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import click

from vhostfs.cli.common import read_prefetch_list
from vhostfs.daemon import RafsMountConfig
from vhostfs.rafs.build.nydus_image import NydusImageError
from vhostfs.rafs.build.remote import default_platform, fetch_bootstrap, open_client
from vhostfs.storage import RafsConfig
from vhostfs.storage.config import CacheConfig, RegistryConfig
from vhostfs.storage.registry import Credentials, RegistryError
from vhostfs.storage.registry.docker_config import docker_credentials
from vhostfs.storage.registry.reference import (
    ImageReference,
    ImageReferenceError,
    parse_reference,
)
from vhostfs.storage.secret import Secret


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
        paths = read_prefetch_list(prefetch_files) if prefetch_files else ()
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
