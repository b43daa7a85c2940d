"""Converting an OCI or Docker image in a registry into a nydus image in a registry, as
`nydusify convert` does: pull the platform's manifest, config and layers; build one nydus blob
per layer (chunks shared across layers) and one merged bootstrap; push the blobs the target
lacks, the bootstrap layer, the config and the manifest (the format: vhostfs.rafs.build.
nydus_image).

Layers are streamed to a scratch directory and checked against their digests before building;
the build runs on a thread, so the event loop keeps the registry connections alive meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from vhostfs.rafs.build.builder import BuildOptions, BuildResult, build_image
from vhostfs.rafs.build.nydus_image import (
    DOCKER_CONFIG,
    NYDUS_BLOB,
    OCI_CONFIG,
    OCI_MANIFEST,
    Descriptor,
    NydusImageError,
    blob_descriptor,
    bootstrap_descriptor,
    bootstrap_layer,
    descriptor,
    descriptors,
    nydus_config,
    nydus_manifest,
    parse_json,
    sha256_digest,
)
from vhostfs.rafs.build.progress import Progress
from vhostfs.rafs.build.remote import default_platform, open_client, resolve_manifest
from vhostfs.storage.registry import Credentials, RegistryClient
from vhostfs.storage.registry.reference import ImageReference

# Layer types the builder reads (tar, tar+gzip, tar+zstd), in either family's spelling.
_LAYER_TYPES = (
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
)


@dataclass(frozen=True, slots=True)
class ConvertOptions:
    build: BuildOptions = field(default_factory=lambda: BuildOptions(blob_per_layer=True))
    platform: str = field(default_factory=default_platform)
    source_insecure: bool = False
    target_insecure: bool = False


@dataclass(frozen=True, slots=True)
class ConvertResult:
    manifest_digest: str
    source_bytes: int  # the source layers, as stored
    blobs: tuple[Descriptor, ...]  # the nydus blobs, in layer order
    pushed_blobs: int
    skipped_blobs: int  # already in the target
    bootstrap_size: int


async def convert_image(
    source: ImageReference,
    target: ImageReference,
    options: ConvertOptions,
    *,
    source_credentials: Credentials,
    target_credentials: Credentials,
    progress_stream: TextIO | None = None,
) -> ConvertResult:
    """Convert `source` into the nydus image `target`. Raises RegistryError, NydusImageError
    or BuildError."""
    async with (
        _client(source, source_credentials, options.source_insecure) as pull,
        _client(target, target_credentials, options.target_insecure) as push,
    ):
        manifest = await resolve_manifest(pull, source.reference, options.platform)
        what = f"manifest {source}"
        config_descriptor = descriptor(manifest.document.get("config"), f"{what} config")
        layers = descriptors(manifest.document, "layers", what)
        for layer in layers:
            if layer.media_type == NYDUS_BLOB:
                raise NydusImageError(f"{source}: already a nydus image")
            if layer.media_type not in _LAYER_TYPES:
                raise NydusImageError(f"{what}: layer type {layer.media_type!r} not supported")
        source_config = parse_json(
            await pull.get_blob(config_descriptor.digest), f"config of {source}"
        )

        with tempfile.TemporaryDirectory(prefix="vhostfs-convert-") as scratch:
            work = Path(scratch)
            layer_files = await _pull_layers(pull, layers, work, progress_stream)
            built = await asyncio.to_thread(
                build_image, layer_files, work / "nydus", options.build, progress_stream
            )
            source_bytes = sum(layer.size for layer in layers)
            return await _push_image(
                push,
                target,
                manifest.media_type,
                source_config,
                built,
                source_bytes,
                progress_stream,
            )


@contextlib.asynccontextmanager
async def _client(
    reference: ImageReference, credentials: Credentials, insecure: bool
) -> AsyncIterator[RegistryClient]:
    client = await open_client(reference, credentials, insecure=insecure)
    async with client:
        yield client


async def _pull_layers(
    client: RegistryClient, layers: list[Descriptor], work: Path, stream: TextIO | None
) -> list[Path]:
    paths = []
    with Progress(sum(layer.size for layer in layers), "pull", stream) as progress:
        for index, layer in enumerate(layers):
            path = work / f"layer-{index}"
            await client.download_blob(layer.digest, path, progress.advance)
            paths.append(path)
    return paths


async def _push_image(
    client: RegistryClient,
    target: ImageReference,
    family: str,
    source_config: dict[str, object],
    built: BuildResult,
    source_bytes: int,
    stream: TextIO | None,
) -> ConvertResult:
    blobs = tuple(
        blob_descriptor(f"sha256:{blob.blob_id}", blob.compressed_size) for blob in built.blobs
    )
    bootstrap = bootstrap_layer(built.bootstrap.read_bytes())
    pushed = skipped = 0
    with Progress(sum(blob.size for blob in blobs), "push", stream) as progress:
        for blob, summary in zip(blobs, built.blobs, strict=True):
            if await client.has_blob(blob.digest, client.push_scope):
                skipped += 1
                progress.advance(blob.size)
                continue
            await client.push_blob_file(blob.digest, summary.path, progress.advance)
            pushed += 1
    if not await client.has_blob(bootstrap.digest, client.push_scope):
        await client.push_blob(bootstrap.digest, bootstrap.data)

    # A nydus blob is stored as is, so its "uncompressed" digest is its own.
    config = nydus_config(source_config, [*(blob.digest for blob in blobs), bootstrap.diff_id])
    config_digest = sha256_digest(config)
    if not await client.has_blob(config_digest, client.push_scope):
        await client.push_blob(config_digest, config)
    config_type = OCI_CONFIG if family == OCI_MANIFEST else DOCKER_CONFIG
    manifest = nydus_manifest(
        family,
        Descriptor(config_type, config_digest, len(config)),
        blobs,
        bootstrap_descriptor(family, bootstrap),
    )
    digest = await client.put_manifest(target.reference, manifest, family)
    return ConvertResult(
        manifest_digest=digest,
        source_bytes=source_bytes,
        blobs=blobs,
        pushed_blobs=pushed,
        skipped_blobs=skipped,
        bootstrap_size=built.bootstrap_size,
    )
