"""How to get an image's data: nydusd's config ("RafsConfig"), v1 JSON or v2, or the CLI flags.

v2 configs (`version = 2`, in TOML or JSON; reference nydus-rafs-and-kata §4.2) map onto the same
RafsConfig: `backend.<type>` is the v1 `device.backend.config`, `cache.filecache` the v1
`device.cache.config`, and `rafs.validate`, `rafs.batch_size` and `rafs.prefetch` the v1
`digest_validate`, `amplify_io` and `fs_prefetch` (with v2's key names: threads, batch_size,
bandwidth_limit). Kata's mount requests may carry either form.

Only what the storage layer and the file system use is kept; other keys are ignored, as nydusd
ignores keys it does not know (snapshotter extras such as `warmup` included). Anything present
but of the wrong type, and anything required but missing, is a ConfigError naming the key path,
e.g. `device.backend.config.dir: expected a string`. What is kept is honoured, or refused:

- `mode`: "direct" or "cached" (nothing else). Both serve the same here: inodes are decoded
  from the mapped bootstrap on demand either way.
- `enable_xattr`: false hides xattrs unless the image says it has them (see vhostfs.fs.rafs).
- `iostats_files`, `access_pattern`, `latest_read_files`: not collected yet; each logs one
  warning when set true, and is not kept.
- `device.cache.config.sync_data`: a vhostfs extension (nydusd has no such key and ignores it):
  fdatasync cached chunks before marking them ready, for power-loss safety.

Backends: the config's backend is a tagged union (`BackendConfig`), one dataclass per type,
opened by the factory registered for its type (vhostfs.storage.backends). `localfs` works;
`registry` and `http-proxy` work too; `oss`, `s3` and `localdisk` are refused with "not
supported yet".

Credentials (`auth`, `registry_token`, mirror headers) are Secrets: no repr, str, log line or
`RafsConfig.redacted()` copy shows them.

Caches: `blobcache` (nydusd's alias `filecache` too) keeps decompressed chunks in
`config.work_dir`; `""`, `dummycache` and `none` mean no cache. `fscache` serves EROFS over the
host kernel's fscache, which has no meaning for virtio-fs, and is refused.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from vhostfs.storage.backend_config import (
    BACKEND_PARSERS,
    BackendConfig,
    Header,
    HttpProxyConfig,
    LocalFsConfig,
    MirrorConfig,
    ProxyConfig,
    RegistryConfig,
)
from vhostfs.storage.config_fields import ConfigError, JsonObject, UnsupportedConfigError
from vhostfs.storage.defaults import (
    DEFAULT_AMPLIFY_IO,
    DEFAULT_MERGING_SIZE,
    DEFAULT_PREFETCH_CONCURRENCY,
    MAX_MERGING_SIZE,
    MAX_PREFETCH_CONCURRENCY,
)
from vhostfs.storage.secret import Secret

# Defined beside the parts they describe; importable from here, the config's front door.
__all__ = [
    "BackendConfig",
    "CacheConfig",
    "ConfigError",
    "Header",
    "HttpProxyConfig",
    "LocalFsConfig",
    "MirrorConfig",
    "PrefetchConfig",
    "ProxyConfig",
    "RafsConfig",
    "RegistryConfig",
    "UnsupportedConfigError",
    "config_from_json",
    "parse_config",
]

log = logging.getLogger(__name__)

_NO_CACHE: Final = ("", "dummycache", "none")
_BLOBCACHE: Final = ("blobcache", "filecache")
_REFUSED_BACKENDS: Final = ("oss", "s3", "localdisk")
# Parsed so that a mount can name them, but nothing behind them yet.
_NOT_COLLECTED: Final = ("iostats_files", "access_pattern", "latest_read_files")


# --- Cache, prefetch, the whole config ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CacheConfig:
    work_dir: str
    sync_data: bool = False  # fdatasync chunks before marking them ready (power-loss safety)


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    enable: bool = False
    # nydusd's name; here it bounds the prefetch batches in flight, not threads.
    threads_count: int = DEFAULT_PREFETCH_CONCURRENCY
    merging_size: int = DEFAULT_MERGING_SIZE
    bandwidth_rate: int = 0  # bytes per second, 0: unlimited
    prefetch_all: bool = False


@dataclass(frozen=True, slots=True)
class RafsConfig:
    backend: BackendConfig
    cache: CacheConfig | None  # None: no chunk cache, every read fetches
    mode: Literal["direct", "cached"] = "direct"
    digest_validate: bool = False
    enable_xattr: bool = False
    amplify_io: int = DEFAULT_AMPLIFY_IO
    prefetch: PrefetchConfig = field(default_factory=PrefetchConfig)

    @classmethod
    def from_flags(
        cls,
        *,
        blob_dir: str | os.PathLike[str] | None = None,
        blob_files: Sequence[str | os.PathLike[str]] = (),
        cache_dir: str | os.PathLike[str] | None = None,
        digest_validate: bool = True,
        sync_data: bool = False,
        prefetch: PrefetchConfig | None = None,
    ) -> RafsConfig:
        """The config for `--blob-dir DIR`, `--blob FILE`... and `--cache-dir D`. Digests are
        checked unless asked not to (nydusd's JSON default is not to)."""
        return cls(
            backend=LocalFsConfig(
                dir=None if blob_dir is None else os.fspath(blob_dir),
                blob_files=tuple(os.fspath(f) for f in blob_files),
            ),
            cache=None if cache_dir is None else CacheConfig(os.fspath(cache_dir), sync_data),
            digest_validate=digest_validate,
            enable_xattr=True,  # nothing asks to hide them: serve the image as it was built
            prefetch=prefetch or PrefetchConfig(),
        )

    def redacted(self) -> dict[str, Any]:
        """A JSON-ready copy with every credential blanked, fit for logs and the API."""
        document = _redacted(self)
        assert isinstance(document, dict)
        document["backend"] = {"type": self.backend.kind, "config": document["backend"]}
        return document

    def to_json(self) -> str:
        """redacted() as JSON text: the only form in which a config leaves the process."""
        return json.dumps(self.redacted(), sort_keys=True)


def _redacted(value: object) -> object:
    if isinstance(value, Secret):
        return ""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _redacted(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [_redacted(item) for item in value]
    if isinstance(value, enum.Enum):
        return value.value
    return value


# --- Parsing -----------------------------------------------------------------------------------


def parse_config(text: str | bytes) -> RafsConfig:
    """A config as Kata passes it in a mount request or nydusd reads from --config: v1 JSON,
    or v2 (`version = 2`) in JSON or TOML."""
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as json_error:
        try:
            document = tomllib.loads(text.decode() if isinstance(text, bytes) else text)
        except (tomllib.TOMLDecodeError, UnicodeDecodeError):
            raise ConfigError(f"config: neither valid JSON nor TOML: {json_error}") from None
        if "version" not in document:
            raise ConfigError("config: a TOML config must be v2 (version = 2)") from None
    return config_from_json(document)


def config_from_json(document: object) -> RafsConfig:
    root = JsonObject.of(document, "config")
    if root.has("version"):
        version = root.integer("version", 2, 0, 1 << 31)
        if version != 2:
            raise ConfigError(f"{root.path('version')}: expected 2, got {version}")
        return _config_v2(root)
    device = root.section("device")
    mode = root.string("mode")
    if mode not in ("direct", "cached"):
        raise ConfigError(f'{root.path("mode")}: expected "direct" or "cached", got {mode!r}')
    config = RafsConfig(
        backend=_backend(device.section("backend")),
        cache=_cache(device.section("cache")) if device.has("cache") else None,
        mode="direct" if mode == "direct" else "cached",
        digest_validate=root.boolean("digest_validate", False),
        enable_xattr=root.boolean("enable_xattr", False),
        amplify_io=root.integer("amplify_io", DEFAULT_AMPLIFY_IO, 0, 1 << 31),
        prefetch=(
            _prefetch(root.section("fs_prefetch")) if root.has("fs_prefetch") else PrefetchConfig()
        ),
    )
    # Checked after everything else parsed, so a config that is refused warns about nothing.
    for key in _NOT_COLLECTED:
        if root.boolean(key, False):
            log.warning("%s: not collected yet, the setting has no effect", root.path(key))
    return config


def _config_v2(root: JsonObject) -> RafsConfig:
    rafs = root.section("rafs") if root.has("rafs") else JsonObject({}, root.path("rafs"))
    mode = rafs.string("mode", "direct")
    if mode not in ("direct", "cached"):
        raise ConfigError(f'{rafs.path("mode")}: expected "direct" or "cached", got {mode!r}')
    backend = root.section("backend")
    config = RafsConfig(
        backend=_backend(backend, v2=True),
        cache=_cache_v2(root.section("cache")) if root.has("cache") else None,
        mode="direct" if mode == "direct" else "cached",
        digest_validate=rafs.boolean("validate", False),
        enable_xattr=rafs.boolean("enable_xattr", False),
        amplify_io=rafs.integer("batch_size", DEFAULT_AMPLIFY_IO, 0, 1 << 31),
        prefetch=_prefetch_v2(rafs.section("prefetch"))
        if rafs.has("prefetch")
        else PrefetchConfig(),
    )
    for key in _NOT_COLLECTED:
        if rafs.boolean(key, False):
            log.warning("%s: not collected yet, the setting has no effect", rafs.path(key))
    return config


def _backend(backend: JsonObject, *, v2: bool = False) -> BackendConfig:
    kind = backend.string("type")
    if kind in _REFUSED_BACKENDS:
        raise UnsupportedConfigError(
            f"{backend.path('type')}: the {kind!r} backend is not supported yet "
            f"(only localfs, registry and http-proxy)"
        )
    parse = BACKEND_PARSERS.get(kind)
    if parse is None:
        raise ConfigError(f"{backend.path('type')}: unknown backend type {kind!r}")
    # v1 keeps the backend's fields under "config", v2 under a table named after the type.
    return parse(backend.section(kind if v2 else "config"))


def _cache(cache: JsonObject) -> CacheConfig | None:
    kind = cache.string("type", "")
    if kind in _NO_CACHE:
        return None
    if kind == "fscache":
        raise UnsupportedConfigError(
            f"{cache.path('type')}: fscache serves EROFS through the host kernel, not over "
            f"virtio-fs; use blobcache"
        )
    if kind not in _BLOBCACHE:
        raise ConfigError(f"{cache.path('type')}: unknown cache type {kind!r}")
    config = cache.section("config")
    work_dir = config.string("work_dir")
    if not work_dir:
        raise ConfigError(f"{config.path('work_dir')}: must not be empty")
    return CacheConfig(work_dir, sync_data=config.boolean("sync_data", False))


def _cache_v2(cache: JsonObject) -> CacheConfig | None:
    kind = cache.string("type", "")
    if kind in _NO_CACHE:
        return None
    if kind == "fscache":
        return _cache(cache)  # refused, with the v1 message
    if kind not in _BLOBCACHE:
        raise ConfigError(f"{cache.path('type')}: unknown cache type {kind!r}")
    config = cache.section("filecache")
    work_dir = config.string("work_dir", ".")
    if not work_dir:
        raise ConfigError(f"{config.path('work_dir')}: must not be empty")
    return CacheConfig(work_dir, sync_data=config.boolean("sync_data", False))


def _prefetch_v2(prefetch: JsonObject) -> PrefetchConfig:
    return PrefetchConfig(
        enable=prefetch.boolean("enable", False),
        threads_count=prefetch.integer(
            "threads", DEFAULT_PREFETCH_CONCURRENCY, 1, MAX_PREFETCH_CONCURRENCY
        ),
        merging_size=prefetch.integer("batch_size", DEFAULT_MERGING_SIZE, 1, MAX_MERGING_SIZE),
        bandwidth_rate=prefetch.integer("bandwidth_limit", 0, 0, 1 << 40),
        prefetch_all=prefetch.boolean("prefetch_all", False),
    )


def _prefetch(prefetch: JsonObject) -> PrefetchConfig:
    return PrefetchConfig(
        enable=prefetch.boolean("enable", False),
        threads_count=prefetch.integer(
            "threads_count", DEFAULT_PREFETCH_CONCURRENCY, 1, MAX_PREFETCH_CONCURRENCY
        ),
        merging_size=prefetch.integer("merging_size", DEFAULT_MERGING_SIZE, 1, MAX_MERGING_SIZE),
        bandwidth_rate=prefetch.integer("bandwidth_rate", 0, 0, 1 << 40),
        prefetch_all=prefetch.boolean("prefetch_all", False),
    )
