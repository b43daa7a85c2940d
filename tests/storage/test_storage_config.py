"""nydusd v1 JSON configs and CLI flags, and building an image's storage from them."""

from __future__ import annotations

import copy
import json
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.storage.blobs import build_blob, materialize, run
from vhostfs.storage import (
    ConfigError,
    PrefetchConfig,
    RafsConfig,
    UnsupportedConfigError,
    open_storage,
    parse_config,
    prefetcher_for,
)
from vhostfs.storage.blob import BlobInfo, Compressor
from vhostfs.storage.config import CacheConfig, LocalFsConfig

# As the snapshotter writes it for Kata, with localfs in place of registry.
KATA_LIKE: dict[str, Any] = {
    "device": {
        "backend": {"type": "localfs", "config": {"dir": "/var/lib/blobs"}},
        "cache": {
            "type": "blobcache",
            "compressed": False,
            "config": {"work_dir": "/var/cache/nydus"},
        },
    },
    "mode": "direct",
    "digest_validate": True,
    "iostats_files": False,
    "enable_xattr": True,
    "latest_read_files": True,
    "amplify_io": 524288,
    "fs_prefetch": {
        "enable": True,
        "threads_count": 4,
        "merging_size": 131072,
        "bandwidth_rate": 10485760,
        "prefetch_all": True,
    },
    "warmup": 1,
}


def with_change(path: str, value: object) -> str:
    """KATA_LIKE with the value at a dotted path replaced (a DELETE value removes the key)."""
    document = copy.deepcopy(KATA_LIKE)
    *parents, last = path.split(".")
    node = document
    for key in parents:
        node = node[key]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return json.dumps(document)


DELETE = object()


def test_a_kata_like_config() -> None:
    config = parse_config(json.dumps(KATA_LIKE))
    assert config == RafsConfig(
        backend=LocalFsConfig(dir="/var/lib/blobs"),
        cache=CacheConfig("/var/cache/nydus"),
        mode="direct",
        digest_validate=True,
        enable_xattr=True,
        amplify_io=524288,
        prefetch=PrefetchConfig(True, 4, 131072, 10485760, True),
    )


def test_defaults() -> None:
    config = parse_config(
        b'{"device": {"backend": {"type": "localfs", "config": {"blob_file": "/b"}}},'
        b' "mode": "cached"}'
    )
    assert config == RafsConfig(backend=LocalFsConfig(blob_file="/b"), cache=None, mode="cached")
    assert config.amplify_io == 1 << 20 and not config.digest_validate
    assert config.prefetch == PrefetchConfig(False, 8, 1 << 20, 0, False)


def test_localfs_fields() -> None:
    text = with_change(
        "device.backend.config", {"dir": "/a", "alt_dirs": ["/b", "/c"], "readahead": True}
    )
    assert parse_config(text).backend == LocalFsConfig(dir="/a", alt_dirs=("/b", "/c"))


@pytest.mark.parametrize("kind", ["", "dummycache", "none"])
def test_no_cache(kind: str) -> None:
    assert parse_config(with_change("device.cache", {"type": kind})).cache is None


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("device", DELETE, "device: required"),
        ("mode", DELETE, "mode: required"),
        ("mode", "lazy", 'mode: expected "direct" or "cached"'),
        ("device.backend.type", DELETE, "device.backend.type: required"),
        ("device.backend.type", 3, "device.backend.type: expected a string, got a number"),
        ("device.backend.type", "ftp", "device.backend.type: unknown backend type 'ftp'"),
        ("device.backend.config", DELETE, "device.backend.config: required"),
        ("device.backend.config", [], "device.backend.config: expected an object, got a list"),
        ("device.backend.config.dir", 5, "device.backend.config.dir: expected a string"),
        ("device.backend.config.dir", DELETE, "device.backend.config.dir: localfs needs"),
        ("device.backend.config.alt_dirs", "/x", "device.backend.config.alt_dirs: expected a list"),
        ("device.backend.config.alt_dirs", ["/x", 1], "device.backend.config.alt_dirs[1]"),
        ("device.cache.type", "lru", "device.cache.type: unknown cache type 'lru'"),
        ("device.cache.config", None, "device.cache.config: required"),
        ("device.cache.config.work_dir", DELETE, "device.cache.config.work_dir: required"),
        ("device.cache.config.work_dir", "", "device.cache.config.work_dir: must not be empty"),
        ("digest_validate", "yes", "digest_validate: expected true or false, got a string"),
        ("enable_xattr", 1, "enable_xattr: expected true or false, got a number"),
        ("amplify_io", True, "amplify_io: expected an integer, got a boolean"),
        ("amplify_io", -1, "amplify_io: -1 is outside"),
        ("amplify_io", 1.5, "amplify_io: expected an integer"),
        ("fs_prefetch", 1, "fs_prefetch: expected an object, got a number"),
        ("fs_prefetch.threads_count", 0, "fs_prefetch.threads_count: 0 is outside 1..1024"),
        ("fs_prefetch.merging_size", 1 << 30, "fs_prefetch.merging_size: 1073741824 is outside"),
        ("fs_prefetch.bandwidth_rate", -5, "fs_prefetch.bandwidth_rate: -5 is outside"),
        ("fs_prefetch.enable", "true", "fs_prefetch.enable: expected true or false"),
    ],
)
def test_errors_name_the_key_path(path: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(with_change(path, value))
    assert str(caught.value).startswith(message)


@pytest.mark.parametrize("kind", ["oss", "s3", "localdisk"])
def test_other_backends_are_not_supported(kind: str) -> None:
    text = with_change("device.backend", {"type": kind, "config": {"host": "example.com"}})
    with pytest.raises(UnsupportedConfigError, match=f"'{kind}' backend is not supported yet"):
        parse_config(text)


def test_fscache_and_other_versions_are_refused() -> None:
    with pytest.raises(UnsupportedConfigError, match=r"device\.cache\.type: fscache"):
        parse_config(with_change("device.cache.type", "fscache"))
    with pytest.raises(ConfigError, match="version: expected 2, got 3"):
        parse_config(with_change("version", 3))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "config: neither valid JSON nor TOML"),
        (b"\xff", "config: neither valid JSON nor TOML"),
        ("mode = 'direct'", "config: a TOML config must be v2"),
        ("[]", "config: expected an object, got a list"),
        ("null", "config: expected an object, got null"),
    ],
)
def test_malformed_documents(text: str | bytes, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(text)


def test_from_flags() -> None:
    config = RafsConfig.from_flags(
        blob_dir="/blobs", blob_files=["/one", Path("/two")], cache_dir="/cache"
    )
    assert config.backend == LocalFsConfig(dir="/blobs", blob_files=("/one", "/two"))
    assert config.cache == CacheConfig("/cache")
    assert config.digest_validate and config.mode == "direct"
    assert RafsConfig.from_flags().cache is None


# --- open_storage ---------------------------------------------------------------------------


def anonymous(info: BlobInfo) -> BlobInfo:
    """The blob as an image whose device slot carries no id would describe it."""
    return BlobInfo(
        info.index,
        "",
        info.compressor,
        info.digester,
        info.chunk_size,
        info.chunk_count,
        info.compressed_size,
        info.uncompressed_size,
        info.features,
    )


def test_open_storage_with_blob_files_in_table_order(tmp_path: Path) -> None:
    first = build_blob(tmp_path, seed=1)
    second = build_blob(tmp_path, seed=2, index=1, compressor=Compressor.NONE)
    config = RafsConfig.from_flags(
        blob_files=[first.path, second.path], cache_dir=tmp_path / "cache"
    )
    blobs = [first.info, anonymous(second.info)]

    async def scenario() -> None:
        storage = open_storage(config, blobs)
        for blob in (first, second):
            data = await storage.read(blob.refs, 0, len(blob.file_bytes))
            assert materialize(data) == blob.file_bytes
        prefetcher = prefetcher_for(storage, PrefetchConfig(enable=True))
        prefetcher.start(first.refs)
        await prefetcher.wait()
        assert storage.metrics.backend_requests == 2
        await storage.aclose()

    run(scenario())
    # A blob without an id has nothing to name shared cache files by: it is not cached.
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [
        f"{first.blob_id}.blob.data",
        f"{first.blob_id}.chunk_map",
    ]


def test_open_storage_refuses_more_files_than_blobs(tmp_path: Path) -> None:
    blob = build_blob(tmp_path)
    config = RafsConfig.from_flags(blob_files=[blob.path, blob.path])
    with pytest.raises(ConfigError, match="--blob: 2 files given, but the image has 1 blobs"):
        open_storage(config, [blob.info])


def test_open_storage_from_json(tmp_path: Path) -> None:
    blob = build_blob(tmp_path)
    text = json.dumps(
        {
            "device": {
                "backend": {"type": "localfs", "config": {"dir": str(tmp_path)}},
                "cache": {"type": "blobcache", "config": {"work_dir": str(tmp_path / "w")}},
            },
            "mode": "direct",
            "digest_validate": True,
        }
    )

    async def scenario() -> None:
        storage = open_storage(parse_config(text), [blob.info])
        assert materialize(await storage.read(blob.refs, 0, 8 * 16384)) == blob.file_bytes
        await storage.aclose()

    run(scenario())
    assert (tmp_path / "w" / f"{blob.blob_id}.chunk_map").exists()


V2_TOML = """
version = 2
id = "img"

[backend]
type = "registry"

[backend.registry]
scheme = "http"
host = "registry.local:5000"
repo = "library/python"
timeout = 7
retry_limit = 2

[cache]
type = "blobcache"

[cache.filecache]
work_dir = "/var/cache/vhostfs"

[rafs]
mode = "cached"
validate = true
batch_size = 131072

[rafs.prefetch]
enable = true
threads = 4
batch_size = 65536
bandwidth_limit = 1000
"""

V1_EQUIVALENT = {
    "device": {
        "backend": {
            "type": "registry",
            "config": {
                "scheme": "http",
                "host": "registry.local:5000",
                "repo": "library/python",
                "timeout": 7,
                "retry_limit": 2,
            },
        },
        "cache": {"type": "blobcache", "config": {"work_dir": "/var/cache/vhostfs"}},
    },
    "mode": "cached",
    "digest_validate": True,
    "amplify_io": 131072,
    "fs_prefetch": {
        "enable": True,
        "threads_count": 4,
        "merging_size": 65536,
        "bandwidth_rate": 1000,
    },
}


def test_a_v2_config_in_toml_or_json_means_what_its_v1_form_means() -> None:
    v1 = parse_config(json.dumps(V1_EQUIVALENT))
    assert parse_config(V2_TOML) == v1
    assert parse_config(json.dumps(tomllib.loads(V2_TOML))) == v1


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ("[backend.registry]", "[backend.localfs]", "backend.registry: required"),
        ("threads = 4", "threads = 0", "rafs.prefetch.threads: "),
        ("version = 2", "version = 3", "version: expected 2, got 3"),
        ('mode = "cached"', 'mode = "lazy"', 'rafs.mode: expected "direct" or "cached"'),
    ],
)
def test_v2_errors_name_the_key_path(old: str, new: str, message: str) -> None:
    assert old in V2_TOML
    with pytest.raises(ConfigError, match=message):
        parse_config(V2_TOML.replace(old, new))
