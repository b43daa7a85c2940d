#!/usr/bin/env python3
"""Peak memory of vhostfs serving a RAFS image of 100,000+ inodes to a real guest, as Kata runs it.

Builds a tree of 100 directories x 1,000 files (one in ten non-empty) and a zstd RAFS image of
it. vhostfs runs as Kata runs nydusd (`vhostfs virtiofs --log-level info --apisock A --sock S`),
and is filled as Kata fills it through the HTTP API: an (empty) passthrough_fs at /containers
before the guest boots, and once the guest's FUSE session is up the image, as rafs with localfs
blobs and a blobcache chunk cache (digests unchecked, nydusd's default), at /rafs/c1/lowerdir.
The guest walks /mnt/rafs/c1/lowerdir (`find`, `ls -lR`, and reading the non-empty files).
QEMU 7.2's virtiofsd serves the plain tree to the same walk, for comparison.

The daemon's RSS is sampled from /proc/PID/smaps (its process tree: virtiofsd serves from a
forked child) every 0.1 s and split by mapping:

  guest      pages of the guest's RAM (the shared mapping of QEMU's memfd) the daemon touched,
             mostly replies it wrote: guest memory, counted in the daemon's RSS as in
             virtiofsd's, but the guest's, not the daemon's
  anonymous  the interpreter and our heap (including [heap] and [stack])
  bootstrap  the mapped bootstrap (image metadata; page cache the kernel can drop)
  cache      the chunk cache's mapped files (its bitmaps)
  other      libraries, the interpreter's binary, other mapped files

"ours" is everything but guest. Both the peak of the total and the peak of ours are reported,
from the same samples (each at its own instant), with VmHWM, the kernel's own peak of the total
(of the largest process: the sampled sums count pages virtiofsd's parent and forked child share
twice). virtiofsd keeps an fd open for every inode the guest holds: where RLIMIT_NOFILE cannot
be raised past the tree's size its walk falls short, and the report says so.

    .venv/bin/python qemu/bench-rss.py [--dirs 100] [--files 1000] [--json FILE]

About two minutes here (TCG guests, 2 CPUs); run it alone on the machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.nydusd import Nydusd, kata_go_argv  # noqa: E402
from tests.support.vm import (  # noqa: E402
    REFERENCE_VIRTIOFSD,
    listening_daemon,
    run_guest,
    short_tempdir,
    wait_listening,
)

# Where Kata puts things in nydusd's pseudo root, as qemu/bench.py mounts them.
KATA_SHARED = "/containers"
KATA_IMAGE = "/rafs/c1/lowerdir"
GUEST_MOUNT = "/mnt"
WALK = "D={dir}; find $D | wc -l; ls -lR $D | wc -l; cat $D/d*/f*0 | wc -c"
KINDS = ("guest", "anon", "bootstrap", "cache", "other")
SAMPLE_EVERY = 0.1
TARGET_MIB = 64  # issue 12: what is ours, at its peak


def make_tree(root: Path, dirs: int, files: int) -> None:
    for d in range(dirs):
        sub = root / f"d{d:03}"
        sub.mkdir(parents=True)
        for i in range(files):
            (sub / f"f{i:04}").write_text(f"{d}-{i}\n" if i % 10 == 0 else "")


@dataclass
class Owned:
    """The files whose mappings are told apart (resolved paths, as smaps shows them)."""

    bootstrap: str | None = None
    cache_dir: str | None = None


def classify(path: str, owned: Owned) -> str:
    if "memfd:memory-backend" in path:  # QEMU's memory-backend-memfd: the guest's RAM
        return "guest"
    if not path or path.startswith("["):
        return "anon"
    if owned.bootstrap is not None and path == owned.bootstrap:
        return "bootstrap"
    if owned.cache_dir is not None and path.startswith(owned.cache_dir + "/"):
        return "cache"
    return "other"


_ENTRY = re.compile(r"\n(?=[0-9a-f]+-[0-9a-f]+ )")
_RSS = re.compile(r"^Rss:\s+(\d+) kB", re.M)


def rss_breakdown(pid: int, owned: Owned) -> dict[str, int]:
    """KiB of RSS by kind, for one process."""
    kinds = dict.fromkeys(KINDS, 0)
    for entry in _ENTRY.split(Path(f"/proc/{pid}/smaps").read_text()):
        match = _RSS.search(entry)
        if not match:
            continue
        # address perms offset dev inode [path, which may hold spaces or end in " (deleted)"]
        fields = entry.split("\n", 1)[0].split(maxsplit=5)
        path = fields[5] if len(fields) > 5 else ""
        kinds[classify(path, owned)] += int(match.group(1))
    return kinds


def process_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        with contextlib.suppress(OSError):
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
    return out


def vm_hwm_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


@dataclass
class Peaks:
    """The largest total and the largest "ours" seen, each with its parts at that instant."""

    samples: int = 0
    total_kib: int = 0
    total_parts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    ours_kib: int = 0
    ours_parts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    vm_hwm_kib: int = 0  # the largest VmHWM in the process tree

    def add(self, parts: dict[str, int], hwm: int) -> None:
        self.samples += 1
        total = sum(parts.values())
        ours = total - parts["guest"]
        if total > self.total_kib:
            self.total_kib, self.total_parts = total, parts
        if ours > self.ours_kib:
            self.ours_kib, self.ours_parts = ours, parts
        self.vm_hwm_kib = max(self.vm_hwm_kib, hwm)


def sample_until(stop: threading.Event, pid: int, owned: Owned, peaks: Peaks) -> None:
    """Sample the process tree every SAMPLE_EVERY until told to stop or the daemon is gone
    (vhostfs, like nydusd, exits when its front-end leaves)."""
    while not stop.is_set():
        parts = dict.fromkeys(KINDS, 0)
        hwm = 0
        try:
            for p in process_tree(pid):
                for kind, kib in rss_breakdown(p, owned).items():
                    parts[kind] += kib
                hwm = max(hwm, vm_hwm_kib(p))
        except OSError:  # the daemon (or a child) went away between listing and reading
            break
        peaks.add(parts, hwm)
        stop.wait(SAMPLE_EVERY)


@dataclass
class Serving:
    """A daemon listening for the guest: its socket, its pid, what to walk."""

    sock: Path
    pid: int
    walk_dir: str
    owned: Owned
    log: Path
    pre: str = ""  # guest shell run before the walk


@contextlib.contextmanager
def vhostfs_kata(work: Path, tmp: Path) -> Iterator[Serving]:
    """`vhostfs virtiofs` started with Kata Go's argv and filled through the API as Kata fills
    nydusd: the sandbox's shared directory at /containers (empty here) before the guest boots,
    the image at /rafs/c1/lowerdir once its FUSE session is up."""
    argv = kata_go_argv(tmp, "vhost-user-fs.sock")
    daemon = Nydusd(argv, tmp, tmp / "nydusd-api.sock", tmp / "vhostfs.log")
    later: threading.Thread | None = None
    try:
        daemon.wait_running()
        cache = work / "cache"
        cache.mkdir(exist_ok=True)
        config = {
            "device": {
                "backend": {"type": "localfs", "config": {"dir": str(work / "image")}},
                "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}},
            },
            "mode": "direct",
            "digest_validate": False,
        }
        bootstrap = work / "image" / "bootstrap"
        mounts = [
            (
                KATA_SHARED,
                {"fs_type": "passthrough_fs", "source": str(work / "shared"), "config": ""},
            ),
            # The API takes the config as a JSON document inside a string, as nydusd does.
            (
                KATA_IMAGE,
                {"fs_type": "rafs", "source": str(bootstrap), "config": json.dumps(config)},
            ),
        ]

        def mount(mountpoint: str, body: dict[str, str]) -> None:
            reply = daemon.api.post("/api/v1/mount", params={"mountpoint": mountpoint}, json=body)
            if reply.status_code != 204:
                raise RuntimeError(f"mount {mountpoint}: {reply.status_code} {reply.text}")

        def mount_image_after_init() -> None:
            """Kata mounts a container's image once the guest is up: after FUSE INIT, so the
            session is negotiated without it (as qemu/bench.py does)."""
            deadline = time.monotonic() + 600
            while "FUSE session up" not in daemon.log():
                if daemon.process.poll() is not None or time.monotonic() > deadline:
                    print("the guest's FUSE session never came up", file=sys.stderr)
                    return
                time.sleep(0.05)
            try:
                mount(*mounts[1])
            except Exception as e:  # the guest's wait for the image then fails the walk
                print(f"image mount failed: {e}", file=sys.stderr)

        mount(*mounts[0])
        later = threading.Thread(target=mount_image_after_init, daemon=True)
        later.start()
        sock = tmp / "vhost-user-fs.sock"
        wait_listening(sock, daemon.process, log=daemon.log_path)
        owned = Owned(str(bootstrap.resolve()), str(cache.resolve()))
        where = GUEST_MOUNT + KATA_IMAGE
        # The guest waits (up to 60 s) for the image to appear in the pseudo root.
        pre = (
            f"i=0; while [ ! -e {where}/d000 ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); "
            f"done; [ -e {where}/d000 ] || exit 98; "
        )
        yield Serving(sock, daemon.process.pid, where, owned, daemon.log_path, pre)
    finally:
        daemon.close()
        if later is not None:
            later.join(timeout=5)


@contextlib.contextmanager
def virtiofsd_plain(work: Path, tmp: Path) -> Iterator[Serving]:
    sock = tmp / "virtiofsd.sock"
    argv = [
        str(REFERENCE_VIRTIOFSD),
        f"--socket-path={sock}",
        "-o",
        f"source={work / 'tree'}",
        "-o",
        "cache=auto",
    ]
    with listening_daemon(argv, sock, log_path=tmp / "virtiofsd.log") as daemon:
        yield Serving(sock, daemon.process.pid, GUEST_MOUNT, Owned(), daemon.log_path)


VHOSTFS = "vhostfs (RAFS image, Kata's pseudo root)"
SERVERS: dict[str, Callable[[Path, Path], contextlib.AbstractContextManager[Serving]]] = {
    VHOSTFS: vhostfs_kata,
    "virtiofsd (plain tree)": virtiofsd_plain,
}


@dataclass
class Result:
    entries: int
    walk_seconds: float
    peaks: Peaks


def measure(
    serve: Callable[[Path, Path], contextlib.AbstractContextManager[Serving]], work: Path
) -> Result:
    """Serve, let the guest walk, and sample the daemon's RSS meanwhile."""
    peaks = Peaks()
    stop = threading.Event()
    with short_tempdir("vhostfs-rss-") as tmp, serve(work, tmp) as serving:
        sampler = threading.Thread(
            target=sample_until, args=(stop, serving.pid, serving.owned, peaks)
        )
        sampler.start()
        started = time.monotonic()
        try:
            result = run_guest(
                socket=serving.sock,
                script=serving.pre + WALK.format(dir=serving.walk_dir),
                mount=GUEST_MOUNT,
                timeout=1800,
            )
        finally:
            elapsed = time.monotonic() - started
            stop.set()
            sampler.join()
        if result.status != 0:  # the logs go with the temporary directory: show them now
            print(serving.log.read_text(errors="replace")[-4000:], file=sys.stderr)
    result.check()
    return Result(int(result.output.split()[0]), elapsed, peaks)


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def describe(name: str, r: Result, expected: int) -> str:
    p = r.peaks
    total, ours = p.total_parts, p.ours_parts
    short = ""
    if r.entries < expected:
        # find's errors go to the guest's stderr: only the count shows that the walk fell short.
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        short = (
            f"\n  INCOMPLETE: the guest saw {r.entries} of {expected} entries, so these figures "
            f"are for a smaller walk (virtiofsd holds an fd per inode the guest knows; this "
            f"process's RLIMIT_NOFILE is {soft}/{hard})"
        )
    return (
        f"{name}: {r.entries} entries, guest walk {r.walk_seconds:.0f} s, {p.samples} samples\n"
        f"  peak RSS {mib(p.total_kib)} MiB (VmHWM {mib(p.vm_hwm_kib)}): guest RAM "
        f"{mib(total['guest'])}, ours {mib(p.total_kib - total['guest'])}\n"
        f"  peak of ours {mib(p.ours_kib)} MiB (guest RAM {mib(ours['guest'])} at that "
        f"instant): anonymous {mib(ours['anon'])}, bootstrap mapping {mib(ours['bootstrap'])}, "
        f"chunk cache maps {mib(ours['cache'])}, libraries/other files {mib(ours['other'])}" + short
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dirs", type=int, default=100)
    parser.add_argument("--files", type=int, default=1000)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()
    results: dict[str, Result] = {}
    with tempfile.TemporaryDirectory(prefix="vhostfs-rss-") as work_dir:
        work = Path(work_dir)
        make_tree(work / "tree", args.dirs, args.files)
        (work / "shared").mkdir()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "vhostfs",
                "build",
                str(work / "tree"),
                "-o",
                str(work / "image"),
                "--compressor",
                "zstd",
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        expected = 1 + args.dirs * (1 + args.files)  # what `find` prints: the root included
        for name, serve in SERVERS.items():
            if serve is virtiofsd_plain and not REFERENCE_VIRTIOFSD.exists():
                print(f"{name}: {REFERENCE_VIRTIOFSD} not installed, skipped")
                continue
            results[name] = r = measure(serve, work)
            print(describe(name, r, expected), flush=True)
    ours = results[VHOSTFS].peaks.ours_kib
    verdict = "met" if ours <= TARGET_MIB * 1024 else "NOT met"
    print(f"target: vhostfs's own peak RSS (all but guest RAM) <= {TARGET_MIB} MiB: {verdict}")
    if args.json:
        doc: dict[str, Any] = {
            "config": {
                "dirs": args.dirs,
                "files": args.files,
                "expected_entries": expected,
                "sample_every_s": SAMPLE_EVERY,
            },
            "results": {name: asdict(r) for name, r in results.items()},
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
