"""nydusd's credential hot reload: PUT /api/v1/config {"registry_auth": ...} on a RAFS mount
whose blobs are in a real registry, as the controller answers it."""

from __future__ import annotations

import asyncio
import base64
import json
from pathlib import Path
from typing import Any

import pytest

from tests.storage.test_registry_backend import push_blob
from tests.support.registry import running_registry
from vhostfs.api import ApiError
from vhostfs.daemon.config import RafsMountConfig
from vhostfs.daemon.controller import DaemonController
from vhostfs.daemon.state import DaemonState
from vhostfs.daemon.table import MountTable
from vhostfs.rafs.build import build_image
from vhostfs.storage import parse_config
from vhostfs.storage.registry import Credentials

REPO = "vhostfs/test"
GOOD = base64.b64encode(b"erin:right").decode()
WRONG = base64.b64encode(b"erin:wrong").decode()


class DaemonView:
    def __init__(self, mounts: MountTable) -> None:
        self.mounts = mounts
        self.state = DaemonState.RUNNING


def test_registry_auth_is_reloaded_without_remounting(tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    (tree / "file").write_bytes(b"fetched lazily " * 1000)
    built = build_image([tree], tmp_path / "image")
    assert built.blob is not None
    with running_registry(tmp_path / "registry", htpasswd={"erin": "right"}) as registry:
        push_blob(registry, built.blob.path, Credentials.from_user("erin", "right"))
        built.blob.path.unlink()
        backend: dict[str, Any] = {"scheme": "http", "host": registry.host, "repo": REPO}
        document = {
            "device": {"backend": {"type": "registry", "config": {**backend, "auth": WRONG}}},
            "mode": "direct",
        }
        mount = RafsMountConfig(str(built.bootstrap), parse_config(json.dumps(document)))

        async def scenario() -> None:
            table = MountTable(pseudo_root=True)
            await table.add("/rafs/c1/lowerdir", mount)
            controller = DaemonController(DaemonView(table))  # type: ignore[arg-type]
            entry = table.get("/rafs/c1/lowerdir")
            assert entry is not None
            storage = entry.mount.storage  # type: ignore[attr-defined]
            image = entry.mount.image  # type: ignore[attr-defined]
            ino = image.lookup(image.root_ino, b"file")
            chunks = image.chunks(ino, 0, 15000)

            with pytest.raises(Exception, match="401"):
                await storage.read(chunks, 0, 15000)
            assert controller.runtime_config("/rafs/c1/lowerdir") == {"registry_auth": ""}
            with pytest.raises(ApiError) as bad:
                controller.set_runtime_config("/rafs/c1/lowerdir", {"registry_auth": "***"})
            assert bad.value.status == 400
            with pytest.raises(ApiError) as unknown:
                controller.set_runtime_config(None, {"bandwidth": "1"})
            assert unknown.value.status == 400

            controller.set_runtime_config("/rafs/c1/lowerdir", {"registry_auth": GOOD})
            segments = await storage.read(chunks, 0, 15000)
            assert sum(len(s) if isinstance(s, bytes) else s.size for s in segments) == 15000
            await table.aclose()

        asyncio.run(scenario())
