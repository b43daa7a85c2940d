"""Image data for the RAFS file system: fetched lazily chunk by chunk, cached, verified.

- `config`: nydusd's v1 JSON config and the CLI flags, as typed dataclasses.
- `build.open_storage`: one image's `ImageStorage` from its config and blob table.
- `fetch.ImageStorage.read`: chunk refs to segments (cache-file slices, bytes) for the guest.
- `cache`: the per-blob chunk cache files and their crash-safe ready bitmap.
- `backend` / `localfs`: where blob bytes come from.
- `prefetch`: background cache warming under a bandwidth limit, behind guest reads.
- `metrics`: counters and the read-latency histogram for the HTTP API.
"""

from vhostfs.storage.backend import BackendError, BlobBackend
from vhostfs.storage.build import open_storage, prefetcher_for
from vhostfs.storage.config import (
    ConfigError,
    PrefetchConfig,
    RafsConfig,
    UnsupportedConfigError,
    parse_config,
)
from vhostfs.storage.fetch import FetchOptions, ImageStorage
from vhostfs.storage.localfs import LocalFsBackend
from vhostfs.storage.metrics import Metrics
from vhostfs.storage.prefetch import Prefetcher

__all__ = [
    "BackendError",
    "BlobBackend",
    "ConfigError",
    "FetchOptions",
    "ImageStorage",
    "LocalFsBackend",
    "Metrics",
    "PrefetchConfig",
    "Prefetcher",
    "RafsConfig",
    "UnsupportedConfigError",
    "open_storage",
    "parse_config",
    "prefetcher_for",
]
