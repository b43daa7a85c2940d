"""Dragonfly's proxy and mirror modes, with nginx standing in for dfdaemon in front of a real
docker-registry: the headers nydusd sends, health checks, and failover to the origin and back
when the proxy is killed mid-run and restored."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nginx import Nginx, running_nginx
from tests.support.registry import Registry, free_port, running_registry
from vhostfs.storage.backend_config import Header, MirrorConfig, ProxyConfig, RegistryConfig
from vhostfs.storage.errors import BackendError
from vhostfs.storage.registry import RegistryClient, RegistryOptions
from vhostfs.storage.registry_backend import RegistryBackend
from vhostfs.storage.secret import Secret

BLOB = os.urandom(256 << 10)
BLOB_ID = hashlib.sha256(BLOB).hexdigest()
REPO = "dragonfly/test"


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry") as registry:

        async def push() -> None:
            async with RegistryClient(RegistryOptions(registry.host, REPO, "http")) as client:
                await client.push_blob(f"sha256:{BLOB_ID}", BLOB)

        asyncio.run(push())
        yield registry


@pytest.fixture
def nginx(tmp_path: Path, registry: Registry) -> Iterator[Nginx]:
    with running_nginx(tmp_path / "nginx", registry.origin) as nginx:
        yield nginx


def backend(registry: Registry, **fields: object) -> RegistryBackend:
    config = RegistryConfig(host=registry.host, repo=REPO, scheme="http", timeout=2, **fields)  # type: ignore[arg-type]
    return RegistryBackend.from_config(config)


async def read_ok(store: RegistryBackend, offset: int = 4096, size: int = 8192) -> None:
    assert await store.read(BLOB_ID, offset, size) == BLOB[offset : offset + size]


async def wait_until(condition: object, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition never held"
        await asyncio.sleep(0.1)


def test_reads_go_through_the_proxy_with_dragonfly_s_headers(
    registry: Registry, nginx: Nginx
) -> None:
    async def go() -> None:
        store = backend(registry, proxy=ProxyConfig(url=nginx.url))
        try:
            await read_ok(store)
            assert await store.blob_size(BLOB_ID) == len(BLOB)
        finally:
            await store.aclose()
        assert store.client.routes.proxied == 2

    asyncio.run(go())
    get = next(r for r in nginx.requests() if r["method"] == "GET")
    assert get["uri"].endswith(f"/v2/{REPO}/blobs/sha256:{BLOB_ID}")
    assert (get["p2p"], get["priority"], get["prefetch"]) == ("true", "6", "true")


def test_killing_the_proxy_mid_run_falls_back_and_restoring_it_returns(
    registry: Registry, nginx: Nginx
) -> None:
    proxy = ProxyConfig(url=nginx.url, ping_url=nginx.health_url, check_interval=1)

    async def go() -> None:
        store = backend(registry, proxy=proxy)
        routes = store.client.routes
        try:
            await read_ok(store)
            assert routes.proxied == 1 and routes.fallbacks == 0

            nginx.stop()
            await read_ok(store)  # the proxy fails this read: the origin answers it
            assert routes.fallbacks == 1
            await wait_until(lambda: not routes.proxy_healthy)
            await read_ok(store)  # an unhealthy proxy is not even tried
            assert routes.fallbacks == 2 and routes.proxied == 1

            nginx.start()
            await wait_until(lambda: routes.proxy_healthy)
            await read_ok(store)
            assert routes.proxied == 2 and routes.fallbacks == 2
        finally:
            await store.aclose()

    asyncio.run(go())
    assert len([r for r in nginx.requests() if r["method"] == "GET"]) == 2


def test_without_fallback_a_dead_proxy_is_an_error(registry: Registry) -> None:
    dead = f"http://127.0.0.1:{free_port()}"

    async def go() -> None:
        store = backend(registry, proxy=ProxyConfig(url=dead, fallback=False))
        try:
            with pytest.raises(BackendError):
                await store.read(BLOB_ID, 0, 10)
        finally:
            await store.aclose()

    asyncio.run(go())


def test_a_proxy_answering_5xx_falls_back_to_the_origin(tmp_path: Path, registry: Registry) -> None:
    # An nginx whose upstream is gone answers 502, as a dfdaemon that cannot reach its peers.
    with running_nginx(tmp_path / "broken", f"http://127.0.0.1:{free_port()}") as broken:

        async def go() -> None:
            store = backend(registry, proxy=ProxyConfig(url=broken.url))
            try:
                await read_ok(store)
            finally:
                await store.aclose()
            assert store.client.routes.fallbacks == 1 and store.client.routes.proxied == 0

        asyncio.run(go())
        assert [r["status"] for r in broken.requests() if r["method"] == "GET"] == ["502"]


def test_mirrors_are_tried_in_order_with_their_headers_and_recover(
    registry: Registry, nginx: Nginx
) -> None:
    dead = MirrorConfig(host=f"http://127.0.0.1:{free_port()}", failure_limit=1)
    mirror = MirrorConfig(
        host=nginx.url,
        ping_url=nginx.health_url,
        headers=(Header("X-Dragonfly-Registry", Secret(registry.origin)),),
        health_check_interval=1,
        failure_limit=2,
    )

    async def go() -> None:
        store = backend(registry, mirrors=(dead, mirror))
        routes = store.client.routes
        try:
            await read_ok(store)  # the dead mirror fails once and is down; nginx answers
            assert routes.proxied == 1
            nginx.stop()
            await read_ok(store)
            await read_ok(store)  # two failures: nginx is down too, the origin answers
            assert routes.fallbacks == 2
            nginx.start()
            # A health check (every second) finds it up again; a loaded machine may be slow.
            for _ in range(150):
                if all(m.up for m in routes._mirrors if m.config is mirror):
                    break
                await asyncio.sleep(0.1)
            await read_ok(store)
            assert routes.proxied == 2
        finally:
            await store.aclose()

    asyncio.run(go())
    gets = [r for r in nginx.requests() if r["method"] == "GET"]
    assert len(gets) == 2 and all(r["registry"] == registry.origin for r in gets)
