"""Struct sizes and encoders against the kernel layouts (as re-stated in tests/support)."""

import stat

import pytest

from tests.support import fuse_client as fc
from vhostfs.fuse import abi
from vhostfs.fuse.ops import Attr, AttrOut, EntryOut, NodeId, StatFs


@pytest.mark.parametrize(
    ("layout", "size"),
    [
        (abi.IN_HEADER, 40),
        (abi.OUT_HEADER, 16),
        (abi.INIT_IN, 16),
        (abi.INIT_OUT, 64),
        (abi.ATTR, 88),
        (abi.ENTRY_OUT, 128),
        (abi.ATTR_OUT, 104),
        (abi.OPEN_OUT, 16),
        (abi.STATFS_OUT, 80),
        (abi.DIRENT, 24),
        (abi.SETATTR_IN, 88),
        (abi.READ_IN, 40),
        (abi.WRITE_IN, 40),
        (abi.RELEASE_IN, 24),
        (abi.FLUSH_IN, 24),
        (abi.FSYNC_IN, 16),
        (abi.GETATTR_IN, 16),
        (abi.MKNOD_IN, 16),
        (abi.CREATE_IN, 16),
        (abi.RENAME2_IN, 16),
        (abi.FALLOCATE_IN, 32),
        (abi.LSEEK_IN, 24),
        (abi.COPY_FILE_RANGE_IN, 56),
        (abi.BATCH_FORGET_IN, 8),
        (abi.FORGET_ONE, 16),
    ],
)
def test_struct_sizes(layout: object, size: int) -> None:
    assert layout.size == size  # type: ignore[attr-defined]


def test_direntplus_header_is_152() -> None:
    assert abi.DIRENTPLUS_HEADER_SIZE == 152


def _attr() -> Attr:
    return Attr(
        st_ino=77,
        st_mode=stat.S_IFREG | 0o640,
        st_nlink=3,
        st_uid=1000,
        st_gid=100,
        st_rdev=0x0801,
        st_size=12345,
        st_blocks=24,
        st_blksize=4096,
        st_atime_ns=1_700_000_000_123_456_789,
        st_mtime_ns=-1_500_000_000,  # before the epoch: seconds negative, nsec positive
        st_ctime_ns=5,
        flags=abi.ATTR_SUBMOUNT,
    )


def test_entry_out_round_trip() -> None:
    raw = abi.pack_entry_out(EntryOut(NodeId(9), _attr(), 1.5, 86400.0, generation=4))
    entry = fc.parse_entry_out(raw)
    assert (entry.nodeid, entry.generation) == (9, 4)
    assert (entry.entry_valid, entry.entry_valid_nsec) == (1, 500_000_000)
    assert (entry.attr_valid, entry.attr_valid_nsec) == (86400, 0)
    a = entry.attr
    assert (a.ino, a.size, a.blocks, a.mode, a.nlink) == (77, 12345, 24, stat.S_IFREG | 0o640, 3)
    assert (a.uid, a.gid, a.rdev, a.blksize, a.flags) == (1000, 100, 0x0801, 4096, 1)
    assert (a.atime, a.atimensec) == (1_700_000_000, 123_456_789)
    assert (a.mtime, a.mtimensec) == (-2, 500_000_000)
    assert (a.ctime, a.ctimensec) == (0, 5)


def test_bad_timeouts_mean_no_caching() -> None:
    entry = fc.parse_entry_out(abi.pack_entry_out(EntryOut(NodeId(2), _attr(), -1.0, float("nan"))))
    assert (entry.entry_valid, entry.entry_valid_nsec, entry.attr_valid) == (0, 0, 0)


def test_attr_out() -> None:
    out = fc.parse_attr_out(abi.pack_attr_out(AttrOut(_attr(), 0.25)))
    assert (out.attr_valid, out.attr_valid_nsec) == (0, 250_000_000)
    assert out.attr.ino == 77


def test_statfs() -> None:
    raw = abi.pack_statfs(StatFs(10, 9, 8, 7, 6, 4096, 255, 512))
    assert fc.parse_statfs(raw) == fc.StatfsOut(10, 9, 8, 7, 6, 4096, 255, 512)


@pytest.mark.parametrize("name", [b"a", b"abcdefg", b"abcdefgh", b"x" * 255])
def test_dirent_padding(name: bytes) -> None:
    raw = abi.pack_dirent(5, 6, stat.S_IFDIR >> 12, name)
    assert len(raw) == abi.dirent_size(len(name))
    assert len(raw) % 8 == 0
    assert fc.parse_dirents(raw) == [fc.Dirent(5, 6, 4, name)]


def test_direntplus_record() -> None:
    entry = abi.pack_entry_out(EntryOut(NodeId(3), _attr(), 1.0, 1.0))
    raw = abi.pack_direntplus(entry, 77, 2, stat.S_IFREG >> 12, b"file")
    assert len(raw) == abi.direntplus_size(4) == 160
    [(parsed, dirent)] = fc.parse_direntplus(raw)
    assert parsed.nodeid == 3
    assert dirent == fc.Dirent(77, 2, 8, b"file")


def test_negative_entry_has_node_zero_and_type() -> None:
    entry = fc.parse_entry_out(abi.negative_entry_out(42, stat.S_IFDIR >> 12))
    assert entry.nodeid == 0
    assert entry.attr.ino == 42
    assert stat.S_ISDIR(entry.attr.mode)
    assert entry.entry_valid == entry.attr_valid == 0


def test_opcode_and_flag_values() -> None:
    assert abi.Opcode.READDIRPLUS == fc.READDIRPLUS == 44
    assert int(abi.Opcode.BATCH_FORGET) == 42
    assert int(abi.Opcode.SYNCFS) == 50
    assert abi.InitFlag.INIT_EXT == fc.INIT_EXT
    assert abi.InitFlag.MAX_PAGES == fc.MAX_PAGES
    assert abi.InitFlag.HAS_INODE_DAX == fc.HAS_INODE_DAX
    assert abi.OpenReplyFlag.CACHE_DIR == fc.FOPEN_CACHE_DIR
