"""The registry backend: blob ranges read lazily from an OCI registry, as nydusd's `registry`.

A blob id is the hex sha256 of the blob, so blob `<id>` is `/v2/<repo>/blobs/sha256:<id>`. All
the HTTP rules (auth, redirects, retries, range checks, timeouts) live in the registry client
(vhostfs.storage.registry.client); this module maps a config onto it, turns its errors into
BackendErrors, and remembers blob sizes (they never change: a blob is named by its digest).

Credentials: the environment variable IMAGE_PULL_AUTH, when set and not blank, replaces the
config's `auth`, as it does for nydusd (reference §1.1). A scheme other than exactly "http"
means HTTPS, also as in nydusd; HTTPS never falls back to HTTP.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Final

from vhostfs.storage.backend_config import RegistryConfig
from vhostfs.storage.config_fields import ConfigError
from vhostfs.storage.errors import BackendError
from vhostfs.storage.registry import Credentials, RegistryClient, RegistryError, RegistryOptions

PULL_AUTH_ENV: Final = "IMAGE_PULL_AUTH"
_BLOB_ID = re.compile(r"[0-9a-f]{64}")


def registry_options(
    config: RegistryConfig, environ: Mapping[str, str] = os.environ
) -> RegistryOptions:
    """The client options a `registry` config asks for. ConfigError for bad credentials."""
    auth = config.auth.reveal() if config.auth is not None else None
    override = environ.get(PULL_AUTH_ENV, "").strip()
    if override:
        auth = override
    token = config.registry_token.reveal() if config.registry_token is not None else None
    try:
        credentials = Credentials.from_config(auth, token)
    except RegistryError as e:
        where = PULL_AUTH_ENV if override else "device.backend.config.auth"
        raise ConfigError(f"{where}: {str(e).removeprefix('auth: ')}") from None
    return RegistryOptions(
        host=config.host,
        repo=config.repo,
        scheme="http" if config.scheme == "http" else "https",
        credentials=credentials,
        skip_verify=config.skip_verify,
        ca_cert_files=config.ca_cert_files,
        connect_timeout=float(config.connect_timeout),
        # nydusd's `timeout` bounds a whole request; here it bounds the wait for the answer
        # and each silence within the body, so a slow but steady range still completes.
        first_byte_timeout=float(config.timeout),
        idle_timeout=float(config.timeout),
        retry_limit=config.retry_limit,
        proxy=config.proxy if config.proxy.url else None,
        mirrors=config.mirrors,
    )


class RegistryBackend:
    def __init__(self, client: RegistryClient) -> None:
        self.client = client
        self._sizes: dict[str, int] = {}

    @classmethod
    def from_config(cls, config: RegistryConfig) -> RegistryBackend:
        try:
            return cls(RegistryClient(registry_options(config)))
        except RegistryError as e:
            raise ConfigError(f"device.backend.config: {e}") from None

    def update_auth(self, auth: str | None) -> None:
        try:
            credentials = Credentials.from_config(auth, None)
        except RegistryError as e:
            raise ConfigError(f"registry_auth: {str(e).removeprefix('auth: ')}") from None
        self.client.auth.replace_credentials(credentials)

    async def read(self, blob_id: str, offset: int, size: int) -> bytes:
        digest = _digest_of(blob_id)
        try:
            return await self.client.read_blob(digest, offset, size)
        except RegistryError as e:
            raise BackendError(str(e), retryable=e.retryable) from None

    async def blob_size(self, blob_id: str) -> int:
        known = self._sizes.get(blob_id)
        if known is not None:
            return known
        try:
            size = await self.client.blob_size(_digest_of(blob_id))
        except RegistryError as e:
            raise BackendError(str(e), retryable=e.retryable) from None
        self._sizes[blob_id] = size
        return size

    async def aclose(self) -> None:
        await self.client.aclose()


def _digest_of(blob_id: str) -> str:
    # Blob ids come from the image: only a sha256 hex digest may become part of a URL.
    if not _BLOB_ID.fullmatch(blob_id):
        raise BackendError(f"blob {blob_id!r}: not a sha256 digest, not fetched from a registry")
    return f"sha256:{blob_id}"
