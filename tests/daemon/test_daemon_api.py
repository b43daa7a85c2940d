"""The daemon behind its API with a front-end attached: metrics after real reads, and a remount."""

from __future__ import annotations

import errno
import json
from pathlib import Path

from tests.support import fuse_client as fc
from tests.support.frontend import Frontend
from tests.support.guest import GuestMemory
from tests.support.nydusd import Nydusd
from tests.support.paths import NYDUS_FIXTURES
from vhostfs.daemon.metrics import FOPS

V6 = NYDUS_FIXTURES / "v6" / "rafs-v6-2.2.boot"
QUEUE = 1
MOUNTPOINT = "/rafs/c1/lowerdir"


def config(cache: Path) -> str:
    return json.dumps(
        {
            "device": {
                "backend": {"type": "localfs", "config": {"dir": str(V6.parent)}},
                "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}},
            },
            "mode": "direct",
            "digest_validate": True,
        }
    )


def open_lib_rs(frontend: Frontend) -> tuple[int, int]:
    """FUSE up, then /rafs/c1/lowerdir/lib.rs looked up and opened: (node, fh)."""
    frontend.init()
    frontend.start()
    assert fc.parse_out_header(frontend.request(QUEUE, fc.init(), 16 + 64)).error == 0
    node = 1
    for name in (b"rafs", b"c1", b"lowerdir", b"lib.rs"):
        reply = frontend.request(QUEUE, fc.lookup(node, name), 16 + 128)
        node = fc.parse_entry_out(reply[16:]).nodeid
    fh = fc.parse_open_out(frontend.request(QUEUE, fc.open_(node), 16 + 16)[16:])[0]
    return node, fh


def read_lib_rs(frontend: Frontend) -> int:
    """Look up and read /rafs/c1/lowerdir/lib.rs in 4 KiB requests, plus one stale getattr."""
    node, fh = open_lib_rs(frontend)
    reads = 0
    for offset in range(0, 16931, 4096):
        assert len(frontend.request(QUEUE, fc.read(node, fh, offset, 4096), 16 + 4096)) > 16
        reads += 1
    stale = frontend.request(QUEUE, fc.getattr_(1 << 56 | 99), 16 + 104)
    assert fc.parse_out_header(stale).error != 0
    return reads


def test_metrics_after_real_reads(tmp_path: Path) -> None:
    argv = ["virtiofs", "--apisock", str(tmp_path / "api.sock"), "--sock", str(tmp_path / "s")]
    daemon = Nydusd(argv, tmp_path, tmp_path / "api.sock", tmp_path / "daemon.log")
    try:
        daemon.wait_running()
        body = {"fs_type": "rafs", "source": str(V6), "config": config(tmp_path / "cache")}
        made = daemon.api.post(f"/api/v1/mount?mountpoint={MOUNTPOINT}", json=body)
        assert made.status_code == 204
        # The daemon ends when its front-end leaves, as nydusd does: ask while it is there.
        with GuestMemory(((0x10_0000, 8 << 20),)) as mem:
            frontend = Frontend(tmp_path / "s", mem)
            try:
                reads = read_lib_rs(frontend)
                check_metrics(daemon, reads, tmp_path)
            finally:
                frontend.close()
    finally:
        daemon.close()


def check_metrics(daemon: Nydusd, reads: int, tmp_path: Path) -> None:
    fs = daemon.api.get("/api/v1/metrics", params={"id": MOUNTPOINT}).json()
    assert fs["id"] == MOUNTPOINT and fs["data_read"] == 16931
    assert fs["fop_hits"][FOPS.index("READ")] == reads
    assert fs["fop_hits"][FOPS.index("LOOKUP")] == 4
    assert fs["fop_errors"][FOPS.index("GETATTR")] == 1
    # Four 4 KiB reads in nydusd's "4K.." class, the 547-byte tail in "< 1K".
    assert fs["block_count_read"] == [1, 0, reads - 1, 0, 0, 0, 0, 0]
    assert sum(fs["read_latency_dist"]) == reads
    assert fs["measure_latency"] is False and fs["fop_cumulative_latency_total"] == [0] * 15

    backend = daemon.api.get("/api/v1/metrics/backend").json()  # no id: the first mount
    assert backend["backend_type"] == "localfs" and backend["read_count"] >= 1
    assert backend["read_errors"] == 0 and backend["read_amount_total"] > 0
    cache = daemon.api.get("/api/v1/metrics/blobcache", params={"id": MOUNTPOINT}).json()
    assert cache["store_path"] == str(tmp_path / "cache")
    assert cache["total"] >= cache["whole_hits"] and cache["total"] > 0

    for missing in ("/api/v1/metrics/files", "/api/v1/metrics/pattern"):
        assert daemon.api.get(missing).status_code == 404
    assert daemon.api.get("/api/v1/metrics", params={"id": "/nope"}).status_code == 404

    text = daemon.api.get("/metrics").text
    assert 'vhostfs_fuse_requests_total{opcode="READ"} ' + str(reads) in text
    assert f'vhostfs_read_bytes_total{{mountpoint="{MOUNTPOINT}"}} 16931' in text


def test_remount_swaps_the_image_under_a_running_guest(tmp_path: Path) -> None:
    v5 = NYDUS_FIXTURES / "v5" / "sha256-nocompress-repeatable"
    argv = ["virtiofs", "--apisock", str(tmp_path / "api.sock"), "--sock", str(tmp_path / "s")]
    daemon = Nydusd(argv, tmp_path, tmp_path / "api.sock", tmp_path / "daemon.log")

    def names(frontend: Frontend) -> list[bytes]:
        node = 1
        for name in (b"rafs", b"c1", b"lowerdir"):
            reply = frontend.request(QUEUE, fc.lookup(node, name), 16 + 128)
            node = fc.parse_entry_out(reply[16:]).nodeid
        # The session reads directories without handles: OPENDIR is ENOSYS, READDIR has fh 0.
        opened = frontend.request(QUEUE, fc.opendir(node), 16 + 16)
        assert fc.parse_out_header(opened).error == -errno.ENOSYS
        listing = frontend.request(QUEUE, fc.readdir(node, 0), 16 + 4096)[16:]
        return sorted(d.name for d in fc.parse_dirents(listing) if d.name not in (b".", b".."))

    try:
        daemon.wait_running()
        body = {"fs_type": "rafs", "source": str(V6), "config": config(tmp_path / "cache")}
        made = daemon.api.post(f"/api/v1/mount?mountpoint={MOUNTPOINT}", json=body)
        assert made.status_code == 204
        with GuestMemory(((0x10_0000, 8 << 20),)) as mem:
            frontend = Frontend(tmp_path / "s", mem)
            try:
                frontend.init()
                frontend.start()
                assert fc.parse_out_header(frontend.request(QUEUE, fc.init(), 16 + 64)).error == 0
                assert names(frontend) == [b"lib.rs", b"sync_io.rs"]

                bad = {"fs_type": "rafs", "source": str(tmp_path / "missing"), "config": "{}"}
                refused = daemon.api.put(f"/api/v1/mount?mountpoint={MOUNTPOINT}", json=bad)
                assert refused.status_code == 500
                assert names(frontend) == [b"lib.rs", b"sync_io.rs"], "a bad remount keeps the old"

                swap = {"fs_type": "rafs", "source": str(v5), "config": config(tmp_path / "c5")}
                swap["config"] = swap["config"].replace(str(V6.parent), str(v5.parent))
                swapped = daemon.api.put(f"/api/v1/mount?mountpoint={MOUNTPOINT}", json=swap)
                assert swapped.status_code == 204, swapped.text
                assert names(frontend) == [b"hardlink-test", b"normal-file-test", b"symlink-test"]
            finally:
                frontend.close()
    finally:
        daemon.close()


def test_what_the_ring_answers_stops_when_the_image_is_unmounted(tmp_path: Path) -> None:
    argv = ["virtiofs", "--apisock", str(tmp_path / "api.sock"), "--sock", str(tmp_path / "s")]
    daemon = Nydusd(argv, tmp_path, tmp_path / "api.sock", tmp_path / "daemon.log")
    try:
        daemon.wait_running()
        body = {"fs_type": "rafs", "source": str(V6), "config": config(tmp_path / "cache")}
        assert daemon.api.post(f"/api/v1/mount?mountpoint={MOUNTPOINT}", json=body).is_success
        with GuestMemory(((0x10_0000, 8 << 20),)) as mem:
            frontend = Frontend(tmp_path / "s", mem)
            try:
                node, fh = open_lib_rs(frontend)
                first = frontend.request(QUEUE, fc.read(node, fh, 0, 4096), 16 + 4096)
                again = frontend.request(QUEUE, fc.read(node, fh, 0, 4096), 16 + 4096)
                assert first[16:] == again[16:] and len(first) == 16 + 4096
                fops = daemon.api.get("/api/v1/metrics", params={"id": MOUNTPOINT}).json()
                assert fops["data_read"] == 2 * 4096  # the ring's answer counted too

                for _ in range(2):  # the second is the ring's to answer
                    attr = frontend.request(QUEUE, fc.getattr_(node), 16 + 104)
                    assert fc.parse_out_header(attr).error == 0

                assert daemon.api.delete(f"/api/v1/mount?mountpoint={MOUNTPOINT}").is_success
                stale = frontend.request(QUEUE, fc.read(node, fh, 0, 4096), 16 + 4096)
                assert fc.parse_out_header(stale).error == -errno.ESTALE
                stale = frontend.request(QUEUE, fc.getattr_(node), 16 + 104)
                assert fc.parse_out_header(stale).error == -errno.ESTALE
            finally:
                frontend.close()
    finally:
        daemon.close()
