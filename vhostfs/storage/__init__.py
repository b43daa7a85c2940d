"""Image data for the RAFS file system: fetched lazily chunk by chunk, cached, verified.

This layer sits below the format readers (vhostfs.rafs) and imports nothing from them, from
FUSE or from the file systems: readers hand it the blob vocabulary defined here.

- `blob`: BlobInfo, ChunkRef, Compressor, Digester: what a blob and a chunk are.
- `codec`: bounded decompression and digests; `decode_chunk`, the one chunk decode path.
- `errors`: StorageError (EIO) and its kinds, BackendError(retryable=...) among them.
- `config`: nydusd's v1 JSON config and the CLI flags, as typed dataclasses, with
  `backend_config` (one dataclass per backend type), `config_fields` (key-path errors) and
  `secret` (credentials that never show).
- `assemble.open_storage`: one image's `ImageStorage` from its config and blob table.
- `image_storage.ImageStorage.read`: chunk refs to segments (cache-file slices, bytes), with
  `plan` (the pieces of a reply), `flight` (single-flight fetches) and `decode` (decode and
  cache write).
- `cache` / `null_cache`: the per-blob chunk cache files, or no cache.
- `backend` / `backends` / `localfs`: where blob bytes come from, a factory per backend type.
- `prefetch`: background cache warming under a bandwidth limit, behind guest reads.
- `sync.SyncStorage`: the same storage behind blocking calls, for the offline tools.
- `metrics`: counters and the read-latency histogram; `defaults`: every default in one place;
  `fileio`: complete preads.
"""

from vhostfs.storage.assemble import open_storage, prefetcher_for
from vhostfs.storage.backend import BlobBackend
from vhostfs.storage.backends import BACKEND_FACTORIES, open_backend
from vhostfs.storage.blob import (
    IN_BOOTSTRAP,
    ZERO_FILL,
    BlobInfo,
    BlobMetaLocation,
    ChunkRef,
    Compressor,
    Digester,
)
from vhostfs.storage.config import (
    BackendConfig,
    CacheConfig,
    ConfigError,
    HttpProxyConfig,
    LocalFsConfig,
    PrefetchConfig,
    RafsConfig,
    RegistryConfig,
    UnsupportedConfigError,
    parse_config,
)
from vhostfs.storage.errors import (
    BackendError,
    CacheError,
    ChunkDecodeError,
    ChunkDigestError,
    ChunkRefError,
    StorageClosedError,
    StorageError,
)
from vhostfs.storage.image_storage import FetchOptions, ImageStorage
from vhostfs.storage.localfs import LocalFsBackend
from vhostfs.storage.metrics import Metrics
from vhostfs.storage.prefetch import Prefetcher
from vhostfs.storage.secret import Secret
from vhostfs.storage.sync import SyncStorage

__all__ = [
    "BACKEND_FACTORIES",
    "IN_BOOTSTRAP",
    "ZERO_FILL",
    "BackendConfig",
    "BackendError",
    "BlobBackend",
    "BlobInfo",
    "BlobMetaLocation",
    "CacheConfig",
    "CacheError",
    "ChunkDecodeError",
    "ChunkDigestError",
    "ChunkRef",
    "ChunkRefError",
    "Compressor",
    "ConfigError",
    "Digester",
    "FetchOptions",
    "HttpProxyConfig",
    "ImageStorage",
    "LocalFsBackend",
    "LocalFsConfig",
    "Metrics",
    "PrefetchConfig",
    "Prefetcher",
    "RafsConfig",
    "RegistryConfig",
    "Secret",
    "StorageClosedError",
    "StorageError",
    "SyncStorage",
    "UnsupportedConfigError",
    "open_backend",
    "open_storage",
    "parse_config",
    "prefetcher_for",
]
