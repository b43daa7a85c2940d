"""The config model beyond localfs: backends as a tagged union opened by type, credentials
that never show, and settings that are honoured, warned about or refused."""

from __future__ import annotations

import json
import logging
import pickle
from pathlib import Path
from typing import Any

import pytest

from tests.storage.blobs import build_blob, run
from vhostfs.storage import (
    BACKEND_FACTORIES,
    ConfigError,
    HttpProxyConfig,
    LocalFsConfig,
    RafsConfig,
    RegistryConfig,
    Secret,
    open_storage,
    parse_config,
)
from vhostfs.storage.cache import ChunkCache
from vhostfs.storage.config import Header, MirrorConfig, ProxyConfig

AUTH = "dXNlcjpodW50ZXIy"  # base64 of user:hunter2
TOKEN = "bearer-token-0123456789"
MIRROR_TOKEN = "mirror-secret-abcdef"
SECRETS = (AUTH, TOKEN, MIRROR_TOKEN, "hunter2")


def config_with(backend: dict[str, Any], **top: object) -> str:
    return json.dumps({"device": {"backend": backend}, "mode": "direct", **top})


REGISTRY = {
    "type": "registry",
    "config": {
        "scheme": "http",
        "host": "registry.local:5000",
        "repo": "library/busybox",
        "auth": AUTH,
        "registry_token": TOKEN,
        "skip_verify": True,
        "timeout": 10,
        "connect_timeout": 3,
        "retry_limit": 2,
        "mirrors": [
            {
                "host": "http://127.0.0.1:65001",
                "headers": {
                    "X-Dragonfly-Registry": "https://index.docker.io",
                    "X-Token": MIRROR_TOKEN,
                },
                "failure_limit": 3,
            }
        ],
    },
}


# --- Backends --------------------------------------------------------------------------------


def test_a_registry_section_parses_into_its_typed_config() -> None:
    backend = parse_config(config_with(REGISTRY)).backend
    assert backend == RegistryConfig(
        host="registry.local:5000",
        repo="library/busybox",
        scheme="http",
        auth=Secret(AUTH),
        registry_token=Secret(TOKEN),
        skip_verify=True,
        timeout=10,
        connect_timeout=3,
        retry_limit=2,
        mirrors=(
            MirrorConfig(
                host="http://127.0.0.1:65001",
                headers=(
                    Header("X-Dragonfly-Registry", Secret("https://index.docker.io")),
                    Header("X-Token", Secret(MIRROR_TOKEN)),
                ),
                failure_limit=3,
            ),
        ),
    )
    assert isinstance(backend, RegistryConfig) and backend.auth is not None
    assert backend.auth.reveal() == AUTH


def test_registry_defaults_and_a_proxy() -> None:
    text = config_with(
        {
            "type": "registry",
            "config": {
                "host": "r",
                "repo": "x/y",
                "auth": "  ",
                "proxy": {"url": "http://127.0.0.1:4001", "fallback": False},
            },
        }
    )
    assert parse_config(text).backend == RegistryConfig(
        host="r",
        repo="x/y",
        proxy=ProxyConfig(url="http://127.0.0.1:4001", fallback=False),
    )


def test_an_http_proxy_section_parses_into_its_typed_config() -> None:
    text = config_with(
        {"type": "http-proxy", "config": {"addr": "/run/dfdaemon.sock", "path": "/blobs"}}
    )
    assert parse_config(text).backend == HttpProxyConfig(addr="/run/dfdaemon.sock", path="/blobs")


@pytest.mark.parametrize(
    ("backend", "message"),
    [
        ({"type": "registry", "config": {"repo": "x"}}, "device.backend.config.host: required"),
        ({"type": "registry", "config": {"host": "", "repo": "x"}}, "config.host: must not be"),
        ({"type": "registry", "config": {"host": "h", "repo": ""}}, "config.repo: must not be"),
        (
            {"type": "registry", "config": {"host": "h", "repo": "r", "retry_limit": 256}},
            "device.backend.config.retry_limit: 256 is outside 0..255",
        ),
        (
            {"type": "registry", "config": {"host": "h", "repo": "r", "auth": 5}},
            "device.backend.config.auth: expected a string",
        ),
        (
            {
                "type": "registry",
                "config": {
                    "host": "h",
                    "repo": "r",
                    "proxy": {"url": "http://p"},
                    "mirrors": [{"host": "http://m"}],
                },
            },
            "device.backend.config.mirrors: cannot be used together with a proxy",
        ),
        (
            {"type": "registry", "config": {"host": "h", "repo": "r", "mirrors": [{"host": 1}]}},
            r"device.backend.config.mirrors\[0\].host: expected a string",
        ),
        (
            {
                "type": "registry",
                "config": {
                    "host": "h",
                    "repo": "r",
                    "mirrors": [{"host": "m", "headers": {"a": 1}}],
                },
            },
            r"device.backend.config.mirrors\[0\].headers.a: expected a string",
        ),
        ({"type": "http-proxy", "config": {}}, "device.backend.config.addr: required"),
        (
            {"type": "http-proxy", "config": {"addr": "ftp://x"}},
            "device.backend.config.addr: expected an http:// or https:// URL",
        ),
    ],
)
def test_backend_errors_name_the_key_path(backend: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(config_with(backend))


def test_every_backend_type_has_a_factory() -> None:
    assert set(BACKEND_FACTORIES) == {"localfs", "registry", "http-proxy"}
    for kind in (LocalFsConfig, RegistryConfig, HttpProxyConfig):
        assert kind.kind in BACKEND_FACTORIES


# --- Secrets ---------------------------------------------------------------------------------


def test_secrets_never_show_in_repr_str_or_format() -> None:
    config = parse_config(config_with(REGISTRY))
    backend = config.backend
    assert isinstance(backend, RegistryConfig) and backend.auth is not None
    shown = [repr(config), str(config), repr(backend.auth), str(backend.auth), f"{backend.auth}"]
    shown.append(f"{backend.auth:>20}")
    for text in shown:
        for secret in SECRETS:
            assert secret not in text
    assert "<redacted>" in repr(config)
    with pytest.raises(TypeError):
        pickle.dumps(config)


def test_secrets_never_show_in_log_output(caplog: pytest.LogCaptureFixture) -> None:
    config = parse_config(config_with(REGISTRY))
    log = logging.getLogger("test.secrets")
    with caplog.at_level(logging.INFO, logger="test.secrets"):
        log.info("mounting with %s", config)
        log.info("mounting with %r", config)
        log.info("config %s", config.to_json())
    assert len(caplog.records) == 3
    for secret in SECRETS:
        assert secret not in caplog.text


def test_the_redacted_json_blanks_every_secret_and_keeps_the_rest() -> None:
    config = parse_config(config_with(REGISTRY))
    document = json.loads(config.to_json())
    assert document == config.redacted()
    for secret in SECRETS:
        assert secret not in json.dumps(document)
    backend = document["backend"]
    assert backend["type"] == "registry"
    assert backend["config"]["auth"] == "" and backend["config"]["registry_token"] == ""
    assert backend["config"]["host"] == "registry.local:5000"
    assert backend["config"]["mirrors"][0]["headers"] == [
        {"name": "X-Dragonfly-Registry", "value": ""},
        {"name": "X-Token", "value": ""},
    ]
    assert document["mode"] == "direct" and document["cache"] is None


# --- Honoured, warned about, or refused -------------------------------------------------------

LOCALFS = {"type": "localfs", "config": {"dir": "/blobs"}}


@pytest.mark.parametrize("mode", ["direct", "cached"])
def test_mode_accepts_direct_and_cached(mode: str) -> None:
    assert parse_config(json.dumps({"device": {"backend": LOCALFS}, "mode": mode})).mode == mode


@pytest.mark.parametrize("mode", ["", "Direct", "cached ", "lazy", 1, None, True])
def test_mode_refuses_everything_else(mode: object) -> None:
    with pytest.raises(ConfigError, match=r"^mode: "):
        parse_config(json.dumps({"device": {"backend": LOCALFS}, "mode": mode}))


NOT_COLLECTED = ("iostats_files", "access_pattern", "latest_read_files")


def test_settings_not_collected_yet_warn_once_each(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vhostfs.storage"):
        parse_config(config_with(LOCALFS, **dict.fromkeys(NOT_COLLECTED, True)))
    messages = [record.getMessage() for record in caplog.records]
    assert messages == [
        f"{key}: not collected yet, the setting has no effect" for key in NOT_COLLECTED
    ]
    assert all(record.levelno == logging.WARNING for record in caplog.records)


def test_settings_not_collected_yet_are_silent_when_off(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="vhostfs.storage"):
        parse_config(config_with(LOCALFS, **dict.fromkeys(NOT_COLLECTED, False)))
        parse_config(config_with(LOCALFS))
    assert caplog.records == []


def test_settings_not_collected_yet_must_still_be_booleans() -> None:
    with pytest.raises(ConfigError, match="access_pattern: expected true or false"):
        parse_config(config_with(LOCALFS, access_pattern="yes"))


@pytest.mark.parametrize("sync_data", [True, False])
def test_sync_data_reaches_the_chunk_cache(tmp_path: Path, sync_data: bool) -> None:
    blob = build_blob(tmp_path)
    text = json.dumps(
        {
            "device": {
                "backend": {"type": "localfs", "config": {"dir": str(tmp_path)}},
                "cache": {
                    "type": "blobcache",
                    "config": {"work_dir": str(tmp_path / "w"), "sync_data": sync_data},
                },
            },
            "mode": "direct",
        }
    )
    config = parse_config(text)
    assert config.cache is not None and config.cache.sync_data is sync_data

    async def scenario() -> None:
        storage = open_storage(config, [blob.info])
        cache = storage._blobs[0].cache
        assert isinstance(cache, ChunkCache) and cache.sync_data is sync_data
        await storage.aclose()

    run(scenario())


def test_sync_data_must_be_a_boolean() -> None:
    cache = {"type": "blobcache", "config": {"work_dir": "/w", "sync_data": 1}}
    text = json.dumps({"device": {"backend": LOCALFS, "cache": cache}, "mode": "direct"})
    with pytest.raises(
        ConfigError, match=r"device\.cache\.config\.sync_data: expected true or false"
    ):
        parse_config(text)


def test_the_cli_flags_serve_xattrs() -> None:
    assert RafsConfig.from_flags(blob_dir="/b").enable_xattr
    assert not parse_config(config_with(LOCALFS)).enable_xattr  # nydusd's JSON default
