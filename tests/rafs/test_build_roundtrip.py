"""Property: any tree, built with any compressor, digester and chunk size, unpacks to itself."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rafs.build_support import (
    IS_ROOT,
    assert_same_tree,
    build,
    run_vhostfs,
    set_mtimes,
    snapshot,
)

names = st.text(
    st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=12
).filter(lambda name: name not in (".", "..") and not name.startswith(".wh."))
contents = st.one_of(
    st.binary(max_size=300),
    st.builds(
        lambda byte, count: bytes([byte]) * count, st.integers(0, 255), st.integers(1, 20000)
    ),
    st.builds(
        lambda seed, count: os.urandom(count) if seed else b"", st.booleans(), st.integers(0, 9000)
    ),
)
xattrs = st.dictionaries(
    st.sampled_from(["user.a", "user.bb", "user.long-" + "n" * 100]),
    st.binary(max_size=200),
    max_size=2,
)
modes = st.sampled_from([0o644, 0o600, 0o755, 0o4755, 0o2711, 0o1777, 0o444])
entries = st.recursive(
    st.one_of(
        st.tuples(st.just("file"), contents, modes, xattrs),
        st.tuples(st.just("link"), names),
        st.tuples(st.just("fifo")),
    ),
    lambda children: st.tuples(
        st.just("dir"), st.dictionaries(names, children, max_size=6), xattrs
    ),
    max_leaves=25,
)
trees = st.tuples(st.just("dir"), st.dictionaries(names, entries, max_size=8), xattrs)


def materialise(path: Path, entry: tuple[object, ...], files: list[Path]) -> None:
    kind = entry[0]
    if kind == "dir":
        _, children, attributes = entry
        path.mkdir(exist_ok=True)
        assert isinstance(children, dict) and isinstance(attributes, dict)
        for name, child in children.items():
            materialise(path / name, child, files)
        for key, value in attributes.items():
            os.setxattr(path, key, value)
    elif kind == "file":
        _, data, mode, attributes = entry
        assert isinstance(data, bytes) and isinstance(mode, int) and isinstance(attributes, dict)
        path.write_bytes(data)
        for key, value in attributes.items():
            os.setxattr(path, key, value)
        os.chmod(path, mode)
        files.append(path)
    elif kind == "link":
        os.symlink(str(entry[1]), path)
    else:
        os.mkfifo(path)


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    tree=trees,
    hard_links=st.lists(st.tuples(st.integers(0, 50), names), max_size=3),
    compressor=st.sampled_from(["zstd", "none", "lz4_block"]),
    digester=st.sampled_from(["blake3", "sha256"]),
    chunk_size=st.sampled_from(["4K", "8K", "1M"]),
)
def test_any_tree_round_trips(
    tree: tuple[object, ...],
    hard_links: list[tuple[int, str]],
    compressor: str,
    digester: str,
    chunk_size: str,
) -> None:
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "source"
        files: list[Path] = []
        materialise(source, tree, files)
        for target, name in hard_links:
            if files and not (source / name).exists():
                os.link(files[target % len(files)], source / name)
        set_mtimes(source, 1_234_567_890_987_654_321)
        options = ("--compressor", compressor, "--digester", digester, "--chunk-size", chunk_size)
        bootstrap, blob = build([source], Path(work) / "image", *options)
        out = Path(work) / "out"
        blob_dir = blob.parent if blob is not None else Path(work)
        result = run_vhostfs("unpack", bootstrap, "--blob-dir", blob_dir, "-o", out)
        assert result.exit_code == 0, result.output
        assert_same_tree(snapshot(source, owners=IS_ROOT), snapshot(out, owners=IS_ROOT))
        assert stat.S_ISDIR(os.lstat(out).st_mode)
