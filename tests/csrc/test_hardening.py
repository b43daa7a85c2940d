"""The built extension carries the hardening that csrc/build_ffi.py asks for.

Read from the ELF file itself, so a build that silently dropped a flag fails here:
full RELRO (-z relro -z now), a non-executable stack (-z noexecstack), and the stack protector.

_FORTIFY_SOURCE cannot be checked the same way. It swaps a call for its *_chk variant only where
the compiler knows the destination size, and every memcpy in vring.c copies into or out of guest
buffers whose size is known only at run time, so the object imports no *_chk function even
though the flag is on. The flag is checked in the build arguments instead.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest
from elftools.elf.constants import P_FLAGS
from elftools.elf.dynamic import DynamicSection
from elftools.elf.elffile import ELFFile
from elftools.elf.sections import SymbolTableSection

from vhostfs import _vring

DF_BIND_NOW = 0x8
DF_1_NOW = 0x1


@pytest.fixture(scope="module")
def elf() -> Iterator[ELFFile]:
    with open(_vring.__file__, "rb") as f:
        yield ELFFile(f)


def dynamic_tags(elf: ELFFile) -> dict[str, int]:
    tags: dict[str, int] = {}
    for section in elf.iter_sections():
        if isinstance(section, DynamicSection):
            for tag in section.iter_tags():
                tags[tag.entry.d_tag] = tag.entry.d_val
    return tags


def imported_symbols(elf: ELFFile) -> set[str]:
    dynsym = elf.get_section_by_name(".dynsym")
    assert isinstance(dynsym, SymbolTableSection)
    return {
        sym.name.split("@")[0]
        for sym in dynsym.iter_symbols()
        if sym.name and sym["st_shndx"] == "SHN_UNDEF"
    }


def test_full_relro(elf: ELFFile) -> None:
    assert any(seg["p_type"] == "PT_GNU_RELRO" for seg in elf.iter_segments())
    tags = dynamic_tags(elf)
    bind_now = tags.get("DT_FLAGS", 0) & DF_BIND_NOW or tags.get("DT_FLAGS_1", 0) & DF_1_NOW
    assert bind_now, "linked without -z now: the GOT stays writable"
    assert "DT_TEXTREL" not in tags


def test_stack_not_executable(elf: ELFFile) -> None:
    stacks = [seg for seg in elf.iter_segments() if seg["p_type"] == "PT_GNU_STACK"]
    assert len(stacks) == 1
    assert not stacks[0]["p_flags"] & P_FLAGS.PF_X


def test_no_writable_and_executable_segment(elf: ELFFile) -> None:
    for seg in elf.iter_segments():
        if seg["p_type"] == "PT_LOAD":
            flags = seg["p_flags"]
            assert not (flags & P_FLAGS.PF_W and flags & P_FLAGS.PF_X)


def test_stack_protector(elf: ELFFile) -> None:
    assert "__stack_chk_fail" in imported_symbols(elf)


def test_fortify_is_requested() -> None:
    # See the module docstring for why the binary cannot show it.
    path = os.path.join(os.path.dirname(__file__), "..", "..", "csrc", "build_ffi.py")
    spec = importlib.util.spec_from_file_location("_vring_build_ffi", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kwds = module.ffibuilder._assigned_source[3]  # set_source's keyword arguments
    assert "-D_FORTIFY_SOURCE=2" in kwds["extra_compile_args"]
    assert any(arg.startswith("-O") and arg != "-O0" for arg in kwds["extra_compile_args"])
