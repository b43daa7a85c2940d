"""Directories read without a handle (fh 0), as Linux reads them once OPENDIR answered ENOSYS
under NO_OPENDIR_SUPPORT: listings paged over many READDIRs, and what a hostile guest can do
with fh 0. Real FUSE bytes through the real dispatcher, over real host directories."""

from __future__ import annotations

import errno
import os
from collections import Counter
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.passthrough_guest import ROOT, Guest
from vhostfs.fs import Passthrough
from vhostfs.fs.passthrough.handles import Listings

BIG = 1000  # entries: a 4 KiB reply holds about 100 of them, 20 with READDIRPLUS


@pytest.fixture
def big(tree: Path) -> Path:
    directory = tree / "big"
    directory.mkdir()
    for i in range(BIG):
        (directory / f"file-{i:04d}-{'y' * (i % 23)}").write_bytes(b"")
    return directory


def page(w: Guest, node: int, offset: int, plus: bool = False, size: int = 4096) -> list[fc.Dirent]:
    """One READDIR (or READDIRPLUS) with fh 0."""
    if plus:
        payload = w.send(fc.readdirplus(node, 0, offset, size)).payload
        return [dirent for _, dirent in fc.parse_direntplus(payload)]
    return fc.parse_dirents(w.send(fc.readdir(node, 0, offset, size)).payload)


def read_all(w: Guest, node: int, plus: bool = False, size: int = 4096) -> list[fc.Dirent]:
    """Page through a whole directory with fh 0, as the kernel does: until an empty reply."""
    out: list[fc.Dirent] = []
    offset = 0
    while entries := page(w, node, offset, plus, size):
        out += entries
        offset = entries[-1].off
    return out


def host_names(directory: Path) -> list[bytes]:
    return sorted([b".", b"..", *(os.fsencode(name) for name in os.listdir(directory))])


# Negotiation.


def test_the_session_reads_directories_without_handles(w: Guest, big: Path) -> None:
    assert w.init.flags & fc.NO_OPENDIR_SUPPORT
    node = w.walk(b"big")
    # Every OPENDIR is ENOSYS while the flag holds: the kernel stops at the first one.
    for directory in (ROOT, node, w.walk(b"sub")):
        assert w.errno_of(fc.opendir(directory)) == errno.ENOSYS
    assert len(w.fs.handles) == 0
    assert sorted(d.name for d in read_all(w, node)) == host_names(big)


def test_a_kernel_without_the_flag_gets_handles(tree: Path) -> None:
    fs = Passthrough(tree)
    try:
        w = Guest(fs, flags=fc.ALL_FLAGS & ~fc.NO_OPENDIR_SUPPORT)
        assert not w.init.flags & fc.NO_OPENDIR_SUPPORT
        assert w.opendir(ROOT) != 0
        assert len(fs.handles) == 1
    finally:
        fs.close()


def test_without_readdirplus_plain_readdir_pages_without_handles(tree: Path, big: Path) -> None:
    fs = Passthrough(tree, readdirplus=False)
    try:
        w = Guest(fs)
        assert w.init.flags & fc.NO_OPENDIR_SUPPORT
        assert not w.init.flags & fc.DO_READDIRPLUS
        assert w.errno_of(fc.opendir(ROOT)) == errno.ENOSYS
        assert sorted(d.name for d in read_all(w, w.walk(b"big"))) == host_names(big)
    finally:
        fs.close()


def test_cache_never_keeps_opendir(tree: Path) -> None:
    """The kernel caches the listings of directories it opens without OPENDIR."""
    fs = Passthrough(tree, cache="never")
    try:
        w = Guest(fs)
        assert not w.init.flags & fc.NO_OPENDIR_SUPPORT
        assert w.opendir(ROOT) != 0
    finally:
        fs.close()


# Paging.


@pytest.mark.parametrize("plus", [False, True], ids=["readdir", "readdirplus"])
@pytest.mark.parametrize("size", [200, 4096])
def test_a_big_directory_pages_through_each_entry_once(
    w: Guest, big: Path, plus: bool, size: int
) -> None:
    node = w.walk(b"big")
    entries = read_all(w, node, plus, size)
    counts = Counter(d.name for d in entries)
    assert sorted(counts) == host_names(big)
    assert set(counts.values()) == {1}
    assert len({d.off for d in entries}) == len(entries)
    assert len(w.fs.listings) == 0, "a listing read to its end is dropped"
    if plus:
        # Every entry sent counted one lookup, and nothing else was counted.
        assert len(w.fs.inodes) == 2 + BIG


def test_a_listing_continues_its_own_snapshot(w: Guest, big: Path) -> None:
    node = w.walk(b"big")
    first = page(w, node, 0)
    before = host_names(big)
    # The directory changes between pages: an entry already sent, one not yet sent, a new one.
    (big / os.fsdecode(first[5].name)).unlink()
    sent = {d.name for d in first}
    (big / os.fsdecode(next(n for n in before if n not in sent))).unlink()
    (big / "added-late").write_bytes(b"")
    rest = []
    offset = first[-1].off
    while entries := page(w, node, offset):
        rest += entries
        offset = entries[-1].off
    assert sorted(d.name for d in first + rest) == before
    # A new listing sees the directory as it is now.
    assert sorted(d.name for d in read_all(w, node)) == host_names(big)


def test_two_listings_of_one_directory_do_not_mix(w: Guest, big: Path) -> None:
    node = w.walk(b"big")
    a = page(w, node, 0)
    a_before = host_names(big)
    for name in (d.name for d in a[2:40]):
        (big / os.fsdecode(name)).unlink()
    b = page(w, node, 0)  # a second reader starts over the changed directory
    a += read_rest(w, node, a)
    b += read_rest(w, node, b)
    assert sorted(d.name for d in a) == a_before
    assert sorted(d.name for d in b) == host_names(big)


def read_rest(w: Guest, node: int, got: list[fc.Dirent]) -> list[fc.Dirent]:
    rest: list[fc.Dirent] = []
    offset = got[-1].off
    while entries := page(w, node, offset):
        rest += entries
        offset = entries[-1].off
    return rest


def test_offset_zero_takes_a_fresh_snapshot(w: Guest, tree: Path) -> None:
    sub = w.walk(b"sub")
    first = page(w, sub, 0)
    (tree / "sub" / "later").write_bytes(b"")
    assert b"later" not in [d.name for d in first]
    assert b"later" in [d.name for d in page(w, sub, 0)]


def test_offsets_past_the_end_are_the_end(w: Guest, big: Path) -> None:
    node = w.walk(b"big")
    entries = read_all(w, node)
    looked_up = len(w.fs.inodes)
    for offset in (entries[-1].off, 123456, 1 << 32 | 5000, 2**63 - 1, 2**63, 2**64 - 1):
        assert page(w, node, offset) == [], offset
        assert page(w, node, offset, plus=True) == [], offset
    assert len(w.fs.inodes) == looked_up  # nothing counted for replies that sent nothing
    assert len(w.fs.listings) == 0


def test_a_cookie_without_its_snapshot_continues_at_its_index(w: Guest, big: Path) -> None:
    node = w.walk(b"big")
    everything = read_all(w, node)
    # The snapshot is gone (read to its end); its cookies still mean "after entry i".
    resumed = page(w, node, everything[99].off)
    assert [d.name for d in resumed] == [d.name for d in everything[100 : 100 + len(resumed)]]
    # A cookie of another directory's listing never yields that directory's entries.
    sub = w.walk(b"sub")
    cookie = page(w, node, 0)[0].off
    assert {d.name for d in page(w, sub, cookie)} <= {b"..", b"deeper", b"inner.txt"}


# What a hostile guest can do with fh 0.


def test_fh0_on_what_is_not_a_directory_is_enotdir(w: Guest) -> None:
    for name in (b"file.txt", b"link_etc", b"fifo"):
        node = w.walk(name)
        for raw in (fc.readdir(node, 0), fc.readdirplus(node, 0), fc.fsyncdir(node, 0)):
            assert w.errno_of(raw) == errno.ENOTDIR, (name, raw[4])


def test_fh0_on_a_stale_node_is_estale(w: Guest, big: Path) -> None:
    node = w.walk(b"big")
    cookie = page(w, node, 0)[-1].off
    w.send(fc.forget(node, 1), writable_len=0)
    for raw in (
        fc.readdir(node, 0),
        fc.readdir(node, 0, cookie),
        fc.readdirplus(node, 0, cookie),
        fc.fsyncdir(node, 0),
        fc.readdir(0xDEADBEEF, 0),
        fc.readdir(2**64 - 1, 0, 2**64 - 1),
    ):
        assert w.errno_of(raw) == errno.ESTALE
    fc.handshake(w.d.handle)  # a new session: nodes and listings of the old one are gone
    assert len(w.fs.listings) == 0


def test_fh0_on_a_directory_removed_on_the_host(w: Guest, tree: Path) -> None:
    node = w.walk(b"sub", b"deeper")
    (tree / "sub" / "deeper").rmdir()
    assert [d.name for d in read_all(w, node)] == [b".", b".."]
    assert w.errno_of(fc.fsyncdir(node, 0)) == 0


def test_fsyncdir_and_releasedir_without_a_handle(w: Guest) -> None:
    assert w.errno_of(fc.fsyncdir(ROOT, 0)) == 0
    assert w.errno_of(fc.fsyncdir(w.walk(b"sub"), 0)) == 0
    # The kernel sends no RELEASEDIR for fh 0; one that comes anyway has nothing to release.
    assert w.errno_of(fc.releasedir(ROOT, 0)) == 0


def test_fh0_leaves_no_descriptor_open(w: Guest, big: Path) -> None:
    node = w.walk(b"big")
    page(w, node, 0)  # open on the host only while the snapshot is taken
    baseline = len(os.listdir("/proc/self/fd"))
    page(w, node, 0)
    read_all(w, node, plus=True)
    w.send(fc.fsyncdir(node, 0))
    assert len(os.listdir("/proc/self/fd")) == baseline + BIG  # one O_PATH per entry looked up


def test_listings_are_bounded(w: Guest, tree: Path) -> None:
    nodes = []
    for i in range(100):
        (tree / f"d{i}").mkdir()
        nodes.append(w.walk(f"d{i}".encode()))
    for node in nodes:
        assert len(page(w, node, 0, size=48)) == 1  # started, never finished
    assert len(w.fs.listings) == 64
    w.fs.listings = Listings(kept=64, kept_entries=10)
    for node in nodes[:5]:
        page(w, node, 0, size=48)
    # Each listing holds ".", "..": five of them are 10 entries, a sixth pushes the oldest out.
    assert (len(w.fs.listings), w.fs.listings.entries) == (5, 10)
    first_cookie = page(w, nodes[5], 0, size=48)[0].off
    assert (len(w.fs.listings), w.fs.listings.entries) == (5, 10)
    # The newest stays whatever its size.
    w.fs.listings = Listings(kept=64, kept_entries=1)
    assert len(page(w, nodes[6], 0, size=48)) == 1
    assert len(w.fs.listings) == 1
    # A listing pushed out still pages on, from a fresh snapshot.
    assert [d.name for d in page(w, nodes[5], first_cookie)] == [b".."]
