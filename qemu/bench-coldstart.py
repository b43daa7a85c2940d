#!/usr/bin/env python3
"""Cold start from a registry: an OCIv1 pull against a lazy nydus mount of the same image.

    flock /tmp/vhostfs-guest.lock .venv/bin/python qemu/bench-coldstart.py [--rates 100,1000]
                                                                  [--out DIR]

The image: the Debian rootfs of tests/support/rootfs.py (python3 included) as a one-layer OCI
image (tar.gz) in a local docker-registry this script starts, converted with `vhostfs convert`
into a nydus image in the same registry.

The network: every pull goes through a shaping proxy of our own (the kernel here has tbf but
neither netem nor prio), a TCP forwarder in front of the registry that meters the bytes it
sends to clients through one token bucket at --rates Mbit/s, and counts them.

Per rate and workload (`python3 -V`, and python3 importing json, email, http.client, asyncio
and decimal), three ways to start:
  oci         skopeo copy of the image through the proxy, its layers unpacked with tar, QEMU's
              virtiofsd serving the tree: cold start = pull + unpack + the command in the guest
  nydus-cold  vhostfs serve --image through the proxy with an empty chunk cache: cold start =
              bootstrap fetch (serve until it listens) + the command in the guest
  nydus-warm  the same, on the chunk cache the cold run left behind
The command is timed in the guest (/proc/uptime around `chroot /mnt ...`, 10 ms resolution);
guest boot is left out, the same for all three. Bytes are what the proxy passed to clients.

Output: a Markdown table (stdout and --out/coldstart.md), coldstart.json, and a chart of the
cold-start times (coldstart.png, when gnuplot is installed). `--chart JSON` redraws the table
and chart from an earlier coldstart.json without running anything.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.oci import push_image  # noqa: E402
from tests.support.registry import free_port, running_registry  # noqa: E402
from tests.support.rootfs import debian_rootfs  # noqa: E402
from tests.support.vm import (  # noqa: E402
    ensure_guest_built,
    listening_daemon,
    reference_virtiofsd,
    run_guest,
    short_tempdir,
)

VHOSTFS = [sys.executable, "-m", "vhostfs"]
WORKLOADS = {
    "python3 -V": "/usr/bin/python3 -V",
    "import-heavy": "/usr/bin/python3 -c 'import json, email, http.client, asyncio, decimal'",
}
GUEST_SCRIPT = """read a _ < /proc/uptime
chroot /mnt {command} > /dev/null
read b _ < /proc/uptime
echo "COLDSTART $a $b"
"""


class ShapingProxy:
    """A TCP forwarder to `upstream_port` whose replies share one token bucket."""

    def __init__(self, upstream_port: int, mbit: float) -> None:
        self.upstream_port = upstream_port
        self.rate = mbit * 1e6 / 8  # bytes per second
        self.port = free_port()
        self.bytes = 0
        self._free_at = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._started = threading.Event()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", self.port)
        )
        self._started.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, shaped: bool
    ) -> None:
        try:
            while data := await reader.read(16384):
                if shaped:
                    now = self._loop.time()
                    self._free_at = max(now, self._free_at) + len(data) / self.rate
                    await asyncio.sleep(self._free_at - now)
                    self.bytes += len(data)
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(
            self._pipe(reader, up_writer, False), self._pipe(up_reader, writer, True)
        )

    def __enter__(self) -> ShapingProxy:
        self._thread.start()
        self._started.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def take_bytes(self) -> int:
        counted, self.bytes = self.bytes, 0
        return counted


@dataclass
class Result:
    rate: int
    workload: str
    mode: str
    prepare_s: float  # pull + unpack, or bootstrap fetch
    guest_s: float
    fetched: int

    @property
    def cold_start_s(self) -> float:
        return self.prepare_s + self.guest_s


def guest_seconds(socket: Path, command: str) -> float:
    result = run_guest(socket=socket, script=GUEST_SCRIPT.format(command=command), timeout=900)
    result.check()
    line = next(line for line in result.output.splitlines() if line.startswith("COLDSTART"))
    _, start, end = line.split()
    return float(end) - float(start)


def run_oci(proxy: ShapingProxy, work: Path, command: str) -> tuple[float, float]:
    layout, tree = work / "oci", work / "tree"
    shutil.rmtree(layout, ignore_errors=True)
    shutil.rmtree(tree, ignore_errors=True)
    began = time.monotonic()
    subprocess.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--src-tls-verify=false",
            f"docker://127.0.0.1:{proxy.port}/bench:oci",
            f"oci:{layout}:bench",
        ],
        check=True,
    )
    index = json.loads((layout / "index.json").read_text())
    manifest_hex = index["manifests"][0]["digest"].split(":")[1]
    manifest = json.loads((layout / "blobs/sha256" / manifest_hex).read_text())
    tree.mkdir()
    for layer in manifest["layers"]:  # one layer here: no whiteouts to apply
        blob = layout / "blobs/sha256" / layer["digest"].split(":")[1]
        subprocess.run(["tar", "-xzf", str(blob), "-C", str(tree)], check=True)
    prepare = time.monotonic() - began
    with short_tempdir() as tmp, reference_virtiofsd(tree, tmp / "virtiofsd.sock"):
        guest = guest_seconds(tmp / "virtiofsd.sock", command)
    return prepare, guest


def run_nydus(proxy: ShapingProxy, cache: Path, command: str) -> tuple[float, float]:
    with short_tempdir() as tmp:
        sock = tmp / "vhostfs.sock"
        argv = [*VHOSTFS, "serve", "--socket", str(sock), "--insecure", "--cache-dir", str(cache)]
        argv += ["--image", f"127.0.0.1:{proxy.port}/bench:nydus", "--log-level", "warning"]
        began = time.monotonic()
        with listening_daemon(argv, sock, log_path=tmp / "daemon.log", timeout=300):
            prepare = time.monotonic() - began
            guest = guest_seconds(sock, command)
    return prepare, guest


@contextmanager
def images(work: Path) -> Iterator[int]:
    """The registry's port, with bench:oci and bench:nydus in it."""
    rootfs = debian_rootfs()
    with running_registry(work / "registry") as registry:
        layer = work / "rootfs.tar.gz"
        subprocess.run(["tar", "-C", str(rootfs), "-czf", str(layer), "."], check=True)
        push_image(registry.host, "bench", "oci", [layer])
        layer.unlink()
        subprocess.run(
            [
                *VHOSTFS,
                "convert",
                "--source",
                f"{registry.host}/bench:oci",
                "--target",
                f"{registry.host}/bench:nydus",
                "--source-insecure",
                "--target-insecure",
            ],
            check=True,
        )
        yield int(registry.host.rsplit(":", 1)[1])


def table(results: list[Result]) -> str:
    lines = [
        "| link | workload | start | prepare (s) | in guest (s) | cold start (s) | fetched (MB) |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for r in results:
        lines.append(
            f"| {r.rate} Mbit/s | {r.workload} | {r.mode} | {r.prepare_s:.2f} | "
            f"{r.guest_s:.2f} | {r.cold_start_s:.2f} | {r.fetched / 1e6:.1f} |"
        )
    return "\n".join(lines)


def chart(results: list[Result], out: Path) -> None:
    """Grouped bars: cold start per (link, workload), one bar per way to start."""
    gnuplot = shutil.which("gnuplot")
    if gnuplot is None:
        return
    modes = ["oci", "nydus-cold", "nydus-warm"]
    groups: dict[str, dict[str, float]] = {}
    for r in results:
        label = f"{r.workload.removeprefix('python3 ')}, {r.rate}M"
        groups.setdefault(label, {})[r.mode] = r.cold_start_s
    rows = [
        f'"{name}" ' + " ".join(f"{times[m]:.3f}" for m in modes) for name, times in groups.items()
    ]
    (out / "coldstart.dat").write_text("\n".join(rows) + "\n")
    script = f"""set terminal pngcairo size 1000,480
set output '{out / "coldstart.png"}'
set title 'Cold start from a registry (command timed in the guest, plus pull or bootstrap fetch)'
set ylabel 'seconds'
set style data histograms
set style histogram clustered gap 1
set style fill solid 0.8 border -1
set key top right
set yrange [0:*]
set xtics noenhanced
plot '{out / "coldstart.dat"}' using 2:xtic(1) title 'OCIv1 (pull + unpack)', \\
     '' using 3 title 'nydus cold', '' using 4 title 'nydus warm'
"""
    subprocess.run([gnuplot], input=script, text=True, check=True)


def load(path: Path) -> list[Result]:
    fields = ("rate", "workload", "mode", "prepare_s", "guest_s", "fetched")
    return [Result(**{k: row[k] for k in fields}) for row in json.loads(path.read_text())]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rates", default="100,1000", help="link rates in Mbit/s")
    parser.add_argument("--out", type=Path, default=REPO / "qemu/bench/results/coldstart")
    parser.add_argument("--chart", type=Path, help="redraw from this coldstart.json only")
    args = parser.parse_args()
    if args.chart is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        results = load(args.chart)
        (args.out / "coldstart.md").write_text(table(results) + "\n")
        chart(results, args.out)
        print(table(results))
        return
    ensure_guest_built()
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="vhostfs-coldstart-") as scratch:
        work = Path(scratch)
        os.environ["DOCKER_CONFIG"] = str(work / "docker")  # no credentials: an open registry
        with images(work) as registry_port:
            for rate in (int(r) for r in args.rates.split(",")):
                with ShapingProxy(registry_port, rate) as proxy:
                    for workload, command in WORKLOADS.items():
                        prepare, guest = run_oci(proxy, work, command)
                        results.append(
                            Result(rate, workload, "oci", prepare, guest, proxy.take_bytes())
                        )
                        cache = work / f"cache-{rate}-{len(results)}"
                        for mode in ("nydus-cold", "nydus-warm"):
                            prepare, guest = run_nydus(proxy, cache, command)
                            results.append(
                                Result(rate, workload, mode, prepare, guest, proxy.take_bytes())
                            )
                        print(table(results[-3:]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    report = table(results)
    (args.out / "coldstart.md").write_text(report + "\n")
    (args.out / "coldstart.json").write_text(
        json.dumps([r.__dict__ | {"cold_start_s": r.cold_start_s} for r in results], indent=1)
    )
    chart(results, args.out)
    print(report)


if __name__ == "__main__":
    main()
