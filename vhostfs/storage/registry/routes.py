"""Where a registry read goes: straight to the registry, through Dragonfly's proxy, or through
the older mirror list (reference §1.9, §1.10, §2).

Proxy mode (`proxy.url`): reads go to the proxy as a standard forward proxy (for an http://
origin the proxy sees the absolute URL), with the headers nydusd sends dfdaemon:
`X-Dragonfly-Use-P2P: true`, `X-Dragonfly-Priority: 6` (an on-demand read) and
`X-Dragonfly-Prefetch: true` (dfdaemon then pulls the whole blob in the background). `use_http`
rewrites https:// to http:// for the proxy only. When the proxy fails (transport error, no
answer in time, or 5xx) and `fallback` is on, the same read goes to the origin. With a
`ping_url`, the proxy is pinged every `check_interval` seconds while reads happened within
`check_pause_elapsed`; an unhealthy proxy is skipped (origin with `fallback`, else an error)
until a ping answers 2xx or 3xx again.

Mirrors (nydusd <= 2.3.4 configs): each mirror that is up is tried in order, with its
`headers`, the URL's scheme and host replaced by the mirror's. An answer below 500 is final; a
5xx moves on to the next; a transport error counts against `failure_limit`, after which the
mirror is down until its `ping_url` (default `<host>/v2`) answers below 500. After the mirrors,
the origin.

Only reads (GET, HEAD) are routed: uploads always go to the registry. Token requests never go
through here (the Authenticator talks to the realm directly), as in nydusd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import urlsplit, urlunsplit

import httpx

from vhostfs.storage.backend_config import MirrorConfig, ProxyConfig

log = logging.getLogger(__name__)

DRAGONFLY_HEADERS: Final = {
    "X-Dragonfly-Use-P2P": "true",
    "X-Dragonfly-Priority": "6",
    "X-Dragonfly-Prefetch": "true",
}
_ROUTED_METHODS: Final = ("GET", "HEAD")


class RouteFailed(Exception):
    """A proxy or mirror could not answer, and nothing else may be tried."""


@dataclass(slots=True)
class _Mirror:
    config: MirrorConfig
    failures: int = 0
    up: bool = True

    @property
    def ping_url(self) -> str:
        return self.config.ping_url or f"{self.config.host.rstrip('/')}/v2"


class Routes:
    """Sends reads the way the config says. Health checks run on the event loop of the first
    read, as background tasks that aclose() ends."""

    def __init__(
        self,
        proxy: ProxyConfig | None,
        mirrors: tuple[MirrorConfig, ...],
        make_client: Callable[[str | None], httpx.AsyncClient],
        *,
        timeout: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._proxy = proxy if proxy is not None and proxy.url else None
        self._proxy_client = make_client(self._proxy.url) if self._proxy else None
        self._mirrors = [_Mirror(mirror) for mirror in mirrors]
        # A client of its own for pings: a ping must not wait behind a pool full of reads.
        self._ping_client = make_client(None) if self._proxy or self._mirrors else None
        self._timeout = timeout or None
        self._clock = clock
        self._last_read = clock()
        self.proxy_healthy = True
        self._checks: list[asyncio.Task[None]] = []
        self.proxied = 0  # reads the proxy or a mirror answered
        self.fallbacks = 0  # reads that went to the origin after the proxy or mirrors failed

    async def send(self, direct: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
        """The response to `request`, body unread; TimeoutError or httpx.HTTPError if even the
        last route failed."""
        if request.method not in _ROUTED_METHODS or not (self._proxy or self._mirrors):
            return await self._attempt(direct, request)
        self._last_read = self._clock()
        self._start_checks()
        if self._proxy is not None:
            return await self._via_proxy(direct, request, self._proxy)
        return await self._via_mirrors(direct, request)

    async def _attempt(self, client: httpx.AsyncClient, request: httpx.Request) -> httpx.Response:
        async with asyncio.timeout(self._timeout):
            return await client.send(request, stream=True)

    async def _via_proxy(
        self, direct: httpx.AsyncClient, request: httpx.Request, proxy: ProxyConfig
    ) -> httpx.Response:
        assert self._proxy_client is not None
        if self.proxy_healthy:
            url = str(request.url)
            if proxy.use_http and url.startswith("https:"):
                url = "http:" + url[len("https:") :]
            proxied = self._proxy_client.build_request(
                request.method, url, headers={**request.headers, **DRAGONFLY_HEADERS}
            )
            try:
                response = await self._attempt(self._proxy_client, proxied)
            except (TimeoutError, httpx.HTTPError) as e:
                if not proxy.fallback:
                    raise
                log.warning("proxy %s failed (%s): reading from the origin", proxy.url, e)
            else:
                if response.status_code < 500 or not proxy.fallback:
                    self.proxied += 1
                    return _as_answer_to(response, request)
                log.warning(
                    "proxy %s answered %d: reading from the origin", proxy.url, response.status_code
                )
                await response.aclose()
        elif not proxy.fallback:
            raise httpx.ConnectError(f"proxy {proxy.url} is unhealthy and fallback is off")
        self.fallbacks += 1
        return await self._attempt(direct, request)

    async def _via_mirrors(
        self, direct: httpx.AsyncClient, request: httpx.Request
    ) -> httpx.Response:
        tried = False
        for mirror in self._mirrors:
            if not mirror.up:
                continue
            tried = True
            target = urlsplit(mirror.config.host)
            url = urlunsplit((target.scheme, target.netloc, *urlsplit(str(request.url))[2:]))
            headers = {**request.headers}
            headers.pop("Host", None)
            headers.update({h.name: h.value.reveal() for h in mirror.config.headers})
            mirrored = direct.build_request(request.method, url, headers=headers)
            try:
                response = await self._attempt(direct, mirrored)
            except (TimeoutError, httpx.HTTPError) as e:
                mirror.failures += 1
                if mirror.failures >= mirror.config.failure_limit:
                    mirror.up = False
                    log.warning(
                        "mirror %s is down after %d failures (%s)",
                        mirror.config.host,
                        mirror.failures,
                        e,
                    )
                continue
            if response.status_code < 500:
                self.proxied += 1
                return _as_answer_to(response, request)
            await response.aclose()
        if tried:
            self.fallbacks += 1
        return await self._attempt(direct, request)

    # --- Health checks ---------------------------------------------------------------------

    def _start_checks(self) -> None:
        if self._checks:
            return
        if self._proxy is not None and self._proxy.ping_url:
            self._checks.append(asyncio.get_running_loop().create_task(self._check_proxy()))
        for mirror in self._mirrors:
            self._checks.append(asyncio.get_running_loop().create_task(self._check_mirror(mirror)))

    def _active(self, pause: int) -> bool:
        return self._clock() - self._last_read < pause

    async def _ping(self, url: str) -> int | None:
        assert self._ping_client is not None
        try:
            async with asyncio.timeout(self._timeout):
                response = await self._ping_client.get(url)
        except (TimeoutError, httpx.HTTPError):
            return None
        return response.status_code

    async def _check_proxy(self) -> None:
        proxy = self._proxy
        assert proxy is not None
        while True:
            await asyncio.sleep(max(proxy.check_interval, 1))
            if not self._active(proxy.check_pause_elapsed):
                continue
            status = await self._ping(proxy.ping_url)
            healthy = status is not None and 200 <= status < 400
            if healthy != self.proxy_healthy:
                log.warning("proxy %s is %s", proxy.url, "healthy" if healthy else "unhealthy")
                self.proxy_healthy = healthy

    async def _check_mirror(self, mirror: _Mirror) -> None:
        config = mirror.config
        while True:
            await asyncio.sleep(max(config.health_check_interval, 1))
            if mirror.up or not self._active(config.health_check_pause_elapsed):
                continue
            status = await self._ping(mirror.ping_url)
            if status is not None and status < 500:
                log.warning("mirror %s is up again", config.host)
                mirror.up, mirror.failures = True, 0

    async def aclose(self) -> None:
        for check in self._checks:
            check.cancel()
        for check in self._checks:
            with contextlib.suppress(asyncio.CancelledError):
                await check
        for client in (self._proxy_client, self._ping_client):
            if client is not None:
                await client.aclose()


def _as_answer_to(response: httpx.Response, request: httpx.Request) -> httpx.Response:
    """The response, as the answer to the original request: the client above must see the
    origin's URL (a mirror's is no redirect target to remember)."""
    response.request = request
    return response
