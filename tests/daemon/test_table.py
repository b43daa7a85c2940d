"""The mount table under load: a mount removed while the guest has requests in flight on it."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

from tests.support import fuse_client as fc
from tests.support.paths import NYDUS_FIXTURES
from vhostfs.daemon.config import PassthroughMountConfig, RafsMountConfig
from vhostfs.daemon.table import MountpointError, MountTable
from vhostfs.fuse import Dispatcher
from vhostfs.storage import RafsConfig

V6 = NYDUS_FIXTURES / "v6" / "rafs-v6-2.2.boot"


def rafs(tmp_path: Path) -> RafsMountConfig:
    return RafsMountConfig(
        str(V6), RafsConfig.from_flags(blob_dir=V6.parent, cache_dir=tmp_path / "cache")
    )


def test_unmounting_under_an_in_flight_read(tmp_path: Path) -> None:
    async def scenario() -> None:
        table = MountTable(pseudo_root=True)
        await table.add("/rafs/c1/lowerdir", rafs(tmp_path))
        dispatcher = Dispatcher(table.session_fs)
        fc.handshake(dispatcher.handle)

        def call(raw: bytes) -> fc.BufferRequest:
            return fc.exchange(dispatcher.handle, raw, 1 << 20)

        node = 1
        for name in (b"rafs", b"c1", b"lowerdir", b"lib.rs"):
            node = fc.parse_entry_out(call(fc.lookup(node, name)).payload).nodeid
        fh = fc.parse_open_out(call(fc.open_(node)).payload)[0]
        reading = call(fc.read(node, fh, 0, 16931))
        assert not reading.completed, "a cold chunk: the read waits for its fetch"

        await table.remove("/rafs/c1/lowerdir")  # closes the image's storage under the read
        await asyncio.wait_for(dispatcher.drain(), 5)

        assert reading.completed, "the read was answered, not lost"
        assert reading.error in (0, errno.EIO)
        if reading.error == 0:
            assert len(reading.payload) == 16931
        assert call(fc.getattr_(node)).error == errno.ESTALE
        assert call(fc.lookup(1, b"rafs")).error == 0, "the pseudo root still answers"
        await table.aclose()

    asyncio.run(scenario())


def test_table_refusals(tmp_path: Path) -> None:
    async def scenario() -> None:
        root = MountTable(pseudo_root=False)
        await root.add("/", PassthroughMountConfig(str(tmp_path)))
        with pytest.raises(MountpointError, match="one file system at /"):
            await root.add("/more", PassthroughMountConfig(str(tmp_path)))
        with pytest.raises(MountpointError, match="already exists"):
            await root.add("/", PassthroughMountConfig(str(tmp_path)))
        with pytest.raises(MountpointError, match="cannot be removed"):
            await root.remove("/")
        await root.aclose()

        pseudo = MountTable(pseudo_root=True)
        with pytest.raises(MountpointError, match="below it"):
            await pseudo.add("/", PassthroughMountConfig(str(tmp_path)))
        with pytest.raises(MountpointError, match="not found"):
            await pseudo.remove("/nothing")
        await pseudo.aclose()

    asyncio.run(scenario())
