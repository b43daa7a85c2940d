"""Image references as docker spells them, and credentials from docker's config.json."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from vhostfs.storage.registry import RegistryError
from vhostfs.storage.registry.docker_config import docker_credentials
from vhostfs.storage.registry.reference import (
    ImageReference,
    ImageReferenceError,
    parse_reference,
)

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("python", ImageReference("docker.io", "library/python")),
        ("python:3.12", ImageReference("docker.io", "library/python", "3.12")),
        ("me/app:v1", ImageReference("docker.io", "me/app", "v1")),
        ("localhost:5000/app", ImageReference("localhost:5000", "app")),
        ("localhost/app:1", ImageReference("localhost", "app", "1")),
        ("r.example.com/a/b:c", ImageReference("r.example.com", "a/b", "c")),
        (f"127.0.0.1:5000/app@{DIGEST}", ImageReference("127.0.0.1:5000", "app", None, DIGEST)),
    ],
)
def test_references_parse_as_docker_reads_them(text: str, expected: ImageReference) -> None:
    assert parse_reference(text) == expected


def test_what_a_reference_asks_the_registry_for() -> None:
    assert parse_reference("python").api_host == "registry-1.docker.io"
    assert parse_reference("python").reference == "latest"
    assert parse_reference(f"h.io/a:1@{DIGEST}").reference == DIGEST
    assert str(parse_reference("h.io/a:1")) == "h.io/a:1"


@pytest.mark.parametrize(
    "text", ["", "A/b", "a//b", "h.io/a:b:c", "a@sha256:12", "h.io/../x", "a:" + "t" * 200]
)
def test_malformed_references_are_refused(text: str) -> None:
    with pytest.raises(ImageReferenceError):
        parse_reference(text)


def write_config(directory: Path, document: object) -> dict[str, str]:
    (directory / "config.json").write_text(json.dumps(document))
    return {"DOCKER_CONFIG": str(directory)}


def test_docker_config_credentials(tmp_path: Path) -> None:
    auth = base64.b64encode(b"u:p").decode()
    env = write_config(
        tmp_path,
        {
            "auths": {
                "reg.local:5000": {"auth": auth},
                "https://index.docker.io/v1/": {"username": "hub", "password": "pw"},
                "https://other.io/": {"auth": base64.b64encode(b"o:q").decode()},
            }
        },
    )
    assert docker_credentials("reg.local:5000", env).basic == auth
    assert docker_credentials("docker.io", env).basic == base64.b64encode(b"hub:pw").decode()
    assert docker_credentials("other.io", env).basic == base64.b64encode(b"o:q").decode()
    assert docker_credentials("unknown.io", env).basic is None
    assert docker_credentials("x", {"DOCKER_CONFIG": str(tmp_path / "none")}).basic is None


@pytest.mark.parametrize(
    "document", [[], {"auths": []}, {"auths": {"h": "x"}}, {"auths": {"h": {}}}]
)
def test_a_malformed_docker_config_is_a_clear_error(tmp_path: Path, document: object) -> None:
    with pytest.raises(RegistryError, match=r"config\.json"):
        docker_credentials("h", write_config(tmp_path, document))
