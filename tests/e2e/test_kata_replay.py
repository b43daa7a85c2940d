"""Kata Containers' use of nydusd, replayed against `vhostfs virtiofs` with a real guest.

The host side does what Kata's runtimes do (reference §3.1-3.2): start the daemon with their
argv, wait on GET /api/v1/daemon for RUNNING, mount the sandbox's shared directory at
/containers and a container image at /rafs/<cid>/lowerdir through the API, with the v1
config nydus-snapshotter writes. The guest does what the agent does: mount tag kataShared at
/run/kata-containers/shared and build the container's rootfs as an overlay of the RAFS
lowerdir and an upper dir on the shared directory (index=off). It then runs python3 in it,
writes, deletes, renames and replaces a directory, while the host adds a second container and
removes the first one's image mount. At the end the host's upper dir must hold exactly what
overlayfs writes, and SIGTERM must end the daemon within Kata's 5 seconds.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.nydusd import Nydusd, kata_go_argv, runtime_rs_argv
from tests.support.rootfs import debian_rootfs
from tests.support.vm import (
    GuestResult,
    assert_directories_without_handles,
    ensure_guest_built,
    require_qemu,
    run_guest,
    short_tempdir,
)

pytestmark = pytest.mark.guest

SHARED = "/run/kata-containers/shared"
GUEST_SCRIPT = rf"""
set -e
S={SHARED}
mkdir -p $S
mount -t virtiofs kataShared $S
C=$S/containers/c1
R=$C/rootfs
mkdir -p $R
O=upperdir=$C/snapshotdir/fs,workdir=$C/snapshotdir/work
mount -t overlay overlay -o $O,lowerdir=$S/rafs/c1/lowerdir,index=off $R
chroot $R /usr/bin/python3 -c 'import json, email, http.client; print("python ok")'
echo new > $R/etc/vhostfs-new
rm $R/etc/debian_version
mv $R/etc/hostname $R/etc/hostname.moved
rm -rf $R/usr/share/doc
mkdir $R/usr/share/doc
echo only > $R/usr/share/doc/only
sync
wait_for() {{ i=0; while [ ! -e "$1" ]; do sleep 0.2; i=$((i+1)); [ $i -lt 300 ] || exit 3; done; }}
touch $S/containers/step1
wait_for $S/rafs/c2/lowerdir/usr/bin/python3
echo "c2 ok"
touch $S/containers/step2
wait_for $S/containers/step2-done
echo still > $S/containers/after-umount
cat $S/containers/after-umount
ls $S/rafs
sync
"""


def snapshotter_config(blob_dir: Path, cache_dir: Path) -> str:
    """The v1 config nydus-snapshotter hands Kata, with a localfs backend for the test."""
    return json.dumps(
        {
            "device": {
                "backend": {"type": "localfs", "config": {"dir": str(blob_dir)}},
                "cache": {"type": "blobcache", "config": {"work_dir": str(cache_dir)}},
            },
            "mode": "direct",
            "digest_validate": False,
            "iostats_files": False,
            "enable_xattr": True,
            "fs_prefetch": {"enable": False, "threads_count": 8, "merging_size": 1048576},
        }
    )


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    require_qemu()
    ensure_guest_built()
    rootfs = debian_rootfs()
    out = tmp_path_factory.mktemp("kata-image")
    subprocess.run(
        [sys.executable, "-m", "vhostfs", "build", str(rootfs), "-o", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out / "bootstrap", out


def go_argv(sandbox: Path) -> list[str]:
    return kata_go_argv(sandbox, "vhost-fs.sock")


def rs_argv(sandbox: Path) -> list[str]:
    return runtime_rs_argv("vhost-fs.sock")


def wait_for(
    path: Path, done: threading.Event, result: list[GuestResult], timeout: float = 300
) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if done.is_set():
            shown = (result[0].output + result[0].console[-3000:]) if result else "no result"
            raise AssertionError(f"the guest ended before {path.name}:\n{shown}")
        assert time.monotonic() < deadline, f"no {path}"
        time.sleep(0.1)


@pytest.mark.parametrize("argv", [go_argv, rs_argv], ids=["kata-go", "runtime-rs"])
def test_kata_replay(image: tuple[Path, Path], argv: Callable[[Path], list[str]]) -> None:
    bootstrap, blob_dir = image
    with short_tempdir() as sandbox:
        shared = sandbox / "shared"
        snapshot = shared / "c1" / "snapshotdir"
        (snapshot / "fs").mkdir(parents=True)
        (snapshot / "work").mkdir()
        daemon = Nydusd(argv(sandbox), sandbox, sandbox / "nydusd-api.sock", sandbox / "log")
        try:
            assert daemon.wait_running()["state"] == "RUNNING"
            api = daemon.api
            body = {"fs_type": "passthrough_fs", "source": str(shared), "config": ""}
            assert api.post("/api/v1/mount?mountpoint=/containers", json=body).status_code == 204

            def rafs(cid: str) -> dict[str, str]:
                config = snapshotter_config(blob_dir, sandbox / f"cache-{cid}")
                return {"fs_type": "rafs", "source": str(bootstrap), "config": config}

            made = api.post("/api/v1/mount?mountpoint=/rafs/c1/lowerdir", json=rafs("c1"))
            assert made.status_code == 204, made.text

            result: list[GuestResult] = []
            done = threading.Event()

            def guest() -> None:
                try:
                    result.append(
                        run_guest(
                            sandbox / "vhost-fs.sock",
                            GUEST_SCRIPT,
                            tag="kataShared",
                            mount=None,
                            timeout=900,
                        )
                    )
                finally:
                    done.set()

            thread = threading.Thread(target=guest)
            thread.start()
            wait_for(shared / "step1", done, result)
            # A second container while the first runs; Kata Go sends the mountpoint raw.
            made = api.post("/api/v1/mount?mountpoint=/rafs/c2/lowerdir", json=rafs("c2"))
            assert made.status_code == 204, made.text
            wait_for(shared / "step2", done, result)
            # runtime-rs percent-encodes it; DELETE carries no body.
            gone = api.delete("/api/v1/mount?mountpoint=%2Frafs%2Fc1%2Flowerdir")
            assert gone.status_code == 204, gone.text
            collection = api.get("/api/v1/daemon").json()["backend_collection"]
            assert sorted(collection) == ["/containers", "/rafs/c2/lowerdir"]
            (shared / "step2-done").touch()
            thread.join(900)
            assert result and result[0].status == 0, (result, daemon.log())
            output = result[0].output
            assert "python ok" in output and "c2 ok" in output and "still" in output

            upper = snapshot / "fs"
            assert (upper / "etc" / "vhostfs-new").read_text() == "new\n"
            for whiteout in (upper / "etc" / "debian_version", upper / "etc" / "hostname"):
                st = os.lstat(whiteout)
                assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0, whiteout
            assert (upper / "etc" / "hostname.moved").exists()
            doc = upper / "usr" / "share" / "doc"
            assert os.getxattr(doc, "trusted.overlay.opaque") == b"y"
            assert sorted(os.listdir(doc)) == ["only"]

            daemon.process.terminate()
            assert daemon.process.wait(5) == 0, daemon.log()
            fops = assert_directories_without_handles(daemon.log())
            print(f"\nrequests: {fops}")
        finally:
            daemon.close()
