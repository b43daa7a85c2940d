"""`--sandbox namespace`: confine the daemon to the share before it serves a request.

The passthrough's own rules (one name at a time beside an O_PATH descriptor, never a host path
built from guest input) keep a *correct* daemon inside the share. The sandbox is for a daemon
that is not correct: a bug that lets the guest reach a path, or run code, should find nothing
of the host to reach. `enter()` runs these steps in order, in the daemon's process, while it is
still single-threaded (capabilities are per thread, and glibc broadcasts none of this):

1. Check: x86_64 (the seccomp filter's syscall numbers), root, one thread.
2. `preload.preload()`: import everything the serving path can import, read the time zone,
   load libgcc_s; after the pivot every absolute path is the guest's (see preload.py).
3. Open /proc/self/status (the passthrough reads its umask there) and read cap_last_cap.
4. unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC): a mount namespace of our own, an empty
   network namespace (only loopback, down) and no SysV IPC shared with the host. The vhost-user
   socket is already bound at its host path, and a path-bound Unix socket keeps accepting
   whatever the namespace. No PID namespace: entering one takes a fork, and the daemon would
   then run as a child that the launcher (Kata, which SIGKILLs the daemon it started) does not
   know; virtiofsd pays that with a waiting parent, we do not.
5. mount(NULL, "/", MS_SLAVE | MS_REC): our mounts and unmounts stay ours, the host's still
   arrive, so a volume bind-mounted under the share after start appears in the guest (Kata
   relies on it).
6. A fresh proc on /proc, /proc/self/fd bind-mounted over it, and that opened O_PATH: the
   daemon's fd directory, whose ".." is its own mount root (no way to /proc/<pid> or to
   /proc/1/root through it).
7. `preload.freeze()`: from here on, no imports and no source lines for tracebacks; and
   --syslog's handler may no longer reconnect by path.
8. Bind the share onto itself (MS_BIND | MS_REC, so it is a mount point with its submounts),
   chdir into it, pivot_root(".", "."), detach the old root (umount2(".", MNT_DETACH)) and
   chdir("/"): "/" is the share; nothing else of the host is reachable by path.
9. fchdir() to the fd directory of step 6 and switch the passthrough to relative names
   (`core.use_fd_directory_cwd`): "N" in the working directory is /proc/self/fd/N for every
   thread (the cwd is process-wide and nothing else in the daemon uses relative paths).
10. Capabilities: clear the ambient set, drop everything else from the bounding set, and keep
    only CHOWN, DAC_OVERRIDE, FOWNER, FSETID, SETGID, SETUID, MKNOD and SETFCAP (virtiofsd's
    list) in the effective, permitted and inheritable sets; SYS_ADMIN too when xattrs are
    served, since the kernel wants it for trusted.* xattrs, which overlayfs in the guest
    stores its metadata in. (That keeps a powerful capability; the seccomp filter takes away
    the calls that make it dangerous: mount, namespaces, bpf, keyctl, ...)
11. PR_SET_NO_NEW_PRIVS, then the seccomp filter (seccomp.py: a deny-list, and why) unless
    `seccomp="none"`.

The caller (Daemon.serve) has bound its socket before, and opens the passthrough after, at "/":
a descriptor opened before the pivot points into the detached old tree, which no longer
receives the host's new mounts.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import logging.handlers
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Final

from vhostfs.daemon import preload, seccomp
from vhostfs.daemon.config import SandboxError, SeccompMode
from vhostfs.fs.passthrough import core

log = logging.getLogger(__name__)

CLONE_NEWNS: Final = 0x00020000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWNET: Final = 0x40000000

MS_NOSUID: Final = 2
MS_NODEV: Final = 4
MS_NOEXEC: Final = 8
MS_BIND: Final = 4096
MS_REC: Final = 16384
MS_SLAVE: Final = 1 << 19
MNT_DETACH: Final = 2

PR_CAPBSET_DROP: Final = 24
PR_SET_NO_NEW_PRIVS: Final = 38
PR_CAP_AMBIENT: Final = 47
PR_CAP_AMBIENT_CLEAR_ALL: Final = 4

SYS_CAPGET: Final = 125
SYS_CAPSET: Final = 126
SYS_PIVOT_ROOT: Final = 155
_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522

CAPABILITIES: Final[dict[str, int]] = {
    "CHOWN": 0,
    "DAC_OVERRIDE": 1,
    "FOWNER": 3,
    "FSETID": 4,
    "SETGID": 6,
    "SETUID": 7,
    "SYS_ADMIN": 21,
    "MKNOD": 27,
    "SETFCAP": 31,
}
BASE_CAPABILITIES: Final = (
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "SETGID",
    "SETUID",
    "MKNOD",
    "SETFCAP",
)

# Resolved now, while the process still sees the host's libraries (they are never looked up
# again: ctypes keeps the function pointers).
_libc: Final = ctypes.CDLL(None, use_errno=True)
_unshare: Final = _libc.unshare
_unshare.argtypes = [ctypes.c_int]
_unshare.restype = ctypes.c_int
_mount: Final = _libc.mount
_mount.argtypes = [
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_char_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
]
_mount.restype = ctypes.c_int
_umount2: Final = _libc.umount2
_umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_umount2.restype = ctypes.c_int
_prctl: Final = _libc.prctl
_prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
_prctl.restype = ctypes.c_int
_syscall: Final = _libc.syscall
_syscall.restype = ctypes.c_long


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [
        ("effective", ctypes.c_uint32),
        ("permitted", ctypes.c_uint32),
        ("inheritable", ctypes.c_uint32),
    ]


@dataclass(frozen=True, slots=True)
class Sandboxed:
    """What `enter` leaves open: the fd directory (also the working directory) and the
    /proc/self/status descriptor the passthrough reads its umask from."""

    fd_directory: int
    status_fd: int
    capabilities: int  # the bit mask kept in the effective and permitted sets
    seccomp: SeccompMode


def kept_capabilities(xattr: bool) -> int:
    """The capability mask the sandbox keeps (SYS_ADMIN only when xattrs are served)."""
    names = [*BASE_CAPABILITIES, *(("SYS_ADMIN",) if xattr else ())]
    mask = 0
    for name in names:
        mask |= 1 << CAPABILITIES[name]
    return mask


def enter(root: str, *, xattr: bool = True, seccomp_mode: SeccompMode = "kill") -> Sandboxed:
    """Confine this process to `root` (see the module docstring for the steps). Raises
    SandboxError; a failure after step 4 leaves the process half-confined, and the caller
    must exit."""
    _check_can_enter()
    root = os.path.realpath(root)
    try:
        preload.preload()
    except (ImportError, OSError) as e:
        raise SandboxError(f"sandbox: cannot preload what the daemon needs: {e}") from None
    with _step("open /proc/self/status"):
        status_fd = os.open("/proc/self/status", os.O_RDONLY | os.O_CLOEXEC)
    cap_last = _cap_last_cap()
    _check(_unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC), "unshare(NEWNS|NEWNET|NEWIPC)")
    fd_directory = _isolate_proc()
    preload.freeze()
    _pin_syslog()
    _pivot_into(root)
    os.fchdir(fd_directory)
    core.use_fd_directory_cwd(status_fd)
    keep = kept_capabilities(xattr)
    _drop_capabilities(keep, cap_last)
    _check(_prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    if seccomp_mode != "none":
        try:
            seccomp.install(seccomp_mode)
        except OSError as e:
            raise SandboxError(f"sandbox: {e}") from None
    return Sandboxed(fd_directory, status_fd, keep, seccomp_mode)


def _check_can_enter() -> None:
    machine = os.uname().machine
    if machine != "x86_64":
        raise SandboxError(f"--sandbox namespace needs x86_64 (its seccomp filter), not {machine}")
    if os.geteuid() != 0:
        raise SandboxError("--sandbox namespace needs root (namespaces, pivot_root, capabilities)")
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise SandboxError(f"the sandbox must be entered single-threaded, not with {threads}")


def _isolate_proc() -> int:
    """Steps 5 and 6; returns the fd directory's O_PATH descriptor."""
    _check(_mount(None, b"/", None, MS_SLAVE | MS_REC, None), "make / a slave mount (MS_REC)")
    flags = MS_NOSUID | MS_NODEV | MS_NOEXEC
    _check(_mount(b"proc", b"/proc", b"proc", flags, None), "mount a new proc on /proc")
    _check(_mount(b"/proc/self/fd", b"/proc", None, MS_BIND, None), "bind /proc/self/fd")
    with _step("open the fd directory"):
        return os.open("/proc", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)


def _pin_syslog() -> None:
    """--syslog's handler is connected to /dev/log already; after the pivot a reconnect (when
    the host's syslog daemon restarts) would find the guest's /dev/log, so it fails instead
    (the record is reported on stderr, as any logging error)."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.handlers.SysLogHandler) and handler.unixsocket:
            setattr(handler, "_connect_unixsocket", _no_reconnect)  # noqa: B010


def _no_reconnect(address: object) -> None:
    raise OSError(errno.ENOENT, "no syslog reconnect from inside the sandbox")


def _pivot_into(root: str) -> None:
    """Step 8: root becomes "/", the old root is detached."""
    path = os.fsencode(root)
    _check(_mount(path, path, None, MS_BIND | MS_REC, None), f"bind {root} onto itself")
    with _step(f"chdir {root}"):
        os.chdir(path)
    _check(_syscall(ctypes.c_long(SYS_PIVOT_ROOT), b".", b"."), f"pivot_root into {root}")
    _check(_umount2(b".", MNT_DETACH), "detach the old root")
    os.chdir("/")


def _drop_capabilities(keep: int, cap_last: int) -> None:
    """Step 10: the bounding set first (dropping needs CAP_SETPCAP, which capset removes)."""
    for cap in range(cap_last + 1):
        if not keep & (1 << cap):
            _check(_prctl(PR_CAPBSET_DROP, cap, 0, 0, 0), f"drop capability {cap} (bounding)")
    _check(_prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "clear ambient caps")
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(_syscall(ctypes.c_long(SYS_CAPGET), ctypes.byref(header), data), "capget")
    for i, part in enumerate(data):
        word = (keep >> (32 * i)) & 0xFFFF_FFFF
        part.effective = word
        part.permitted = word
        part.inheritable &= word
    _check(_syscall(ctypes.c_long(SYS_CAPSET), ctypes.byref(header), data), "capset")


def _cap_last_cap() -> int:
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            return int(f.read())
    except (OSError, ValueError) as e:
        raise SandboxError(f"sandbox: cannot read cap_last_cap: {e}") from None


def _check(result: int, what: str) -> None:
    if result != 0:
        err = ctypes.get_errno()
        hint = " (no CAP_SYS_ADMIN here? --sandbox none runs without)" if err == errno.EPERM else ""
        raise SandboxError(f"sandbox: {what}: {os.strerror(err)}{hint}")


@contextlib.contextmanager
def _step(what: str) -> Iterator[None]:
    """An OSError in the body becomes a SandboxError naming the step."""
    try:
        yield
    except OSError as e:
        raise SandboxError(f"sandbox: {what}: {e.strerror}") from None
