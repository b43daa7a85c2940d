"""Every byte a guest fsynced is on the host, even when the daemon is killed with SIGKILL.

Four writers in the guest append 4 KiB records to their own files on the share (write-through,
and with --writeback, where the guest's page cache holds writes until fsync pushes them) and
report each successful fsync on the serial console. The host kills the daemon with SIGKILL once
every writer has got well under way; the guest then prints the reports. Every record up to each
writer's last reported fsync must be on the host, byte for byte.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.vm import (
    ensure_guest_built,
    listening_daemon,
    require_qemu,
    run_guest,
    short_tempdir,
)

pytestmark = pytest.mark.guest

SOURCE = Path(__file__).parent / "posix" / "fsyncwriter.c"
WRITERS = 4
RECORD = 4096
KILL_AFTER_RECORDS = 48  # on the host, per writer, before SIGKILL
# The guest stops waiting once no fsync has succeeded for 5 s (the daemon is gone), then
# prints what succeeded; writers stuck on the dead device are left to the power-off.
SCRIPT = f"""
/vhostfs/fsyncwriter /mnt {WRITERS} > /tmp/synced 2>/tmp/errors &
last=0
still=0
while [ $still -lt 5 ]; do
    sleep 1
    now=$(wc -l < /tmp/synced)
    if [ "$now" -gt 0 ] && [ "$now" -eq "$last" ]; then still=$((still + 1)); else still=0; fi
    last=$now
done
cat /tmp/synced
# The device is gone, so /init's umount and sync at the end would wait for it forever: report
# the exit status as /init would, and power off at once without syncing.
printf '\n@@VHOSTFS-EXIT=0@@\n'
poweroff -f -n
"""


def _record(writer: int, seq: int) -> bytes:
    header = f"w={writer} seq={seq}\n".encode()
    return header + bytes([(writer * 131 + seq * 7) & 0xFF]) * (RECORD - len(header))


@pytest.mark.parametrize("cache", ["write-through", "writeback"])
def test_fsynced_bytes_survive_sigkill(tmp_path: Path, cache: str) -> None:
    require_qemu()
    ensure_guest_built()
    with short_tempdir() as tmp:
        exe = tmp / "fsyncwriter"
        subprocess.run(["gcc", "-O2", "-static", "-o", str(exe), str(SOURCE)], check=True)
        share = tmp / "share"
        share.mkdir()
        sock = tmp / "vhostfs.sock"
        argv = [sys.executable, "-m", "vhostfs", "serve", "--socket", str(sock)]
        argv += ["--shared-dir", str(share)]
        if cache == "writeback":
            argv.append("--writeback")  # the guest's page cache holds writes until fsync
        result: list[object] = []

        def guest() -> None:
            try:
                result.append(
                    run_guest(
                        socket=sock,
                        script=SCRIPT,
                        files={"/vhostfs/fsyncwriter": (exe.read_bytes(), 0o755)},
                        timeout=300,
                    )
                )
            except Exception as exc:
                result.append(exc)

        with listening_daemon(argv, sock, log_path=tmp / "daemon.log") as daemon:
            thread = threading.Thread(target=guest)
            thread.start()
            deadline = time.monotonic() + 400
            while not all(
                (share / f"w{i}").exists()
                and (share / f"w{i}").stat().st_size >= KILL_AFTER_RECORDS * RECORD
                for i in range(WRITERS)
            ):
                assert time.monotonic() < deadline and thread.is_alive(), result
                time.sleep(0.2)
            daemon.process.send_signal(signal.SIGKILL)
            daemon.process.wait(10)
            thread.join(400)
        outcome = result[0]
        assert not isinstance(outcome, Exception), outcome
        synced: dict[int, int] = {}
        for line in outcome.output.splitlines():  # type: ignore[attr-defined]
            if line.startswith("SYNCED "):
                _, writer, seq = line.split()
                synced[int(writer)] = max(synced.get(int(writer), -1), int(seq))
        assert sorted(synced) == list(range(WRITERS)), outcome
        for writer, last in synced.items():
            data = (share / f"w{writer}").read_bytes()
            assert len(data) >= (last + 1) * RECORD, (writer, last, len(data))
            for seq in range(last + 1):
                assert data[seq * RECORD : (seq + 1) * RECORD] == _record(writer, seq), (
                    writer,
                    seq,
                )
        print(f"\nfsynced records checked per writer: {synced}")
