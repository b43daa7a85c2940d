"""The registry backend against a real docker-registry: images built with `vhostfs build`, their
blobs pushed with credentials, then read back lazily through the storage layer, `vhostfs check`
and `vhostfs unpack`; and a corrupted body, which is fetched once more and never served."""

from __future__ import annotations

import asyncio
import base64
import filecmp
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.storage.blobs import build_blob, materialize, refs_for, run
from tests.support.faultproxy import fault_proxy
from tests.support.registry import Registry, running_registry
from vhostfs.cli import main
from vhostfs.rafs.build import build_image
from vhostfs.rafs.image import open_image
from vhostfs.storage import (
    ConfigError,
    RegistryConfig,
    Secret,
    SyncStorage,
    open_storage,
    parse_config,
)
from vhostfs.storage.errors import BackendError, StorageError
from vhostfs.storage.registry import Credentials, RegistryClient, RegistryOptions
from vhostfs.storage.registry_backend import PULL_AUTH_ENV, RegistryBackend, registry_options

REPO = "vhostfs/test"
USERS = {"dora": "s3cret"}
AUTH = base64.b64encode(b"dora:s3cret").decode()


def push_blob(registry: Registry, path: Path, credentials: Credentials | None = None) -> None:
    async def go() -> None:
        options = RegistryOptions(
            registry.host, REPO, scheme="http", credentials=credentials or Credentials()
        )
        async with RegistryClient(options) as client:
            await client.push_blob("sha256:" + path.name, path.read_bytes())

    asyncio.run(go())


def registry_config(host: str, **fields: object) -> dict[str, Any]:
    return {
        "device": {
            "backend": {
                "type": "registry",
                "config": {"scheme": "http", "host": host, "repo": REPO, **fields},
            }
        },
        "mode": "direct",
        "digest_validate": True,
    }


def make_tree(root: Path) -> Path:
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "hostname").write_text("lazy\n")
    (root / "big").write_bytes(os.urandom(3 << 20) + b"tail")
    (root / "same").write_bytes((root / "big").read_bytes())  # one set of chunks for both
    (root / "link").symlink_to("etc/hostname")
    return root


@pytest.fixture
def guarded(tmp_path: Path) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry", htpasswd=USERS) as registry:
        yield registry


@pytest.fixture
def image(tmp_path: Path, guarded: Registry) -> Path:
    """A built image whose only blob is in the registry, not beside it."""
    result = build_image([make_tree(tmp_path / "tree")], tmp_path / "image")
    assert result.blob is not None
    push_blob(guarded, result.blob.path, Credentials.from_user("dora", "s3cret"))
    result.blob.path.unlink()
    return result.bootstrap


def test_an_image_reads_back_byte_exact_from_the_registry(
    tmp_path: Path, guarded: Registry, image: Path
) -> None:
    config = parse_config(json.dumps(registry_config(guarded.host, auth=AUTH)))
    with open_image(image) as opened, SyncStorage(config, opened.blobs, bootstrap=image) as store:
        ino = opened.lookup(opened.root_ino, b"big")
        assert ino is not None
        chunks = list(opened.chunks(ino, 0, (3 << 20) + 4))
        data = store.read(chunks, 0, (3 << 20) + 4)
    assert data == (tmp_path / "tree" / "big").read_bytes()


def test_check_and_unpack_read_their_blobs_from_the_registry(
    tmp_path: Path, guarded: Registry, image: Path
) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps(registry_config(guarded.host, auth=AUTH)))
    runner = CliRunner()
    checked = runner.invoke(main, ["check", str(image), "--config", str(config)])
    assert checked.exit_code == 0, checked.output
    assert "chunk digests verified" in checked.output
    out = tmp_path / "out"
    unpacked = runner.invoke(main, ["unpack", str(image), "--config", str(config), "-o", str(out)])
    assert unpacked.exit_code == 0, unpacked.output
    assert filecmp.cmp(out / "big", tmp_path / "tree" / "big", shallow=False)
    assert (out / "etc" / "hostname").read_text() == "lazy\n"


def test_wrong_credentials_fail_cleanly_and_image_pull_auth_overrides_them(
    tmp_path: Path, guarded: Registry, image: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wrong = base64.b64encode(b"dora:wrong").decode()
    config = tmp_path / "config.json"
    config.write_text(json.dumps(registry_config(guarded.host, auth=wrong)))
    refused = CliRunner().invoke(main, ["check", str(image), "--config", str(config)])
    assert refused.exit_code == 1 and "401" in refused.output
    assert "Traceback" not in refused.output and wrong not in refused.output
    monkeypatch.setenv(PULL_AUTH_ENV, AUTH)
    accepted = CliRunner().invoke(main, ["check", str(image), "--config", str(config)])
    assert accepted.exit_code == 0, accepted.output


def test_a_flipped_byte_is_fetched_once_more_then_gives_eio(tmp_path: Path) -> None:
    blob = build_blob(tmp_path, chunk_count=4)
    with running_registry(tmp_path / "registry") as registry, fault_proxy(registry.origin) as proxy:
        push_blob(registry, blob.path)
        config = parse_config(json.dumps(registry_config(proxy.host)))

        async def read_chunk(index: int) -> tuple[bytes | StorageError, int, int]:
            storage = open_storage(config, [blob.info], log_failures=False)
            start, end = blob.chunk_range(index)
            try:
                try:
                    result: bytes | StorageError = materialize(
                        await storage.read(refs_for(blob, start, end), start, end)
                    )
                except StorageError as e:
                    result = e
                return result, storage.metrics.chunk_refetches, storage.metrics.backend_requests
            finally:
                await storage.aclose()

        proxy.inject("flip")
        data, refetches, requests = run(read_chunk(1))
        assert data == blob.chunks[1] and refetches == 1 and requests == 2

        proxy.inject("flip", "flip")
        failed, refetches, requests = run(read_chunk(2))
        assert isinstance(failed, StorageError) and failed.errno == 5
        assert refetches == 1 and requests == 2
        assert not proxy.faults  # exactly two fetches took the two faults

        data, refetches, _ = run(read_chunk(2))  # nothing was cached: the next read tries again
        assert data == blob.chunks[2] and refetches == 0


# --- The config, mapped onto the client -------------------------------------------------------


def test_registry_options_follow_nydusd_s_rules() -> None:
    config = RegistryConfig(
        host="r:5000", repo="a/b", scheme="", timeout=7, connect_timeout=2, retry_limit=3
    )
    options = registry_options(config, environ={})
    assert options.scheme == "https"  # only exactly "http" is plain HTTP
    assert options.connect_timeout == 2 and options.first_byte_timeout == 7
    assert options.idle_timeout == 7 and options.retry_limit == 3
    with_env = registry_options(config, environ={PULL_AUTH_ENV: AUTH})
    assert with_env.credentials.basic == AUTH
    blank_env = registry_options(config, environ={PULL_AUTH_ENV: "  "})
    assert blank_env.credentials.basic is None


def test_bad_credentials_are_config_errors_without_the_secret() -> None:
    config = RegistryConfig(host="r", repo="a", auth=Secret("bm9jb2xvbg=="))  # "nocolon"
    with pytest.raises(ConfigError, match=r"config\.auth: decodes to no user:password") as e:
        registry_options(config, environ={})
    assert "bm9jb2xvbg" not in str(e.value)
    with pytest.raises(ConfigError, match=f"{PULL_AUTH_ENV}: not base64"):
        registry_options(RegistryConfig(host="r", repo="a"), environ={PULL_AUTH_ENV: "%%%"})


def test_a_blob_id_that_is_not_a_digest_never_becomes_a_url() -> None:
    async def go() -> None:
        backend = RegistryBackend.from_config(RegistryConfig(host="127.0.0.1:9", repo="a"))
        try:
            for bad in ("../../etc", "ab" * 31, "A" * 64):
                with pytest.raises(BackendError, match="not a sha256 digest"):
                    await backend.read(bad, 0, 1)
        finally:
            await backend.aclose()

    asyncio.run(go())
