"""A real Debian rootfs for end-to-end tests and benchmarks, built once and cached.

`debootstrap --variant=minbase --include=python3 bookworm` from the machine's Debian mirror,
into ~/.cache/vhostfs/debian-rootfs (VHOSTFS_ROOTFS overrides). Building takes about a minute;
later calls return the cached tree. A lock file keeps parallel callers from building twice, and
the tree only appears under its final name once debootstrap has succeeded.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from pathlib import Path

SUITE = "bookworm"
MIRROR = os.environ.get("VHOSTFS_DEBIAN_MIRROR", "http://deb.debian.org/debian")
CACHE = Path(os.environ.get("VHOSTFS_ROOTFS", Path.home() / ".cache/vhostfs/debian-rootfs"))


def debian_rootfs() -> Path:
    """The cached rootfs, built now if it does not exist yet."""
    if (CACHE / "usr/bin/python3").exists():
        return CACHE
    if shutil.which("debootstrap") is None:
        raise RuntimeError("debootstrap is not installed (apt-get install debootstrap)")
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with open(CACHE.parent / ".rootfs.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (CACHE / "usr/bin/python3").exists():
            return CACHE
        partial = CACHE.with_name(CACHE.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        result = subprocess.run(
            ["debootstrap", "--variant=minbase", "--include=python3", SUITE, str(partial), MIRROR],
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise RuntimeError(f"debootstrap failed:\n{result.stdout[-3000:]}{result.stderr}")
        partial.rename(CACHE)
    return CACHE
