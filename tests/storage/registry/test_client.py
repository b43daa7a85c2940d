"""The registry client against a real registry: pushes, checked range reads, and each way of
authenticating (none, htpasswd Basic, Bearer tokens from a token server, TLS)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support.faultproxy import fault_proxy
from tests.support.registry import (
    Registry,
    TokenServer,
    running_registry,
    tls_files,
    token_server,
)
from vhostfs.storage.registry.auth import Credentials
from vhostfs.storage.registry.client import RegistryClient, RegistryOptions
from vhostfs.storage.registry.errors import RegistryError

BLOB = os.urandom(3 << 20)
DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
REPO = "library/test"
MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"


def options(registry: Registry, **kw: object) -> RegistryOptions:
    return RegistryOptions(registry.host, REPO, scheme=registry.scheme, **kw)  # type: ignore[arg-type]


async def push_image(client: RegistryClient) -> str:
    """The blob, a config and a manifest naming both; returns the manifest's digest."""
    await client.push_blob(DIGEST, BLOB)
    config = b"{}"
    config_digest = "sha256:" + hashlib.sha256(config).hexdigest()
    await client.push_blob(config_digest, config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_TYPE,
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": config_digest,
            "size": len(config),
        },
        "layers": [
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": DIGEST,
                "size": len(BLOB),
            }
        ],
    }
    return await client.put_manifest("v1", json.dumps(manifest).encode(), MANIFEST_TYPE)


@pytest.fixture
def open_registry(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry") as registry:
        yield registry


def test_push_then_read_ranges(open_registry: Registry) -> None:
    async def scenario() -> None:
        async with RegistryClient(options(open_registry)) as client:
            digest = await push_image(client)
            assert await client.has_blob(DIGEST)
            assert await client.blob_size(DIGEST) == len(BLOB)
            for offset, size in [(0, 1), (0, 4096), (12345, 1 << 20), (len(BLOB) - 7, 7)]:
                assert await client.read_blob(DIGEST, offset, size) == BLOB[offset : offset + size]
            manifest = await client.get_manifest("v1", (MANIFEST_TYPE,))
            assert manifest.digest == digest and manifest.media_type == MANIFEST_TYPE
            assert (await client.get_manifest(digest, (MANIFEST_TYPE,))).body == manifest.body
            assert await client.get_blob(json.loads(manifest.body)["config"]["digest"]) == b"{}"

    asyncio.run(scenario())


def test_missing_blob_and_bad_ranges_fail_clearly(open_registry: Registry) -> None:
    async def scenario() -> None:
        async with RegistryClient(options(open_registry, retry_limit=3)) as client:
            await client.push_blob(DIGEST, BLOB)
            missing = "sha256:" + "0" * 64
            sent = client.requests
            with pytest.raises(RegistryError) as gone:
                await client.read_blob(missing, 0, 10)
            assert gone.value.status == 404 and not gone.value.retryable
            assert client.requests == sent + 1, "a 404 is not retried"
            assert not await client.has_blob(missing)
            with pytest.raises(RegistryError) as past_end:
                await client.read_blob(DIGEST, len(BLOB), 10)
            assert past_end.value.status == 416
            with pytest.raises(RegistryError, match="not a sha256 digest"):
                await client.read_blob("sha256:../../etc", 0, 1)

    asyncio.run(scenario())


def test_htpasswd_basic_auth(tmp_path: Path) -> None:
    async def scenario(registry: Registry) -> None:
        good = Credentials.from_user("alice", "wonderland")
        async with RegistryClient(options(registry, credentials=good)) as client:
            await push_image(client)
            assert await client.read_blob(DIGEST, 100, 200) == BLOB[100:300]
        for credentials in (Credentials(), Credentials.from_user("alice", "nope")):
            async with RegistryClient(options(registry, credentials=credentials)) as client:
                with pytest.raises(RegistryError) as refused:
                    await client.read_blob(DIGEST, 0, 10)
                assert refused.value.status == 401 and not refused.value.retryable

    with running_registry(tmp_path / "r", htpasswd={"alice": "wonderland"}) as registry:
        asyncio.run(scenario(registry))


def bearer_registry(tmp_path: Path, **kw: object) -> Iterator[tuple[Registry, TokenServer]]:
    with (
        token_server({"bob": "builder"}, **kw) as tokens,  # type: ignore[arg-type]
        running_registry(tmp_path / "r", tokens=tokens) as registry,
    ):
        yield registry, tokens


def test_bearer_tokens_are_fetched_once_for_concurrent_reads(tmp_path: Path) -> None:
    async def scenario(registry: Registry, tokens: TokenServer) -> None:
        credentials = Credentials.from_user("bob", "builder")
        async with RegistryClient(options(registry, credentials=credentials)) as client:
            await push_image(client)
        tokens.requests.clear()
        async with RegistryClient(options(registry, credentials=credentials)) as client:
            ranges = [(i * 4096, 4096) for i in range(24)]
            got = await asyncio.gather(*(client.read_blob(DIGEST, o, s) for o, s in ranges))
            assert got == [BLOB[o : o + s] for o, s in ranges]
            assert client.auth.token_fetches == 1
        assert tokens.requests[0][0] == "POST"
        assert tokens.requests[0][1]["scope"] == f"repository:{REPO}:pull"
        assert tokens.requests[0][1]["client_id"] == "nydus-registry-client"

    for registry, tokens in bearer_registry(tmp_path):
        asyncio.run(scenario(registry, tokens))


def test_token_endpoint_refusing_post_falls_back_to_get_once(tmp_path: Path) -> None:
    async def scenario(registry: Registry, tokens: TokenServer) -> None:
        credentials = Credentials.from_user("bob", "builder")
        async with RegistryClient(options(registry, credentials=credentials)) as client:
            await push_image(client)  # push scope, then pull scope: two tokens
            assert await client.read_blob(DIGEST, 0, 10) == BLOB[:10]
        methods = [method for method, _ in tokens.requests]
        assert methods[:2] == ["POST", "GET"] and "POST" not in methods[2:]

    for registry, tokens in bearer_registry(tmp_path):
        tokens.refuse_post = True
        asyncio.run(scenario(registry, tokens))


def test_a_token_is_renewed_before_it_expires(tmp_path: Path) -> None:
    async def scenario(registry: Registry) -> None:
        now = [1000.0]
        credentials = Credentials.from_user("bob", "builder")
        client = RegistryClient(options(registry, credentials=credentials), clock=lambda: now[0])
        async with client:
            await push_image(client)
            await client.read_blob(DIGEST, 0, 10)
            fetched = client.auth.token_fetches
            now[0] += 290  # inside the renewal window of a 300 s token, before its expiry
            assert await client.read_blob(DIGEST, 10, 10) == BLOB[10:20]
            await asyncio.sleep(0.5)  # the renewal runs beside the read, not in front of it
            assert client.auth.token_fetches == fetched + 1

    for registry, _ in bearer_registry(tmp_path):
        asyncio.run(scenario(registry))


def test_a_ready_registry_token(tmp_path: Path) -> None:
    async def scenario(registry: Registry, tokens: TokenServer) -> None:
        token = tokens.token(f"repository:{REPO}:pull,push", "bob")
        credentials = Credentials.from_config(None, token)
        async with RegistryClient(options(registry, credentials=credentials)) as client:
            await push_image(client)
            assert await client.read_blob(DIGEST, 5, 5) == BLOB[5:10]
            assert client.auth.token_fetches == 0

    for registry, tokens in bearer_registry(tmp_path):
        asyncio.run(scenario(registry, tokens))


def test_tls_with_a_test_ca(tmp_path: Path) -> None:
    files = tls_files(tmp_path)

    async def scenario(registry: Registry) -> None:
        trusted = options(registry, ca_cert_files=(str(files.ca_pem),))
        async with RegistryClient(trusted) as client:
            await push_image(client)
            assert await client.read_blob(DIGEST, 0, 64) == BLOB[:64]
        async with RegistryClient(options(registry, skip_verify=True)) as client:
            assert await client.read_blob(DIGEST, 64, 64) == BLOB[64:128]
        async with RegistryClient(options(registry)) as client:
            with pytest.raises(RegistryError, match="CERTIFICATE_VERIFY_FAILED"):
                await client.read_blob(DIGEST, 0, 64)
            assert client.options.scheme == "https", "never falls back to plain HTTP"

    with running_registry(tmp_path / "r", tls=files) as registry:
        asyncio.run(scenario(registry))


def test_credentials_never_show(tmp_path: Path) -> None:
    credentials = Credentials.from_config(Credentials.from_user("u", "s3cret").basic, "tok3n")
    text = repr(credentials) + repr(RegistryOptions("h", "r", credentials=credentials))
    assert credentials.basic is not None and credentials.bearer == "tok3n"
    assert "s3cret" not in text and "tok3n" not in text and credentials.basic not in text
    with pytest.raises(RegistryError, match="not base64"):
        Credentials.from_config("***", None)
    with pytest.raises(RegistryError, match="no user:password"):
        Credentials.from_config("bm9jb2xvbg==", None)  # "nocolon"


def test_an_expired_token_answered_harbor_s_way_is_replaced(tmp_path: Path) -> None:
    async def scenario(proxy_host: str, inject: Callable[[str], None]) -> None:
        credentials = Credentials.from_user("bob", "builder")
        options = RegistryOptions(proxy_host, REPO, scheme="http", credentials=credentials)
        async with RegistryClient(options) as client:
            await push_image(client)
            assert await client.read_blob(DIGEST, 0, 10) == BLOB[:10]
            fetched = client.auth.token_fetches
            inject("expired-token")  # the token we hold is refused with a Basic challenge
            assert await client.read_blob(DIGEST, 10, 10) == BLOB[10:20]
            assert client.auth.token_fetches == fetched + 1, "a new token was fetched"

    for registry, _ in bearer_registry(tmp_path):
        with fault_proxy(registry.origin) as proxy:
            asyncio.run(scenario(proxy.host, proxy.inject))
