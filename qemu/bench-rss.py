#!/usr/bin/env python3
"""Peak memory of vhostfs serving a RAFS image of 100,000+ inodes to a real guest.

Builds a tree of 100 directories x 1,000 files (one in ten non-empty), makes a RAFS image of it,
serves it, and lets the guest walk it (`find`, `ls -lR`, and reading the non-empty files).
Prints the daemon's peak RSS and what it is made of: guest RAM pages the daemon wrote replies
into (a shared mapping of the guest's memfd, which virtiofsd's RSS counts the same way), the
bootstrap's page cache, and the daemon's own anonymous memory.

    .venv/bin/python qemu/bench-rss.py [--dirs 100] [--files 1000]
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.vm import listening_daemon, run_guest, short_tempdir  # noqa: E402

WALK = "find /mnt | wc -l; ls -lR /mnt | wc -l; cat /mnt/d*/f*0 | wc -c"


def make_tree(root: Path, dirs: int, files: int) -> None:
    for d in range(dirs):
        sub = root / f"d{d:03}"
        sub.mkdir(parents=True)
        for i in range(files):
            (sub / f"f{i:04}").write_text(f"{d}-{i}\n" if i % 10 == 0 else "")


def rss_breakdown(pid: int) -> dict[str, int]:
    """KiB of RSS by kind: guest memory, bootstrap, anonymous, other files."""
    kinds = {"guest": 0, "bootstrap": 0, "anon": 0, "other": 0}
    for entry in re.split(r"\n(?=[0-9a-f]+-[0-9a-f]+ )", Path(f"/proc/{pid}/smaps").read_text()):
        head = entry.split("\n", 1)[0]
        match = re.search(r"^Rss:\s+(\d+) kB", entry, re.M)
        if not match:
            continue
        kb = int(match.group(1))
        if "memory-backend-memfd" in head:
            kinds["guest"] += kb
        elif head.endswith("/bootstrap"):
            kinds["bootstrap"] += kb
        elif len(head.split()) < 6 or head.split()[5].startswith("["):
            kinds["anon"] += kb
        else:
            kinds["other"] += kb
    return kinds


def measure(argv_template: list[str]) -> tuple[int, dict[str, int], float, int]:
    """Serve, let the guest walk, and sample the server's RSS: (peak KiB, its parts at the
    peak, walk seconds, entries the guest saw)."""
    peak, peak_parts = 0, {}
    with short_tempdir() as tmp:
        sock = tmp / "server.sock"
        argv = [arg.replace("{sock}", str(sock)) for arg in argv_template]
        with listening_daemon(argv, sock, log_path=tmp / "server.log") as server:

            def sample() -> None:
                nonlocal peak, peak_parts
                while server.alive():
                    try:
                        # virtiofsd serves from a forked child: sample the whole process tree.
                        parts = _tree_breakdown(server.process.pid)
                    except OSError:
                        break
                    if sum(parts.values()) > peak:
                        peak, peak_parts = sum(parts.values()), parts
                    time.sleep(0.1)

            sampler = threading.Thread(target=sample)
            sampler.start()
            started = time.monotonic()
            result = run_guest(socket=sock, script=WALK, timeout=1800)
            elapsed = time.monotonic() - started
            sampler.join()
    result.check()
    return peak, peak_parts, elapsed, int(result.output.split()[0])


def _tree_breakdown(pid: int) -> dict[str, int]:
    total = rss_breakdown(pid)
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for child in children:
        for kind, kb in _tree_breakdown(int(child)).items():
            total[kind] += kb
    return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dirs", type=int, default=100)
    parser.add_argument("--files", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vhostfs-rss-") as work_dir:
        work = Path(work_dir)
        make_tree(work / "tree", args.dirs, args.files)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "vhostfs",
                "build",
                str(work / "tree"),
                "-o",
                str(work / "image"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        servers = {
            "vhostfs (RAFS image)": [
                sys.executable,
                "-m",
                "vhostfs",
                "serve",
                "--socket",
                "{sock}",
                "--bootstrap",
                str(work / "image/bootstrap"),
                "--blob-dir",
                str(work / "image"),
                "--cache-dir",
                str(work / "cache"),
            ],
            "virtiofsd (plain tree)": [
                "/usr/lib/qemu/virtiofsd",
                "--socket-path={sock}",
                "-o",
                f"source={work / 'tree'}",
                "-o",
                "cache=auto",
            ],
        }
        for name, argv in servers.items():
            if not Path(argv[0]).exists():
                print(f"{name}: {argv[0]} not installed, skipped")
                continue
            peak, parts, elapsed, entries = measure(argv)
            print(
                f"{name}: {entries} entries, guest walk {elapsed:.0f} s, "
                f"peak RSS {peak / 1024:.1f} MiB: guest RAM written {parts['guest'] / 1024:.1f}"
                f", bootstrap page cache {parts['bootstrap'] / 1024:.1f}"
                f", anonymous {parts['anon'] / 1024:.1f}, other files "
                f"{parts['other'] / 1024:.1f} MiB"
            )
        print("target: vhostfs peak RSS <= 64 MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
