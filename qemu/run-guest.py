#!/usr/bin/env python3
"""Run a script in the vhostfs test guest; see qemu/README.md and qemu/guestvm.py.

    qemu/run-guest.py --socket S [--tag T] [--disk FILE]... [--memory 1024] [--timeout 300]
                      (--script FILE | --command 'CMD')

Prints the guest script's stdout and exits with its status (255 when the guest itself failed).
Importable too: the public names of guestvm (run_guest, ensure_guest_built, ...) are re-exported.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from guestvm import (
    GuestError,
    GuestResult,
    GuestTimeout,
    detect_accel,
    ensure_guest_built,
    main,
    run_guest,
)

__all__ = [
    "GuestError",
    "GuestResult",
    "GuestTimeout",
    "detect_accel",
    "ensure_guest_built",
    "main",
    "run_guest",
]

if __name__ == "__main__":
    sys.exit(main())
