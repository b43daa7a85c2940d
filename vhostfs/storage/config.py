"""How to get an image's data: nydusd's v1 JSON config ("RafsConfig"), or the CLI flags.

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
`registry` and `http-proxy` are parsed into their typed configs now but cannot be opened yet;
`oss`, `s3` and `localdisk` are refused with "not supported yet".

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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, TypeAlias

from vhostfs.storage.defaults import (
    DEFAULT_AMPLIFY_IO,
    DEFAULT_MERGING_SIZE,
    DEFAULT_PREFETCH_CONCURRENCY,
    MAX_MERGING_SIZE,
    MAX_PREFETCH_CONCURRENCY,
)
from vhostfs.storage.secret import Secret

log = logging.getLogger(__name__)

_NO_CACHE: Final = ("", "dummycache", "none")
_BLOBCACHE: Final = ("blobcache", "filecache")
_REFUSED_BACKENDS: Final = ("oss", "s3", "localdisk")
# Parsed so that a mount can name them, but nothing behind them yet.
_NOT_COLLECTED: Final = ("iostats_files", "access_pattern", "latest_read_files")
_SECONDS_MAX: Final = (1 << 32) - 1


class ConfigError(ValueError):
    """The config cannot be used; the message starts with the offending key path."""


class UnsupportedConfigError(ConfigError):
    """Well-formed, but asks for something vhostfs does not do (yet)."""


# --- Backends ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LocalFsConfig:
    """Where blob files are: see vhostfs.storage.localfs for the lookup order."""

    kind: ClassVar[str] = "localfs"
    dir: str | None = None
    alt_dirs: tuple[str, ...] = ()
    blob_file: str | None = None
    # From the CLI's repeatable `--blob FILE`: the files of the image's blobs, in blob-table
    # (device-table) order, for images whose device slots carry no blob id.
    blob_files: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    """An HTTP forward proxy in front of the origin (Dragonfly's dfdaemon); "" url: none."""

    url: str = ""
    ping_url: str = ""
    fallback: bool = True  # go to the origin when the proxy fails
    check_interval: int = 5  # seconds between health pings
    use_http: bool = False  # rewrite https to http in URLs sent through the proxy
    check_pause_elapsed: int = 300  # seconds of backend inactivity after which pings pause


@dataclass(frozen=True, slots=True)
class Header:
    """An extra HTTP header; its value is a Secret because such headers carry tokens."""

    name: str
    value: Secret


@dataclass(frozen=True, slots=True)
class MirrorConfig:
    """A registry mirror (nydus up to v2.3.4). Header values often carry credentials."""

    host: str  # base URL with scheme, e.g. http://127.0.0.1:65001
    ping_url: str = ""
    headers: tuple[Header, ...] = ()
    health_check_interval: int = 5
    failure_limit: int = 5
    health_check_pause_elapsed: int = 300


@dataclass(frozen=True, slots=True)
class RegistryConfig:
    """An OCI registry: blobs are `{scheme}://{host}/v2/{repo}/blobs/sha256:{blob_id}`."""

    kind: ClassVar[str] = "registry"
    host: str
    repo: str
    scheme: str = "https"
    auth: Secret | None = None  # base64 of user:password
    registry_token: Secret | None = None  # a bearer token used as is
    skip_verify: bool = False
    ca_cert_files: tuple[str, ...] = ()
    timeout: int = 5  # seconds, 0: none
    connect_timeout: int = 5
    retry_limit: int = 0
    blob_url_scheme: str = ""
    blob_redirected_host: str = ""
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    mirrors: tuple[MirrorConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class HttpProxyConfig:
    """Blobs from an HTTP server (or a Unix socket) at `addr`, under `path`."""

    kind: ClassVar[str] = "http-proxy"
    addr: str
    path: str = ""
    skip_verify: bool = False
    ca_cert_files: tuple[str, ...] = ()
    timeout: int = 5
    connect_timeout: int = 5
    retry_limit: int = 0
    proxy: ProxyConfig = field(default_factory=ProxyConfig)


BackendConfig: TypeAlias = LocalFsConfig | RegistryConfig | HttpProxyConfig


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


def _backend(backend: _Object) -> BackendConfig:
    kind = backend.string("type")
    if kind in _REFUSED_BACKENDS:
        raise UnsupportedConfigError(
            f"{backend.path('type')}: the {kind!r} backend is not supported yet (only localfs)"
        )
    parse = _BACKEND_PARSERS.get(kind)
    if parse is None:
        raise ConfigError(f"{backend.path('type')}: unknown backend type {kind!r}")
    return parse(backend.section("config"))


def _localfs(config: _Object) -> LocalFsConfig:
    dir_ = config.optional_string("dir")
    blob_file = config.optional_string("blob_file")
    if not dir_ and not blob_file:
        raise ConfigError(f"{config.path('dir')}: localfs needs a dir or a blob_file")
    return LocalFsConfig(
        dir=dir_ or None,
        alt_dirs=tuple(config.strings("alt_dirs")),
        blob_file=blob_file or None,
    )


def _registry(config: _Object) -> RegistryConfig:
    host = config.string("host")
    repo = config.string("repo")
    for key, value in (("host", host), ("repo", repo)):
        if not value:
            raise ConfigError(f"{config.path(key)}: must not be empty")
    mirrors = tuple(_mirror(mirror) for mirror in config.sections("mirrors"))
    proxy = _proxy(config.section("proxy")) if config.has("proxy") else ProxyConfig()
    if mirrors and proxy.url:
        raise ConfigError(f"{config.path('mirrors')}: cannot be used together with a proxy")
    return RegistryConfig(
        host=host,
        repo=repo,
        scheme=config.string("scheme", "https"),
        auth=config.optional_secret("auth"),
        registry_token=config.optional_secret("registry_token"),
        skip_verify=config.boolean("skip_verify", False),
        ca_cert_files=tuple(config.strings("ca_cert_files")),
        timeout=config.integer("timeout", 5, 0, _SECONDS_MAX),
        connect_timeout=config.integer("connect_timeout", 5, 0, _SECONDS_MAX),
        retry_limit=config.integer("retry_limit", 0, 0, 255),
        blob_url_scheme=config.string("blob_url_scheme", ""),
        blob_redirected_host=config.string("blob_redirected_host", ""),
        proxy=proxy,
        mirrors=mirrors,
    )


def _http_proxy(config: _Object) -> HttpProxyConfig:
    addr = config.string("addr")
    if not addr.startswith(("http://", "https://", "/")):
        raise ConfigError(
            f"{config.path('addr')}: expected an http:// or https:// URL or the absolute path "
            f"of a Unix socket, got {addr!r}"
        )
    return HttpProxyConfig(
        addr=addr,
        path=config.string("path", ""),
        skip_verify=config.boolean("skip_verify", False),
        ca_cert_files=tuple(config.strings("ca_cert_files")),
        timeout=config.integer("timeout", 5, 0, _SECONDS_MAX),
        connect_timeout=config.integer("connect_timeout", 5, 0, _SECONDS_MAX),
        retry_limit=config.integer("retry_limit", 0, 0, 255),
        proxy=_proxy(config.section("proxy")) if config.has("proxy") else ProxyConfig(),
    )


def _proxy(proxy: _Object) -> ProxyConfig:
    return ProxyConfig(
        url=proxy.string("url", ""),
        ping_url=proxy.string("ping_url", ""),
        fallback=proxy.boolean("fallback", True),
        check_interval=proxy.integer("check_interval", 5, 0, _SECONDS_MAX),
        use_http=proxy.boolean("use_http", False),
        check_pause_elapsed=proxy.integer("check_pause_elapsed", 300, 0, _SECONDS_MAX),
    )


def _mirror(mirror: _Object) -> MirrorConfig:
    host = mirror.string("host")
    if not host:
        raise ConfigError(f"{mirror.path('host')}: must not be empty")
    return MirrorConfig(
        host=host,
        ping_url=mirror.string("ping_url", ""),
        headers=_headers(mirror.section("headers")) if mirror.has("headers") else (),
        health_check_interval=mirror.integer("health_check_interval", 5, 0, _SECONDS_MAX),
        failure_limit=mirror.integer("failure_limit", 5, 0, _SECONDS_MAX),
        health_check_pause_elapsed=mirror.integer(
            "health_check_pause_elapsed", 300, 0, _SECONDS_MAX
        ),
    )


def _headers(headers: _Object) -> tuple[Header, ...]:
    return tuple(Header(name, Secret(headers.string(name))) for name in headers.names())


_BACKEND_PARSERS: Final[dict[str, Callable[[_Object], BackendConfig]]] = {
    LocalFsConfig.kind: _localfs,
    RegistryConfig.kind: _registry,
    HttpProxyConfig.kind: _http_proxy,
}


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
    config = cache.section("config")
    work_dir = config.string("work_dir")
    if not work_dir:
        raise ConfigError(f"{config.path('work_dir')}: must not be empty")
    return CacheConfig(work_dir, sync_data=config.boolean("sync_data", False))


def _prefetch(prefetch: _Object) -> PrefetchConfig:
    return PrefetchConfig(
        enable=prefetch.boolean("enable", False),
        threads_count=prefetch.integer(
            "threads_count", DEFAULT_PREFETCH_CONCURRENCY, 1, MAX_PREFETCH_CONCURRENCY
        ),
        merging_size=prefetch.integer("merging_size", DEFAULT_MERGING_SIZE, 1, MAX_MERGING_SIZE),
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

    def names(self) -> list[str]:
        return list(self._fields)

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

    def sections(self, key: str) -> list[_Object]:
        value = self._get(key, [])
        if not isinstance(value, list):
            raise ConfigError(f"{self.path(key)}: expected a list of objects")
        return [_Object.of(item, f"{self.path(key)}[{i}]") for i, item in enumerate(value)]

    def string(self, key: str, default: object = _REQUIRED) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise ConfigError(f"{self.path(key)}: expected a string, got {_json_type(value)}")
        return value

    def optional_string(self, key: str) -> str | None:
        return self.string(key) if self.has(key) else None

    def optional_secret(self, key: str) -> Secret | None:
        """A credential; blank (nydusd: whitespace only) means none."""
        value = self.optional_string(key)
        return Secret(value) if value is not None and value.strip() else None

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
