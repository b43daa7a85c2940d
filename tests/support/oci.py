"""Plain OCI images for the conversion tests: layers tarred from directories, pushed to a test
registry with the registry client, as `docker push` would leave them."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vhostfs.storage.registry import Credentials, RegistryClient, RegistryOptions

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_TAR_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def file_digest(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as f:
        while piece := f.read(1 << 20):
            hasher.update(piece)
    return "sha256:" + hasher.hexdigest()


def tar_layer_file(directory: Path, out: Path) -> Path:
    """An uncompressed tar layer of the tree under `directory`, for big trees (a rootfs)."""
    with tarfile.open(out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
    return out


def layer_from_directory(directory: Path, whiteouts: Sequence[str] = ()) -> bytes:
    """A tar.gz of the tree under `directory`, plus a `.wh.` entry for each path in
    `whiteouts` (deleting it from the layers below)."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for path in sorted(directory.rglob("*")):
            tar.add(path, arcname=str(path.relative_to(directory)), recursive=False)
        for deleted in whiteouts:
            parent, _, name = deleted.rpartition("/")
            member = tarfile.TarInfo(f"{parent}/.wh.{name}" if parent else f".wh.{name}")
            tar.addfile(member, io.BytesIO(b""))
    packed = io.BytesIO()
    with gzip.GzipFile(fileobj=packed, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return packed.getvalue()


@dataclass(frozen=True)
class PushedImage:
    manifest_digest: str
    layer_digests: tuple[str, ...]


def push_image(
    host: str,
    repo: str,
    tag: str,
    layers: Sequence[bytes | Path],
    *,
    credentials: Credentials | None = None,
    architecture: str = "amd64",
    index_with: Sequence[str] = (),
) -> PushedImage:
    """Push an OCI image of these layers (tar.gz bytes, or tar or .tar.gz files) under
    `tag`. With `index_with` (other architectures), `tag` names an index of one manifest per
    architecture, all with the same layers, each config saying its architecture."""

    async def go() -> PushedImage:
        options = RegistryOptions(
            host, repo, scheme="http", credentials=credentials or Credentials()
        )
        async with RegistryClient(options) as client:
            for layer in layers:
                if isinstance(layer, Path):
                    await client.push_blob_file(file_digest(layer), layer)
                else:
                    await client.push_blob(digest_of(layer), layer)
            entries = []
            for arch in (architecture, *index_with):
                manifest = await _push_manifest(client, layers, arch)
                entries.append((arch, manifest))
            if not index_with:
                _, body = entries[0]
                digest = await client.put_manifest(tag, body, OCI_MANIFEST)
            else:
                for _, body in entries:
                    await client.put_manifest(digest_of(body), body, OCI_MANIFEST)
                index = {
                    "schemaVersion": 2,
                    "mediaType": OCI_INDEX,
                    "manifests": [
                        {
                            "mediaType": OCI_MANIFEST,
                            "digest": digest_of(body),
                            "size": len(body),
                            "platform": {"os": "linux", "architecture": arch},
                        }
                        for arch, body in entries
                    ],
                }
                digest = await client.put_manifest(tag, json.dumps(index).encode(), OCI_INDEX)
            return PushedImage(digest, tuple(str(_descriptor(layer)["digest"]) for layer in layers))

    return asyncio.run(go())


def _descriptor(layer: bytes | Path) -> dict[str, object]:
    if isinstance(layer, Path):
        return {
            "mediaType": OCI_LAYER if layer.suffix == ".gz" else OCI_TAR_LAYER,
            "digest": file_digest(layer),
            "size": layer.stat().st_size,
        }
    return {"mediaType": OCI_LAYER, "digest": digest_of(layer), "size": len(layer)}


def _diff_id(layer: bytes | Path) -> str:
    if not isinstance(layer, Path):
        return digest_of(gzip.decompress(layer))
    if layer.suffix != ".gz":
        return file_digest(layer)
    hasher = hashlib.sha256()
    with gzip.open(layer, "rb") as plain:
        while piece := plain.read(1 << 20):
            hasher.update(piece)
    return "sha256:" + hasher.hexdigest()


async def _push_manifest(
    client: RegistryClient, layers: Sequence[bytes | Path], arch: str
) -> bytes:
    diff_ids = [_diff_id(layer) for layer in layers]
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/bin/sh"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
            "history": [{"created_by": f"layer {i}"} for i in range(len(layers))],
        }
    ).encode()
    await client.push_blob(digest_of(config), config)
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": digest_of(config), "size": len(config)},
        "layers": [_descriptor(layer) for layer in layers],
    }
    return json.dumps(manifest).encode()
