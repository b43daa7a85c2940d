"""Sources: directories and OCI tar layers (plain, gzip, zstd) applied in order, with
whiteouts, opaque directories, hard links across layers, and tar metadata (pax xattrs,
nanosecond mtimes, devices, sparse members)."""

from __future__ import annotations

import io
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest
import zstandard

from tests.rafs.build_support import build, run_vhostfs
from tests.rafs.images import open_blobs, read_file
from vhostfs.rafs import open_image
from vhostfs.rafs.build import BuildError
from vhostfs.rafs.build.source import Spool, load_sources
from vhostfs.rafs.build.tree import Node

Member = tuple[tarfile.TarInfo, bytes]


def regular(name: str, data: bytes = b"", mode: int = 0o644, **fields: object) -> Member:
    info = tarfile.TarInfo(name)
    info.size, info.mode = len(data), mode
    for key, value in fields.items():
        setattr(info, key, value)
    return info, data


def special(name: str, kind: bytes, **fields: object) -> Member:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in fields.items():
        setattr(info, key, value)
    return info, b""


def directory(name: str) -> Member:
    return special(name, tarfile.DIRTYPE)


def hard_link(name: str, target: str) -> Member:
    return special(name, tarfile.LNKTYPE, linkname=target)


def write_layer(path: Path, members: list[Member], compression: str = "") -> Path:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    raw = buffer.getvalue()
    if compression == "gz":
        import gzip

        raw = gzip.compress(raw, mtime=0)
    elif compression == "zst":
        raw = zstandard.ZstdCompressor().compress(raw)
    path.write_bytes(raw)
    return path


def flatten(root: Node) -> dict[str, tuple[str, bytes]]:
    """path -> (kind letter, content) for the whole tree."""
    result: dict[str, tuple[str, bytes]] = {}
    pending: list[tuple[str, Node]] = [("", root)]
    while pending:
        prefix, node = pending.pop()
        for name, child in node.entries.items():
            path = f"{prefix}/{name.decode()}"
            if child.is_dir:
                result[path] = ("d", b"")
                pending.append((path, child))
            elif stat.S_ISLNK(child.mode):
                result[path] = ("l", child.target)
            else:
                content = b""
                if child.data is not None:
                    with open(child.data.path, "rb") as f:
                        f.seek(child.data.offset)
                        content = f.read(child.data.size)
                result[path] = ("f", content)
    return result


def load(tmp_path: Path, *sources: Path) -> tuple[Node, dict[str, tuple[str, bytes]]]:
    """The tree's root, and its flattened form read while the spool still exists."""
    with Spool(tmp_path) as spool:
        root = load_sources(sources, spool)
        return root, flatten(root)


def test_layers_apply_in_order_with_whiteouts_and_opaque_directories(tmp_path: Path) -> None:
    lower = write_layer(
        tmp_path / "lower.tar",
        [
            directory("etc"),
            regular("etc/passwd", b"root:x:0:0"),
            regular("etc/hosts", b"127.0.0.1 localhost"),
            regular("etc/gone", b"deleted above"),
            directory("var/cache"),
            regular("var/cache/a", b"a"),
            regular("var/cache/b", b"b"),
            regular("opt/keep/deep", b"all of opt goes"),
            hard_link("hosts-link", "etc/hosts"),
            regular("file-then-dir", b"file"),
            regular("dir-then-file/child", b"child"),
        ],
    )
    upper = write_layer(
        tmp_path / "upper.tar.gz",
        [
            regular("etc/.wh.gone"),
            regular("etc/passwd", b"root:x:0:0:replaced"),
            regular("etc/same", b"added and whited out in one layer: stays"),
            regular("etc/.wh.same"),
            regular("var/cache/.wh..wh..opq"),
            regular("var/cache/c", b"c"),
            regular(".wh.opt"),
            directory("file-then-dir"),
            regular("file-then-dir/x", b"x"),
            regular("dir-then-file", b"now a file"),
            regular("./new/deep/file", b"parents made up"),
            hard_link("upper-link", "etc/hosts"),
        ],
        compression="gz",
    )
    top = tmp_path / "top-directory"
    (top / "etc").mkdir(parents=True)
    (top / ".wh.upper-link").write_bytes(b"")
    (top / "etc" / "from-directory").write_bytes(b"a directory layer")

    root, flat = load(tmp_path, lower, upper, top)

    assert flat == {
        "/etc": ("d", b""),
        "/etc/passwd": ("f", b"root:x:0:0:replaced"),
        "/etc/hosts": ("f", b"127.0.0.1 localhost"),
        "/etc/same": ("f", b"added and whited out in one layer: stays"),
        "/etc/from-directory": ("f", b"a directory layer"),
        "/var": ("d", b""),
        "/var/cache": ("d", b""),
        "/var/cache/c": ("f", b"c"),
        "/hosts-link": ("f", b"127.0.0.1 localhost"),
        "/file-then-dir": ("d", b""),
        "/file-then-dir/x": ("f", b"x"),
        "/dir-then-file": ("f", b"now a file"),
        "/new": ("d", b""),
        "/new/deep": ("d", b""),
        "/new/deep/file": ("f", b"parents made up"),
    }
    etc = root.entries[b"etc"]
    assert root.entries[b"hosts-link"] is etc.entries[b"hosts"]


def test_a_layer_directory_entry_keeps_the_lower_contents_and_takes_its_metadata(
    tmp_path: Path,
) -> None:
    lower = write_layer(tmp_path / "1.tar", [directory("d"), regular("d/old", b"old")])
    update = directory("d")
    update[0].mode, update[0].uid, update[0].mtime = 0o700, 42, 1234
    upper = write_layer(tmp_path / "2.tar.zst", [update, regular("d/new", b"new")], "zst")

    root, _ = load(tmp_path, lower, upper)

    d = root.entries[b"d"]
    assert sorted(d.entries) == [b"new", b"old"]
    assert (stat.S_IMODE(d.mode), d.uid, d.mtime) == (0o700, 42, 1234)


def test_tar_metadata_reaches_the_image(tmp_path: Path) -> None:
    xattrs = {
        "SCHILY.xattr.user.comment": "plain text",
        "SCHILY.xattr.security.capability": b"\x01\x00\x00\x02\xff\xfe".decode(
            "utf-8", "surrogateescape"
        ),
        "mtime": "1700000000.123456789",
    }
    name = "n" * 255
    layer = write_layer(
        tmp_path / "layer.tar",
        [
            regular("bin/tool", b"#!/bin/sh\n", 0o4755, uid=1000, gid=2000, pax_headers=xattrs),
            regular(f"long/{name}", b"long name"),
            special("dev/null", tarfile.CHRTYPE, devmajor=1, devminor=3, mode=0o666),
            special("dev/sda1", tarfile.BLKTYPE, devmajor=8, devminor=1),
            special("dev/fifo", tarfile.FIFOTYPE),
            special("link", tarfile.SYMTYPE, linkname="bin/tool"),
        ],
    )
    bootstrap, _ = build([layer], tmp_path / "out")

    with open_image(bootstrap) as image, open_blobs(image, tmp_path / "out") as store:
        tool = image.lookup(image.lookup(image.root_ino, b"bin") or 0, b"tool")
        assert tool is not None
        attr = image.getattr(tool)
        assert (attr.mode, attr.uid, attr.gid) == (stat.S_IFREG | 0o4755, 1000, 2000)
        assert (attr.mtime, attr.mtime_nsec) == (1700000000, 123456789)
        assert image.getxattr(tool, b"user.comment") == b"plain text"
        assert image.getxattr(tool, b"security.capability") == b"\x01\x00\x00\x02\xff\xfe"
        assert read_file(image, tool, 0, 100, store) == b"#!/bin/sh\n"
        dev = image.lookup(image.root_ino, b"dev") or 0
        null = image.getattr(image.lookup(dev, b"null") or 0)
        assert (stat.S_ISCHR(null.mode), null.rdev) == (True, os.makedev(1, 3))
        sda1 = image.getattr(image.lookup(dev, b"sda1") or 0)
        assert (stat.S_ISBLK(sda1.mode), sda1.rdev) == (True, os.makedev(8, 1))
        assert stat.S_ISFIFO(image.getattr(image.lookup(dev, b"fifo") or 0).mode)
        long = image.lookup(image.root_ino, b"long") or 0
        assert image.lookup(long, name.encode()) is not None
        assert image.readlink(image.lookup(image.root_ino, b"link") or 0) == b"bin/tool"


def test_sparse_tar_members_are_read_through_tarfile(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    with open(source / "holes", "wb") as f:
        f.write(b"start")
        f.seek(3 << 20)
        f.write(b"end")
    layer = tmp_path / "sparse.tar"
    subprocess.run(["tar", "--sparse", "-C", source, "-cf", layer, "holes"], check=True)
    with tarfile.open(layer) as tar:
        assert tar.getmember("holes").issparse()

    bootstrap, _ = build([layer], tmp_path / "out")

    with open_image(bootstrap) as image, open_blobs(image, tmp_path / "out") as store:
        holes = image.lookup(image.root_ino, b"holes") or 0
        data = read_file(image, holes, 0, 4 << 20, store)
    assert data == (source / "holes").read_bytes()


def test_directory_sources_count_only_links_inside_the_tree(tmp_path: Path) -> None:
    source = tmp_path / "tree"
    source.mkdir()
    (source / "a").write_bytes(b"linked")
    os.link(source / "a", source / "b")
    os.link(source / "a", tmp_path / "outside")  # st_nlink is 3, the tree holds 2
    bootstrap, _ = build([source], tmp_path / "out")

    with open_image(bootstrap) as image:
        a, b = image.lookup(image.root_ino, b"a"), image.lookup(image.root_ino, b"b")
        assert a == b and a is not None
        assert image.getattr(a).nlink == 2


@pytest.mark.parametrize(
    ("members", "message"),
    [
        ([regular("../escape", b"x")], "climbs out of the archive root"),
        ([hard_link("link", "missing")], "target /missing not found"),
        ([directory("d"), hard_link("link", "d")], "is a directory"),
        ([special("link", tarfile.SYMTYPE, linkname="")], "symlink target of 0 bytes"),
        ([regular("n" * 256, b"x")], "longer than 255 bytes"),
    ],
)
def test_bad_layers_are_refused_with_a_message(
    tmp_path: Path, members: list[Member], message: str
) -> None:
    layer = write_layer(tmp_path / "bad.tar", members)
    result = run_vhostfs("build", layer, "-o", tmp_path / "out")
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_file_that_is_not_a_tar_is_refused(tmp_path: Path) -> None:
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"\x1f\x8b" + os.urandom(1000))
    with pytest.raises(BuildError, match="not a readable tar archive"):
        load(tmp_path, junk)
