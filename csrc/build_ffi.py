"""cffi builder for vhostfs._vring (out-of-line API mode).

Each header (vring.h, lz4_block.h) is both the C header and a part of the cdef, so the two cannot
drift apart. setuptools runs this file with the project root as the working directory and wants
source paths relative to it; run directly (`python csrc/build_ffi.py`, from anywhere) it only
test-compiles under build/.
"""

import os

import cffi  # type: ignore[import-untyped,unused-ignore]

_HERE = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_HERE)


def _rel(path: str) -> str:
    """path relative to the project root when we run from it (setuptools), else absolute."""
    if os.path.abspath(os.getcwd()) == _ROOT:
        return os.path.relpath(path, _ROOT)
    return path


_HEADERS = ["vring.h", "lz4_block.h"]
_SOURCES = ["vring.c", "lz4_block.c"]


def _read(name: str) -> str:
    with open(os.path.join(_HERE, name), encoding="utf-8") as f:
        return f.read()


_CDEF = "\n".join(_read(name) for name in _HEADERS)

ffibuilder = cffi.FFI()
ffibuilder.cdef(_CDEF)
ffibuilder.set_source(
    "vhostfs._vring",
    "\n".join(f'#include "{name}"' for name in _HEADERS),
    sources=[_rel(os.path.join(_HERE, name)) for name in _SOURCES],
    include_dirs=[_rel(_HERE)],
    depends=[_rel(os.path.join(_HERE, name)) for name in _HEADERS],
    extra_compile_args=[
        "-O2",
        "-D_FORTIFY_SOURCE=2",
        "-fstack-protector-strong",
        "-fPIC",
        "-Wall",
        "-Wextra",
        "-Werror=implicit-function-declaration",
        "-std=gnu11",
    ],
    extra_link_args=["-Wl,-z,relro,-z,now", "-Wl,-z,noexecstack"],
)

if __name__ == "__main__":
    # A standalone build under build/cffi, to check that the C compiles. It is not copied into
    # vhostfs/: a cpython-311 .so there would shadow the _vring.abi3.so that
    # `pip install -e .` builds. Use pip for a usable module.
    print(ffibuilder.compile(tmpdir=os.path.join(_ROOT, "build", "cffi"), verbose=True))
