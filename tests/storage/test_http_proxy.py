"""The http-proxy backend against nginx serving blob files, over TCP and over a Unix socket."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.storage.blobs import build_blob, materialize, refs_for, run
from tests.support.nginx import Nginx, running_nginx
from tests.support.vm import short_tempdir
from vhostfs.storage import ConfigError, StorageError, open_storage, parse_config
from vhostfs.storage.backend_config import HttpProxyConfig
from vhostfs.storage.errors import BackendError
from vhostfs.storage.http_proxy import HttpProxyBackend


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Nginx, Path, Path]]:
    (tmp_path / "www" / "blobs").mkdir(parents=True)
    with short_tempdir() as sockets:
        sock = sockets / "blobs.sock"
        with running_nginx(tmp_path / "nginx", root=tmp_path / "www", unix_socket=sock) as nginx:
            yield nginx, tmp_path / "www" / "blobs", sock


@pytest.mark.parametrize("over", ["tcp", "unix"])
def test_blobs_read_back_byte_exact(served: tuple[Nginx, Path, Path], over: str) -> None:
    nginx, blobs, sock = served
    blob = build_blob(blobs, chunk_count=6)
    addr = nginx.url if over == "tcp" else str(sock)
    backend = {"type": "http-proxy", "config": {"addr": addr, "path": "/blobs/"}}
    config = parse_config(json.dumps({"device": {"backend": backend}, "mode": "direct"}))

    async def go() -> tuple[bytes, int]:
        storage = open_storage(config, [blob.info])
        try:
            end = len(blob.file_bytes)
            data = materialize(await storage.read(refs_for(blob, 0, end), 0, end))
            return data, await storage.blob_size(0)
        finally:
            await storage.aclose()

    data, size = run(go())
    assert data == blob.file_bytes and size == blob.path.stat().st_size


def test_a_missing_blob_or_a_bad_id_is_an_error_not_retried(
    served: tuple[Nginx, Path, Path],
) -> None:
    nginx, _, _ = served

    async def go() -> None:
        backend = HttpProxyBackend(HttpProxyConfig(addr=nginx.url, path="blobs", retry_limit=3))
        try:
            with pytest.raises(BackendError, match="HTTP 404"):
                await backend.read("ab" * 32, 0, 10)
            with pytest.raises(StorageError, match="not a blob id"):
                await backend.read("../../etc/passwd", 0, 10)
        finally:
            await backend.aclose()

    run(go())
    assert len(nginx.requests()) == 1  # the 404 was not retried


def test_an_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    config = HttpProxyConfig(addr="https://127.0.0.1:1", ca_cert_files=(str(tmp_path / "no"),))
    with pytest.raises(ConfigError, match="ca_cert_files"):
        HttpProxyBackend.from_config(config)
