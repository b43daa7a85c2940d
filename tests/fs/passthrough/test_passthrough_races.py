"""Races between the guest's requests and changes made on the host meanwhile (the reference's
attacks B11, B12 and D26): a host thread swaps names under the requests, which go through the
real dispatcher, and nothing may ever land outside the export.

Each race runs for a few seconds rather than the reference's 60, to fit CI; every round is one
full attempt, and the tests count the rounds in which the guest saw the symlink to be sure the
race was really run.
"""

from __future__ import annotations

import asyncio
import errno
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from tests.support import fuse_client as fc
from tests.support.passthrough_guest import ROOT, Guest, snapshot_around
from vhostfs.fs import Passthrough

RACE_SECONDS = 3.0


@contextmanager
def host_loop(step: Callable[[], None]) -> Iterator[None]:
    """Run step over and over on a host thread while the body runs."""
    done = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        while not done.is_set():
            try:
                step()
            except FileNotFoundError:
                pass  # a step the guest's own request overtook
            except BaseException as e:  # reported below
                failures.append(e)
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(10)
    assert not failures, failures


def _quietly(action: Callable[[], None]) -> None:
    with suppress(OSError):
        action()


def test_b11_a_directory_swapped_for_a_symlink_during_lookups(w: Guest, tree: Path) -> None:
    outside = tree.parent / "outside-dir"
    before = snapshot_around(tree)
    d, parked = tree / "d", tree / "d.tmp"
    d.mkdir()
    (d / "etc").mkdir()

    def swap() -> None:
        os.rename(d, parked)
        os.symlink(outside, d)
        os.unlink(d)
        os.rename(parked, d)

    seen_link = created = 0
    with host_loop(swap):
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            found = w.send(fc.lookup(ROOT, b"d"))
            if found.error:
                continue
            node = fc.parse_entry_out(found.payload).nodeid
            inner = w.send(fc.lookup(node, b"etc"))
            made = w.send(fc.create(node, b"x", os.O_RDWR | os.O_CREAT))
            if made.error == errno.ENOTDIR:
                seen_link += 1
                assert inner.error == errno.ENOTDIR
            elif made.error == 0:
                created += 1
                entry = fc.parse_entry_out(made.payload)
                fh = fc.parse_open_out(made.payload, 128)[0]
                w.send(fc.release(entry.nodeid, fh))
                w.send(fc.unlink(node, b"x"))
                w.send(fc.forget(entry.nodeid, 1))
            w.send(fc.forget(node, 1))
    assert seen_link and created, (seen_link, created)
    assert not (outside / "x").exists()
    assert snapshot_around(tree) == before


def test_b12_create_against_a_dangling_symlink(w: Guest, tree: Path) -> None:
    target = tree.parent / "created-by-guest"
    t = tree / "t"
    before = snapshot_around(tree)

    def plant() -> None:
        _quietly(lambda: os.symlink(target, t))
        _quietly(lambda: os.unlink(t))

    errors: set[int] = set()
    with host_loop(plant):
        deadline = time.monotonic() + RACE_SECONDS
        while time.monotonic() < deadline:
            # The guest kernel sends CREATE without O_EXCL for open(O_CREAT) of a name it
            # believes missing; the host must still never follow the link.
            made = w.send(fc.create(ROOT, b"t", os.O_RDWR | os.O_CREAT))
            errors.add(made.error)
            if made.error == 0:
                entry = fc.parse_entry_out(made.payload)
                fh = fc.parse_open_out(made.payload, 128)[0]
                w.send(fc.release(entry.nodeid, fh))
                w.send(fc.forget(entry.nodeid, 1))
                _quietly(lambda: os.unlink(t))
            assert not target.exists() and not target.is_symlink()
    assert errno.EEXIST in errors, errors  # the race was run: the link was there at times
    assert errors <= {0, errno.EEXIST}
    assert snapshot_around(tree) == before


def test_d26_concurrent_creators_get_their_own_ids(tree: Path) -> None:
    """Sixteen guest callers, each its own uid and gid, create at once; the WRITEs in between
    are large enough to run on the worker threads, so requests really overlap. Every file and
    directory is owned by the caller that made it."""
    fs = Passthrough(tree, workers=4)
    w = Guest(fs)
    try:
        work = tree / "work"
        work.mkdir(mode=0o777)
        work.chmod(0o777)
        parent = w.walk(b"work")
        # Root among them: its files would show any switch that was not undone.
        callers = [(0, 0)] + [(2000 + i, 3000 + i) for i in range(15)]
        big = b"z" * (256 << 10)

        async def one(uid: int, gid: int, round_: int) -> None:
            name = b"f-%d-%d" % (uid, round_)
            made = await w.asend(fc.create(parent, name, uid=uid, gid=gid))
            assert made.error == 0, made.error
            entry = fc.parse_entry_out(made.payload)
            fh = fc.parse_open_out(made.payload, 128)[0]
            wrote = await w.asend(fc.write(entry.nodeid, fh, 0, big, uid=uid, gid=gid))
            assert wrote.error == 0
            await w.asend(fc.mkdir(parent, name + b".d", uid=uid, gid=gid))

        async def everyone() -> None:
            await asyncio.gather(*(one(uid, gid, r) for r in range(4) for uid, gid in callers))

        w.loop.run_until_complete(everyone())
        for uid, gid in callers:
            for r in range(4):
                for name in (f"f-{uid}-{r}", f"f-{uid}-{r}.d"):
                    st = os.lstat(work / name)
                    assert (st.st_uid, st.st_gid) == (uid, gid), name
        assert os.getuid() == 0 and os.getgid() == 0  # the daemon's own ids are untouched
    finally:
        fs.close()
