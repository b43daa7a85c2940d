"""The registry client through a proxy that fails on purpose: what is retried, how long it
waits, where redirects go and what they carry."""

from __future__ import annotations

import asyncio
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.faultproxy import FaultProxy, fault_proxy
from tests.support.registry import Registry, running_registry
from vhostfs.storage.registry.auth import Credentials
from vhostfs.storage.registry.client import RegistryClient, RegistryOptions
from vhostfs.storage.registry.errors import RegistryError

BLOB = os.urandom(1 << 20)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
REPO = "library/faults"
USERS = {"carol": "secret"}
CREDENTIALS = Credentials.from_user("carol", "secret")


def push(registry: Registry, credentials: Credentials | None = None) -> None:
    async def go() -> None:
        options = RegistryOptions(
            registry.host, REPO, scheme="http", credentials=credentials or Credentials()
        )
        async with RegistryClient(options) as client:
            await client.push_blob(DIGEST, BLOB)

    asyncio.run(go())


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry", htpasswd=USERS) as registry:
        push(registry, CREDENTIALS)
        yield registry


@pytest.fixture
def proxy(registry: Registry) -> Iterator[FaultProxy]:
    with fault_proxy(registry.origin) as proxy:
        yield proxy


class Run:
    """A client through the proxy whose backoff sleeps are recorded instead of slept."""

    def __init__(self, proxy: FaultProxy, **kw: object) -> None:
        settings: dict[str, object] = {
            "scheme": "http",
            "credentials": CREDENTIALS,
            "retry_limit": 2,
            "first_byte_timeout": 1.0,
            "idle_timeout": 1.0,
        }
        settings.update(kw)
        self.options = RegistryOptions(proxy.host, REPO, **settings)  # type: ignore[arg-type]
        self.sleeps: list[float] = []

    async def _sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def read(self, offset: int, size: int, times: int = 1) -> list[bytes]:
        async def go() -> list[bytes]:
            async with RegistryClient(self.options, sleep=self._sleep) as client:
                return [await client.read_blob(DIGEST, offset, size) for _ in range(times)]

        return asyncio.run(go())


def after_challenge(proxy: FaultProxy, *faults: str) -> None:
    """Faults for the requests after a new client's first, which only draws the 401."""
    proxy.inject("", *faults)


def blob_requests(proxy: FaultProxy) -> list[tuple[str, str, dict[str, str]]]:
    return [seen for seen in proxy.seen if "/blobs/" in seen[1]]


@pytest.mark.parametrize("fault", ["500", "reset", "truncate", "stall"])
def test_transient_failures_are_retried(proxy: FaultProxy, fault: str) -> None:
    proxy.stall = 3.0
    after_challenge(proxy, fault)
    run = Run(proxy)
    assert run.read(4096, 65536) == [BLOB[4096 : 4096 + 65536]]
    assert len(run.sleeps) == 1 and 0 < run.sleeps[0] <= 0.5


@pytest.mark.parametrize("fault", ["429", "503"])
def test_retry_after_is_honoured(proxy: FaultProxy, fault: str) -> None:
    proxy.retry_after = "2"
    after_challenge(proxy, fault)
    run = Run(proxy)
    assert run.read(0, 100) == [BLOB[:100]]
    assert run.sleeps == [2.0]


def test_retries_stop_at_the_limit(proxy: FaultProxy) -> None:
    after_challenge(proxy, "500", "500", "500", "500")
    run = Run(proxy, retry_limit=2)
    with pytest.raises(RegistryError) as failed:
        run.read(0, 100)
    assert failed.value.retryable and failed.value.status == 500
    assert len(run.sleeps) == 2
    assert run.sleeps[1] > run.sleeps[0] / 2, "backoff grows (jitter keeps it above half)"


def test_a_200_for_a_range_at_zero_gives_the_prefix_and_elsewhere_fails(proxy: FaultProxy) -> None:
    after_challenge(proxy, "ignore-range")
    assert Run(proxy).read(0, 1000) == [BLOB[:1000]]
    after_challenge(proxy, "ignore-range")
    run = Run(proxy)
    with pytest.raises(RegistryError, match="ignored the Range header"):
        run.read(5000, 1000)
    assert run.sleeps == []


def test_a_relative_redirect_keeps_the_credentials(proxy: FaultProxy) -> None:
    after_challenge(proxy, "redirect-relative")
    assert Run(proxy).read(10, 10) == [BLOB[10:20]]
    redirected = blob_requests(proxy)[-1]
    assert "authorization" in redirected[2]


def test_a_redirect_to_another_host_carries_no_credentials_and_is_cached(
    tmp_path: Path, proxy: FaultProxy
) -> None:
    with (
        running_registry(tmp_path / "cdn-registry") as cdn_registry,
        fault_proxy(cdn_registry.origin) as cdn,
    ):
        push(cdn_registry)
        proxy.redirect_to = f"http://{cdn.host}"
        after_challenge(proxy, "redirect")
        run = Run(proxy)
        assert run.read(100, 50, times=3) == [BLOB[100:150]] * 3
        assert len(blob_requests(proxy)) == 2  # the 401 challenge, then the redirected one
        cdn_reads = blob_requests(cdn)
        assert len(cdn_reads) == 3, "the second and third reads went straight to the target"
        assert all("authorization" not in headers for _, _, headers in cdn_reads)

        # An expired target (403) is dropped; the read asks the registry again.
        after_challenge(proxy, "redirect")
        cdn.inject("", "403")  # the first read passes, the cached one then expires

        async def expire() -> list[bytes]:
            async with RegistryClient(run.options, sleep=run._sleep) as client:
                first = await client.read_blob(DIGEST, 0, 10)
                second = await client.read_blob(DIGEST, 10, 10)
                return [first, second]

        before = len(blob_requests(proxy))
        assert asyncio.run(expire()) == [BLOB[:10], BLOB[10:20]]
        assert len(blob_requests(proxy)) > before + 1, "the registry was asked again after 403"
