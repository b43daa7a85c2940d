"""Images in registries: connecting to one, resolving a reference to a platform's manifest,
and fetching a nydus image's bootstrap.

`insecure` is nydusify's `--source-insecure` / `--target-insecure`: certificates are not
verified, and a registry that does not speak TLS at all is then used over plain HTTP. Without
it, HTTPS is required: nothing falls back to HTTP unasked.
"""

from __future__ import annotations

import platform as host_platform
from dataclasses import dataclass
from typing import Any

from vhostfs.rafs.build.nydus_image import (
    INDEXES,
    MANIFESTS,
    NydusImageError,
    descriptors,
    extract_bootstrap,
    find_bootstrap_layer,
    parse_json,
)
from vhostfs.storage.registry import Credentials, RegistryClient, RegistryError, RegistryOptions
from vhostfs.storage.registry.reference import ImageReference

_ARCHES = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le"}
_MAX_INDEX_DEPTH = 2


def default_platform() -> str:
    machine = host_platform.machine()
    return f"linux/{_ARCHES.get(machine, machine)}"


@dataclass(frozen=True, slots=True)
class ResolvedManifest:
    document: dict[str, Any]
    media_type: str  # OCI_MANIFEST or DOCKER_MANIFEST
    digest: str


async def open_client(
    reference: ImageReference, credentials: Credentials, *, insecure: bool, retry_limit: int = 2
) -> RegistryClient:
    """A client for the reference's repository, over HTTPS unless `insecure` allows HTTP."""

    def client(scheme: str) -> RegistryClient:
        return RegistryClient(
            RegistryOptions(
                reference.api_host,
                reference.repo,
                scheme=scheme,
                credentials=credentials,
                skip_verify=insecure,
                retry_limit=retry_limit,
                first_byte_timeout=30.0,
                idle_timeout=30.0,
            )
        )

    secure = client("https")
    if not insecure:
        return secure
    try:
        await secure.ping()
        return secure
    except RegistryError as e:
        if e.status is not None:
            return secure  # it answered over TLS: the error is for the real requests to meet
        await secure.aclose()
        return client("http")


async def resolve_manifest(
    client: RegistryClient, reference: str, platform: str
) -> ResolvedManifest:
    """The image manifest `reference` names; an index resolves to its `platform` entry."""
    accept = (*MANIFESTS, *INDEXES)
    for _ in range(_MAX_INDEX_DEPTH):
        manifest = await client.get_manifest(reference, accept)
        what = f"manifest {reference}"
        document = parse_json(manifest.body, what)
        media_type = manifest.media_type or str(document.get("mediaType", ""))
        if media_type in MANIFESTS:
            return ResolvedManifest(document, media_type, manifest.digest)
        if media_type not in INDEXES:
            raise NydusImageError(f"{what}: unsupported media type {media_type!r}")
        reference = _platform_entry(document, platform, what)
    raise NydusImageError(f"manifest {reference}: an index of indexes is not supported")


def _platform_entry(index: dict[str, Any], platform: str, what: str) -> str:
    wanted = platform.split("/")
    entries = index.get("manifests")
    if not isinstance(entries, list):
        raise NydusImageError(f"{what}: no manifests list")
    for entry, checked in zip(entries, descriptors(index, "manifests", what), strict=True):
        described = entry.get("platform") or {}
        if not isinstance(described, dict):
            continue
        have = [str(described.get("os", "")), str(described.get("architecture", ""))]
        if described.get("variant"):
            have.append(str(described["variant"]))
        if have[: len(wanted)] == wanted or (len(wanted) == 3 and have == wanted):
            return checked.digest
    raise NydusImageError(f"{what}: no manifest for platform {platform}")


async def fetch_bootstrap(
    client: RegistryClient, reference: str, platform: str
) -> tuple[ResolvedManifest, bytes]:
    """A nydus image's manifest and its bootstrap (the RAFS image file)."""
    manifest = await resolve_manifest(client, reference, platform)
    layer = find_bootstrap_layer(manifest.document, f"manifest {reference}")
    data = await client.get_blob(layer.digest)
    return manifest, extract_bootstrap(data, f"bootstrap layer {layer.digest}")
