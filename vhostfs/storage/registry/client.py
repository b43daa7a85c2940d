"""An OCI distribution client for lazy blob reads, image pulls and pushes.

Every request goes through `_exchange`, which owns the rules nydusd's registry backend follows
(reference §1), made explicit:

- authentication: send what the Authenticator has for the scope; on 401 follow the challenge
  once (Harbor answers an expired token with a Basic challenge: then drop the token and ask
  again without it, to get the real challenge);
- redirects are followed by hand, for absolute and relative `Location`s; Authorization is sent
  only to the registry's own origin, never to a redirect target on another host;
- timeouts: connect, first byte (until the response head is in) and idle read (between body
  bytes) are separate, so a slow but steady 1 MiB range never times out while a stalled one does;
- retries: transport errors, 5xx and 429 are retried up to `retry_limit` times with exponential
  backoff and jitter, honouring Retry-After on 429 and 503; anything else fails at once.

Blob ranges (`read_blob`) are one range per request and are checked: 206 with a Content-Range
that matches what was asked, or a 200 (Range ignored) of which only the asked-for prefix is
used when the range starts at 0. A blob read of another offset answered with 200 is refused
rather than read through. The redirect target of a blob is cached for REDIRECT_TTL and dropped
when it answers 401 or 403 (a presigned URL that expired).
"""

from __future__ import annotations

import asyncio
import email.utils
import hashlib
import logging
import os
import random
import re
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, TypeVar
from urllib.parse import urljoin, urlsplit

import httpx

from vhostfs.storage.backend_config import MirrorConfig, ProxyConfig
from vhostfs.storage.registry.auth import Authenticator, Credentials
from vhostfs.storage.registry.challenge import ChallengeError, parse_challenge
from vhostfs.storage.registry.errors import RegistryError
from vhostfs.storage.registry.routes import Routes

log = logging.getLogger(__name__)

_T = TypeVar("_T")


def _ignore(count: int) -> None:
    pass


# A request body: bytes, or a function making a fresh stream of it for each send.
Body = bytes | Callable[[], AsyncIterator[bytes]] | None

REDIRECT_TTL: Final = 300.0  # presigned URLs usually live 10 minutes or more
MAX_REDIRECTS: Final = 5
MAX_RETRY_AFTER: Final = 30.0
MAX_BACKOFF: Final = 10.0
MAX_SMALL_BLOB: Final = 64 << 20  # manifests, configs, bootstrap layers: read whole

_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")


@dataclass(frozen=True, slots=True)
class RegistryOptions:
    host: str  # host[:port]
    repo: str
    scheme: str = "https"
    credentials: Credentials = field(default_factory=Credentials)
    skip_verify: bool = False
    ca_cert_files: tuple[str, ...] = ()
    connect_timeout: float = 5.0
    first_byte_timeout: float = 5.0
    idle_timeout: float = 5.0
    retry_limit: int = 0
    max_connections: int = 16
    http2: bool = False
    proxy: ProxyConfig | None = None  # Dragonfly's dfdaemon as a forward proxy
    mirrors: tuple[MirrorConfig, ...] = ()  # or the older mirror list (vhostfs...routes)

    @property
    def origin(self) -> str:
        return f"{self.scheme}://{self.host}"


@dataclass(frozen=True, slots=True)
class Manifest:
    body: bytes
    media_type: str
    digest: str


@dataclass(slots=True)
class _Redirect:
    url: str
    expires_at: float


class RegistryClient:
    """One repository of one registry. Use as an async context manager, or call aclose()."""

    def __init__(
        self,
        options: RegistryOptions,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if options.scheme not in ("http", "https"):
            raise RegistryError(
                f"scheme {options.scheme!r}: expected http or https", retryable=False
            )
        self.options = options
        self._clock = clock
        self._sleep = sleep
        timeout = httpx.Timeout(
            connect=options.connect_timeout or None,
            read=options.idle_timeout or None,
            write=options.idle_timeout or None,
            pool=options.connect_timeout or None,
        )
        limits = httpx.Limits(
            max_connections=options.max_connections,
            max_keepalive_connections=options.max_connections,
        )
        verify = _tls_context(options)

        def make_client(proxy: str | None) -> httpx.AsyncClient:
            return httpx.AsyncClient(
                verify=verify,
                timeout=timeout,
                limits=limits,
                http2=options.http2,
                follow_redirects=False,
                trust_env=False,  # a proxy is configured explicitly, never taken from the env
                headers={"User-Agent": "vhostfs"},
                proxy=proxy,
            )

        self._http = make_client(None)
        self.routes = Routes(
            options.proxy,
            options.mirrors,
            make_client,
            timeout=options.first_byte_timeout,
            clock=clock,
        )
        self.auth = Authenticator(self._http, options.credentials, clock=clock)
        self._redirects: dict[str, _Redirect] = {}
        self.requests = 0  # HTTP requests sent (retries, redirects and auth included)

    async def __aenter__(self) -> RegistryClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.routes.aclose()
        await self._http.aclose()

    @property
    def pull_scope(self) -> str:
        return f"repository:{self.options.repo}:pull"

    @property
    def push_scope(self) -> str:
        return f"repository:{self.options.repo}:pull,push"

    def url(self, suffix: str) -> str:
        return f"{self.options.origin}/v2/{self.options.repo}/{suffix}"

    # --- Reading ---------------------------------------------------------------------------

    async def read_blob(self, digest: str, offset: int, size: int) -> bytes:
        """Exactly `size` bytes of blob `digest` ("sha256:<hex>") at `offset`."""
        _check_digest(digest)
        if offset < 0 or size <= 0:
            raise RegistryError(f"blob {digest}: bad range {offset}+{size}", retryable=False)
        headers = {"Range": f"bytes={offset}-{offset + size - 1}"}
        cached = self._redirects.get(digest)
        if cached is not None and cached.expires_at > self._clock():
            try:
                return await self._retrying(
                    lambda: self._read_range(cached.url, headers, digest, offset, size, False)
                )
            except RegistryError as e:
                if e.status not in (401, 403):
                    raise
                log.info("blob %s: cached redirect refused (%s), asking the registry", digest, e)
            self._redirects.pop(digest, None)
        url = self.url(f"blobs/{digest}")
        return await self._retrying(
            lambda: self._read_range(url, headers, digest, offset, size, True)
        )

    async def _read_range(
        self, url: str, headers: dict[str, str], digest: str, offset: int, size: int, own: bool
    ) -> bytes:
        response = await self._exchange("GET", url, headers, self.pull_scope, own_origin=own)
        try:
            if response.status_code not in (200, 206):
                raise _status_error(response, f"blob {digest} range {offset}+{size}")
            if own and str(response.url) != url:
                self._redirects[digest] = _Redirect(str(response.url), self._clock() + REDIRECT_TTL)
            check_range(response, digest, offset, size)
            return await read_exactly(response, size, f"blob {digest} range {offset}+{size}")
        finally:
            await response.aclose()

    async def ping(self) -> None:
        """Check once, without retries, that the registry answers GET /v2/ (authenticating
        if asked to): RegistryError with a status if it answered otherwise, without one if
        it could not be reached."""
        response = await self._exchange("GET", f"{self.options.origin}/v2/", {}, "")
        await response.aclose()
        if response.status_code != 200:
            raise _status_error(response, "registry /v2/")

    async def blob_size(self, digest: str) -> int:
        _check_digest(digest)

        async def once() -> int:
            url = self.url(f"blobs/{digest}")
            response = await self._exchange("HEAD", url, {}, self.pull_scope)
            await response.aclose()
            if response.status_code != 200:
                raise _status_error(response, f"blob {digest}")
            length = response.headers.get("Content-Length", "")
            if not length.isdigit():
                raise RegistryError(f"blob {digest}: no Content-Length", retryable=False)
            return int(length)

        return await self._retrying(once)

    async def has_blob(self, digest: str, scope: str | None = None) -> bool:
        _check_digest(digest)

        async def once() -> bool:
            url = self.url(f"blobs/{digest}")
            response = await self._exchange("HEAD", url, {}, scope or self.pull_scope)
            await response.aclose()
            if response.status_code == 404:
                return False
            if response.status_code != 200:
                raise _status_error(response, f"blob {digest}")
            return True

        return await self._retrying(once)

    async def get_blob(self, digest: str, limit: int = MAX_SMALL_BLOB) -> bytes:
        """A whole (small) blob, checked against its digest."""
        _check_digest(digest)

        async def once() -> bytes:
            url = self.url(f"blobs/{digest}")
            response = await self._exchange("GET", url, {}, self.pull_scope)
            try:
                if response.status_code != 200:
                    raise _status_error(response, f"blob {digest}")
                return await _read_all(response, limit, f"blob {digest}")
            finally:
                await response.aclose()

        data = await self._retrying(once)
        _verify(data, digest, f"blob {digest}")
        return data

    async def download_blob(
        self, digest: str, path: str | os.PathLike[str], on_bytes: Callable[[int], None] = _ignore
    ) -> int:
        """Stream a whole blob (an image layer) into the file `path`, checked against its
        digest; returns its size. `on_bytes` hears of every piece written (a progress bar)."""
        _check_digest(digest)

        async def once() -> int:
            url = self.url(f"blobs/{digest}")
            response = await self._exchange("GET", url, {}, self.pull_scope)
            hasher = hashlib.sha256()
            size = 0
            try:
                if response.status_code != 200:
                    raise _status_error(response, f"blob {digest}")
                with open(path, "wb") as out:
                    try:
                        async for piece in response.aiter_raw():
                            out.write(piece)
                            hasher.update(piece)
                            size += len(piece)
                            on_bytes(len(piece))
                    except httpx.HTTPError as e:
                        raise RegistryError(
                            f"blob {digest}: {_describe(e)} after {size} bytes", retryable=True
                        ) from None
            finally:
                await response.aclose()
            if "sha256:" + hasher.hexdigest() != digest:
                raise RegistryError(
                    f"blob {digest}: content has digest sha256:{hasher.hexdigest()}",
                    retryable=True,
                )
            return size

        return await self._retrying(once)

    async def get_manifest(self, reference: str, accept: tuple[str, ...]) -> Manifest:
        """The manifest or index `reference` (a tag or a digest) names; a digest reference is
        checked against the body."""

        async def once() -> Manifest:
            url = self.url(f"manifests/{reference}")
            headers = {"Accept": ", ".join(accept)}
            response = await self._exchange("GET", url, headers, self.pull_scope)
            try:
                if response.status_code != 200:
                    raise _status_error(response, f"manifest {reference}")
                body = await _read_all(response, 4 << 20, f"manifest {reference}")
            finally:
                await response.aclose()
            media_type = response.headers.get("Content-Type", "").split(";")[0].strip()
            digest = "sha256:" + hashlib.sha256(body).hexdigest()
            if reference.startswith("sha256:") and reference != digest:
                raise RegistryError(
                    f"manifest {reference}: body has digest {digest}", retryable=True
                )
            return Manifest(body, media_type, digest)

        return await self._retrying(once)

    # --- Writing ---------------------------------------------------------------------------

    async def push_blob(self, digest: str, data: bytes) -> None:
        """Upload a blob held in memory, checked against its digest first."""
        _check_digest(digest)
        _verify(data, digest, f"blob {digest} to push")
        await self._retrying(lambda: self._upload(digest, data, len(data)))

    async def push_blob_file(
        self, digest: str, path: str | os.PathLike[str], on_bytes: Callable[[int], None] = _ignore
    ) -> None:
        """Upload a blob from a file without holding it in memory. The file must be the blob
        `digest` names (the registry checks, and refuses a mismatch)."""
        _check_digest(digest)
        size = os.path.getsize(path)

        async def chunks() -> AsyncIterator[bytes]:
            with open(path, "rb") as blob:
                while piece := blob.read(1 << 20):
                    on_bytes(len(piece))
                    yield piece

        await self._retrying(lambda: self._upload(digest, chunks, size))

    async def _upload(
        self, digest: str, body: bytes | Callable[[], AsyncIterator[bytes]], size: int
    ) -> None:
        """One monolithic upload: POST for a session, then PUT the body with the digest. A
        streamed body is a factory, so each attempt reads the content afresh."""
        start = await self._exchange(
            "POST", self.url("blobs/uploads/"), {}, self.push_scope, body=b""
        )
        await start.aclose()
        if start.status_code != 202 or "Location" not in start.headers:
            raise _status_error(start, f"upload of blob {digest}")
        location = urljoin(str(start.url), start.headers["Location"])
        separator = "&" if "?" in location else "?"
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        done = await self._exchange(
            "PUT", f"{location}{separator}digest={digest}", headers, self.push_scope, body=body
        )
        await done.aclose()
        if done.status_code != 201:
            raise _status_error(done, f"upload of blob {digest}")

    async def put_manifest(self, reference: str, body: bytes, media_type: str) -> str:
        """Push a manifest under a tag or digest; returns its digest."""

        async def once() -> None:
            url = self.url(f"manifests/{reference}")
            headers = {"Content-Type": media_type}
            response = await self._exchange("PUT", url, headers, self.push_scope, body=body)
            await response.aclose()
            if response.status_code != 201:
                raise _status_error(response, f"manifest {reference}")

        await self._retrying(once)
        return "sha256:" + hashlib.sha256(body).hexdigest()

    # --- The request engine ----------------------------------------------------------------

    async def _retrying(self, attempt: Callable[[], Awaitable[_T]]) -> _T:
        """attempt(), again after a retryable failure, up to retry_limit more times."""
        failures = 0
        while True:
            try:
                return await attempt()
            except RegistryError as e:
                if not e.retryable or failures >= self.options.retry_limit:
                    raise
                delay = e.retry_after
                if delay is None:
                    delay = min(0.5 * 2**failures, MAX_BACKOFF) * (0.5 + random.random() / 2)
                failures += 1
                log.warning(
                    "%s; retry %d of %d in %.1f s", e, failures, self.options.retry_limit, delay
                )
                await self._sleep(delay)

    async def _exchange(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        scope: str,
        *,
        body: Body = None,
        own_origin: bool = True,
    ) -> httpx.Response:
        """Send, authenticate and follow redirects; returns the final response, body unread."""
        authorization = await self.auth.header(scope) if own_origin else None
        challenges = redirects = 0
        while True:
            response = await self._send(method, url, headers, authorization, body)
            status = response.status_code
            # At most two challenges: Harbor's stale-token one, then the real one.
            if status == 401 and challenges < 2 and _same_origin(url, self.options.origin):
                challenges += 1
                # Read the (small) 401 body first: that returns the connection to the pool,
                # which the token request may need.
                try:
                    await response.aread()
                except httpx.HTTPError as e:
                    raise RegistryError(
                        f"{method} {_redact(url)}: {_describe(e)}", retryable=True
                    ) from None
                again, authorization = await self._answer_challenge(response, scope, authorization)
                if not again:
                    return response
                await response.aclose()
                continue
            if not 300 <= status < 400 or "Location" not in response.headers:
                return response
            await response.aclose()
            redirects += 1
            if redirects > MAX_REDIRECTS:
                raise RegistryError(
                    f"{method} {_redact(url)}: more than {MAX_REDIRECTS} redirects", retryable=False
                )
            url = urljoin(url, response.headers["Location"])
            if not _same_origin(url, self.options.origin):
                authorization = None  # never hand our credentials to another host

    async def _answer_challenge(
        self, response: httpx.Response, scope: str, sent: str | None
    ) -> tuple[bool, str | None]:
        """Whether to send the request again, and with what Authorization."""
        try:
            challenge = parse_challenge(response.headers.get("WWW-Authenticate", ""))
        except ChallengeError as e:
            raise RegistryError(str(e), retryable=False, status=401) from None
        if challenge.scheme == "basic" and sent is not None and sent.startswith("Bearer "):
            # Harbor's answer to an expired token: the real challenge comes without one.
            self.auth.forget(scope)
            return True, None
        answer = await self.auth.answer(challenge, scope, sent)
        return answer is not None and answer != sent, answer

    async def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        authorization: str | None,
        body: Body,
    ) -> httpx.Response:
        all_headers = dict(headers)
        if authorization is not None:
            all_headers["Authorization"] = authorization
        # A streamed body is made afresh for each send: a challenge or redirect sends again.
        content = body() if callable(body) else body
        request = self._http.build_request(method, url, headers=all_headers, content=content)
        self.requests += 1
        try:
            return await self.routes.send(self._http, request)
        except TimeoutError:
            raise RegistryError(
                f"{method} {_redact(url)}: no answer within {self.options.first_byte_timeout} s",
                retryable=True,
            ) from None
        except httpx.HTTPError as e:
            raise RegistryError(
                f"{method} {_redact(url)}: {_describe(e)}", retryable=True
            ) from None


def _tls_context(options: RegistryOptions) -> ssl.SSLContext | bool:
    if options.scheme != "https":
        return True
    if options.skip_verify:
        return False
    context = ssl.create_default_context()
    for path in options.ca_cert_files:
        try:
            context.load_verify_locations(cafile=path)
        except (OSError, ssl.SSLError) as e:
            raise RegistryError(f"ca_cert_files: {path}: {e}", retryable=False) from None
    return context


def _check_digest(digest: str) -> None:
    # The digest goes into a URL path: only the one form the registry can mean.
    if not _DIGEST.fullmatch(digest):
        raise RegistryError(f"{digest!r} is not a sha256 digest", retryable=False)


def _status_error(response: httpx.Response, what: str) -> RegistryError:
    status = response.status_code
    retryable = status >= 500 or status in (408, 429)
    error = RegistryError(f"{what}: HTTP {status}", retryable=retryable, status=status)
    if status in (429, 503):
        error.retry_after = _retry_after(response.headers.get("Retry-After"))
    return error


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    if value.strip().isdigit():
        seconds = float(value.strip())
    else:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


def check_range(response: httpx.Response, digest: str, offset: int, size: int) -> None:
    what = f"blob {digest} range {offset}+{size}"
    content_range = response.headers.get("Content-Range")
    if content_range is not None:
        match = _CONTENT_RANGE.fullmatch(content_range.strip())
        if match is None:
            raise RegistryError(f"{what}: bad Content-Range {content_range!r}", retryable=True)
        first, last = int(match.group(1)), int(match.group(2))
        if first != offset or last != offset + size - 1:
            raise RegistryError(
                f"{what}: server sent bytes {first}-{last} (Content-Range)", retryable=True
            )
        return
    if response.status_code == 206:
        raise RegistryError(f"{what}: 206 without Content-Range", retryable=True)
    if offset != 0:  # a 200 is the whole blob: reading through to our offset is not worth it
        raise RegistryError(f"{what}: the server ignored the Range header", retryable=False)


async def read_exactly(response: httpx.Response, size: int, what: str) -> bytes:
    """The first `size` body bytes; a body that ends sooner is a (retryable) short read."""
    data = bytearray()
    try:
        async for piece in response.aiter_raw():
            data += piece
            if len(data) >= size:
                break
    except httpx.HTTPError as e:
        raise RegistryError(
            f"{what}: {_describe(e)} after {len(data)} bytes", retryable=True
        ) from None
    if len(data) < size:
        raise RegistryError(f"{what}: body ended after {len(data)} bytes", retryable=True)
    if response.status_code == 206 and len(data) > size:
        raise RegistryError(f"{what}: body longer than its range", retryable=True)
    return bytes(data[:size])


async def _read_all(response: httpx.Response, limit: int, what: str) -> bytes:
    data = bytearray()
    try:
        async for piece in response.aiter_bytes():
            data += piece
            if len(data) > limit:
                raise RegistryError(f"{what}: larger than {limit} bytes", retryable=False)
    except httpx.HTTPError as e:
        raise RegistryError(
            f"{what}: {_describe(e)} after {len(data)} bytes", retryable=True
        ) from None
    return bytes(data)


def _verify(data: bytes, digest: str, what: str) -> None:
    actual = "sha256:" + hashlib.sha256(data).hexdigest()
    if actual != digest:
        raise RegistryError(f"{what}: content has digest {actual}", retryable=True)


def _same_origin(url: str, origin: str) -> bool:
    a, b = urlsplit(url), urlsplit(origin)
    return (a.scheme, a.netloc.lower()) == (b.scheme, b.netloc.lower())


def _redact(url: str) -> str:
    # Presigned redirect targets carry credentials in their query.
    return url.split("?", 1)[0]


def _describe(error: httpx.HTTPError) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
