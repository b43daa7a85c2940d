#!/usr/bin/env python3
"""Image build benchmark: `vhostfs build` against mkfs.erofs on the same tree, in one run.

Builders, each run --runs times in turn (round-robin, so a slow moment hits all of them), best
time kept:

  vhostfs zstd         vhostfs build --compressor zstd (the default)
  vhostfs none         vhostfs build --compressor none (kernel-mountable blob)
  mkfs.erofs           mkfs.erofs IMG TREE (uncompressed, data inside the image)
  mkfs.erofs blobdev   mkfs.erofs --chunksize=1048576 --blobdev=BLOB IMG TREE

Throughput is the tree's file data (regular files, each hard-linked file once) divided by wall
time, process start included. The tree is read once before timing, so every builder reads it
from the page cache. Ratios are against plain mkfs.erofs.

The tree: --tree DIR, --debian (the cached Debian rootfs from tests/support/rootfs.py), or by
default a generated one of --size-mb MB: a few large files, thousands of small ones in nested
directories, part text-like (compressible), part random, about a tenth duplicated.

    .venv/bin/python qemu/bench-build.py [--tree DIR | --debian] [--size-mb 256] [--runs 3]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MB = 1_000_000
WORDS = [b"the", b"of", b"and", b"data", b"chunk", b"image", b"layer", b"blob", b"tree", b"file"]
# `vhostfs build` without going through the whole CLI module, so the figures measure the
# builder (and Python's start-up, as a user pays it), nothing else.
VHOSTFS_BUILD = [
    sys.executable,
    "-c",
    "import sys; sys.path.insert(0, sys.argv.pop(1)); "
    "from vhostfs.cli.image import build_command; build_command()",
    str(REPO),
]


@dataclass
class Builder:
    name: str
    command: Callable[[Path, Path], list[str]]  # (tree, output dir) -> argv
    best: float = float("inf")
    output_bytes: int = 0


BUILDERS = [
    Builder("vhostfs zstd", lambda tree, out: [*VHOSTFS_BUILD, str(tree), "-o", str(out)]),
    Builder(
        "vhostfs none",
        lambda tree, out: [*VHOSTFS_BUILD, str(tree), "-o", str(out), "--compressor", "none"],
    ),
    Builder("mkfs.erofs", lambda tree, out: ["mkfs.erofs", "--quiet", f"{out}/image", str(tree)]),
    Builder(
        "mkfs.erofs blobdev",
        lambda tree, out: [
            "mkfs.erofs",
            "--quiet",
            "--chunksize=1048576",
            f"--blobdev={out}/blob",
            f"{out}/image",
            str(tree),
        ],
    ),
]


def generate_tree(root: Path, size_mb: int, seed: int = 1) -> None:
    """A deterministic mixed tree of about `size_mb` MB of file data."""
    rng = random.Random(seed)
    budget = size_mb * MB

    def content(size: int) -> bytes:
        if rng.random() < 0.5:  # text-like: compresses several times over
            words = rng.choices(WORDS, k=size // 4 + 1)
            return b" ".join(words)[:size]
        return rng.randbytes(size)

    large = root / "large"
    large.mkdir(parents=True)
    written = 0
    for n in range(4):  # a few large files: a quarter of the budget
        size = budget // 16
        (large / f"big-{n}.bin").write_bytes(content(size))
        written += size
    originals: list[Path] = []
    n = 0
    while written < budget:
        directory = root / f"d{n % 37:02}" / f"sub{n % 11:02}"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"file-{n:06}"
        if originals and rng.random() < 0.1:
            shutil.copyfile(rng.choice(originals), path)  # a duplicate
        else:
            size = int(rng.paretovariate(1.2) * 4000) % (4 * MB) + 1
            path.write_bytes(content(size))
            originals.append(path)
        written += path.stat().st_size
        n += 1


def file_bytes(tree: Path) -> tuple[int, int]:
    """(bytes of file data, entries) of the tree; reading it also warms the page cache."""
    seen: set[tuple[int, int]] = set()
    total = entries = 0
    for directory, dirnames, filenames in os.walk(tree):
        entries += len(dirnames) + len(filenames)
        for name in filenames:
            path = os.path.join(directory, name)
            info = os.lstat(path)
            key = (info.st_dev, info.st_ino)
            if stat.S_ISREG(info.st_mode) and key not in seen:
                seen.add(key)
                total += info.st_size
                with open(path, "rb") as f:
                    while f.read(1 << 20):
                        pass
    return total, entries


def run_once(builder: Builder, tree: Path, work: Path) -> float:
    out = work / builder.name.replace(" ", "-")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    argv = builder.command(tree, out)
    os.sync()  # the previous builder's output is not written back on this one's time
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{builder.name} failed:\n{done.stdout}{done.stderr}")
    builder.output_bytes = sum(p.stat().st_size for p in out.iterdir())
    return elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--tree", type=Path, help="benchmark this directory")
    source.add_argument("--debian", action="store_true", help="use the cached Debian rootfs")
    parser.add_argument("--size-mb", type=int, default=256, help="size of a generated tree")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if shutil.which("mkfs.erofs") is None:
        raise SystemExit("mkfs.erofs not found (apt-get install erofs-utils)")

    with tempfile.TemporaryDirectory(prefix="bench-build-") as scratch:
        work = Path(scratch)
        if args.tree is not None:
            tree = args.tree
        elif args.debian:
            from tests.support.rootfs import debian_rootfs

            tree = debian_rootfs()
        else:
            tree = work / "tree"
            print(f"generating a {args.size_mb} MB tree in {tree} ...", file=sys.stderr)
            generate_tree(tree, args.size_mb)
        data, entries = file_bytes(tree)
        print(f"tree: {tree}: {entries} entries, {data / MB:.1f} MB of file data")
        print(f"cpus: {os.cpu_count()}, runs: {args.runs} (best kept)\n")
        for _ in range(args.runs):
            for builder in BUILDERS:
                builder.best = min(builder.best, run_once(builder, tree, work))

    reference = next(b for b in BUILDERS if b.name == "mkfs.erofs")
    print(f"{'builder':<20} {'seconds':>8} {'MB/s':>8} {'output MB':>10} {'time vs mkfs':>13}")
    results = []
    for builder in BUILDERS:
        rate = data / MB / builder.best
        ratio = builder.best / reference.best
        print(
            f"{builder.name:<20} {builder.best:8.2f} {rate:8.1f} "
            f"{builder.output_bytes / MB:10.1f} {ratio:12.2f}x"
        )
        results.append(
            {
                "builder": builder.name,
                "seconds": builder.best,
                "mb_per_s": rate,
                "output_bytes": builder.output_bytes,
                "time_vs_mkfs_erofs": ratio,
            }
        )
    zstd, none, blobdev = BUILDERS[0], BUILDERS[1], BUILDERS[3]
    print(
        f"\nvhostfs none vs mkfs.erofs --blobdev (both chunked, uncompressed): "
        f"{none.best / blobdev.best:.2f}x the time; zstd output is "
        f"{zstd.output_bytes / none.output_bytes:.0%} of uncompressed"
    )
    if args.json is not None:
        args.json.write_text(
            json.dumps({"tree": str(tree), "file_bytes": data, "results": results}, indent=2)
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
