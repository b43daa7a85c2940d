"""A real guest runs python3 from a nydus image that `vhostfs convert` made from an OCI image of
the cached Debian rootfs, served by `vhostfs serve --image` straight from a local registry
(htpasswd auth, credentials in docker's config.json): every file's checksum must equal the
source's, and `python3 -V` must fetch only a small part of the image."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_rafs_guest import CHECKSUM_SCRIPT, parse_sha256sum, source_checksums
from tests.support.oci import push_image, tar_layer_file
from tests.support.registry import Registry, running_registry
from tests.support.rootfs import debian_rootfs
from tests.support.vm import (
    DaemonProcess,
    ensure_guest_built,
    listening_daemon,
    require_qemu,
    run_guest,
    short_tempdir,
)
from vhostfs.storage.registry import Credentials

pytestmark = pytest.mark.guest

LAZY_FRACTION_BOUND = 0.15  # the target for python3 -V
USER, PASSWORD = "guest", "lazy-pull"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    directory = tmp_path_factory.mktemp("registry")
    with running_registry(directory, htpasswd={USER: PASSWORD}) as registry:
        yield registry


@pytest.fixture(scope="module")
def docker_env(tmp_path_factory: pytest.TempPathFactory, registry: Registry) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("docker")
    auth = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
    (directory / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
    return {**os.environ, "DOCKER_CONFIG": str(directory)}


@pytest.fixture(scope="module")
def image(
    tmp_path_factory: pytest.TempPathFactory, registry: Registry, docker_env: dict[str, str]
) -> tuple[Path, str, int]:
    """(the source rootfs, the nydus image's reference, its blobs' total size)."""
    require_qemu()
    ensure_guest_built()
    rootfs = debian_rootfs()
    layer = tar_layer_file(rootfs, tmp_path_factory.mktemp("layer") / "rootfs.tar")
    credentials = Credentials.from_user(USER, PASSWORD)
    push_image(registry.host, "debian", "bookworm", [layer], credentials=credentials)
    layer.unlink()
    target = f"{registry.host}/debian:bookworm-nydus"
    argv = [sys.executable, "-m", "vhostfs", "convert", "--target", target, "--target-insecure"]
    argv += ["--source", f"{registry.host}/debian:bookworm", "--source-insecure"]
    converted = subprocess.run(
        argv,
        env=docker_env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert converted.returncode == 0, converted.stderr
    counted = re.search(r"nydus blobs: \d+, (\d+) bytes", converted.stdout)
    assert counted is not None, converted.stdout
    blob_bytes = int(counted.group(1))
    return rootfs, target, blob_bytes


@contextlib.contextmanager
def serving(reference: str, env: dict[str, str], cache: Path) -> Iterator[DaemonProcess]:
    with short_tempdir() as tmp:
        sock = tmp / "vhostfs.sock"
        argv = [sys.executable, "-m", "vhostfs", "serve", "--socket", str(sock)]
        argv += ["--image", reference, "--insecure", "--cache-dir", str(cache)]
        with listening_daemon(argv, sock, log_path=tmp / "daemon.log", env=env) as daemon:
            yield daemon


def exit_metrics(daemon: DaemonProcess) -> dict[str, int]:
    assert daemon.process.wait(10) == 0, daemon.log()
    lines = [line for line in daemon.log().splitlines() if " metrics {" in line]
    assert lines, daemon.log()
    metrics = json.loads(lines[-1].split(" metrics ", 1)[1])
    return {k: v for k, v in metrics.items() if isinstance(v, int)}


def test_python_runs_from_the_registry_and_every_file_matches(
    image: tuple[Path, str, int], docker_env: dict[str, str], tmp_path: Path
) -> None:
    rootfs, reference, _ = image
    with serving(reference, docker_env, tmp_path / "cache") as daemon:
        result = run_guest(
            socket=daemon.socket_path,
            script="chroot /mnt /usr/bin/python3 -c 'import json, email, http.client; "
            'print("imports ok")\'\n' + CHECKSUM_SCRIPT,
            timeout=1200,
        )
        result.check()
        metrics = exit_metrics(daemon)
    assert result.output.splitlines()[0] == "imports ok"
    assert parse_sha256sum(result.output) == source_checksums(rootfs)
    assert metrics["chunk_errors"] == 0


def test_python_version_fetches_a_small_part_of_the_image(
    image: tuple[Path, str, int], docker_env: dict[str, str], tmp_path: Path
) -> None:
    _, reference, blob_bytes = image
    with serving(reference, docker_env, tmp_path / "cache") as daemon:
        result = run_guest(
            socket=daemon.socket_path, command="chroot /mnt /usr/bin/python3 -V", timeout=600
        )
        result.check()
        metrics = exit_metrics(daemon)
    assert result.output.startswith("Python 3.11")
    fraction = metrics["backend_bytes"] / blob_bytes
    print(
        f"python3 -V fetched {metrics['backend_bytes']} of {blob_bytes} blob bytes from the "
        f"registry ({fraction:.1%}) in {metrics['backend_requests']} range requests"
    )
    assert 0 < fraction < LAZY_FRACTION_BOUND
