"""Putting one image's storage together from its config and its blob table."""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from vhostfs.rafs.blob import BlobInfo
from vhostfs.storage.backend import blob_names
from vhostfs.storage.config import ConfigError, PrefetchConfig, RafsConfig
from vhostfs.storage.fetch import FetchOptions, ImageStorage
from vhostfs.storage.localfs import LocalFsBackend
from vhostfs.storage.metrics import Metrics
from vhostfs.storage.prefetch import Prefetcher

IO_THREADS = 4


def open_storage(
    config: RafsConfig,
    blobs: Sequence[BlobInfo],
    *,
    bootstrap: str | os.PathLike[str] | None = None,
    metrics: Metrics | None = None,
) -> ImageStorage:
    """The storage serving `blobs` (the opened image's blob table) as `config` says.

    Opens or creates the cache files of every blob now, so a bad work directory fails the
    mount rather than the first read. Raises ConfigError, BlobError or OSError.
    """
    local = config.backend
    names = blob_names([blob.blob_id for blob in blobs])
    if len(local.blob_files) > len(blobs):
        raise ConfigError(
            f"--blob: {len(local.blob_files)} files given, but the image has {len(blobs)} blobs"
        )
    # One pool for backend preads and for decompression, so IO_THREADS bounds the blocking
    # work of the whole image.
    executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="vhostfs-storage")
    backend = LocalFsBackend(
        dir=local.dir,
        alt_dirs=local.alt_dirs,
        blob_file=local.blob_file,
        files=dict(zip(names, local.blob_files, strict=False)),
        executor=executor,
    )
    options = FetchOptions(
        digest_validate=config.digest_validate,
        amplify_io=config.amplify_io,
        sync_data=config.cache.sync_data if config.cache else False,
        threads=IO_THREADS,
    )
    try:
        return ImageStorage(
            blobs,
            backend,
            work_dir=config.cache.work_dir if config.cache else None,
            bootstrap=bootstrap,
            options=options,
            metrics=metrics,
            executor=executor,
        )
    except BaseException:
        backend.close()
        raise


def prefetcher_for(storage: ImageStorage, config: PrefetchConfig) -> Prefetcher:
    """A prefetcher with the config's limits; start() it with the refs to warm."""
    return Prefetcher(
        storage,
        bandwidth_rate=config.bandwidth_rate,
        merging_size=config.merging_size,
        threads=config.threads_count,
    )
