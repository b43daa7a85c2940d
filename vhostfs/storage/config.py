"""How to get an image's data: nydusd's v1 JSON config ("RafsConfig"), or the CLI flags.

Only what the storage layer and the file system use is kept; other keys are ignored, as nydusd
ignores keys it does not know (snapshotter extras such as `warmup` included). Anything present
but of the wrong type, and anything required but missing, is a ConfigError naming the key path,
e.g. `device.backend.config.dir: expected a string`.

Backends: only `localfs` for now. `registry`, `oss`, `s3`, `localdisk` and `http-proxy` are
recognised and refused with "not supported yet".

Caches: `blobcache` (nydusd's alias `filecache` too) keeps decompressed chunks in
`config.work_dir`; `""`, `dummycache` and `none` mean no cache. `fscache` serves EROFS over the
host kernel's fscache, which has no meaning for virtio-fs, and is refused.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

DEFAULT_AMPLIFY_IO: Final = 1 << 20
MAX_MERGING_SIZE: Final = 0x10000000

_NO_CACHE: Final = ("", "dummycache", "none")
_BLOBCACHE: Final = ("blobcache", "filecache")
_LATER_BACKENDS: Final = ("registry", "oss", "s3", "localdisk", "http-proxy")


class ConfigError(ValueError):
    """The config cannot be used; the message starts with the offending key path."""


class UnsupportedConfigError(ConfigError):
    """Well-formed, but asks for something vhostfs does not do (yet)."""


@dataclass(frozen=True, slots=True)
class LocalFsConfig:
    """Where blob files are: see vhostfs.storage.localfs for the lookup order."""

    dir: str | None = None
    alt_dirs: tuple[str, ...] = ()
    blob_file: str | None = None
    # From the CLI's repeatable `--blob FILE`: the files of the image's blobs, in blob-table
    # (device-table) order, for images whose device slots carry no blob id.
    blob_files: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CacheConfig:
    work_dir: str
    sync_data: bool = False  # fdatasync chunks before marking them ready (power-loss safety)


@dataclass(frozen=True, slots=True)
class PrefetchConfig:
    enable: bool = False
    threads_count: int = 8
    merging_size: int = 1 << 20
    bandwidth_rate: int = 0  # bytes per second, 0: unlimited
    prefetch_all: bool = False


@dataclass(frozen=True, slots=True)
class RafsConfig:
    backend: LocalFsConfig
    cache: CacheConfig | None  # None: no chunk cache, every read fetches
    mode: Literal["direct", "cached"] = "direct"
    digest_validate: bool = False
    iostats_files: bool = False
    enable_xattr: bool = False
    access_pattern: bool = False
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


def parse_config(text: str | bytes) -> RafsConfig:
    """A v1 JSON config, as Kata passes it in a mount request or nydusd reads from --config."""
    try:
        document = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"config: not valid JSON: {e}") from None
    return config_from_json(document)


def config_from_json(document: object) -> RafsConfig:
    root = _Object.of(document, "config")
    if root.has("version"):
        raise UnsupportedConfigError(
            f"{root.path('version')}: v2 configs are not supported yet, use the v1 JSON format"
        )
    device = root.section("device")
    mode = root.string("mode")
    if mode not in ("direct", "cached"):
        raise ConfigError(f'{root.path("mode")}: expected "direct" or "cached", got {mode!r}')
    return RafsConfig(
        backend=_backend(device.section("backend")),
        cache=_cache(device.section("cache")) if device.has("cache") else None,
        mode="direct" if mode == "direct" else "cached",
        digest_validate=root.boolean("digest_validate", False),
        iostats_files=root.boolean("iostats_files", False),
        enable_xattr=root.boolean("enable_xattr", False),
        access_pattern=root.boolean("access_pattern", False),
        amplify_io=root.integer("amplify_io", DEFAULT_AMPLIFY_IO, 0, 1 << 31),
        prefetch=(
            _prefetch(root.section("fs_prefetch")) if root.has("fs_prefetch") else PrefetchConfig()
        ),
    )


def _backend(backend: _Object) -> LocalFsConfig:
    kind = backend.string("type")
    if kind in _LATER_BACKENDS:
        raise UnsupportedConfigError(
            f"{backend.path('type')}: the {kind!r} backend is not supported yet (only localfs)"
        )
    if kind != "localfs":
        raise ConfigError(f"{backend.path('type')}: unknown backend type {kind!r}")
    config = backend.section("config")
    dir_ = config.optional_string("dir")
    blob_file = config.optional_string("blob_file")
    if not dir_ and not blob_file:
        raise ConfigError(f"{config.path('dir')}: localfs needs a dir or a blob_file")
    return LocalFsConfig(
        dir=dir_ or None,
        alt_dirs=tuple(config.strings("alt_dirs")),
        blob_file=blob_file or None,
    )


def _cache(cache: _Object) -> CacheConfig | None:
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
    work_dir = cache.section("config").string("work_dir")
    if not work_dir:
        raise ConfigError(f"{cache.path('config')}.work_dir: must not be empty")
    return CacheConfig(work_dir)


def _prefetch(prefetch: _Object) -> PrefetchConfig:
    return PrefetchConfig(
        enable=prefetch.boolean("enable", False),
        threads_count=prefetch.integer("threads_count", 8, 1, 1024),
        merging_size=prefetch.integer("merging_size", 1 << 20, 1, MAX_MERGING_SIZE),
        bandwidth_rate=prefetch.integer("bandwidth_rate", 0, 0, 1 << 40),
        prefetch_all=prefetch.boolean("prefetch_all", False),
    )


_REQUIRED: Final = object()


class _Object:
    """A JSON object and where it sits in the document, for error messages."""

    def __init__(self, fields: Mapping[str, Any], where: str) -> None:
        self._fields = fields
        self._where = where

    @classmethod
    def of(cls, value: object, where: str) -> _Object:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected an object, got {_json_type(value)}")
        return cls(value, where)

    def path(self, key: str) -> str:
        return key if self._where == "config" else f"{self._where}.{key}"

    def has(self, key: str) -> bool:
        return key in self._fields and self._fields[key] is not None

    def _get(self, key: str, default: object) -> object:
        if self.has(key):
            return self._fields[key]
        if default is _REQUIRED:
            raise ConfigError(f"{self.path(key)}: required")
        return default

    def section(self, key: str) -> _Object:
        return _Object.of(self._get(key, _REQUIRED), self.path(key))

    def string(self, key: str, default: object = _REQUIRED) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.path(key)}: expected a string, got {_json_type(value)}")
        return value

    def optional_string(self, key: str) -> str | None:
        return self.string(key) if self.has(key) else None

    def strings(self, key: str) -> list[str]:
        value = self._get(key, [])
        if not isinstance(value, list):
            raise ConfigError(f"{self.path(key)}: expected a list of strings")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(
                    f"{self.path(key)}[{i}]: expected a string, got {_json_type(item)}"
                )
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.path(key)}: expected true or false, got {_json_type(value)}")
        return value

    def integer(self, key: str, default: int, low: int, high: int) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.path(key)}: expected an integer, got {_json_type(value)}")
        if not low <= value <= high:
            raise ConfigError(f"{self.path(key)}: {value} is outside {low}..{high}")
        return value


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "an object"
