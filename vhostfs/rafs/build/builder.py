"""Building an image: sources -> tree -> chunks in blobs -> bootstrap.

The output directory gets `bootstrap` and one blob named by its id (the sha256 of the blob
file), or with `blob_per_layer` one blob per source, as nydusify makes them: each holds the
chunks of the files its layer put in the final tree that no earlier blob holds already, and the
one (merged) bootstrap references them all. A source with no new file data gets no blob, as
with nydus-image: a device slot may not be empty. Every file is written under a temporary name
and renamed into place, so an interrupted build leaves no half-written image under the final
names.

The same sources and options always give the same bytes: entries are sorted, times come from
the sources, and parallel compression is written back in order.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from vhostfs.rafs import layout as L
from vhostfs.rafs.build.blob_writer import BlobSummary, BlobWriter, Chunk
from vhostfs.rafs.build.bootstrap import ImageSettings, write_bootstrap
from vhostfs.rafs.build.chunker import Chunker
from vhostfs.rafs.build.compression import BUILD_COMPRESSORS
from vhostfs.rafs.build.errors import BuildError
from vhostfs.rafs.build.progress import Progress
from vhostfs.rafs.build.source import Spool, load_sources
from vhostfs.rafs.build.tree import Inode, Node, display, number_inodes
from vhostfs.storage.blob import Compressor, Digester

log = logging.getLogger(__name__)

BOOTSTRAP_NAME = "bootstrap"
DEFAULT_CHUNK_SIZE = 1 << 20


@dataclass(frozen=True, slots=True)
class BuildOptions:
    chunk_size: int = DEFAULT_CHUNK_SIZE
    compressor: Compressor = Compressor.ZSTD
    digester: Digester = Digester.BLAKE3
    workers: int = min(4, os.cpu_count() or 1)
    blob_per_layer: bool = False  # one blob per source rather than one for the image
    # Absolute paths in the image for its prefetch table (a directory: everything below it).
    prefetch_patterns: tuple[bytes, ...] = ()


@dataclass(frozen=True, slots=True)
class BuildResult:
    bootstrap: Path
    bootstrap_size: int
    blobs: tuple[BlobSummary, ...]  # in blob-table order
    inode_count: int
    file_bytes: int  # content of every regular file, each hard-linked file once
    deduplicated_bytes: int  # of those, bytes that repeated an earlier chunk

    @property
    def blob(self) -> BlobSummary | None:
        """The image's blob when it has at most one (always, unless blob_per_layer)."""
        assert len(self.blobs) <= 1, "a layered build has a blob per layer: use blobs"
        return self.blobs[0] if self.blobs else None


def check_options(options: BuildOptions) -> None:
    size = options.chunk_size
    if size & (size - 1) or not L.MIN_CHUNK_SIZE <= size <= L.MAX_CHUNK_SIZE:
        raise BuildError(f"chunk size {size}: must be a power of two from 4 KiB to 16 MiB")
    if options.compressor not in BUILD_COMPRESSORS:
        raise BuildError(f"compressor {options.compressor.value}: not supported for building")
    if options.workers < 1:
        raise BuildError(f"workers {options.workers}: at least one is needed")


def build_image(
    sources: Sequence[str | os.PathLike[str]],
    output: str | os.PathLike[str],
    options: BuildOptions = BuildOptions(),
    progress_stream: TextIO | None = None,
) -> BuildResult:
    """Build `sources` (applied in order) into `output`; BuildError when they cannot be."""
    check_options(options)
    if not sources:
        raise BuildError("no sources given")
    outdir = Path(output)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
        with Spool(outdir) as spool:
            return _build(sources, outdir, options, spool, progress_stream)
    except OSError as e:
        where = f"{e.filename}: " if e.filename else ""
        raise BuildError(f"{where}{e.strerror or e}") from None


def _build(
    sources: Sequence[str | os.PathLike[str]],
    outdir: Path,
    options: BuildOptions,
    spool: Spool,
    progress_stream: TextIO | None,
) -> BuildResult:
    root = load_sources(sources, spool, skip=outdir)
    inodes = number_inodes(root)
    files = [inode for inode in inodes if inode.node.kind == stat.S_IFREG]
    file_bytes = sum(inode.node.size for inode in files)
    settings = ImageSettings(options.chunk_size, options.compressor, options.digester)

    # Each group of files goes to a blob of its own: one group, or one per source layer.
    groups: list[list[Inode]] = [[] for _ in sources] if options.blob_per_layer else [[]]
    for inode in files:
        groups[inode.node.layer if options.blob_per_layer else 0].append(inode)

    file_chunks: dict[Node, list[Chunk]] = {}
    chunks: list[Chunk] = []
    blobs: list[BlobSummary] = []
    with (
        Progress(file_bytes, "build", progress_stream) as progress,
        Chunker(
            options.chunk_size,
            options.compressor,
            options.digester,
            progress,
            options.workers,
        ) as chunker,
    ):
        for group in groups:
            blob_writer = BlobWriter(
                outdir, options.compressor, options.compressor is Compressor.NONE
            )
            try:
                chunker.start_blob(blob_writer, len(blobs))
                for inode in group:
                    if inode.node.data is not None:
                        file_chunks[inode.node] = chunker.add_file(
                            inode.node.data, display(inode.path)
                        )
                new_chunks = chunker.finish()
                if new_chunks:
                    blobs.append(blob_writer.finish(new_chunks, chunker.uncompressed_size))
                    chunks += new_chunks
            finally:
                blob_writer.discard()  # only removes the file when finish() did not rename it
        deduplicated = chunker.deduplicated_bytes

    bootstrap = outdir / BOOTSTRAP_NAME
    partial = outdir / f".{BOOTSTRAP_NAME}.partial"
    try:
        prefetch = _prefetch_nodes(root, options.prefetch_patterns)
        size = write_bootstrap(partial, inodes, file_chunks, chunks, blobs, settings, prefetch)
        os.replace(partial, bootstrap)
    finally:
        partial.unlink(missing_ok=True)
    return BuildResult(bootstrap, size, tuple(blobs), len(inodes), file_bytes, deduplicated)


def _prefetch_nodes(root: Node, patterns: Sequence[bytes]) -> list[Node]:
    """The nodes the patterns name, each once, in pattern order. A pattern that names nothing
    is skipped with a warning, as nydus-image does: a stale list must not fail a build."""
    found: list[Node] = []
    for pattern in patterns:
        node: Node | None = root
        for name in pattern.split(b"/"):
            if name and node is not None:
                node = node.entries.get(name) if node.is_dir else None
        if node is None:
            log.warning("prefetch pattern %r: not in the image", pattern)
        elif node not in found:
            found.append(node)
    return found
