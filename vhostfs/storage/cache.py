"""The on-disk chunk cache of one blob: decompressed chunk bytes plus a bitmap of which are ready.

Two files in the work directory, named after the blob id as nydusd names them:

- `<blob_id>.blob.data`: decompressed chunks, each at its uncompressed offset in the blob (a
  sparse file). Hits go to the guest straight from here.
- `<blob_id>.chunk_map`: a header (magic, version, chunk count, inode number of the data file)
  followed by one bit per chunk-info index, set once that chunk's bytes are in the data file.
  The format is ours, not nydusd's: a nydusd map, like any map we cannot vouch for, fails the
  header check and is replaced by an empty one, so everything is fetched again. Recording the
  data file's inode catches a data file deleted or replaced behind a surviving map.

Crash safety: a chunk's bytes are written (pwrite returned) before its bit is set, and both go
through the page cache, so a process killed at any moment (kill -9 included) leaves every set
bit backed by complete bytes; at worst a chunk was written and not marked, and is fetched again.
Power loss is another matter: the kernel may write the map page back before the data pages.
`sync_data` closes that hole by calling fdatasync on the data file before marking, at the cost
of a disk flush per fetch.

A fresh map is built in a temporary file and renamed into place, so a process that still has
the old map mapped never sees it shrink (a kill in that instant leaves a stray `.new-chunk-map-*`
file behind, nothing worse). Several daemons may share a work directory: they see
each other's bits through the shared mapping; a bit lost to two processes updating the same
byte at once only costs a refetch.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import tempfile
from typing import Final

from vhostfs.storage.errors import CacheError

log = logging.getLogger(__name__)

MAP_MAGIC: Final = b"vhfsCMAP"
MAP_VERSION: Final = 1
# magic, version, chunk count, st_ino of the data file
MAP_HEADER: Final = struct.Struct("<8sIIQ")

DATA_SUFFIX: Final = ".blob.data"
MAP_SUFFIX: Final = ".chunk_map"
_NAME_MAX: Final = 255


def cache_file_name_ok(blob_id: str) -> bool:
    """Whether the id can name the cache files: it comes from the image, so it must not be a
    path, and must leave room for the suffixes."""
    return (
        blob_id not in ("", ".", "..")
        and "/" not in blob_id
        and "\0" not in blob_id
        and len(os.fsencode(blob_id)) + len(DATA_SUFFIX) <= _NAME_MAX
    )


class ChunkCache:
    """Opens (creating or repairing as needed) the cache files of one blob."""

    keeps_chunks = True  # see NullCache

    def __init__(
        self, work_dir: str | os.PathLike[str], blob_id: str, chunk_count: int, *, sync_data: bool
    ) -> None:
        if not cache_file_name_ok(blob_id):
            raise CacheError(f"blob {blob_id!r}: id cannot name a cache file")
        if not 0 < chunk_count < 1 << 32:
            raise CacheError(f"blob {blob_id}: cannot cache {chunk_count} chunks")
        work_dir = os.fspath(work_dir)
        self.blob_id = blob_id
        self.chunk_count = chunk_count
        self.sync_data = sync_data
        self.data_path = os.path.join(work_dir, blob_id + DATA_SUFFIX)
        self.map_path = os.path.join(work_dir, blob_id + MAP_SUFFIX)
        self.data_fd, created = _open_data(self.data_path)
        try:
            data_ino = os.fstat(self.data_fd).st_ino
            # A new data file may reuse a deleted one's inode number: its map means nothing.
            self.discarded_reason = "new data file" if created else self._check_map(data_ino)
            if self.discarded_reason is not None:
                if os.path.exists(self.map_path):
                    log.warning(
                        "%s: discarding the chunk map (%s); its chunks will be fetched again",
                        self.map_path,
                        self.discarded_reason,
                    )
                self._write_fresh_map(work_dir, data_ino)
            self._map = self._map_file()
        except BaseException:
            os.close(self.data_fd)
            raise

    # --- Opening -----------------------------------------------------------------------

    @property
    def _map_size(self) -> int:
        return MAP_HEADER.size + (self.chunk_count + 7) // 8

    def _check_map(self, data_ino: int) -> str | None:
        """None if the map on disk can be trusted, else why not."""
        try:
            with open(self.map_path, "rb") as f:
                content = f.read(self._map_size + 1)
        except FileNotFoundError:
            return "missing"
        if len(content) < MAP_HEADER.size:
            return f"{len(content)} bytes, shorter than its header"
        magic, version, count, ino = MAP_HEADER.unpack_from(content)
        if magic != MAP_MAGIC:
            return "bad magic"
        if version != MAP_VERSION:
            return f"version {version}, expected {MAP_VERSION}"
        if count != self.chunk_count:
            return f"made for {count} chunks, the blob has {self.chunk_count}"
        if ino != data_ino:
            return "made for another data file"
        if len(content) != self._map_size:
            return f"{len(content)} bytes, expected {self._map_size}"
        spare_bits = self.chunk_count % 8
        if spare_bits and content[-1] >> spare_bits:
            return "bits set past the last chunk"
        return None

    def _write_fresh_map(self, work_dir: str, data_ino: int) -> None:
        header = MAP_HEADER.pack(MAP_MAGIC, MAP_VERSION, self.chunk_count, data_ino)
        fd, temporary = tempfile.mkstemp(dir=work_dir, prefix=".new-chunk-map-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(header + bytes(self._map_size - len(header)))
            os.rename(temporary, self.map_path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise

    def _map_file(self) -> mmap.mmap:
        fd = os.open(self.map_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            if os.fstat(fd).st_size != self._map_size:
                raise CacheError(f"{self.map_path}: changed size while being opened")
            return mmap.mmap(fd, self._map_size)
        finally:
            os.close(fd)

    # --- Use ---------------------------------------------------------------------------

    def is_ready(self, index: int) -> bool:
        return bool(self._map[MAP_HEADER.size + (index >> 3)] & (1 << (index & 7)))

    def ready_count(self) -> int:
        bitmap = self._map[MAP_HEADER.size : self._map_size]
        return int.from_bytes(bitmap, "little").bit_count()

    def write(self, offset: int, data: bytes) -> None:
        """Store a chunk's bytes (from a worker thread). OSError if the disk refuses."""
        view = memoryview(data)
        while view:
            written = os.pwrite(self.data_fd, view, offset)
            view = view[written:]
            offset += written

    def flush(self) -> None:
        """Make written chunks durable before they are marked (only with sync_data)."""
        if self.sync_data:
            os.fdatasync(self.data_fd)

    def mark_ready(self, index: int) -> None:
        """Only on the event loop thread, after write() (and flush()) returned for the chunk."""
        position = MAP_HEADER.size + (index >> 3)
        self._map[position] |= 1 << (index & 7)

    def close(self) -> None:
        self._map.close()
        os.close(self.data_fd)


def _open_data(path: str) -> tuple[int, bool]:
    """The data file's descriptor, and whether this call created it."""
    flags = os.O_RDWR | os.O_CLOEXEC
    while True:
        try:
            return os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600), True
        except FileExistsError:
            pass
        try:
            return os.open(path, flags), False
        except FileNotFoundError:
            continue  # deleted in between: try creating it again
