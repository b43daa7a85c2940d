"""Putting one image's storage together from its config and its blob table."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from vhostfs.storage.backend import BlobBackend
from vhostfs.storage.backends import open_backend
from vhostfs.storage.blob import BlobInfo, blob_names
from vhostfs.storage.config import PrefetchConfig, RafsConfig
from vhostfs.storage.defaults import IO_THREADS
from vhostfs.storage.image_storage import FetchOptions, ImageStorage
from vhostfs.storage.metrics import Metrics
from vhostfs.storage.prefetch import Prefetcher


def open_storage(
    config: RafsConfig,
    blobs: Sequence[BlobInfo],
    *,
    bootstrap: str | os.PathLike[str] | None = None,
    metrics: Metrics | None = None,
    use_cache: bool = True,
    log_failures: bool = True,
) -> ImageStorage:
    """The storage serving `blobs` (the opened image's blob table) as `config` says.

    Opens or creates the cache files of every blob now, so a bad work directory fails the
    mount rather than the first read (`use_cache` False ignores the config's cache, as the
    offline tools do). Raises ConfigError, StorageError or OSError.
    """
    # One pool for backend preads and for decompression, so IO_THREADS bounds the blocking
    # work of the whole image.
    executor = ThreadPoolExecutor(IO_THREADS, thread_name_prefix="vhostfs-storage")
    try:
        backend = open_backend(
            config.backend, blob_names([blob.blob_id for blob in blobs]), executor
        )
    except BaseException:
        executor.shutdown(wait=False)
        raise
    cache = config.cache if use_cache else None
    options = FetchOptions(
        digest_validate=config.digest_validate,
        amplify_io=config.amplify_io,
        sync_data=cache.sync_data if cache else False,
        io_threads=IO_THREADS,
    )
    try:
        return ImageStorage(
            blobs,
            backend,
            work_dir=cache.work_dir if cache else None,
            bootstrap=bootstrap,
            options=options,
            metrics=metrics,
            executor=executor,
            config=config,
            log_failures=log_failures,
        )
    except BaseException:
        _close_quietly(backend)
        raise


_closing: set[asyncio.Task[None]] = set()


def _close_quietly(backend: BlobBackend) -> None:
    """Release a backend that never served. Its aclose is a coroutine and open_storage is not:
    run it on the caller's loop when there is one (the daemon's), else on a private one."""
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(backend.aclose())
        return
    task = loop.create_task(backend.aclose())
    _closing.add(task)  # the loop keeps only a weak reference to its tasks
    task.add_done_callback(_closing.discard)


def prefetcher_for(storage: ImageStorage, config: PrefetchConfig) -> Prefetcher:
    """A prefetcher with the config's limits; start() it with the refs to warm."""
    return Prefetcher(
        storage,
        bandwidth_rate=config.bandwidth_rate,
        merging_size=config.merging_size,
        max_batches=config.threads_count,
    )
