"""The OCI form of a nydus image, as nydusify writes it and nydus-snapshotter recognises it
(reference registry-and-dragonfly §3):

    manifest
      config      the source's image config, rootfs.diff_ids rewritten: the blob digests, then
                  the bootstrap layer's uncompressed (tar) digest; one history entry appended
      layers      one nydus blob per layer (mediaType ...nydus.blob.v1, annotation nydus-blob),
                  then the bootstrap layer, always last: a tar.gz holding image/image.boot
                  (annotations nydus-bootstrap and nydus-fs-version)

The manifest's family (OCI or Docker schema 2) follows the source's. Reading goes the other
way: `bootstrap_layer` finds the last layer of a manifest and checks it is a nydus bootstrap,
and `extract_bootstrap` takes image/image.boot out of it (or the legacy image.boot), refusing
anything oversized or odd, since the image comes from a registry and may be hostile.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

OCI_MANIFEST: Final = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX: Final = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG: Final = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP: Final = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST: Final = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST: Final = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG: Final = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP: Final = "application/vnd.docker.image.rootfs.diff.tar.gzip"
NYDUS_BLOB: Final = "application/vnd.oci.image.layer.nydus.blob.v1"

MANIFESTS: Final = (OCI_MANIFEST, DOCKER_MANIFEST)
INDEXES: Final = (OCI_INDEX, DOCKER_LIST)

ANNOTATION_BLOB: Final = "containerd.io/snapshot/nydus-blob"
ANNOTATION_BOOTSTRAP: Final = "containerd.io/snapshot/nydus-bootstrap"
ANNOTATION_FS_VERSION: Final = "containerd.io/snapshot/nydus-fs-version"

BOOTSTRAP_MEMBER: Final = "image/image.boot"
_LEGACY_BOOTSTRAP_MEMBER: Final = "image.boot"
MAX_BOOTSTRAP: Final = 512 << 20


class NydusImageError(ValueError):
    """A manifest or bootstrap layer that is not a well-formed nydus image."""


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: str
    size: int
    annotations: Mapping[str, str] | None = None

    def to_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "mediaType": self.media_type,
            "digest": self.digest,
            "size": self.size,
        }
        if self.annotations:
            document["annotations"] = dict(self.annotations)
        return document


@dataclass(frozen=True, slots=True)
class BootstrapLayer:
    data: bytes  # the tar.gz
    digest: str  # of the tar.gz
    diff_id: str  # of the tar inside


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def bootstrap_layer(bootstrap: bytes) -> BootstrapLayer:
    """The bootstrap layer's tar.gz: a directory `image` and `image/image.boot`, with fixed
    times, owners and gzip header, so the same bootstrap always gives the same digest."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo("image")
        directory.type = tarfile.DIRTYPE
        directory.mode = 0o755
        tar.addfile(directory)
        member = tarfile.TarInfo(BOOTSTRAP_MEMBER)
        member.mode = 0o444
        member.size = len(bootstrap)
        tar.addfile(member, io.BytesIO(bootstrap))
    plain = tar_bytes.getvalue()
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0) as gz:
        gz.write(plain)
    data = packed.getvalue()
    return BootstrapLayer(data, sha256_digest(data), sha256_digest(plain))


def nydus_config(source_config: Mapping[str, Any], diff_ids: Sequence[str]) -> bytes:
    """The source's image config with the nydus layers' diff_ids and a history entry."""
    config = dict(source_config)
    config["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    history = config.get("history")
    entries = list(history) if isinstance(history, list) else []
    entries.append({"created_by": "Nydus Converter", "comment": "Nydus Bootstrap Layer"})
    config["history"] = entries
    return json.dumps(config, separators=(",", ":")).encode()


def nydus_manifest(
    family: str, config: Descriptor, blobs: Sequence[Descriptor], bootstrap: Descriptor
) -> bytes:
    """The manifest (`family` OCI_MANIFEST or DOCKER_MANIFEST) of a nydus image."""
    document: dict[str, Any] = {"schemaVersion": 2, "mediaType": family}
    document["config"] = config.to_json()
    document["layers"] = [blob.to_json() for blob in blobs] + [bootstrap.to_json()]
    return json.dumps(document, separators=(",", ":")).encode()


def blob_descriptor(digest: str, size: int) -> Descriptor:
    return Descriptor(NYDUS_BLOB, digest, size, {ANNOTATION_BLOB: "true"})


def bootstrap_descriptor(family: str, layer: BootstrapLayer) -> Descriptor:
    media_type = OCI_LAYER_GZIP if family == OCI_MANIFEST else DOCKER_LAYER_GZIP
    annotations = {ANNOTATION_BOOTSTRAP: "true", ANNOTATION_FS_VERSION: "6"}
    return Descriptor(media_type, layer.digest, len(layer.data), annotations)


# --- Reading -----------------------------------------------------------------------------------


def parse_json(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise NydusImageError(f"{what}: not JSON: {e}") from None
    if not isinstance(document, dict):
        raise NydusImageError(f"{what}: not a JSON object")
    return document


def descriptors(manifest: Mapping[str, Any], key: str, what: str) -> list[Descriptor]:
    """The checked descriptors listed under `key` ("layers", "manifests")."""
    listed = manifest.get(key)
    if not isinstance(listed, list):
        raise NydusImageError(f"{what}: no {key} list")
    return [descriptor(entry, f"{what} {key}[{i}]") for i, entry in enumerate(listed)]


def descriptor(entry: object, what: str) -> Descriptor:
    if not isinstance(entry, dict):
        raise NydusImageError(f"{what}: not an object")
    media_type, digest, size = entry.get("mediaType"), entry.get("digest"), entry.get("size")
    annotations = entry.get("annotations") or {}
    if not isinstance(media_type, str) or not isinstance(digest, str):
        raise NydusImageError(f"{what}: mediaType and digest must be strings")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise NydusImageError(f"{what}: size must be a non-negative integer")
    if not isinstance(annotations, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()
    ):
        raise NydusImageError(f"{what}: annotations must map strings to strings")
    return Descriptor(media_type, digest, size, annotations)


def find_bootstrap_layer(manifest: Mapping[str, Any], what: str) -> Descriptor:
    """The manifest's bootstrap layer: its last, as nydus-snapshotter looks for it."""
    layers = descriptors(manifest, "layers", what)
    if not layers or (layers[-1].annotations or {}).get(ANNOTATION_BOOTSTRAP) != "true":
        raise NydusImageError(
            f"{what}: not a nydus image (its last layer has no {ANNOTATION_BOOTSTRAP} annotation)"
        )
    return layers[-1]


def extract_bootstrap(layer: bytes, what: str) -> bytes:
    """image/image.boot (or a legacy image.boot) from a bootstrap layer's tar.gz."""
    try:
        with (
            gzip.GzipFile(fileobj=io.BytesIO(layer)) as plain,
            tarfile.open(fileobj=plain, mode="r|") as tar,
        ):
            for member in tar:
                name = member.name.lstrip("./")
                if name not in (BOOTSTRAP_MEMBER, _LEGACY_BOOTSTRAP_MEMBER):
                    continue
                if not member.isreg() or member.size > MAX_BOOTSTRAP:
                    raise NydusImageError(f"{what}: {member.name} is not a plausible bootstrap")
                extracted = tar.extractfile(member)
                assert extracted is not None  # a regular file
                return extracted.read()
    except (tarfile.TarError, EOFError, OSError) as e:
        raise NydusImageError(f"{what}: not a readable tar.gz: {e}") from None
    raise NydusImageError(f"{what}: no {BOOTSTRAP_MEMBER} in the bootstrap layer")
