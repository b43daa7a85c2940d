"""`vhostfs convert` against a real docker-registry: an OCI image of two layers (with a whiteout)
becomes a nydus image in nydusify's format, and its tree, read back lazily from the registry,
is the source's merged tree."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from tests.support.oci import digest_of, layer_from_directory, push_image
from tests.support.registry import Registry, running_registry
from vhostfs.cli import main
from vhostfs.rafs.build.nydus_image import (
    ANNOTATION_BLOB,
    ANNOTATION_BOOTSTRAP,
    ANNOTATION_FS_VERSION,
    NYDUS_BLOB,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    NydusImageError,
    bootstrap_layer,
    extract_bootstrap,
)
from vhostfs.rafs.build.remote import fetch_bootstrap
from vhostfs.rafs.image import open_image
from vhostfs.storage.registry import Credentials, RegistryClient, RegistryOptions

USERS = {"erin": "pa55"}
CREDENTIALS = Credentials.from_user("erin", "pa55")
AUTH = base64.b64encode(b"erin:pa55").decode()


def trees(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two layers, and the merged tree they make."""
    lower, upper, merged = tmp_path / "lower", tmp_path / "upper", tmp_path / "merged"
    (lower / "usr/lib").mkdir(parents=True)
    (lower / "usr/lib/big").write_bytes(os.urandom(3 << 20))
    (lower / "usr/lib/gone").write_text("deleted by the upper layer\n")
    (lower / "etc").mkdir()
    (lower / "etc/os-release").write_text("lower\n")
    (upper / "etc").mkdir(parents=True)
    (upper / "etc/os-release").write_text("upper\n")
    (upper / "copy").write_bytes((lower / "usr/lib/big").read_bytes())  # deduplicated
    (upper / "link").symlink_to("etc/os-release")
    shutil.copytree(lower, merged, symlinks=True)
    shutil.copytree(upper, merged, symlinks=True, dirs_exist_ok=True)
    (merged / "usr/lib/gone").unlink()
    return lower, upper, merged


def assert_same_tree(expected: Path, actual: Path) -> None:
    names = sorted(str(p.relative_to(expected)) for p in expected.rglob("*"))
    assert sorted(str(p.relative_to(actual)) for p in actual.rglob("*")) == names
    for name in names:
        want, got = expected / name, actual / name
        if want.is_symlink():
            assert os.readlink(got) == os.readlink(want), name
        elif want.is_file():
            assert got.read_bytes() == want.read_bytes(), name


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    with running_registry(tmp_path / "registry", htpasswd=USERS) as registry:
        docker = tmp_path / "docker"
        docker.mkdir()
        (docker / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": AUTH}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(docker))
        yield registry


def convert(source: str, target: str, *extra: str) -> str:
    result = CliRunner().invoke(
        main,
        [
            "convert",
            "--source",
            source,
            "--target",
            target,
            "--source-insecure",
            "--target-insecure",
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    return result.output


def manifest_of(registry: Registry, repo: str, tag: str) -> dict[str, Any]:
    async def go() -> dict[str, Any]:
        options = RegistryOptions(registry.host, repo, scheme="http", credentials=CREDENTIALS)
        async with RegistryClient(options) as client:
            manifest = await client.get_manifest(tag, (OCI_MANIFEST,))
            document: dict[str, Any] = json.loads(manifest.body)
            config = await client.get_blob(document["config"]["digest"])
            document["config"]["content"] = json.loads(config)
            return document

    return asyncio.run(go())


def bootstrap_of(registry: Registry, repo: str, tag: str, out: Path) -> Path:
    async def go() -> bytes:
        options = RegistryOptions(registry.host, repo, scheme="http", credentials=CREDENTIALS)
        async with RegistryClient(options) as client:
            _, bootstrap = await fetch_bootstrap(client, tag, "linux/amd64")
            return bootstrap

    out.write_bytes(asyncio.run(go()))
    return out


def test_an_oci_image_converts_to_nydusify_s_format(tmp_path: Path, registry: Registry) -> None:
    lower, upper, merged = trees(tmp_path)
    layers = [layer_from_directory(lower), layer_from_directory(upper, ["usr/lib/gone"])]
    push_image(registry.host, "app", "1", layers, credentials=CREDENTIALS)

    output = convert(f"{registry.host}/app:1", f"{registry.host}/app:1-nydus")
    assert "nydus blobs: 2" in output and "2 pushed, 0 already there" in output

    manifest = manifest_of(registry, "app", "1-nydus")
    assert manifest["mediaType"] == OCI_MANIFEST
    *blobs, boot = manifest["layers"]
    assert len(blobs) == 2
    for blob in blobs:
        assert blob["mediaType"] == NYDUS_BLOB
        assert blob["annotations"] == {ANNOTATION_BLOB: "true"}
    assert boot["mediaType"] == OCI_LAYER_GZIP
    assert boot["annotations"] == {ANNOTATION_BOOTSTRAP: "true", ANNOTATION_FS_VERSION: "6"}
    config = manifest["config"]["content"]
    assert config["rootfs"]["diff_ids"][:2] == [blob["digest"] for blob in blobs]
    assert len(config["rootfs"]["diff_ids"]) == 3
    assert config["history"][-1]["comment"] == "Nydus Bootstrap Layer"
    assert config["config"] == {"Cmd": ["/bin/sh"]}  # the rest of the config is kept
    # The upper blob holds no copy of the lower layer's data.
    assert blobs[1]["size"] < 64 << 10 < blobs[0]["size"]

    bootstrap = bootstrap_of(registry, "app", "1-nydus", tmp_path / "image.boot")
    backend = {
        "type": "registry",
        "config": {"scheme": "http", "host": registry.host, "repo": "app", "auth": AUTH},
    }
    config_file = tmp_path / "nydusd.json"
    config_file.write_text(json.dumps({"device": {"backend": backend}, "mode": "direct"}))
    runner = CliRunner()
    checked = runner.invoke(main, ["check", str(bootstrap), "--config", str(config_file)])
    assert checked.exit_code == 0, checked.output
    out = tmp_path / "out"
    unpacked = runner.invoke(
        main, ["unpack", str(bootstrap), "--config", str(config_file), "-o", str(out)]
    )
    assert unpacked.exit_code == 0, unpacked.output
    assert_same_tree(merged, out)

    again = convert(f"{registry.host}/app:1", f"{registry.host}/app:again")
    assert "0 pushed, 2 already there" in again


def test_an_index_resolves_to_the_platform_asked_for(tmp_path: Path, registry: Registry) -> None:
    lower, _, _ = trees(tmp_path)
    push_image(
        registry.host,
        "multi",
        "1",
        [layer_from_directory(lower)],
        credentials=CREDENTIALS,
        index_with=["arm64"],
    )
    convert(f"{registry.host}/multi:1", f"{registry.host}/multi:arm", "--platform", "linux/arm64")
    assert manifest_of(registry, "multi", "arm")["config"]["content"]["architecture"] == "arm64"
    refused = CliRunner().invoke(
        main,
        [
            "convert",
            "--source",
            f"{registry.host}/multi:1",
            "--target",
            f"{registry.host}/multi:x",
            "--source-insecure",
            "--target-insecure",
            "--platform",
            "linux/s390x",
        ],
    )
    assert refused.exit_code == 1 and "no manifest for platform linux/s390x" in refused.output


def test_prefetch_patterns_from_stdin_reach_the_bootstrap(
    tmp_path: Path, registry: Registry
) -> None:
    lower, _, _ = trees(tmp_path)
    push_image(registry.host, "pf", "1", [layer_from_directory(lower)], credentials=CREDENTIALS)
    args = ["convert", "--source", f"{registry.host}/pf:1", "--target", f"{registry.host}/pf:n"]
    args += ["--source-insecure", "--target-insecure", "--prefetch-patterns"]
    result = CliRunner().invoke(main, args, input="/etc/os-release\n\n/usr/lib\n")
    assert result.exit_code == 0, result.output
    bootstrap = bootstrap_of(registry, "pf", "n", tmp_path / "pf.boot")
    with open_image(bootstrap) as opened:
        etc = opened.lookup(opened.root_ino, b"etc")
        usr = opened.lookup(opened.root_ino, b"usr")
        assert etc is not None and usr is not None
        expected = [opened.lookup(etc, b"os-release"), opened.lookup(usr, b"lib")]
        assert opened.prefetch_table() == expected
    relative = CliRunner().invoke(main, args, input="etc\n")
    assert relative.exit_code == 1 and "not an absolute path" in relative.output


def test_bad_input_fails_in_one_line(tmp_path: Path, registry: Registry) -> None:
    def fails(*args: str) -> str:
        result = CliRunner().invoke(main, ["convert", *args])
        assert result.exit_code != 0 and "Traceback" not in result.output
        return result.output

    assert "not a valid repository name" in fails("--source", "A//b", "--target", "x/y")
    missing = fails(
        "--source",
        f"{registry.host}/nothing:1",
        "--target",
        f"{registry.host}/t:1",
        "--source-insecure",
        "--target-insecure",
    )
    assert "HTTP 404" in missing
    # Without --source-insecure a plain-HTTP registry is never used.
    assert "Error" in fails("--source", f"{registry.host}/app:1", "--target", "x/y:1")


def test_a_bootstrap_layer_round_trips_and_odd_ones_are_refused() -> None:
    layer = bootstrap_layer(b"bootstrap bytes")
    assert bootstrap_layer(b"bootstrap bytes") == layer  # deterministic digests
    assert extract_bootstrap(layer.data, "layer") == b"bootstrap bytes"
    assert layer.digest == digest_of(layer.data)
    for bad in (b"", b"not gzip", bootstrap_layer(b"x").data[:20]):
        with pytest.raises(NydusImageError):
            extract_bootstrap(bad, "layer")
