"""The backend part of a config: one typed dataclass per backend type, and their parsers.

`BackendConfig` is a tagged union: each member's `kind` is the v1 JSON `device.backend.type`
it comes from, and the key under which vhostfs.storage.backends registers its factory. Fields
follow nydusd's (dragonflyoss/nydus `api/src/config.rs`); credentials are Secrets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Final, TypeAlias

from vhostfs.storage.config_fields import ConfigError, JsonObject
from vhostfs.storage.secret import Secret

_SECONDS_MAX: Final = (1 << 32) - 1


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


# --- Parsing -----------------------------------------------------------------------------------


def parse_localfs(config: JsonObject) -> LocalFsConfig:
    dir_ = config.optional_string("dir")
    blob_file = config.optional_string("blob_file")
    if not dir_ and not blob_file:
        raise ConfigError(f"{config.path('dir')}: localfs needs a dir or a blob_file")
    return LocalFsConfig(
        dir=dir_ or None,
        alt_dirs=tuple(config.strings("alt_dirs")),
        blob_file=blob_file or None,
    )


def parse_registry(config: JsonObject) -> RegistryConfig:
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


def parse_http_proxy(config: JsonObject) -> HttpProxyConfig:
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


def _proxy(proxy: JsonObject) -> ProxyConfig:
    return ProxyConfig(
        url=proxy.string("url", ""),
        ping_url=proxy.string("ping_url", ""),
        fallback=proxy.boolean("fallback", True),
        check_interval=proxy.integer("check_interval", 5, 0, _SECONDS_MAX),
        use_http=proxy.boolean("use_http", False),
        check_pause_elapsed=proxy.integer("check_pause_elapsed", 300, 0, _SECONDS_MAX),
    )


def _mirror(mirror: JsonObject) -> MirrorConfig:
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


def _headers(headers: JsonObject) -> tuple[Header, ...]:
    return tuple(Header(name, Secret(headers.string(name))) for name in headers.names())


BACKEND_PARSERS: Final[dict[str, Callable[[JsonObject], BackendConfig]]] = {
    LocalFsConfig.kind: parse_localfs,
    RegistryConfig.kind: parse_registry,
    HttpProxyConfig.kind: parse_http_proxy,
}
