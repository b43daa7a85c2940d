"""The inode table's descriptor quota: how big it is, and what happens at the limit."""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Iterator

import pytest

from vhostfs.fs.inodes import DAEMON_RESERVE, FdQuota, guest_fd_limit
from vhostfs.fuse.ops import FuseError


@pytest.fixture
def nofile() -> Iterator[tuple[int, int]]:
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield limits
    resource.setrlimit(resource.RLIMIT_NOFILE, limits)


@pytest.mark.parametrize("soft", [64, 1024, 4096])
def test_the_guest_gets_what_the_daemon_does_not_keep(
    nofile: tuple[int, int], soft: int
) -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, nofile[1]))
    assert guest_fd_limit() == soft - min(soft // 2, DAEMON_RESERVE)


def test_a_full_quota_closes_the_descriptor_and_answers_enfile() -> None:
    quota = FdQuota(1)
    first, second = os.open("/", os.O_PATH), os.open("/", os.O_PATH)
    quota.take(first)
    quota.check(0)
    with pytest.raises(FuseError) as refused:
        quota.check()
    assert refused.value.errno == errno.ENFILE
    with pytest.raises(FuseError):
        quota.take(second)
    with pytest.raises(OSError):
        os.fstat(second)  # closed by take
    quota.give_back(5)  # more than held: never negative
    assert quota.held == 0
    os.close(first)
