"""Boot the throw-away test guest (built by qemu/build-guest.sh) in QEMU and run a script in it.

Python 3.11 standard library only, so it can be used both by ``qemu/run-guest.py`` and by the
test-suite (``tests/support/vm.py`` loads this file by path).

Guest protocol (implemented by the /init that build-guest.sh writes):

* The script travels in a second, uncompressed cpio archive (``/vhostfs/run.sh`` plus any extra
  files) appended to the base initramfs; the kernel unpacks concatenated archives in order.
* ``vhostfs.tag=T vhostfs.mnt=DIR`` on the kernel command line make /init mount the virtio-fs tag
  before the script runs.
* Script stdout goes to the second serial port (ttyS1), stderr to the third (ttyS2), both in raw
  mode so the bytes arrive unchanged; the kernel console stays on ttyS0.  After the script /init
  writes ``\\n@@VHOSTFS-EXIT=<status>@@\\n`` to ttyS1 and powers the VM off.

Acceleration: KVM is used only when a real boot under KVM finishes quickly (``/dev/kvm`` may
exist and open fine while guests crawl or hang, as on nested setups); the probe result is cached
per host boot in the guest directory.  ``VHOSTFS_ACCEL=kvm|tcg`` forces a choice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

QEMU_DIR = Path(__file__).resolve().parent
BUILD_SCRIPT = QEMU_DIR / "build-guest.sh"
QEMU_BINARY = os.environ.get("VHOSTFS_QEMU", "qemu-system-x86_64")

DEFAULT_TAG = "vhostfs"
DEFAULT_MOUNT = "/mnt"
DEFAULT_MEMORY_MIB = 1024
DEFAULT_SMP = 1
DEFAULT_TIMEOUT = 300.0
KVM_PROBE_TIMEOUT = float(os.environ.get("VHOSTFS_KVM_PROBE_TIMEOUT", "15"))

_EXIT_RE = re.compile(rb"\n@@VHOSTFS-EXIT=(\d+)@@\n\Z")
# Statuses reserved by /init for its own failures.
INIT_FAILURES = {
    250: "no /vhostfs/run.sh in the initramfs",
    252: "mounting the virtio-fs tag failed",
}


class GuestError(RuntimeError):
    """The guest could not be started or did not report a script exit status."""


class GuestTimeout(GuestError):
    """The guest did not finish within the timeout."""


@dataclasses.dataclass(frozen=True)
class GuestResult:
    """Outcome of one guest run.  ``output`` is the script's stdout, byte-exact when decoded
    with ``surrogateescape`` (or use ``output_bytes``)."""

    output: str
    status: int
    stderr: str = ""
    console: str = dataclasses.field(default="", repr=False)
    output_bytes: bytes = dataclasses.field(default=b"", repr=False)
    duration: float = 0.0
    accel: str = ""

    def check(self) -> GuestResult:
        """Raise GuestError (with stderr and console tail) unless the script exited 0."""
        if self.status != 0:
            raise GuestError(
                f"guest script exited with status {self.status}\n"
                f"--- stderr ---\n{self.stderr}\n"
                f"--- console (tail) ---\n{_tail(self.console)}"
            )
        return self


def default_guest_dir() -> Path:
    env = os.environ.get("VHOSTFS_GUEST_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "vhostfs" / "guest"


def _guest_outputs(guest_dir: Path) -> list[Path]:
    return [guest_dir / "vmlinuz", guest_dir / "initramfs.img", guest_dir / "guest.info"]


def ensure_guest_built(
    guest_dir: str | os.PathLike[str] | None = None, *, force: bool = False, quiet: bool = True
) -> Path:
    """Build the guest kernel/initramfs if needed (build-guest.sh is idempotent) and return the
    directory holding ``vmlinuz`` (+ ``vmlinux`` when extractable) and ``initramfs.img``."""
    gdir = Path(guest_dir) if guest_dir is not None else default_guest_dir()
    script_mtime = BUILD_SCRIPT.stat().st_mtime
    outputs = _guest_outputs(gdir)
    if not force and all(p.exists() and p.stat().st_mtime > script_mtime for p in outputs):
        return gdir
    gdir.mkdir(parents=True, exist_ok=True)
    # Serialise concurrent builders (parallel test workers).
    with open(gdir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        cmd = [str(BUILD_SCRIPT), *(["--force"] if force else []), str(gdir)]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            raise GuestError(
                f"{BUILD_SCRIPT.name} failed with status {proc.returncode}:\n"
                + proc.stdout.decode(errors="replace")
            )
        if not quiet:
            print(proc.stdout.decode(errors="replace"), end="")
    return gdir


def qemu_available() -> bool:
    return shutil.which(QEMU_BINARY) is not None


# ---------------------------------------------------------------------------------------------
# cpio (newc) writer for the per-run archive


def _cpio_entry(name: str, mode: int, data: bytes = b"") -> bytes:
    name_b = name.encode() + b"\0"
    fields = [
        0,
        mode,
        0,
        0,
        1 if not stat.S_ISDIR(mode) else 2,
        0,
        len(data),
        0,
        0,
        0,
        0,
        len(name_b),
        0,
    ]
    header = b"070701" + b"".join(b"%08X" % f for f in fields)
    out = header + name_b
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def make_cpio(files: Mapping[str, bytes | tuple[bytes, int]]) -> bytes:
    """Build a newc archive.  Keys are absolute guest paths; values are contents or
    (contents, permission bits).  Parent directories are added automatically."""
    dirs: set[str] = set()
    entries: list[bytes] = []
    for path in sorted(files):
        rel = path.strip("/")
        if not rel or ".." in rel.split("/"):
            raise ValueError(f"bad guest path {path!r}")
        parts = rel.split("/")
        for i in range(1, len(parts)):
            d = "/".join(parts[:i])
            if d not in dirs:
                dirs.add(d)
                entries.append(_cpio_entry(d, stat.S_IFDIR | 0o755))
        value = files[path]
        data, perm = value if isinstance(value, tuple) else (value, 0o644)
        entries.append(_cpio_entry(rel, stat.S_IFREG | perm, data))
    entries.append(_cpio_entry("TRAILER!!!", 0))
    return b"".join(entries)


# ---------------------------------------------------------------------------------------------
# accelerator selection


def _kvm_usable_device() -> bool:
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def _qemu_version() -> str:
    try:
        out = subprocess.run(
            [QEMU_BINARY, "--version"], capture_output=True, text=True, check=False, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.splitlines()[0] if out else "?"


def _probe_key(kernel: Path) -> dict[str, str]:
    try:
        boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot_id = "?"
    return {
        "boot_id": boot_id,
        "host_kernel": os.uname().release,
        "qemu": _qemu_version(),
        "guest_kernel": f"{kernel.name}:{kernel.stat().st_size}",
    }


def detect_accel(guest_dir: str | os.PathLike[str] | None = None) -> str:
    """Return "kvm" or "tcg".

    ``/dev/kvm`` being present and openable is not enough: on this project's CI host (nested
    virtualisation) KVM guests stall early in boot instead of failing.  So the decision is a
    real boot of the test guest under KVM running ``true`` with a short timeout; the answer is
    cached in ``<guest_dir>/accel-probe.json`` keyed by host boot id, host kernel, QEMU version
    and guest kernel.  ``VHOSTFS_ACCEL=kvm|tcg`` overrides everything.
    """
    forced = os.environ.get("VHOSTFS_ACCEL", "").strip().lower()
    if forced in ("kvm", "tcg"):
        return forced
    if forced:
        raise GuestError(f"VHOSTFS_ACCEL must be 'kvm' or 'tcg', not {forced!r}")
    if not _kvm_usable_device():
        return "tcg"
    gdir = ensure_guest_built(guest_dir)
    kernel = _pick_kernel(gdir)
    cache = gdir / "accel-probe.json"
    with open(gdir / ".accel.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        key = _probe_key(kernel)
        with contextlib.suppress(OSError, ValueError):
            cached = json.loads(cache.read_text())
            if cached.get("key") == key and cached.get("accel") in ("kvm", "tcg"):
                return str(cached["accel"])
        accel = "tcg"
        detail = ""
        t0 = time.monotonic()
        try:
            res = run_guest(
                script="true", guest_dir=gdir, accel="kvm", timeout=KVM_PROBE_TIMEOUT, memory=256
            )
            if res.status == 0:
                accel = "kvm"
        except GuestError as exc:
            detail = str(exc).splitlines()[0]
        record = {
            "key": key,
            "accel": accel,
            "probe_seconds": round(time.monotonic() - t0, 2),
            "detail": detail,
        }
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        tmp.replace(cache)
        return accel


# ---------------------------------------------------------------------------------------------
# running the guest


def _pick_kernel(guest_dir: Path) -> Path:
    # vmlinux (ELF with a PVH entry note) skips the in-guest xz decompression, which costs ~4 s
    # under TCG; fall back to the bzImage.
    vmlinux = guest_dir / "vmlinux"
    return vmlinux if vmlinux.exists() else guest_dir / "vmlinuz"


def _qemu_opt(value: str | os.PathLike[str]) -> str:
    """Escape a value for QEMU's comma-separated option syntax."""
    return str(value).replace(",", ",,")


def _tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _decode(data: bytes) -> str:
    return data.decode("utf-8", errors="surrogateescape")


def _clean_console(data: bytes) -> str:
    # Drop SeaBIOS' terminal escape sequences and carriage returns.
    text = data.decode("utf-8", errors="replace")
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]|\x1bc", "", text)
    return text.replace("\r", "")


def build_qemu_command(
    *,
    kernel: Path,
    initrd: Path,
    cmdline: str,
    console_log: Path,
    stdout_log: Path,
    stderr_log: Path,
    accel: str,
    socket: str | os.PathLike[str] | None = None,
    tag: str = DEFAULT_TAG,
    queue_size: int | None = None,
    num_request_queues: int | None = None,
    disks: Sequence[str | os.PathLike[str]] = (),
    memory: int = DEFAULT_MEMORY_MIB,
    smp: int = DEFAULT_SMP,
    extra_args: Sequence[str] = (),
) -> list[str]:
    options: list[tuple[str, str]] = [
        ("-M", "q35"),
        ("-accel", accel),
        ("-cpu", "host" if accel == "kvm" else "max"),
        ("-m", f"{memory}M"),
        ("-smp", str(smp)),
        # vhost-user needs guest RAM in a shareable fd.
        ("-object", f"memory-backend-memfd,id=mem,size={memory}M,share=on"),
        ("-numa", "node,memdev=mem"),
        ("-monitor", "none"),
        ("-serial", f"file:{_qemu_opt(console_log)}"),  # ttyS0: kernel console
        ("-serial", f"file:{_qemu_opt(stdout_log)}"),  # ttyS1: script stdout
        ("-serial", f"file:{_qemu_opt(stderr_log)}"),  # ttyS2: script stderr
        ("-kernel", str(kernel)),
        ("-initrd", str(initrd)),
        ("-append", cmdline),
    ]
    if socket is not None:
        dev = f"vhost-user-fs-pci,chardev=vfs,tag={_qemu_opt(tag)}"
        if queue_size is not None:
            dev += f",queue-size={queue_size}"
        if num_request_queues is not None:
            dev += f",num-request-queues={num_request_queues}"
        options += [("-chardev", f"socket,id=vfs,path={_qemu_opt(socket)}"), ("-device", dev)]
    for i, disk in enumerate(disks):
        drive = f"file={_qemu_opt(disk)},if=none,id=disk{i},format=raw,readonly=on"
        options += [
            ("-drive", drive),
            ("-device", f"virtio-blk-pci,drive=disk{i},serial=vhostfs-disk{i}"),
        ]
    cmd = [QEMU_BINARY, "-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]
    for opt, value in options:
        cmd += [opt, value]
    cmd += list(extra_args)
    return cmd


def run_guest(
    socket: str | os.PathLike[str] | None = None,
    script: str | bytes | None = None,
    *,
    command: str | None = None,
    script_file: str | os.PathLike[str] | None = None,
    tag: str = DEFAULT_TAG,
    mount: str | None = DEFAULT_MOUNT,
    disks: Iterable[str | os.PathLike[str]] = (),
    files: Mapping[str, bytes | tuple[bytes, int]] | None = None,
    memory: int = DEFAULT_MEMORY_MIB,
    smp: int = DEFAULT_SMP,
    timeout: float = DEFAULT_TIMEOUT,
    queue_size: int | None = None,
    num_request_queues: int | None = None,
    guest_dir: str | os.PathLike[str] | None = None,
    accel: str | None = None,
    extra_cmdline: Sequence[str] = (),
    extra_qemu_args: Sequence[str] = (),
    raise_on_init_failure: bool = True,
) -> GuestResult:
    """Boot the guest, run a shell script in it (busybox ash), and return its stdout and status.

    socket: path of an already-listening vhost-user-fs daemon (None: no virtio-fs device).
    script / command / script_file: the script text, a one-line command, or a file (one of them).
    mount: with a socket, /init mounts ``tag`` there before the script runs; None leaves mounting
        to the script (``mount -t virtiofs <tag> <dir>``).
    disks: raw images attached read-only as virtio-blk disks /dev/vda, /dev/vdb, ... in order.
    files: extra files for the guest, {absolute guest path: bytes or (bytes, mode)}.
    Raises GuestTimeout / GuestError when QEMU fails or the guest never reports a status, and
    (unless raise_on_init_failure=False) when /init could not mount the tag.
    """
    sources = [x for x in (script, command, script_file) if x is not None]
    if len(sources) != 1:
        raise ValueError("give exactly one of script, command, script_file")
    if script_file is not None:
        body = Path(script_file).read_bytes()
    else:
        text = script if script is not None else command
        assert text is not None
        body = text.encode() if isinstance(text, str) else text
    if not body.endswith(b"\n"):
        body += b"\n"
    if socket is not None and (not tag or len(tag.encode()) > 36 or any(c.isspace() for c in tag)):
        raise ValueError(f"bad virtio-fs tag {tag!r} (1..36 bytes, no whitespace)")
    if mount is not None and any(c.isspace() for c in mount):
        raise ValueError(f"mount point may not contain whitespace: {mount!r}")
    if not qemu_available():
        raise GuestError(f"{QEMU_BINARY} not found (apt-get install qemu-system-x86)")

    gdir = ensure_guest_built(guest_dir)
    kernel = _pick_kernel(gdir)
    if accel is None:
        accel = detect_accel(gdir)

    run_files: dict[str, bytes | tuple[bytes, int]] = dict(files or {})
    run_files["/vhostfs/run.sh"] = (body, 0o755)

    cmdline = ["console=ttyS0", "quiet", "panic=-1"]
    if socket is not None and mount is not None:
        cmdline += [f"vhostfs.tag={tag}", f"vhostfs.mnt={mount}"]
    cmdline += list(extra_cmdline)

    with tempfile.TemporaryDirectory(prefix="vhostfs-vm-") as tmp:
        tmpdir = Path(tmp)
        initrd = tmpdir / "initrd.img"
        base = (gdir / "initramfs.img").read_bytes()
        # Concatenated archives must start 4-byte aligned; zero padding is skipped by the kernel.
        initrd.write_bytes(base + b"\0" * (-len(base) % 4) + make_cpio(run_files))
        console_log, stdout_log, stderr_log = (tmpdir / n for n in ("console", "stdout", "stderr"))
        qemu_log = tmpdir / "qemu.log"
        cmd = build_qemu_command(
            kernel=kernel,
            initrd=initrd,
            cmdline=" ".join(cmdline),
            console_log=console_log,
            stdout_log=stdout_log,
            stderr_log=stderr_log,
            accel=accel,
            socket=socket,
            tag=tag,
            queue_size=queue_size,
            num_request_queues=num_request_queues,
            disks=list(disks),
            memory=memory,
            smp=smp,
            extra_args=extra_qemu_args,
        )
        t0 = time.monotonic()
        with open(qemu_log, "wb") as qlog:
            proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=qlog, stderr=qlog, start_new_session=True
            )
            try:
                proc.wait(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                timed_out = True
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        duration = time.monotonic() - t0

        out = _read(stdout_log)
        err = _decode(_read(stderr_log))
        console = _clean_console(_read(console_log))
        qemu_msgs = _read(qemu_log).decode(errors="replace").strip()
        match = _EXIT_RE.search(out)

        def details() -> str:
            parts = [f"accel={accel}, {duration:.1f}s"]
            if qemu_msgs:
                parts.append(f"--- qemu ---\n{_tail(qemu_msgs)}")
            if out:
                text = _decode(out).encode("ascii", "backslashreplace").decode()
                parts.append(f"--- script stdout (tail) ---\n{_tail(text, 10)}")
            if err:
                parts.append(f"--- script stderr (tail) ---\n{_tail(err)}")
            parts.append(f"--- last console lines ---\n{_tail(console) or '(none)'}")
            return "\n".join(parts)

        if timed_out:
            raise GuestTimeout(f"guest did not finish within {timeout:g} s; {details()}")
        if match is None:
            raise GuestError(
                f"QEMU exited with status {proc.returncode} without a script exit status; "
                f"{details()}"
            )
        status = int(match.group(1))
        if raise_on_init_failure and status in INIT_FAILURES and ("vhostfs-init:" in err):
            raise GuestError(f"guest init failed: {INIT_FAILURES[status]}; {details()}")
        out_bytes = out[: match.start()]
        return GuestResult(
            output=_decode(out_bytes),
            status=status,
            stderr=err,
            console=console,
            output_bytes=out_bytes,
            duration=duration,
            accel=accel,
        )


def main(argv: Sequence[str] | None = None) -> int:
    import argparse
    import sys

    ap = argparse.ArgumentParser(
        prog="run-guest.py",
        description="Boot the vhostfs test guest against an already-listening vhost-user-fs "
        "daemon, run a script in it, print the script's stdout, exit with its status.",
    )
    ap.add_argument("--socket", help="vhost-user socket of a listening daemon")
    ap.add_argument("--tag", default=DEFAULT_TAG, help="virtio-fs tag (default %(default)s)")
    ap.add_argument(
        "--mount", default=DEFAULT_MOUNT, help="where /init mounts the tag (default %(default)s)"
    )
    ap.add_argument("--no-mount", action="store_true", help="leave mounting to the script")
    ap.add_argument("--disk", action="append", default=[], help="raw image, read-only virtio-blk")
    ap.add_argument("--memory", type=int, default=DEFAULT_MEMORY_MIB, help="MiB")
    ap.add_argument("--smp", type=int, default=DEFAULT_SMP)
    ap.add_argument("--queue-size", type=int)
    ap.add_argument("--num-request-queues", type=int)
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds")
    ap.add_argument("--accel", choices=["kvm", "tcg"], help="default: probe (cached)")
    ap.add_argument(
        "--guest-dir",
        help="build output dir (default $VHOSTFS_GUEST_DIR or ~/.cache/vhostfs/guest)",
    )
    ap.add_argument("--console", action="store_true", help="print the guest console to stderr")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--script", help="script file to run in the guest ('-' = stdin)")
    src.add_argument("--command", help="shell command to run in the guest")
    args = ap.parse_args(argv)

    script: bytes | None = None
    if args.script == "-":
        script = sys.stdin.buffer.read()
    elif args.script is not None:
        script = Path(args.script).read_bytes()
    try:
        res = run_guest(
            socket=args.socket,
            script=script,
            command=args.command,
            tag=args.tag,
            mount=None if args.no_mount else args.mount,
            disks=args.disk,
            memory=args.memory,
            smp=args.smp,
            timeout=args.timeout,
            queue_size=args.queue_size,
            num_request_queues=args.num_request_queues,
            guest_dir=args.guest_dir,
            accel=args.accel,
        )
    except (GuestError, ValueError, OSError) as exc:
        print(f"run-guest: {exc}", file=sys.stderr)
        return 255
    sys.stdout.buffer.write(res.output_bytes)
    sys.stdout.flush()
    if res.stderr:
        sys.stderr.write(res.stderr)
    if args.console:
        sys.stderr.write(res.console)
    print(f"run-guest: status {res.status}, {res.duration:.1f}s ({res.accel})", file=sys.stderr)
    return res.status
