"""Registry credentials and the tokens they buy, per repository scope.

nydusd's registry backend (reference §1.3) authenticates the way the distribution token spec
says, and vhostfs does the same with stricter bookkeeping:

- `auth` (base64 of "user:password") goes out as Basic when the registry asks for Basic, and is
  presented to the token endpoint when it asks for Bearer;
- `registry_token` is a ready bearer token, used as is;
- a bearer token is cached per scope (`repository:<repo>:pull`) until it expires; it is renewed
  ahead of expiry, at a moment jittered so that many daemons started together do not all renew
  together, and a renewal is fetched once however many requests want it (single flight);
- the token endpoint is tried with POST first and GET after, as nydusd does; a realm that only
  answers GET is remembered.

Secrets never appear in a repr or a log line.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import httpx

from vhostfs.storage.registry.challenge import Challenge
from vhostfs.storage.registry.errors import RegistryError

# The token spec's default lifetime when the endpoint does not say (nydusd assumes 600 s; a
# shorter guess only costs an early renewal).
DEFAULT_TOKEN_SECONDS: Final = 60
CLIENT_ID: Final = "nydus-registry-client"  # what nydusd sends; some token servers log it


@dataclass(frozen=True, slots=True)
class Credentials:
    basic: str | None = field(default=None, repr=False)  # base64 "user:password"
    bearer: str | None = field(default=None, repr=False)  # a ready token (registry_token)

    @classmethod
    def from_config(cls, auth: str | None, registry_token: str | None) -> Credentials:
        """Validated as nydusd validates them: `auth` must decode to UTF-8 "user:password"."""
        basic = auth.strip() if auth and auth.strip() else None
        if basic is not None:
            try:
                decoded = base64.b64decode(basic, validate=True).decode()
            except (binascii.Error, UnicodeDecodeError):
                raise RegistryError("auth: not base64 of user:password", retryable=False) from None
            if ":" not in decoded:
                raise RegistryError("auth: decodes to no user:password pair", retryable=False)
        bearer = registry_token.strip() if registry_token and registry_token.strip() else None
        return cls(basic, bearer)

    @classmethod
    def from_user(cls, user: str, password: str) -> Credentials:
        return cls(base64.b64encode(f"{user}:{password}".encode()).decode())

    def __repr__(self) -> str:
        return (
            f"Credentials(basic={'<redacted>' if self.basic else None}, "
            f"bearer={'<redacted>' if self.bearer else None})"
        )


@dataclass(slots=True)
class _Token:
    header: str  # "Bearer ..."
    renew_at: float
    expires_at: float


class Authenticator:
    """Authorization headers for one registry, by scope."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        credentials: Credentials,
        *,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._http = http
        self._credentials = credentials
        self._clock = clock
        self._jitter = jitter
        self._tokens: dict[str, _Token] = {}
        self._challenges: dict[str, Challenge] = {}  # the last bearer challenge, by scope
        self._basic_wanted = False  # the registry answered with a Basic challenge
        self._fetching: dict[str, asyncio.Task[_Token]] = {}
        self._get_only: set[str] = set()  # realms whose token endpoint refuses POST
        self.token_fetches = 0  # successful ones, for tests and metrics

    async def header(self, scope: str) -> str | None:
        """What to send as Authorization for a request in `scope`, if anything is known."""
        if self._credentials.bearer is not None:
            return f"Bearer {self._credentials.bearer}"
        token = self._tokens.get(scope)
        if token is not None:
            now = self._clock()
            if now < token.renew_at:
                return token.header
            if now < token.expires_at:
                self._renew(scope)  # in the background: this token still works meanwhile
                return token.header
            return (await self._renewal(scope)).header if scope in self._challenges else None
        if self._basic_wanted and self._credentials.basic is not None:
            return f"Basic {self._credentials.basic}"
        return None

    def replace_credentials(self, credentials: Credentials) -> None:
        """New credentials from now on (nydusd's registry_auth hot reload): tokens bought with
        the old ones are dropped, and the next challenge is answered with the new ones."""
        self._credentials = credentials
        self._tokens.clear()

    def forget(self, scope: str) -> None:
        """The registry refused the token we sent: do not send it again."""
        self._tokens.pop(scope, None)

    async def answer(self, challenge: Challenge, scope: str, sent: str | None) -> str | None:
        """The Authorization header that answers `challenge` to a request sent with `sent`,
        or None if we have nothing to offer (then the 401 stands)."""
        if challenge.scheme == "basic":
            self._basic_wanted = True
            return f"Basic {self._credentials.basic}" if self._credentials.basic else None
        if challenge.scheme != "bearer" or not challenge.realm:
            raise RegistryError(
                f"registry asks for {challenge.scheme} authentication, which is not supported",
                retryable=False,
            )
        if self._credentials.bearer is not None:
            return None  # the ready token was refused: asking again will not help
        self._challenges[scope] = challenge
        current = self._tokens.get(scope)
        if current is not None and current.header != sent and self._clock() < current.expires_at:
            return current.header  # the request left before this token came: just resend
        if scope not in self._fetching:
            self.forget(scope)  # it was refused; a renewal under way will replace it anyway
        return (await self._renewal(scope)).header

    def _renew(self, scope: str) -> None:
        if scope not in self._fetching and scope in self._challenges:
            task = asyncio.get_running_loop().create_task(self._fetch(scope))
            self._fetching[scope] = task
            task.add_done_callback(_consume)

    async def _renewal(self, scope: str) -> _Token:
        self._renew(scope)
        return await asyncio.shield(self._fetching[scope])

    async def _fetch(self, scope: str) -> _Token:
        try:
            challenge = self._challenges[scope]
            token, seconds = await self._request_token(challenge, scope)
            now = self._clock()
            lead = min(seconds / 4, 20.0) + self._jitter() * min(seconds / 10, 300.0)
            entry = _Token(f"Bearer {token}", now + max(seconds - lead, 0.0), now + seconds)
            self._tokens[scope] = entry
            self.token_fetches += 1
            return entry
        finally:
            self._fetching.pop(scope, None)

    async def _request_token(self, challenge: Challenge, scope: str) -> tuple[str, float]:
        realm = challenge.params["realm"]
        params = {"service": challenge.params.get("service", ""), "client_id": CLIENT_ID}
        params["scope"] = challenge.params.get("scope") or scope
        headers = {}
        if self._credentials.basic is not None:
            headers["Authorization"] = f"Basic {self._credentials.basic}"
        response: httpx.Response | None = None
        if realm not in self._get_only:
            try:
                response = await self._http.post(realm, data=params, headers=headers)
            except httpx.HTTPError:
                response = None
            if response is None or response.status_code >= 400:
                self._get_only.add(realm)
                response = None
        if response is None:
            try:
                response = await self._http.get(realm, params=params, headers=headers)
            except httpx.HTTPError as e:
                raise RegistryError(f"token endpoint {realm}: {e}", retryable=True) from None
        if response.status_code >= 400:
            raise RegistryError(
                f"token endpoint {realm}: HTTP {response.status_code}",
                retryable=response.status_code >= 500 or response.status_code == 429,
                status=response.status_code,
            )
        return _token_of(response, realm)


def _token_of(response: httpx.Response, realm: str) -> tuple[str, float]:
    try:
        document = response.json()
    except ValueError:
        raise RegistryError(
            f"token endpoint {realm}: answer is not JSON", retryable=False
        ) from None
    token = (
        document.get("token") or document.get("access_token")
        if isinstance(document, dict)
        else None
    )
    if not isinstance(token, str) or not token:
        raise RegistryError(f"token endpoint {realm}: answer holds no token", retryable=False)
    seconds = document.get("expires_in", DEFAULT_TOKEN_SECONDS)
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds <= 0:
        seconds = DEFAULT_TOKEN_SECONDS
    return token, float(seconds)


def _consume(task: asyncio.Task[_Token]) -> None:
    # A background renewal that failed is retried by the next request that needs it.
    if not task.cancelled():
        task.exception()
