"""Image references as docker and nydusify spell them: `[host[:port]/]repo[:tag][@digest]`.

A first component is a host only when it looks like one (it has a `.` or a `:`, or is
`localhost`); otherwise the image is on Docker Hub, whose one-word repositories live under
`library/` and whose API is at registry-1.docker.io. Everything is checked against the
distribution spec's grammar, since the parts become URL paths.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

DOCKER_HUB: Final = "docker.io"
DOCKER_HUB_API: Final = "registry-1.docker.io"

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_REPO = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_HOST = re.compile(r"[A-Za-z0-9.-]+(?::[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](?::[0-9]{1,5})?")


class ImageReferenceError(ValueError):
    """Not an image reference."""


@dataclass(frozen=True, slots=True)
class ImageReference:
    host: str  # as written (docker.io for Docker Hub)
    repo: str
    tag: str | None = None
    digest: str | None = None

    @property
    def api_host(self) -> str:
        """Where the registry API answers."""
        return DOCKER_HUB_API if self.host == DOCKER_HUB else self.host

    @property
    def reference(self) -> str:
        """What goes after /manifests/: the digest if there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.host}/{self.repo}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(text: str) -> ImageReference:
    rest, digest = text, None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise ImageReferenceError(f"{text!r}: {digest!r} is not a sha256 digest")
    first, _, remainder = rest.partition("/")
    if remainder and ("." in first or ":" in first or first == "localhost"):
        host, path = first, remainder
        if not _HOST.fullmatch(host):
            raise ImageReferenceError(f"{text!r}: {host!r} is not a host[:port]")
    else:
        host, path = DOCKER_HUB, rest
    tag = None
    name, colon, maybe_tag = path.rpartition(":")
    if colon:
        path, tag = name, maybe_tag
        if not _TAG.fullmatch(tag):
            raise ImageReferenceError(f"{text!r}: {tag!r} is not a valid tag")
    if host == DOCKER_HUB and "/" not in path:
        path = f"library/{path}"
    if not _REPO.fullmatch(path):
        raise ImageReferenceError(f"{text!r}: {path!r} is not a valid repository name")
    return ImageReference(host, path, tag, digest)
