"""Load everything the serving daemon can need, then make Python load nothing more.

After the sandbox's pivot_root every absolute path resolves inside the share, which the guest
writes as root. A module imported lazily from then on (`import x` inside a function, a codec
looked up by name, `concurrent.futures` resolving an attribute) would run the guest's file with
the daemon's privileges; a traceback printed with its source lines would open the guest's file
at the frame's path (a FIFO there hangs the daemon); a shared library loaded on demand (glibc
dlopens libgcc_s to unwind a thread at pthread_exit) would be the guest's too. So, while the
process still sees the host:

1. `preload()` imports every module of the serving path (the vhostfs packages a passthrough
   session runs, and the standard modules they or uvloop, asyncio, logging and traceback may
   import late), caches the codecs a name lookup may hit, reads the time zone once (glibc then
   never re-reads /etc/localtime) and loads libgcc_s.
2. `freeze()` then refuses every later import (a meta-path finder first in line raises
   ImportError naming the module; sys.path, the path hooks and their cache emptied; no
   bytecode written), makes linecache return no lines without touching any file, and installs
   sys.excepthook, sys.unraisablehook and threading.excepthook that print exceptions with
   their frames but no source lines (CPython's built-in printers open the source files
   themselves, bypassing linecache).

A module not listed that the daemon does import late then fails with ImportError, which the
request that needed it answers as any unexpected error (EIO, logged): closed, never open.
"""

from __future__ import annotations

import codecs
import ctypes
import importlib
import linecache
import pkgutil
import sys
import threading
import time
import traceback
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from types import ModuleType, TracebackType
from typing import Any, Final

# Packages a passthrough session runs, imported whole (their function-level imports included).
SERVING_PACKAGES: Final = (
    "vhostfs.fuse",
    "vhostfs.vhost",
    "vhostfs.fs",
    "vhostfs.daemon",
    "vhostfs.api",
)
SERVING_MODULES: Final = ("vhostfs.segments", "vhostfs._vring")

# Standard modules imported late by the serving path, uvloop, asyncio, logging, traceback and
# warnings, or by anything a codec or an exception handler may reach.
STANDARD_MODULES: Final = (
    "asyncio",
    "asyncio.base_events",
    "asyncio.base_futures",
    "asyncio.base_subprocess",
    "asyncio.base_tasks",
    "asyncio.constants",
    "asyncio.coroutines",
    "asyncio.events",
    "asyncio.exceptions",
    "asyncio.format_helpers",
    "asyncio.futures",
    "asyncio.locks",
    "asyncio.log",
    "asyncio.mixins",
    "asyncio.protocols",
    "asyncio.queues",
    "asyncio.runners",
    "asyncio.selector_events",
    "asyncio.sslproto",
    "asyncio.staggered",
    "asyncio.streams",
    "asyncio.subprocess",
    "asyncio.taskgroups",
    "asyncio.tasks",
    "asyncio.threads",
    "asyncio.timeouts",
    "asyncio.transports",
    "asyncio.trsock",
    "asyncio.unix_events",
    "uvloop",
    "concurrent.futures",
    "concurrent.futures._base",
    "concurrent.futures.thread",
    "threading",
    "queue",
    "selectors",
    "signal",
    "socket",
    "select",
    "mmap",
    "errno",
    "stat",
    "struct",
    "array",
    "ctypes",
    "json",
    "json.decoder",
    "json.encoder",
    "json.scanner",
    "logging",
    "logging.handlers",
    "traceback",
    "linecache",
    "tokenize",
    "warnings",
    "tracemalloc",
    "inspect",
    "reprlib",
    "weakref",
    "copy",
    "contextvars",
    "dataclasses",
    "enum",
    "functools",
    "collections",
    "collections.abc",
    "datetime",
    "_strptime",
    "encodings",
    "encodings.aliases",
    "encodings.ascii",
    "encodings.idna",
    "encodings.latin_1",
    "encodings.punycode",
    "encodings.raw_unicode_escape",
    "encodings.unicode_escape",
    "encodings.utf_8",
    "encodings.utf_8_sig",
    "stringprep",
    "unicodedata",
)
# Looked up once, so the codec registry answers these names from its cache.
CODECS: Final = ("utf-8", "utf-8-sig", "latin-1", "ascii", "idna", "unicode-escape")
# dlopened by glibc on demand (thread unwinding at pthread_exit / pthread_cancel).
LIBRARIES: Final = ("libgcc_s.so.1",)


def preload() -> None:
    """Import and load everything listed above; ImportError or OSError if something is
    missing (the sandbox refuses to start rather than start half-loaded)."""
    for name in (*SERVING_MODULES, *STANDARD_MODULES):
        importlib.import_module(name)
    for package in SERVING_PACKAGES:
        _import_package(package)
    for name in CODECS:
        codecs.lookup(name)
    time.localtime()  # glibc reads /etc/localtime now, once
    time.strftime("%c")
    for library in LIBRARIES:
        ctypes.CDLL(library)
    traceback.format_exception(ValueError, ValueError("x"), None)


def _import_package(name: str) -> None:
    package = importlib.import_module(name)
    path: Sequence[str] = getattr(package, "__path__", ())
    for info in pkgutil.iter_modules(path, name + "."):
        if info.name.rsplit(".", 1)[-1] == "__main__":
            continue
        if info.ispkg:
            _import_package(info.name)
        else:
            importlib.import_module(info.name)


class ImportRefused:
    """A meta-path finder that refuses every import it is asked about."""

    @staticmethod
    def find_spec(
        fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        raise ImportError(f"no imports in the sandbox: {fullname}", name=fullname)


def freeze() -> None:
    """No imports and no source lines from now on (see the module docstring)."""
    sys.meta_path.insert(0, ImportRefused())
    sys.path.clear()
    sys.path_hooks.clear()
    sys.path_importer_cache.clear()
    sys.dont_write_bytecode = True
    _silence_linecache()
    sys.excepthook = _excepthook
    sys.unraisablehook = _unraisablehook
    threading.excepthook = _thread_excepthook


def _silence_linecache() -> None:
    linecache.clearcache()
    setattr(linecache, "getline", _no_line)  # noqa: B010  (mypy: no function assignment)
    setattr(linecache, "getlines", _no_lines)  # noqa: B010
    setattr(linecache, "updatecache", _no_lines)  # noqa: B010
    setattr(linecache, "checkcache", _nothing)  # noqa: B010
    setattr(linecache, "lazycache", _not_cached)  # noqa: B010


def _no_line(*args: Any, **kwargs: Any) -> str:
    return ""


def _no_lines(*args: Any, **kwargs: Any) -> list[str]:
    return []


def _nothing(*args: Any, **kwargs: Any) -> None:
    return None


def _not_cached(*args: Any, **kwargs: Any) -> bool:
    return False


def print_exception(
    exc_type: type[BaseException] | None,
    exc: BaseException | None,
    tb: TracebackType | None,
    heading: str = "",
) -> None:
    """Print an exception with its frames (file, line, function) and no source lines; never
    raises (a failing hook would hand the exception to CPython's own printer)."""
    try:
        lines = [heading + "\n"] if heading else []
        if exc_type is not None:
            lines += traceback.format_exception(exc_type, exc, tb)
        sys.stderr.write("".join(lines))
        sys.stderr.flush()
    except BaseException:  # nothing is left to report it with
        pass


def _excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    print_exception(exc_type, exc, tb)


def _unraisablehook(unraisable: Any) -> None:
    message = unraisable.err_msg or "Exception ignored in"
    heading = f"{message}: {unraisable.object!r}" if unraisable.object is not None else message
    print_exception(unraisable.exc_type, unraisable.exc_value, unraisable.exc_traceback, heading)


def _thread_excepthook(args: Any) -> None:
    name = args.thread.name if args.thread is not None else "?"
    print_exception(
        args.exc_type, args.exc_value, args.exc_traceback, f"Exception in thread {name}:"
    )
