"""DaemonInfo as the API shows it: nydusd's fields, and never a credential."""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from typing import Any

from vhostfs.daemon.config import PassthroughMountConfig, RafsMountConfig
from vhostfs.daemon.controller import DaemonController
from vhostfs.daemon.events import MAX_ERRORS, ErrorEvents
from vhostfs.daemon.mount import PassthroughMount, RafsMount
from vhostfs.daemon.state import DaemonState
from vhostfs.daemon.table import MountedFs
from vhostfs.storage import parse_config

PASSWORD = "hunter2-very-secret"
TOKEN = "eyJ-registry-token-secret"


class DaemonView:
    """The two things the controller reads of a daemon for DaemonInfo."""

    def __init__(self, entries: list[MountedFs]) -> None:
        self.state = DaemonState.RUNNING
        self._entries = entries
        self.events = ErrorEvents()

    @property
    def mounts(self) -> Iterator[MountedFs]:
        return iter(self._entries)


def test_daemon_info_blanks_every_secret() -> None:
    auth = base64.b64encode(f"user:{PASSWORD}".encode()).decode()
    config = {
        "device": {
            "backend": {
                "type": "registry",
                "config": {
                    "host": "registry.local:5000",
                    "repo": "library/python",
                    "auth": auth,
                    "registry_token": TOKEN,
                },
            }
        },
        "mode": "direct",
    }
    rafs = RafsMountConfig("/images/boot", parse_config(json.dumps(config)))
    shared = PassthroughMountConfig("/run/shared")
    entries = [
        MountedFs("/rafs/c1/lowerdir", RafsMount(rafs), rafs, 1_700_000_000.0),
        MountedFs("/containers", PassthroughMount(shared), shared, 1_700_000_000.0),
    ]
    controller = DaemonController(DaemonView(entries))  # type: ignore[arg-type]

    info: dict[str, Any] = controller.daemon_info(with_backends=True)
    text = json.dumps(info)

    assert info["state"] == "RUNNING" and info["id"] is None and info["supervisor"] is None
    assert set(info["version"]) == {"package_ver", "git_commit", "build_time", "profile", "rustc"}
    collection = info["backend_collection"]
    assert collection["/containers"] == {
        "backend_type": "PassthroughFs",
        "mountpoint": "/containers",
        "mounted_time": "2023-11-14T22:13:20+00:00",
        "config": None,
    }
    shown = collection["/rafs/c1/lowerdir"]["config"]
    assert shown["backend"]["type"] == "registry"
    assert shown["backend"]["config"]["host"] == "registry.local:5000"
    assert PASSWORD not in text and TOKEN not in text and auth not in text


def test_error_events_are_bounded_and_counted() -> None:
    events = ErrorEvents()
    logger = logging.getLogger("vhostfs.test.events")
    logger.addHandler(events)
    logger.propagate = False
    try:
        logger.warning("not an error")
        for i in range(MAX_ERRORS + 10):
            logger.error("chunk %d failed", i)
        logger.error("bad %d format %d", 1)  # a broken log call is kept, not raised
    finally:
        logger.removeHandler(events)
    shown = events.snapshot()
    assert shown["total_errors"] == MAX_ERRORS + 11
    assert len(shown["errors"]) == MAX_ERRORS
    assert shown["errors"][-2] == f"vhostfs.test.events: chunk {MAX_ERRORS + 9} failed"
    assert "not an error" not in " ".join(shown["errors"])
