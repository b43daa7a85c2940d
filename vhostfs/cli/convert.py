"""`vhostfs convert`: an OCI or Docker image in a registry to a nydus image in a registry, with
nydusify's flags and output format. Credentials come from docker's config.json."""

from __future__ import annotations

import asyncio
import sys

import click

from vhostfs.cli.image import _clean_errors, _fail, _parse_size
from vhostfs.rafs.build import BuildOptions
from vhostfs.rafs.build.builder import DEFAULT_CHUNK_SIZE
from vhostfs.rafs.build.compression import BUILD_COMPRESSORS
from vhostfs.rafs.build.convert import ConvertOptions, convert_image
from vhostfs.rafs.build.nydus_image import NydusImageError
from vhostfs.rafs.build.remote import default_platform
from vhostfs.storage.blob import Compressor
from vhostfs.storage.registry import RegistryError
from vhostfs.storage.registry.docker_config import docker_credentials
from vhostfs.storage.registry.reference import ImageReferenceError, parse_reference


@click.command("convert")
@click.option("--source", required=True, help="The image to convert, e.g. localhost:5000/app:1")
@click.option("--target", required=True, help="Where to push the nydus image.")
@click.option(
    "--source-insecure", is_flag=True, help="Skip TLS verification; plain HTTP if needed."
)
@click.option(
    "--target-insecure", is_flag=True, help="Skip TLS verification; plain HTTP if needed."
)
@click.option(
    "--fs-version",
    type=click.Choice(["6"]),
    default="6",
    show_default=True,
    help="RAFS version (only 6 is built).",
)
@click.option(
    "--compressor",
    type=click.Choice([c.value for c in BUILD_COMPRESSORS]),
    default=Compressor.ZSTD.value,
    show_default=True,
)
@click.option(
    "--chunk-size",
    "--fs-chunk-size",
    "chunk_size",
    default=str(DEFAULT_CHUNK_SIZE),
    callback=_parse_size,
    show_default="1M",
    help="Chunk size: a power of two from 4K to 16M.",
)
@click.option(
    "--prefetch-patterns",
    is_flag=True,
    help="Read prefetch paths from stdin, one a line (absolute; a directory means everything "
    "below it): they go into the bootstrap's prefetch table.",
)
@click.option(
    "--platform",
    default=default_platform,
    show_default="this machine's",
    help="os/arch[/variant] to pick from a multi-platform source.",
)
def convert_command(
    source: str,
    target: str,
    source_insecure: bool,
    target_insecure: bool,
    fs_version: str,
    compressor: str,
    chunk_size: int,
    prefetch_patterns: bool,
    platform: str,
) -> None:
    """Convert SOURCE (an OCI or Docker image) into the nydus image TARGET: one nydus blob per
    layer, chunks deduplicated across layers, a merged bootstrap, pushed as nydusify pushes it
    so that nydus-snapshotter and `vhostfs serve --image` recognise it."""
    patterns: tuple[bytes, ...] = ()
    if prefetch_patterns:
        patterns = tuple(line.strip().encode() for line in sys.stdin if line.strip())
        for pattern in patterns:
            if not pattern.startswith(b"/"):
                _fail(f"--prefetch-patterns: {pattern.decode()!r} is not an absolute path")
    try:
        source_ref, target_ref = parse_reference(source), parse_reference(target)
    except ImageReferenceError as e:
        _fail(e)
    build = BuildOptions(
        chunk_size=chunk_size,
        compressor=Compressor(compressor),
        blob_per_layer=True,
        prefetch_patterns=patterns,
    )
    options = ConvertOptions(build, platform, source_insecure, target_insecure)
    with _clean_errors():
        try:
            result = asyncio.run(
                convert_image(
                    source_ref,
                    target_ref,
                    options,
                    source_credentials=docker_credentials(source_ref.host),
                    target_credentials=docker_credentials(target_ref.host),
                    progress_stream=sys.stderr,
                )
            )
        except (RegistryError, NydusImageError) as e:
            _fail(e)
    blob_bytes = sum(blob.size for blob in result.blobs)
    click.echo(f"converted {source_ref} -> {target_ref} ({result.manifest_digest})")
    click.echo(
        f"source layers: {result.source_bytes} bytes; nydus blobs: {len(result.blobs)}, "
        f"{blob_bytes} bytes ({result.pushed_blobs} pushed, {result.skipped_blobs} already "
        f"there); bootstrap: {result.bootstrap_size} bytes"
    )
