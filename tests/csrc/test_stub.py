"""vhostfs/_vring.pyi against the built module: the stub names every lib symbol, and no other.

The headers are the cdef, so C and cffi cannot drift; this keeps the stub from drifting either.
"""

import ast
from pathlib import Path

import vhostfs
from vhostfs._vring import ffi, lib

STUB = Path(vhostfs.__file__).with_name("_vring.pyi")


def _class_members(name: str) -> set[str]:
    tree = ast.parse(STUB.read_text())
    [cls] = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name]
    members = set()
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            members.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            members.add(node.target.id)
    return members


def test_the_stub_names_every_lib_symbol_and_no_other() -> None:
    assert _class_members("_Lib") == set(dir(lib))


def test_struct_fields_match_the_cdef() -> None:
    for cdecl, name in [
        ("struct vq_ring", "VqRing"),
        ("struct vq_chain", "VqChain"),
        ("struct vq_memory", "VqMemory"),
        ("struct vq_region", "VqRegion"),
    ]:
        fields = {field for field, _ in ffi.typeof(cdecl).fields}
        assert _class_members(name) == fields, cdecl
    iov_fields = {field for field, _ in ffi.typeof("struct vq_iov").fields}
    assert iov_fields <= _class_members("VqIov")
