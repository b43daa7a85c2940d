#!/usr/bin/env python3
"""microVM file-system benchmark: vhostfs against virtiofsd (and RAFS/EROFS) on the same data.

    .venv/bin/python qemu/bench.py [--out DIR] [--rounds N] [--quick]
                                   [--servers a,b,...] [--workloads x,y,...]

Data (built once, cached in --data-dir, default ~/.cache/vhostfs/bench): a copy of the Debian
rootfs from tests/support/rootfs.py at TREE/rootfs and 256 MiB of seeded random bytes at
TREE/bench/big.bin. Every server serves that tree (or an image built from it), so every guest
sees the same bytes at /mnt/rootfs and /mnt/bench/big.bin.

Guest side: qemu/bench/fsbench.c, compiled here with `gcc -O2 -static` and put into the guest
initramfs as /bench/fsbench. It times each workload in the guest (CLOCK_MONOTONIC) and prints
one `FSBENCH label=... op=... ns=...` line per workload. Before every workload the guest runs
`sync; echo 3 > /proc/sys/vm/drop_caches`, so each starts from a cold guest page cache (the
host page cache stays warm: the servers' host-side reads are cached hits).

Servers (all that are available run; the others are listed as skipped):
  virtiofsd   QEMU 7.2's C virtiofsd on the tree, its defaults and -o cache=auto (the baseline)
  vhostfs     the passthrough as Kata runs it: `vhostfs virtiofs --sock --apisock`, TREE
              mounted at /containers through the API; the guest reads /mnt/containers
  rafs-cold   a zstd RAFS image of the tree mounted at /rafs/c1/lowerdir through the API
              (next to an empty passthrough at /containers, as Kata has), empty chunk cache;
              the guest boots once per workload with a fresh cache, so each workload is cold
  rafs-warm   the same image, chunk cache filled beforehand by a guest reading every file
              (both with Kata's config for local blobs: localfs backend, blobcache, direct
              mode, no prefetch, digests unchecked as nydusd's default; --digest-validate
              checks them)
  erofs-blk   the guest kernel's EROFS over virtio-blk on an uncompressed build of the tree
              (mount -t erofs -o device=/dev/vdb /dev/vda /mnt)
The RAFS/EROFS servers need `vhostfs build` and `vhostfs serve --bootstrap/--blob-dir/
--cache-dir`.

Workloads: seq (256 MiB file, 1 MiB reads, MB/s), rand (4 KiB psync preads at seeded random
offsets, IOPS), walk (readdir + lstat of every entry of the rootfs, entries/s), tar (busybox
`tar -cf /dev/null` of the rootfs, s), readall (every file of the rootfs, MB/s and files/s),
pyver (`python3 -V` in `chroot /mnt/rootfs`, s), pyimport (python3 importing json, email,
http.client, asyncio, decimal in the chroot, s).

Rounds are interleaved (round 1: every server in order, round 2: ...); one guest boot per
(server, round) runs the selected workloads in sequence (rafs-cold: one boot per workload).
Results: medians with min/max per (workload, server) and ratios against virtiofsd, where > 1.0
always means better than virtiofsd (throughput: server/virtiofsd; times: virtiofsd/server).
--out gets results.json, ratios.dat + ratios.gp + ratios.png (gnuplot pngcairo, if installed),
fsbench, and logs/ (each guest's output and each daemon's log).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.rootfs import debian_rootfs  # noqa: E402
from tests.support.vm import (  # noqa: E402
    REFERENCE_VIRTIOFSD,
    GuestError,
    detect_accel,
    ensure_guest_built,
    listening_daemon,
    reference_virtiofsd,
    run_guest,
    short_tempdir,
)

BENCH_DIR = Path(__file__).resolve().parent / "bench"
FSBENCH_SRC = BENCH_DIR / "fsbench.c"
DEFAULT_DATA = Path(os.environ.get("VHOSTFS_BENCH_DATA", Path.home() / ".cache/vhostfs/bench"))
BIG_SIZE = 256 << 20
BIG_SEED = 20240501
RAND_SEED = 42
GUEST_MEMORY = 1024
GUEST_TIMEOUT = 600.0
VHOSTFS = [sys.executable, "-m", "vhostfs"]


# ---------------------------------------------------------------------------------------------
# workloads


@dataclasses.dataclass(frozen=True)
class Metric:
    key: str  # field of the FSBENCH line ("s" = ns / 1e9)
    unit: str
    higher_better: bool


@dataclasses.dataclass(frozen=True)
class Workload:
    name: str
    title: str
    command: str  # guest shell; $B = fsbench, $D = mount point
    metrics: tuple[Metric, ...]


PY_ENV = "PYTHONDONTWRITEBYTECODE=1"  # virtiofsd serves read-write: never write .pyc files
PY_IMPORTS = "import json, email, http.client, asyncio, decimal"


def workloads(rand_ops: int) -> dict[str, Workload]:
    mbps, secs = Metric("mbps", "MB/s", True), Metric("s", "s", False)
    items = [
        Workload("seq", "seq read 1M", "$B -l seq seq $D/bench/big.bin 1048576", (mbps,)),
        Workload(
            "rand",
            "rand read 4K",
            f"$B -l rand rand $D/bench/big.bin {rand_ops} {RAND_SEED}",
            (Metric("iops", "IOPS", True),),
        ),
        Workload(
            "walk", "lstat walk", "$B -l walk walk $D/rootfs", (Metric("eps", "entries/s", True),)
        ),
        Workload(
            "tar",
            "tar -cf /dev/null",
            "$B -l tar time -q -- tar -cf /dev/null -C $D rootfs",
            (secs,),
        ),
        Workload(
            "readall",
            "read all files",
            "$B -l readall readall $D/rootfs",
            (mbps, Metric("fps", "files/s", True)),
        ),
        Workload(
            "pyver",
            "python3 -V",
            f"{PY_ENV} $B -l pyver time -c $D/rootfs -- /usr/bin/python3 -V",
            (secs,),
        ),
        Workload(
            "pyimport",
            "python3 imports",
            f"{PY_ENV} $B -l pyimport time -c $D/rootfs -- /usr/bin/python3 -c '{PY_IMPORTS}'",
            (secs,),
        ),
    ]
    return {w.name: w for w in items}


WORKLOAD_NAMES = list(workloads(1))
QUICK_WORKLOADS = ["seq", "rand", "walk", "pyver", "pyimport"]


def guest_script(selected: list[Workload], mount: str, pre: str = "") -> str:
    lines = ["B=/bench/fsbench", f"D={mount}", pre]
    for w in selected:
        lines.append(f'$B drop && {w.command} || echo "FSBENCH label={w.name} op=error status=$?"')
    return "\n".join(lines) + "\n"


def parse_output(text: str) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for line in text.splitlines():
        if not line.startswith("FSBENCH "):
            continue
        fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
        out[fields.get("label", "?")] = fields
    return out


# ---------------------------------------------------------------------------------------------
# data


def _tree_stats(root: Path) -> dict[str, int]:
    """What the guest should see below root: entries (everything but root itself), regular
    files (per path: hard links count once per name) and their bytes."""
    entries = files = size = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            entries += 1
            st = os.lstat(os.path.join(dirpath, name))
            if (st.st_mode & 0o170000) == 0o100000:
                files += 1
                size += st.st_size
    return {"entries": entries, "files": files, "bytes": size}


def _write_big(path: Path) -> str:
    rng = random.Random(BIG_SEED)
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(BIG_SIZE >> 20):
            block = rng.randbytes(1 << 20)
            digest.update(block)
            f.write(block)
    return digest.hexdigest()


def prepare_tree(data_dir: Path) -> tuple[Path, dict[str, Any]]:
    """TREE/rootfs (copy of the cached Debian rootfs) + TREE/bench/big.bin; reused while the
    source rootfs is unchanged."""
    src = debian_rootfs()
    src_stats = _tree_stats(src)
    tree = data_dir / "tree"
    marker = data_dir / "tree.json"
    want = {"source": str(src), "source_stats": src_stats, "big_size": BIG_SIZE, "seed": BIG_SEED}
    with contextlib.suppress(OSError, ValueError):
        have = json.loads(marker.read_text())
        big = tree / "bench/big.bin"
        if all(have.get(k) == v for k, v in want.items()) and big.stat().st_size == BIG_SIZE:
            return tree, have
    log(f"preparing {tree}: copying {src} and writing 256 MiB of random bytes")
    data_dir.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    shutil.rmtree(tree, ignore_errors=True)
    (tree / "bench").mkdir(parents=True)
    subprocess.run(["cp", "-a", "--reflink=auto", str(src), str(tree / "rootfs")], check=True)
    sha = _write_big(tree / "bench/big.bin")
    info = {**want, "big_sha256": sha, "rootfs_stats": _tree_stats(tree / "rootfs")}
    marker.write_text(json.dumps(info, indent=1) + "\n")
    # Any image built from an older tree is stale now.
    shutil.rmtree(data_dir / "images", ignore_errors=True)
    return tree, info


def build_fsbench(out_dir: Path) -> bytes:
    exe = out_dir / "fsbench"
    cmd = ["gcc", "-O2", "-static", "-Wall", "-o", str(exe), str(FSBENCH_SRC)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: building fsbench failed: {' '.join(cmd)}\n{proc.stderr}")
    return exe.read_bytes()


# ---------------------------------------------------------------------------------------------
# RAFS images (need `vhostfs build`)


def _run_ok(argv: list[str]) -> tuple[bool, str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return False, str(exc)
    return proc.returncode == 0, proc.stdout + proc.stderr


def _vhostfs_fingerprint() -> str:
    """Hash of the RAFS sources (builder and layout): a changed builder means a new image."""
    h = hashlib.sha256()
    for p in sorted((REPO / "vhostfs" / "rafs").rglob("*.py")):
        h.update(str(p.relative_to(REPO)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:16]


@dataclasses.dataclass
class Image:
    bootstrap: Path
    blobs: list[Path]
    blob_dir: Path
    build_seconds: float
    sizes: dict[str, int]


def _find_image(outdir: Path) -> Image:
    """`vhostfs build -o OUTDIR` writes OUTDIR/bootstrap and OUTDIR/<blob id> (64 hex digits)."""
    bootstrap = outdir / "bootstrap"
    if not bootstrap.is_file():
        raise RuntimeError(f"no bootstrap in {outdir}: {sorted(p.name for p in outdir.iterdir())}")
    blobs = sorted(
        p
        for p in outdir.iterdir()
        if p.is_file() and len(p.name) == 64 and all(c in "0123456789abcdef" for c in p.name)
    )
    if not blobs:
        raise RuntimeError(f"no blob (64 hex digit name) in {outdir}")
    meta_file = outdir.parent / "build.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    return Image(
        bootstrap=bootstrap,
        blobs=blobs,
        blob_dir=outdir,
        build_seconds=float(meta.get("build_seconds", 0.0)),
        sizes={p.name[:16]: p.stat().st_size for p in [bootstrap, *blobs]},
    )


def build_image(tree: Path, data_dir: Path, compressor: str, rebuild: bool) -> Image:
    key = _vhostfs_fingerprint()
    outdir = data_dir / "images" / compressor
    stamp = outdir / "bench-stamp.json"
    with contextlib.suppress(OSError, ValueError, RuntimeError):
        if not rebuild and json.loads(stamp.read_text()).get("key") == key:
            return _find_image(outdir / "out")
    shutil.rmtree(outdir, ignore_errors=True)
    outdir.mkdir(parents=True)
    argv = [*VHOSTFS, "build", str(tree), "-o", str(outdir / "out"), "--compressor", compressor]
    log(f"  building the {compressor} image: vhostfs {' '.join(argv[len(VHOSTFS) :])}")
    t0 = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True)
    took = time.monotonic() - t0
    (outdir / "build.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"vhostfs build failed ({proc.returncode}):\n{proc.stderr[-2000:]}")
    (outdir / "build.json").write_text(json.dumps({"build_seconds": took}) + "\n")
    img = _find_image(outdir / "out")
    stamp.write_text(json.dumps({"key": key}) + "\n")
    log(
        f"  built in {took:.1f}s: "
        + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in img.sizes.items())
    )
    return img


def padded_disk(path: Path, dest_dir: Path) -> Path:
    """virtio-blk works in 512-byte sectors: give QEMU a copy padded with zeros when needed."""
    size = path.stat().st_size
    if size % 4096 == 0:
        return path
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / (path.name + ".padded")
    if (
        not dest.exists()
        or dest.stat().st_size != size + (-size % 4096)
        or dest.stat().st_mtime < path.stat().st_mtime
    ):
        shutil.copyfile(path, dest)
        with open(dest, "r+b") as f:
            f.truncate(size + (-size % 4096))
    return dest


# ---------------------------------------------------------------------------------------------
# servers


@dataclasses.dataclass
class Context:
    tree: Path
    out: Path
    data_dir: Path
    zstd: Image | None = None
    plain: Image | None = None
    warm_cache: Path | None = None
    timeout: float = GUEST_TIMEOUT
    digest_validate: bool = False


@dataclasses.dataclass(frozen=True)
class Server:
    name: str
    title: str
    needs_builder: bool = False
    per_workload: bool = False  # one guest (and a fresh daemon/cache) per workload


SERVERS = [
    Server("virtiofsd", "virtiofsd (C, cache=auto)"),
    Server("vhostfs", "vhostfs passthrough"),
    Server("rafs-cold", "vhostfs RAFS zstd, cold cache", needs_builder=True, per_workload=True),
    Server("rafs-warm", "vhostfs RAFS zstd, warm cache", needs_builder=True),
    Server("erofs-blk", "kernel EROFS on virtio-blk", needs_builder=True),
]
SERVER_BY_NAME = {s.name: s for s in SERVERS}


def _rafs_argv(img: Image, sock: Path, cache: Path) -> list[str]:
    return [
        *VHOSTFS,
        "serve",
        "--socket",
        str(sock),
        "--bootstrap",
        str(img.bootstrap),
        "--blob-dir",
        str(img.blob_dir),
        "--cache-dir",
        str(cache),
    ]


# Where Kata puts things in nydusd's pseudo root (reference §2.5): the sandbox's shared
# directory at /containers, each container's image at /rafs/<cid>/lowerdir.
KATA_SHARED = "/containers"
KATA_IMAGE = "/rafs/c1/lowerdir"


def _rafs_mount_config(img: Image, cache: Path, digest_validate: bool) -> str:
    """The v1 config Kata's nydus setup hands nydusd, for local blobs: localfs, a blob cache,
    direct mode, xattrs; digests are checked only when asked (nydusd's default is not to)."""
    return json.dumps(
        {
            "device": {
                "backend": {"type": "localfs", "config": {"dir": str(img.blob_dir)}},
                "cache": {"type": "blobcache", "config": {"work_dir": str(cache)}},
            },
            "mode": "direct",
            "digest_validate": digest_validate,
            "enable_xattr": True,
        }
    )


@contextlib.contextmanager
def kata_daemon(
    tmp: Path,
    log_path: Path,
    at_start: Sequence[tuple[str, dict[str, str]]],
    after_init: Sequence[tuple[str, dict[str, str]]] = (),
) -> Iterator[Path]:
    """`vhostfs virtiofs` started and filled as Kata Go fills nydusd, through the API's POST
    /api/v1/mount: `at_start` before the guest boots (the sandbox's shared directory), and
    `after_init` once the guest's FUSE INIT is done (container images come later, so the
    session's flags are settled without them). Yields the vhost-user socket."""
    import httpx

    sock, apisock = tmp / "fs.sock", tmp / "api.sock"
    argv = [*VHOSTFS, "virtiofs", "--log-level", "info", "--sock", str(sock)]
    with listening_daemon([*argv, "--apisock", str(apisock)], sock, log_path=log_path) as d:
        transport = httpx.HTTPTransport(uds=str(apisock))
        api = httpx.Client(transport=transport, base_url="http://unix", timeout=30)

        def mount(mounts: Sequence[tuple[str, dict[str, str]]]) -> None:
            for mountpoint, body in mounts:
                reply = api.post("/api/v1/mount", params={"mountpoint": mountpoint}, json=body)
                if reply.status_code != 204:
                    raise RuntimeError(f"mount {mountpoint}: {reply.status_code} {reply.text}")

        def mount_after_init() -> None:
            with contextlib.suppress(AssertionError, RuntimeError, httpx.HTTPError):
                d.log_lines_once_there("FUSE session up", timeout=GUEST_TIMEOUT)
                mount(after_init)

        with api:
            mount(at_start)
            later = threading.Thread(target=mount_after_init, daemon=True)
            if after_init:
                later.start()
            yield sock
            if after_init:
                if later.is_alive():
                    d.stop()  # the guest never came up: let the waiting thread see the log end
                later.join(timeout=5)


def wait_for(path: str) -> str:
    """Guest shell: wait until `path` exists (an image mounted once the session is up)."""
    return (
        f"i=0; while [ ! -e {path} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i + 1)); done; "
        f"[ -e {path} ] || exit 98"
    )


@contextlib.contextmanager
def serving(server: Server, ctx: Context, logs: Path, tag: str) -> Iterator[dict[str, Any]]:
    """Start the server; yield run_guest keyword arguments (socket or disks, mount)."""
    with short_tempdir("vhostfs-bench-") as tmp:
        sock = tmp / "fs.sock"
        log_path = logs / f"{tag}.daemon.log"
        if server.name == "virtiofsd":
            with reference_virtiofsd(ctx.tree, sock) as d:
                try:
                    yield {"socket": sock, "mount": "/mnt"}
                finally:
                    d.stop()
                    shutil.copyfile(d.log_path, log_path)
        elif server.name == "vhostfs":
            shared = {"fs_type": "passthrough_fs", "source": str(ctx.tree), "config": ""}
            with kata_daemon(tmp, log_path, [(KATA_SHARED, shared)]) as sock:
                yield {"socket": sock, "mount": "/mnt", "dir": "/mnt" + KATA_SHARED}
        elif server.name in ("rafs-cold", "rafs-warm"):
            assert ctx.zstd is not None
            if server.name == "rafs-cold":
                cache = tmp / "cache"
                cache.mkdir()
            else:
                assert ctx.warm_cache is not None
                cache = ctx.warm_cache
            (tmp / "shared").mkdir()
            shared = {"fs_type": "passthrough_fs", "source": str(tmp / "shared"), "config": ""}
            image = {
                "fs_type": "rafs",
                "source": str(ctx.zstd.bootstrap),
                "config": _rafs_mount_config(ctx.zstd, cache, ctx.digest_validate),
            }
            where = "/mnt" + KATA_IMAGE
            later = [(KATA_IMAGE, image)]
            with kata_daemon(tmp, log_path, [(KATA_SHARED, shared)], later) as sock:
                pre = wait_for(where + "/bench")
                yield {"socket": sock, "mount": "/mnt", "dir": where, "pre": pre}
        elif server.name == "erofs-blk":
            assert ctx.plain is not None
            disks = [
                padded_disk(p, ctx.data_dir / "images" / "padded")
                for p in [ctx.plain.bootstrap, *ctx.plain.blobs]
            ]
            devs = ",".join(f"device=/dev/vd{chr(ord('b') + i)}" for i in range(len(disks) - 1))
            pre = f"mkdir -p $D && mount -t erofs -o ro,{devs} /dev/vda $D || exit 99"
            yield {"socket": None, "mount": None, "disks": disks, "pre": pre}
        else:
            raise ValueError(server.name)


def warm_cache(ctx: Context, fsbench: bytes, logs: Path) -> float:
    """Fill rafs-warm's chunk cache: a guest reads every file of the image once."""
    assert ctx.zstd is not None
    cache = ctx.data_dir / "warm-cache"
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    t0 = time.monotonic()
    with short_tempdir("vhostfs-bench-") as tmp:
        sock = tmp / "fs.sock"
        with listening_daemon(
            _rafs_argv(ctx.zstd, sock, cache), sock, log_path=logs / "warmup.daemon.log"
        ):
            res = run_guest(
                socket=sock,
                script="/bench/fsbench -l warm readall /mnt\n",
                files={"/bench/fsbench": (fsbench, 0o755)},
                memory=GUEST_MEMORY,
                timeout=ctx.timeout,
            )
    (logs / "warmup.guest.txt").write_text(res.output + "\n--- stderr ---\n" + res.stderr)
    res.check()
    ctx.warm_cache = cache
    return time.monotonic() - t0


def warm_host_cache(roots: list[Path]) -> int:
    """Read every file the servers will serve once, so that no server pays for host disk reads
    (the first server of round 1 would otherwise)."""
    total = 0
    buf = bytearray(1 << 20)
    for root in roots:
        files = [root] if root.is_file() else [Path(d, f) for d, _, fs in os.walk(root) for f in fs]
        for path in files:
            with contextlib.suppress(OSError):
                if not path.is_file() or path.is_symlink():
                    continue
                with open(path, "rb", buffering=0) as f:
                    while n := f.readinto(buf):
                        total += n
    return total


def daemon_metrics(log_path: Path) -> dict[str, Any] | None:
    """The JSON vhostfs logs at exit ("... vhostfs: metrics {...}"), when there is one."""
    with contextlib.suppress(OSError, ValueError):
        for line in reversed(log_path.read_text(errors="replace").splitlines()):
            if " metrics {" in line:
                value = json.loads(line.split(" metrics ", 1)[1])
                return value if isinstance(value, dict) else None
    return None


def available_servers() -> dict[str, str]:
    """name -> why it cannot run ("" = available)."""
    why: dict[str, str] = {}
    why["virtiofsd"] = "" if REFERENCE_VIRTIOFSD.exists() else f"{REFERENCE_VIRTIOFSD} missing"
    ok, text = _run_ok([*VHOSTFS, "serve", "--help"])
    last = (text.strip().splitlines() or ["?"])[-1]
    why["vhostfs"] = "" if ok else f"`vhostfs serve --help` fails: {last}"
    builder, _ = _run_ok([*VHOSTFS, "build", "--help"])
    flags = ok and all(f in text for f in ("--bootstrap", "--blob-dir", "--cache-dir"))
    for name in ("rafs-cold", "rafs-warm"):
        why[name] = (
            ""
            if builder and flags
            else "not available yet: "
            + (
                "`vhostfs build --help` fails"
                if not builder
                else "`vhostfs serve` has no --bootstrap/--blob-dir/--cache-dir"
            )
        )
    why["erofs-blk"] = "" if builder else "not available yet: `vhostfs build --help` fails"
    return why


# ---------------------------------------------------------------------------------------------
# reporting


class HostLoad:
    """CPU used on the host during a session by everything except this benchmark (its QEMU
    and daemons are its children): other work on a shared 2-core host skews TCG results."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0 = self._busy()
        self.own0 = self._own()

    @staticmethod
    def _busy() -> float:
        with contextlib.suppress(OSError, ValueError, IndexError):
            f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
            return (sum(f) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")
        return 0.0

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def other_cores(self) -> float:
        """Average number of cores other processes kept busy since construction."""
        wall = time.monotonic() - self.t0
        other = (self._busy() - self.busy0) - (self._own() - self.own0)
        return max(0.0, other / wall) if wall > 0 else 0.0


CONTENDED = 0.3  # other processes' cores above which a session is flagged


def wait_quiet(limit: float) -> float:
    """Wait (up to limit seconds) until other processes use less than CONTENDED of a core
    over a 2 s window; returns the seconds waited."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        probe = HostLoad()
        time.sleep(2.0)
        if probe.other_cores() < CONTENDED:
            break
    return time.monotonic() - t0


def log(msg: str) -> None:
    print(msg, flush=True)


def machine_info(accel: str) -> dict[str, Any]:
    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True, text=True)
    guest_info = {}
    with contextlib.suppress(OSError):
        gi = ensure_guest_built() / "guest.info"
        guest_info = dict(line.split("=", 1) for line in gi.read_text().splitlines() if "=" in line)
    rev = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "vhostfs", "csrc"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        mem_kb = int(Path("/proc/meminfo").read_text().split()[1])
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1),
        "accel": accel,
        "qemu": (qemu.stdout.splitlines() or ["?"])[0],
        "host_kernel": f"{platform.system()} {platform.release()}",
        "guest_kernel": guest_info.get("kernel_version", "?"),
        "guest": f"q35, 1 vCPU, {GUEST_MEMORY} MiB, cpu {'host' if accel == 'kvm' else 'max'}",
        "python": platform.python_version(),
        "vhostfs": rev + (" (+ uncommitted changes)" if dirty else ""),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def summarize(
    samples: dict[str, dict[str, list[float]]],
    wls: dict[str, Workload],
    servers: list[str],
    busy: dict[str, dict[str, list[bool]]] | None = None,
) -> list[dict[str, Any]]:
    """One row per (workload metric, server); busy marks samples taken on a contended host."""
    rows = []
    for w in wls.values():
        for m in w.metrics:
            key = f"{w.name}.{m.key}"
            base = samples.get("virtiofsd", {}).get(key, [])
            base_med = statistics.median(base) if base else None
            for s in servers:
                vals = samples.get(s, {}).get(key, [])
                row: dict[str, Any] = {
                    "workload": w.name,
                    "title": w.title,
                    "metric": m.key,
                    "unit": m.unit,
                    "higher_better": m.higher_better,
                    "server": s,
                    "n": len(vals),
                    "values": vals,
                    "busy": sum((busy or {}).get(s, {}).get(key, [])),
                }
                if vals:
                    med = statistics.median(vals)
                    row.update(median=med, min=min(vals), max=max(vals))
                    if base_med and med:
                        if m.higher_better:
                            row.update(
                                ratio=med / base_med,
                                ratio_lo=min(vals) / base_med,
                                ratio_hi=max(vals) / base_med,
                            )
                        else:
                            row.update(
                                ratio=base_med / med,
                                ratio_lo=base_med / max(vals),
                                ratio_hi=base_med / min(vals),
                            )
                rows.append(row)
    return rows


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 1000:
        return f"{v:,.0f}"
    if v >= 100:
        return f"{v:.1f}"
    if v >= 10:
        return f"{v:.2f}"
    return f"{v:.3f}"


def print_table(rows: list[dict[str, Any]]) -> None:
    hdr = (
        f"{'workload':<18} {'metric':<10} {'server':<10} {'n':>2} {'busy':>4} {'median':>10} "
        f"{'min':>10} {'max':>10}  {'vs virtiofsd':>12}"
    )
    log(hdr)
    log("-" * len(hdr))
    last = None
    for r in rows:
        wl = (r["workload"], r["metric"])
        if last is not None and wl != last:
            log("")
        last = wl
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else "-"
        unit = r["unit"] + ("" if r["higher_better"] else " (lower)")
        log(
            f"{r['title']:<18} {unit:<10} {r['server']:<10} {r['n']:>2} {r['busy'] or '':>4} "
            f"{_fmt(r.get('median')):>10} {_fmt(r.get('min')):>10} {_fmt(r.get('max')):>10}  "
            f"{ratio:>12}"
        )


def write_chart(rows: list[dict[str, Any]], servers: list[str], out: Path) -> str:
    """ratios.dat/.gp always; ratios.png when gnuplot is installed. Returns a status line.
    Bars: median ratio; error bars: the rounds' min..max against virtiofsd's median (the
    virtiofsd bar shows its own spread around 1)."""
    if "virtiofsd" not in servers or len(servers) < 2:
        return "chart: needs virtiofsd and at least one other server; skipped"
    keys: list[tuple[str, str]] = []
    for r in rows:
        k = (r["workload"], r["metric"])
        if k not in keys:
            keys.append(k)
    by = {(r["workload"], r["metric"], r["server"]): r for r in rows}
    units = {(r["workload"], r["metric"]): r["unit"] for r in rows}
    lines = ["workload " + " ".join(f"{s} {s}.lo {s}.hi" for s in servers)]
    for wl, met in keys:
        label = f"{wl}({units[(wl, met)]})".replace(" ", "")
        cells = []
        for s in servers:
            r = by.get((wl, met, s), {})
            cells += [
                "?" if r.get(k) is None else f"{r[k]:.4f}"
                for k in ("ratio", "ratio_lo", "ratio_hi")
            ]
        lines.append(label + " " + " ".join(cells))
    (out / "ratios.dat").write_text("\n".join(lines) + "\n")
    gp = f"""set terminal pngcairo size 1280,640 font ",10"
set output '{out / "ratios.png"}'
set title "microVM file-system benchmark against virtiofsd\\n\
(> 1 = better than virtiofsd; bars: median of rounds, whiskers: min..max)"
set datafile missing '?'
set style data histograms
set style histogram errorbars gap 1 lw 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set key top left
set ylabel "ratio vs virtiofsd"
set yrange [0:*]
set grid ytics
set xtics rotate by -30
set arrow 1 from graph 0, first 1 to graph 1, first 1 nohead lw 1 dt 2 lc rgb "black"
plot for [i=0:{len(servers) - 1}] '{out / "ratios.dat"}' \\
    using (column(2+3*i)):(column(3+3*i)):(column(4+3*i)):xtic(1) title columnheader(2+3*i)
"""
    (out / "ratios.gp").write_text(gp)
    if shutil.which("gnuplot") is None:
        return "chart: gnuplot not installed (apt-get install -y gnuplot-nox); skipped ratios.png"
    proc = subprocess.run(["gnuplot", str(out / "ratios.gp")], capture_output=True, text=True)
    if proc.returncode != 0:
        return f"chart: gnuplot failed: {proc.stderr.strip()[-500:]}"
    return f"chart: {out / 'ratios.png'}"


# ---------------------------------------------------------------------------------------------
# main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="bench.py",
        description="microVM benchmark: vhostfs vs virtiofsd (+ RAFS, EROFS) on the same data",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--out", type=Path, help="results dir (default DATA_DIR/results/<timestamp>)")
    ap.add_argument("--rounds", type=int, help="rounds per (server, workload) (default 3, quick 2)")
    ap.add_argument(
        "--quick",
        action="store_true",
        help="2 rounds, no tar/readall, fewer random reads (~4 min for all servers)",
    )
    ap.add_argument("--servers", help="comma list, from: " + ",".join(s.name for s in SERVERS))
    ap.add_argument("--workloads", help="comma list, from: " + ",".join(WORKLOAD_NAMES))
    ap.add_argument("--rand-ops", type=int, help="random reads per run (default 4000, quick 2000)")
    ap.add_argument(
        "--data-dir",
        type=Path,
        default=DEFAULT_DATA,
        help="cached tree and images (default %(default)s)",
    )
    ap.add_argument(
        "--vhostfs",
        default=" ".join(VHOSTFS),
        metavar="CMD",
        help="how to run vhostfs (default: %(default)s)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        default=GUEST_TIMEOUT,
        help="seconds per guest boot before it counts as hung (default %(default)g)",
    )
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each guest boot, wait up to S seconds for other processes to leave the "
        "host CPUs alone (shared machines; default 0 = no waiting)",
    )
    ap.add_argument("--rebuild-images", action="store_true", help="rebuild RAFS/EROFS images")
    ap.add_argument(
        "--digest-validate",
        action="store_true",
        help="RAFS mounts check every chunk's digest (default: off, nydusd's and Kata's default)",
    )
    args = ap.parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so running guests and daemons are stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    VHOSTFS[:] = args.vhostfs.split()
    rounds = args.rounds or (2 if args.quick else 3)
    rand_ops = args.rand_ops or (2000 if args.quick else 4000)
    all_wls = workloads(rand_ops)
    wl_names = (
        args.workloads.split(",")
        if args.workloads
        else QUICK_WORKLOADS
        if args.quick
        else WORKLOAD_NAMES
    )
    bad = [w for w in wl_names if w not in all_wls]
    if bad:
        ap.error(f"unknown workloads {bad}; choose from {WORKLOAD_NAMES}")
    wls = {n: all_wls[n] for n in WORKLOAD_NAMES if n in wl_names}
    wanted = args.servers.split(",") if args.servers else [s.name for s in SERVERS]
    bad = [s for s in wanted if s not in SERVER_BY_NAME]
    if bad:
        ap.error(f"unknown servers {bad}; choose from {[s.name for s in SERVERS]}")
    out: Path = args.out or args.data_dir / "results" / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    logs = out / "logs"
    logs.mkdir(exist_ok=True)
    t_start = time.monotonic()

    ensure_guest_built()
    accel = detect_accel()
    machine = machine_info(accel)
    log("== machine")
    for k, v in machine.items():
        log(f"  {k:<13} {v}")
    if accel == "tcg":
        log(
            "  note: TCG emulates the guest CPU, so guest-side costs are inflated many times; "
            "compare ratios, not absolute numbers"
        )

    why = available_servers()
    servers = [s for s in SERVERS if s.name in wanted and not why[s.name]]
    skipped = {s: why[s] for s in wanted if why[s]}
    log("== servers")
    for s in SERVERS:
        if s.name in wanted:
            state = f"SKIPPED, {why[s.name]}" if why[s.name] else "ok"
            log(f"  {s.name:<10} {s.title:<32} {state}")
    if "virtiofsd" not in [s.name for s in servers]:
        log("  note: virtiofsd is not in the run, so no ratios")

    log("== data")
    fsbench = build_fsbench(out)
    log(f"  fsbench: gcc -O2 -static {FSBENCH_SRC.relative_to(REPO)} ({len(fsbench)} bytes)")
    tree, tree_info = prepare_tree(args.data_dir)
    expect = tree_info["rootfs_stats"]
    log(
        f"  tree {tree}: rootfs {expect['entries']} entries, {expect['files']} files, "
        f"{expect['bytes'] / 1e6:.1f} MB; bench/big.bin 256 MiB "
        f"(sha256 {tree_info['big_sha256'][:16]})"
    )
    ctx = Context(
        tree=tree,
        out=out,
        data_dir=args.data_dir,
        timeout=args.timeout,
        digest_validate=args.digest_validate,
    )
    setup: dict[str, Any] = {}
    names = {s.name for s in servers}

    def setup_failed(which: list[str], exc: Exception) -> None:
        for name in which:
            if name in names:
                skipped[name] = f"setup failed: {str(exc).strip().splitlines()[-1]}"
        log(f"  setup failed, skipping {', '.join(n for n in which if n in names)}: {exc}")

    if names & {"rafs-cold", "rafs-warm"}:
        try:
            ctx.zstd = build_image(tree, args.data_dir, "zstd", args.rebuild_images)
            setup["image_zstd"] = dataclasses.asdict(ctx.zstd)
        except (RuntimeError, OSError, ValueError) as exc:
            setup_failed(["rafs-cold", "rafs-warm"], exc)
    if "erofs-blk" in names:
        try:
            ctx.plain = build_image(tree, args.data_dir, "none", args.rebuild_images)
            setup["image_none"] = dataclasses.asdict(ctx.plain)
        except (RuntimeError, OSError, ValueError) as exc:
            setup_failed(["erofs-blk"], exc)
    if "rafs-warm" in names and ctx.zstd is not None:
        log("  warming rafs-warm's chunk cache (a guest reads every file once)")
        try:
            took = warm_cache(ctx, fsbench, logs)
            setup["warmup_seconds"] = round(took, 1)
            setup["warm_cache_bytes"] = sum(
                p.stat().st_size for p in (args.data_dir / "warm-cache").rglob("*") if p.is_file()
            )
            log(f"  warm-up took {took:.1f}s, cache holds {setup['warm_cache_bytes'] / 1e6:.1f} MB")
        except (RuntimeError, GuestError, OSError) as exc:
            setup_failed(["rafs-warm"], exc)
    servers = [srv for srv in servers if srv.name not in skipped]
    t0 = time.monotonic()
    roots = [tree]
    if ctx.zstd is not None:
        roots.append(ctx.zstd.blob_dir)
    if ctx.warm_cache is not None:
        roots.append(ctx.warm_cache)
    if ctx.plain is not None:
        roots += [padded_disk(p, args.data_dir / "images" / "padded") for p in ctx.plain.blobs]
        roots.append(ctx.plain.bootstrap)
    n = warm_host_cache(roots)
    log(f"  host page cache: read {n / 1e6:.0f} MB of served data in {time.monotonic() - t0:.1f}s")

    log(
        f"== runs: {rounds} rounds x {len(servers)} servers, workloads {','.join(wls)} "
        f"(rand: {rand_ops} reads), cold guest page cache before each"
    )
    samples: dict[str, dict[str, list[float]]] = {s.name: {} for s in servers}
    sessions: list[dict[str, Any]] = []
    problems: list[str] = []
    contended: list[str] = []
    busy_flags: dict[str, dict[str, list[bool]]] = {s.name: {} for s in servers}
    for rnd in range(1, rounds + 1):
        for server in servers:
            groups = [[w] for w in wls.values()] if server.per_workload else [list(wls.values())]
            for group in groups:
                tag = f"r{rnd}-{server.name}" + (f"-{group[0].name}" if server.per_workload else "")
                waited = wait_quiet(args.wait_quiet) if args.wait_quiet > 0 else 0.0
                t0 = time.monotonic()
                load = HostLoad()
                record: dict[str, Any] = {
                    "round": rnd,
                    "server": server.name,
                    "workloads": [w.name for w in group],
                }
                try:
                    with serving(server, ctx, logs, tag) as kw:
                        where = kw.pop("dir", "/mnt")
                        script = guest_script(group, where, kw.pop("pre", ""))
                        res = run_guest(
                            script=script,
                            files={"/bench/fsbench": (fsbench, 0o755)},
                            memory=GUEST_MEMORY,
                            timeout=ctx.timeout,
                            **kw,
                        )
                    (logs / f"{tag}.guest.txt").write_text(
                        res.output
                        + "\n--- stderr ---\n"
                        + res.stderr
                        + f"\n--- status {res.status}, {res.duration:.1f}s ---\n"
                    )
                    record.update(status=res.status, guest_seconds=round(res.duration, 2))
                    results = parse_output(res.output)
                    if res.status != 0:
                        problems.append(
                            f"{tag}: guest script status {res.status}: {res.stderr.strip()[-300:]}"
                        )
                except (GuestError, RuntimeError, OSError) as exc:
                    results = {}
                    record.update(status=None, error=str(exc)[-2000:])
                    problems.append(f"{tag}: {str(exc).splitlines()[0]}")
                    (logs / f"{tag}.error.txt").write_text(traceback.format_exc())
                record["seconds"] = round(time.monotonic() - t0, 2)
                metrics = daemon_metrics(logs / f"{tag}.daemon.log")
                if metrics is not None:
                    record["daemon_metrics"] = metrics
                record["other_cores"] = round(load.other_cores(), 2)
                record["waited_for_quiet"] = round(waited, 1)
                if record["other_cores"] > CONTENDED:
                    contended.append(tag)
                record["results"] = results
                sessions.append(record)
                got = []
                for w in group:
                    r = results.get(w.name)
                    if r is None or r.get("op") == "error" or r.get("status", "0") != "0":
                        problems.append(f"{tag}: workload {w.name} failed: {r}")
                        got.append(f"{w.name}=FAILED")
                        continue
                    problems.extend(f"{tag}: {p}" for p in check_result(w, r, expect))
                    for m in w.metrics:
                        v = int(r["ns"]) / 1e9 if m.key == "s" else float(r[m.key])
                        samples[server.name].setdefault(f"{w.name}.{m.key}", []).append(v)
                        busy_flags[server.name].setdefault(f"{w.name}.{m.key}", []).append(
                            record["other_cores"] > CONTENDED
                        )
                    m0 = w.metrics[0]
                    v0 = samples[server.name][f"{w.name}.{m0.key}"][-1]
                    got.append(f"{w.name}={_fmt(v0)}{m0.unit if m0.unit != 's' else 's'}")
                busy = f"other load {record['other_cores']:.2f}" + (
                    " (CONTENDED)" if record["other_cores"] > CONTENDED else ""
                )
                name = server.name + (f"/{group[0].name}" if server.per_workload else "")
                log(f"  round {rnd} {name:<18} {record['seconds']:6.1f}s  {busy}  {' '.join(got)}")

    rows = summarize(samples, wls, [s.name for s in servers], busy_flags)
    elapsed = time.monotonic() - t_start
    log(
        f"== results (median, min and max of {rounds} rounds; ratio > 1 = better than "
        f"virtiofsd; busy = samples taken while other processes used > {CONTENDED} core)"
    )
    print_table(rows)
    chart = write_chart(rows, [s.name for s in servers], out)
    if contended:
        log(
            f"note: other processes kept more than {CONTENDED} of a core busy during "
            f"{len(contended)} of {len(sessions)} guest runs: expect extra spread (per run: "
            "'other_cores' in results.json; --wait-quiet S waits for a quiet host)"
        )
    for name, reason in skipped.items():
        log(f"skipped {name}: {reason}")
    for p in problems:
        log(f"PROBLEM {p}")
    result = {
        "machine": machine,
        "config": {
            "rounds": rounds,
            "quick": args.quick,
            "workloads": list(wls),
            "servers": [s.name for s in servers],
            "rand_ops": rand_ops,
            "rand_seed": RAND_SEED,
            "guest_memory_mib": GUEST_MEMORY,
            "workload_commands": {w.name: w.command for w in wls.values()},
        },
        "data": {"tree": str(tree), **tree_info},
        "setup": setup,
        "skipped": skipped,
        "summary": rows,
        "sessions": sessions,
        "problems": problems,
        "contended_runs": contended,
        "elapsed_seconds": round(elapsed, 1),
    }
    (out / "results.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
    log(chart)
    log(f"results: {out / 'results.json'}  (total {elapsed / 60:.1f} min)")
    return 1 if problems else 0


def check_result(w: Workload, r: dict[str, str], expect: dict[str, int]) -> list[str]:
    """Every server must have served the same tree: compare counts with the host's."""
    issues = []
    if w.name == "seq" and int(r.get("bytes", -1)) != BIG_SIZE:
        issues.append(f"seq read {r.get('bytes')} bytes, expected {BIG_SIZE}")
    if w.name == "walk" and int(r.get("entries", -1)) != expect["entries"]:
        issues.append(f"walk saw {r.get('entries')} entries, host has {expect['entries']}")
    if w.name == "readall":
        for k in ("entries", "files", "bytes"):
            if int(r.get(k, -1)) != expect[k]:
                issues.append(f"readall: {k}={r.get(k)}, host has {expect[k]}")
    return issues


if __name__ == "__main__":
    sys.exit(main())
