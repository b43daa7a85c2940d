"""overlayfs in a real guest with its upper dir on the writable passthrough, as Kata's nydus
mode sets it up: one `vhostfs virtiofs` daemon, nydusd's pseudo root, /containers a passthrough
(upper and work dir) and /rafs/c1/lowerdir a RAFS image (the lower dir), mounted with Kata's
options (index=off).

The guest writes, copies up, deletes (whiteouts), renames and replaces a directory (opaque),
then does the very same on an overlay whose upper dir is a guest tmpfs. The upper dir on the
host must then hold exactly what overlayfs wrote on the local file system: every entry, mode,
size, whiteout device and trusted.overlay.* xattr (tests/e2e/posix/treedump.c prints both),
and both merged views must read the same.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.nydusd import Nydusd
from tests.support.vm import ensure_guest_built, require_qemu, run_guest, short_tempdir

pytestmark = pytest.mark.guest

TREEDUMP = Path(__file__).parent / "posix" / "treedump.c"
OPERATIONS = """
cd "$1"
echo new > new.txt
echo more >> modify.txt
chmod 600 keep.txt
rm delete.txt
rm dir/a
rm -rf replace && mkdir replace && echo fresh > replace/new
mv move.txt moved.txt
mkdir newdir && echo z > newdir/z
ln -s keep.txt link
mv sub sub2
"""
SCRIPT = f"""
cat > /tmp/ops.sh <<'OPS'
{OPERATIONS}
OPS
set -e
LOWER=/mnt/rafs/c1/lowerdir
# The image is a submount of the pseudo root: walk into it so the guest mounts it before
# overlayfs resolves the path (it refuses an automount point that is not mounted yet).
ls $LOWER/ > /dev/null
C=/mnt/containers
mkdir -p $C/up $C/wk /merged /t /tmerged
mount -t overlay overlay -o lowerdir=$LOWER,upperdir=$C/up,workdir=$C/wk,index=off /merged
mount -t tmpfs tmpfs /t
mkdir /t/up /t/wk
mount -t overlay overlay -o lowerdir=$LOWER,upperdir=/t/up,workdir=/t/wk,index=off /tmerged
sh /tmp/ops.sh /merged
sh /tmp/ops.sh /tmerged
for m in /merged /tmerged; do
    echo "@@MERGED $m"
    (cd $m && find . | sort && find . -type f | sort | xargs md5sum)
done
umount /merged
umount /tmerged
echo "@@TMPFS"
/vhostfs/treedump /t/up
echo "@@DMESG"
dmesg | grep -i overlay || true
echo "@@END"
"""


def make_lower(root: Path) -> None:
    files = {
        "keep.txt": "keep\n",
        "modify.txt": "orig\n",
        "delete.txt": "del\n",
        "dir/a": "a\n",
        "dir/b": "b\n",
        "replace/old": "old\n",
        "move.txt": "move\n",
        "sub/deep/file": "deep\n",
    }
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def sections(output: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    current = None
    for line in output.splitlines():
        if line.startswith("@@"):
            current = line[2:]
            found[current] = []
        elif current is not None:
            found[current].append(line)
    return found


def test_overlay_upper_on_the_passthrough_matches_a_local_disk(tmp_path: Path) -> None:
    require_qemu()
    ensure_guest_built()
    with short_tempdir() as tmp:
        treedump = tmp / "treedump"
        subprocess.run(["gcc", "-O2", "-static", "-o", str(treedump), str(TREEDUMP)], check=True)
        lower, image, shared = tmp / "lower", tmp / "image", tmp / "shared"
        lower.mkdir()
        shared.mkdir()
        make_lower(lower)
        build = [sys.executable, "-m", "vhostfs", "build", str(lower), "-o", str(image)]
        subprocess.run(build, check=True, capture_output=True)
        sock, apisock = tmp / "vhost-fs.sock", tmp / "api.sock"
        argv = ["virtiofs", "--apisock", str(apisock), "--sock", str(sock)]
        daemon = Nydusd(argv, tmp, apisock, tmp / "daemon.log")
        try:
            daemon.wait_running()
            passthrough = {"fs_type": "passthrough_fs", "source": str(shared), "config": ""}
            rafs_config = {
                "device": {"backend": {"type": "localfs", "config": {"dir": str(image)}}},
                "mode": "direct",
            }
            rafs = {
                "fs_type": "rafs",
                "source": str(image / "bootstrap"),
                "config": json.dumps(rafs_config),
            }
            for mountpoint, body in (("/containers", passthrough), ("/rafs/c1/lowerdir", rafs)):
                reply = daemon.api.post(f"/api/v1/mount?mountpoint={mountpoint}", json=body)
                assert reply.status_code == 204, reply.text
            result = run_guest(
                socket=sock,
                script=SCRIPT,
                files={"/vhostfs/treedump": (treedump.read_bytes(), 0o755)},
                timeout=600,
            )
            result.check()
            log = daemon.log()
        finally:
            daemon.close()
        assert "Traceback" not in log, log
        found = sections(result.output)
        assert "END" in found, result.output
        on_host = subprocess.run(
            [str(treedump), str(shared / "up")], check=True, capture_output=True, text=True
        ).stdout.splitlines()
    print("\nupper dir on the host:\n  " + "\n  ".join(on_host))
    print("overlay kernel messages:\n  " + "\n  ".join(found["DMESG"]))
    assert on_host == found["TMPFS"]
    merged = [found[key] for key in sorted(found) if key.startswith("MERGED")]
    assert merged[0] == merged[1]
    assert any("trusted.overlay.opaque=y" in line for line in on_host)
    assert any(line.startswith("delete.txt c 0000 rdev=0:0") for line in on_host)
    assert not [line for line in found["DMESG"] if "not support" in line]
