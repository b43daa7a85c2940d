"""The kata-config fragments: loaded as Kata loads its TOML, turned into the daemon's command
line as each Kata runtime builds it (reference §3.1-3.2), and used to run vhostfs."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.support.nydusd import Nydusd

FRAGMENTS = Path(__file__).resolve().parents[2] / "kata-config"
HYPERVISORS = {"qemu": "vhost-fs.sock", "clh": "virtiofsd.sock"}


def hypervisor_section(name: str) -> dict[str, Any]:
    with open(FRAGMENTS / f"configuration-{name}-nydus.toml", "rb") as f:
        section: dict[str, Any] = tomllib.load(f)["hypervisor"][name]
    return section


def go_runtime_argv(section: dict[str, Any], sandbox: Path, sock: str, debug: bool) -> list[str]:
    """nydusd.go: virtiofs --log-level L --apisock A --sock S, then virtio_fs_extra_args."""
    return [
        "virtiofs",
        "--log-level",
        "debug" if debug else "info",
        "--apisock",
        str(sandbox / "nydusd-api.sock"),
        "--sock",
        str(sandbox / sock),
        *section["virtio_fs_extra_args"],
    ]


def runtime_rs_argv(section: dict[str, Any]) -> list[str]:
    """share_virtio_fs_nydus.rs, rootless: bare socket names, the cwd set to the jail."""
    return [
        "virtiofs",
        "--hybrid-mode",
        "--log-level",
        "info",
        "--apisock",
        "nydusd-api.sock",
        "--sock",
        "virtiofsd.sock",
        *section["virtio_fs_extra_args"],
    ]


@pytest.mark.parametrize("name", sorted(HYPERVISORS))
def test_the_fragment_holds_the_keys_kata_reads(name: str) -> None:
    section = hypervisor_section(name)
    assert section["shared_fs"] == "virtio-fs-nydus"
    assert section["virtio_fs_daemon"] in section["valid_virtio_fs_daemon_paths"]
    assert Path(section["virtio_fs_daemon"]).name == "vhostfs"
    assert section["virtio_fs_extra_args"] == []
    assert section["virtio_fs_cache_size"] == 0
    assert section["virtio_fs_queue_size"] == 1024


@pytest.mark.parametrize("name", sorted(HYPERVISORS))
@pytest.mark.parametrize("runtime", ["go", "runtime-rs"])
def test_each_runtime_s_argv_runs_the_daemon(tmp_path: Path, name: str, runtime: str) -> None:
    section = hypervisor_section(name)
    shared = tmp_path / "shared"
    shared.mkdir()
    if runtime == "go":
        argv = go_runtime_argv(section, tmp_path, HYPERVISORS[name], debug=False)
    else:
        argv = runtime_rs_argv(section)
    daemon = Nydusd(argv, tmp_path, tmp_path / "nydusd-api.sock", tmp_path / "daemon.log")
    try:
        daemon.wait_running()
        body = {"fs_type": "passthrough_fs", "source": str(shared), "config": ""}
        response = daemon.api.post("/api/v1/mount?mountpoint=/containers", json=body)
        assert response.status_code == 204, response.text
        assert (
            tmp_path / HYPERVISORS[name] if runtime == "go" else tmp_path / "virtiofsd.sock"
        ).exists()
        assert "ignoring virtiofsd arguments" not in daemon.log()
        assert daemon.api.put("/api/v1/daemon/exit").status_code == 204
        assert daemon.process.wait(5) == 0
    finally:
        daemon.close()

