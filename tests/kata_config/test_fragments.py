"""The kata-config fragments: loaded as Kata loads its TOML, turned into the daemon's command
line as each Kata runtime builds it (reference §3.1-3.2), and used to run vhostfs."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from tests.support.nydusd import Nydusd, kata_go_argv, runtime_rs_argv

FRAGMENTS = Path(__file__).resolve().parents[2] / "kata-config"
HYPERVISORS = {"qemu": "vhost-fs.sock", "clh": "virtiofsd.sock"}


def hypervisor_section(name: str) -> dict[str, Any]:
    with open(FRAGMENTS / f"configuration-{name}-nydus.toml", "rb") as f:
        section: dict[str, Any] = tomllib.load(f)["hypervisor"][name]
    return section


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
        argv = kata_go_argv(tmp_path, HYPERVISORS[name], section["virtio_fs_extra_args"])
    else:
        argv = runtime_rs_argv(extra=section["virtio_fs_extra_args"])
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
