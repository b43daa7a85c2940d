"""The sandbox's seccomp filter: a classic-BPF deny-list, built here and installed with TSYNC.

This is a deny-list, not virtiofsd's allow-list. virtiofsd allows ~100 named system calls and
kills on anything else; its syscall set is that of one Rust binary. A CPython daemon's set is
the interpreter's, uvloop's (libuv) and glibc's, differs between their versions and grows with
every code path we have not run yet (an allow-list that misses one kills the daemon in the
middle of a guest's workload). So the filter allows by default and kills the process on the
calls a compromised daemon would need to get out, or to attack the host kernel, and which the
daemon itself never makes once it serves:

- running programs: execve, execveat;
- new processes: fork, vfork, and clone without CLONE_THREAD (threads stay possible); clone3
  answers ENOSYS, since its flags sit in memory a filter cannot read, and glibc then falls back
  to clone, which is checked;
- other processes' memory and fds: ptrace, process_vm_readv/writev, process_madvise, pidfd_getfd;
- the mount table and namespaces: mount, umount2, pivot_root, chroot, unshare, setns, and the
  new mount API (open_tree, move_mount, fsopen, fsconfig, fsmount, fspick, mount_setattr);
- kernel attack surface we never use: bpf, keyctl, add_key, request_key, perf_event_open,
  userfaultfd, open_by_handle_at (which reaches inodes by handle, outside any root),
  kexec_load, kexec_file_load, init_module, finit_module, delete_module, reboot, swapon,
  swapoff; io_uring_setup answers ENOSYS instead, as uvloop's libuv (1.52) may try it for
  file operations and then falls back to its thread pool, where killing would end the daemon;
- the network: socket() of any family but AF_UNIX (the sandbox also has its own empty network
  namespace).

Calls from another ABI (not AUDIT_ARCH_X86_64, or x32 numbers with bit 30 set) always kill,
whatever the mode. "log" mode logs the deny-list's calls (SECCOMP_RET_LOG: the kernel's audit
log, or dmesg) and lets them run, for finding out what a workload needs.

x86_64 only: the numbers below are from <asm/unistd_64.h>.
"""

from __future__ import annotations

import ctypes
import os
import struct
from typing import Final, Literal, TypeAlias

AUDIT_ARCH_X86_64: Final = 0xC000003E
X32_SYSCALL_BIT: Final = 0x40000000

# struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6]
_NR: Final = 0
_ARCH: Final = 4
_ARG0_LOW: Final = 16  # little-endian: the low 32 bits of args[0]

# Classic BPF opcodes (linux/bpf_common.h).
_LD_W_ABS: Final = 0x00 | 0x00 | 0x20  # BPF_LD | BPF_W | BPF_ABS
_JEQ_K: Final = 0x05 | 0x10  # BPF_JMP | BPF_JEQ | BPF_K
_JGE_K: Final = 0x05 | 0x30  # BPF_JMP | BPF_JGE | BPF_K
_JSET_K: Final = 0x05 | 0x40  # BPF_JMP | BPF_JSET | BPF_K
_RET_K: Final = 0x06  # BPF_RET | BPF_K

RET_KILL_PROCESS: Final = 0x80000000
RET_ERRNO: Final = 0x00050000
RET_LOG: Final = 0x7FFC0000
RET_ALLOW: Final = 0x7FFF0000

_ENOSYS: Final = 38
_AF_UNIX: Final = 1
_CLONE_THREAD: Final = 0x00010000

# x86_64 numbers of the calls the filter kills outright.
DENIED: Final[dict[str, int]] = {
    "fork": 57,
    "vfork": 58,
    "execve": 59,
    "ptrace": 101,
    "pivot_root": 155,
    "chroot": 161,
    "mount": 165,
    "umount2": 166,
    "swapon": 167,
    "swapoff": 168,
    "reboot": 169,
    "init_module": 175,
    "delete_module": 176,
    "kexec_load": 246,
    "add_key": 248,
    "request_key": 249,
    "keyctl": 250,
    "unshare": 272,
    "perf_event_open": 298,
    "open_by_handle_at": 304,
    "setns": 308,
    "process_vm_readv": 310,
    "process_vm_writev": 311,
    "finit_module": 313,
    "kexec_file_load": 320,
    "bpf": 321,
    "execveat": 322,
    "userfaultfd": 323,
    "open_tree": 428,
    "move_mount": 429,
    "fsopen": 430,
    "fsconfig": 431,
    "fsmount": 432,
    "fspick": 433,
    "pidfd_getfd": 438,
    "process_madvise": 440,
    "mount_setattr": 442,
}
SYS_SOCKET: Final = 41
SYS_CLONE: Final = 56
SYS_CLONE3: Final = 435
SYS_IO_URING_SETUP: Final = 425
SYS_SECCOMP: Final = 317

SECCOMP_SET_MODE_FILTER: Final = 1
SECCOMP_FILTER_FLAG_TSYNC: Final = 1

Instruction: TypeAlias = tuple[int, int, int, int]  # code, jt, jf, k


def _ld(offset: int) -> Instruction:
    return (_LD_W_ABS, 0, 0, offset)


def _ret(action: int) -> Instruction:
    return (_RET_K, 0, 0, action)


def program(mode: Literal["kill", "log"]) -> list[Instruction]:
    """The filter, as (code, jt, jf, k) instructions; jumps are relative to the next one."""
    deny = RET_KILL_PROCESS if mode == "kill" else RET_LOG
    prog: list[Instruction] = [
        _ld(_ARCH),
        (_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _ret(RET_KILL_PROCESS),
        _ld(_NR),
        (_JGE_K, 0, 1, X32_SYSCALL_BIT),
        _ret(RET_KILL_PROCESS),
    ]
    for nr in sorted(DENIED.values()):
        prog += [(_JEQ_K, 0, 1, nr), _ret(deny)]
    prog += [(_JEQ_K, 0, 1, SYS_CLONE3), _ret(RET_ERRNO | _ENOSYS)]
    prog += [(_JEQ_K, 0, 1, SYS_IO_URING_SETUP), _ret(RET_ERRNO | _ENOSYS)]
    # clone: only with CLONE_THREAD (a new thread, not a new process). Both branches return,
    # so loading the argument over the syscall number is fine.
    prog += [
        (_JEQ_K, 0, 4, SYS_CLONE),
        _ld(_ARG0_LOW),
        (_JSET_K, 1, 0, _CLONE_THREAD),
        _ret(deny),
        _ret(RET_ALLOW),
    ]
    # socket: AF_UNIX only.
    prog += [
        (_JEQ_K, 0, 4, SYS_SOCKET),
        _ld(_ARG0_LOW),
        (_JEQ_K, 1, 0, _AF_UNIX),
        _ret(deny),
        _ret(RET_ALLOW),
    ]
    prog.append(_ret(RET_ALLOW))
    return prog


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


_libc: Final = ctypes.CDLL(None, use_errno=True)
_syscall: Final = _libc.syscall
_syscall.restype = ctypes.c_long


def install(mode: Literal["kill", "log"]) -> None:
    """Install the filter on every thread of the process (TSYNC). The caller must have set
    no_new_privs (or hold CAP_SYS_ADMIN). Raises OSError."""
    prog = program(mode)
    raw = b"".join(struct.pack("<HBBI", *insn) for insn in prog)
    buf = ctypes.create_string_buffer(raw, len(raw))
    fprog = _SockFprog(len(prog), ctypes.cast(buf, ctypes.c_void_p))
    result = _syscall(
        ctypes.c_long(SYS_SECCOMP),
        ctypes.c_long(SECCOMP_SET_MODE_FILTER),
        ctypes.c_long(SECCOMP_FILTER_FLAG_TSYNC),
        ctypes.byref(fprog),
    )
    if result != 0:
        err = ctypes.get_errno()
        if result > 0:  # TSYNC: the id of a thread that could not take the filter
            raise OSError(f"seccomp: thread {result} could not take the filter")
        raise OSError(err, f"seccomp: {os.strerror(err)}")
