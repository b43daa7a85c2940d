"""The http-proxy backend: blobs served by a plain HTTP(S) server or over a Unix socket (a local
dfdaemon, a cache), as nydusd's `http-proxy` backend reads them.

Blob `<id>` is `<addr>/<path>/<id>` for an http:// or https:// `addr`, or `http://localhost/
<path>/<id>` over the Unix socket when `addr` is an absolute path. Reads are single checked
ranges, as from a registry (vhostfs.storage.registry.client.check_range); transport errors and
5xx are retried `retry_limit` times with backoff; `proxy` sends them through Dragonfly's proxy
with the same fallback rules (vhostfs.storage.registry.routes).
"""

from __future__ import annotations

import asyncio
import random
import re
import ssl
from collections.abc import Awaitable, Callable
from typing import TypeVar

import httpx

from vhostfs.storage.backend_config import HttpProxyConfig
from vhostfs.storage.config_fields import ConfigError
from vhostfs.storage.errors import BackendError
from vhostfs.storage.registry.client import check_range, read_exactly
from vhostfs.storage.registry.errors import RegistryError
from vhostfs.storage.registry.routes import Routes

_T = TypeVar("_T")
_BLOB_ID = re.compile(r"[0-9A-Za-z._-]{1,255}")
_MAX_BACKOFF = 10.0


class HttpProxyBackend:
    def __init__(self, config: HttpProxyConfig) -> None:
        self._config = config
        socket = config.addr if config.addr.startswith("/") else None
        base = "http://localhost" if socket else config.addr.rstrip("/")
        path = config.path.strip("/")
        self._base = f"{base}/{path}" if path else base
        timeout = httpx.Timeout(
            connect=config.connect_timeout or None,
            read=config.timeout or None,
            write=config.timeout or None,
            pool=config.connect_timeout or None,
        )

        verify = _tls_context(config)

        def make_client(proxy: str | None) -> httpx.AsyncClient:
            transport = httpx.AsyncHTTPTransport(uds=socket) if socket and not proxy else None
            return httpx.AsyncClient(
                verify=verify,
                timeout=timeout,
                trust_env=False,
                follow_redirects=True,
                transport=transport,
                proxy=proxy,
                headers={"User-Agent": "vhostfs"},
            )

        self._http = make_client(None)
        self._routes = Routes(
            config.proxy if config.proxy.url else None, (), make_client, timeout=config.timeout
        )
        self._sizes: dict[str, int] = {}

    @classmethod
    def from_config(cls, config: HttpProxyConfig) -> HttpProxyBackend:
        try:
            return cls(config)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(f"device.backend.config.ca_cert_files: {e}") from None

    def url(self, blob_id: str) -> str:
        if not _BLOB_ID.fullmatch(blob_id) or blob_id in (".", ".."):
            raise BackendError(f"blob {blob_id!r}: not a blob id that can be part of a URL")
        return f"{self._base}/{blob_id}"

    async def read(self, blob_id: str, offset: int, size: int) -> bytes:
        url = self.url(blob_id)
        what = f"blob {blob_id} range {offset}+{size}"

        async def once() -> bytes:
            headers = {"Range": f"bytes={offset}-{offset + size - 1}"}
            response = await self._send(self._http.build_request("GET", url, headers=headers))
            try:
                if response.status_code not in (200, 206):
                    raise _status_error(response.status_code, what)
                check_range(response, blob_id, offset, size)
                return await read_exactly(response, size, what)
            finally:
                await response.aclose()

        return await self._retrying(once)

    async def blob_size(self, blob_id: str) -> int:
        known = self._sizes.get(blob_id)
        if known is not None:
            return known
        url = self.url(blob_id)

        async def once() -> int:
            response = await self._send(self._http.build_request("HEAD", url))
            await response.aclose()
            if response.status_code != 200:
                raise _status_error(response.status_code, f"blob {blob_id}")
            length = response.headers.get("Content-Length", "")
            if not length.isdigit():
                raise RegistryError(f"blob {blob_id}: no Content-Length", retryable=False)
            return int(length)

        size = await self._retrying(once)
        self._sizes[blob_id] = size
        return size

    async def _send(self, request: httpx.Request) -> httpx.Response:
        try:
            return await self._routes.send(self._http, request)
        except TimeoutError:
            raise RegistryError(
                f"{request.method} {request.url}: no answer", retryable=True
            ) from None
        except httpx.HTTPError as e:
            raise RegistryError(f"{request.method} {request.url}: {e}", retryable=True) from None

    async def _retrying(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        failures = 0
        while True:
            try:
                return await attempt()
            except RegistryError as e:
                if not e.retryable or failures >= self._config.retry_limit:
                    raise BackendError(str(e), retryable=e.retryable) from None
                delay = min(0.5 * 2**failures, _MAX_BACKOFF) * (0.5 + random.random() / 2)
                failures += 1
                await asyncio.sleep(delay)

    async def aclose(self) -> None:
        await self._routes.aclose()
        await self._http.aclose()


def _tls_context(config: HttpProxyConfig) -> ssl.SSLContext | bool:
    if config.skip_verify:
        return False
    context = ssl.create_default_context()
    for path in config.ca_cert_files:
        context.load_verify_locations(cafile=path)
    return context


def _status_error(status: int, what: str) -> RegistryError:
    return RegistryError(f"{what}: HTTP {status}", retryable=status >= 500 or status == 429)
