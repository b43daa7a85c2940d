"""`vhostfs serve --image REF`: from an image reference to a mount, with the bootstrap fetched
from the registry and the data read lazily from it (exercised here by prefetching it all)."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.cli.test_serve import exit_metrics, serve, wait_for_line
from tests.support.frontend import Frontend
from tests.support.guest import GuestMemory
from tests.support.oci import layer_from_directory, push_image
from tests.support.registry import running_registry
from tests.support.vm import listening_daemon
from vhostfs.cli import main
from vhostfs.storage.registry import Credentials


def test_an_image_reference_is_served_from_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    tree = tmp_path / "tree"
    (tree / "bin").mkdir(parents=True)
    (tree / "bin" / "tool").write_bytes(os.urandom(2 << 20))
    docker = tmp_path / "docker"
    docker.mkdir()
    with running_registry(tmp_path / "registry", htpasswd={"fay": "pw"}) as registry:
        auth = base64.b64encode(b"fay:pw").decode()
        (docker / "config.json").write_text(json.dumps({"auths": {registry.host: {"auth": auth}}}))
        monkeypatch.setenv("DOCKER_CONFIG", str(docker))
        push_image(
            registry.host,
            "tool",
            "1",
            [layer_from_directory(tree)],
            credentials=Credentials.from_user("fay", "pw"),
        )
        image = f"{registry.host}/tool:nydus"
        converted = CliRunner().invoke(
            main,
            [
                "convert",
                "--source",
                f"{registry.host}/tool:1",
                "--target",
                image,
                "--source-insecure",
                "--target-insecure",
            ],
        )
        assert converted.exit_code == 0, converted.output

        listing = tmp_path / "prefetch"
        listing.write_text("/bin/tool\n")
        sock = tmp_path / "s.sock"
        argv = [sys.executable, "-m", "vhostfs", "serve", "--socket", str(sock)]
        argv += ["--image", image, "--insecure", "--cache-dir", str(tmp_path / "cache")]
        argv += ["--prefetch-files", str(listing)]
        env = {**os.environ, "DOCKER_CONFIG": str(docker)}
        with (
            listening_daemon(argv, sock, log_path=tmp_path / "log", env=env) as daemon,
            GuestMemory() as mem,
        ):
            frontend = Frontend(sock, mem)
            frontend.init()
            frontend.start()
            wait_for_line(daemon, "prefetch done:")
            frontend.close()
            assert daemon.process.wait(10) == 0
            log = daemon.log()
    metrics = exit_metrics(log)
    assert metrics["prefetch_bytes"] == metrics["backend_bytes"] > 0
    assert metrics["chunk_errors"] == 0
    assert auth not in log  # the credential never reaches the log
    boots = list((tmp_path / "cache").glob("*.boot"))
    assert len(boots) == 1  # the bootstrap, kept by manifest digest


def test_a_bad_reference_or_an_image_that_is_not_nydus_fails_before_listening(
    tmp_path: Path,
) -> None:
    sock = tmp_path / "s"
    result = serve("--socket", str(sock), "--image", "Not//A/Ref")
    assert result.returncode == 1 and "not a valid repository name" in result.stderr
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "f").write_text("x")
    with running_registry(tmp_path / "registry") as registry:
        push_image(registry.host, "plain", "1", [layer_from_directory(tree)])
        result = serve("--socket", str(sock), "--image", f"{registry.host}/plain:1", "--insecure")
    assert result.returncode == 1 and "not a nydus image" in result.stderr
    assert "Traceback" not in result.stderr and not sock.exists()
