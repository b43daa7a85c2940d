"""The localfs backend: blobs are files on the host, as nydusd's `localfs` backend finds them.

A blob is looked up, in order, in the explicit `files` mapping (the CLI's `--blob FILE`, keyed
by the name the storage layer gives each blob), then `blob_file` (one file that serves whatever
blob is asked for, as nydusd does), then `<dir>/<blob_id>`, then `<alt_dir>/<blob_id>` for each
alt_dir in order. Blob ids come from the image, so an id is only joined to a directory when it
is a plain file name.

preads run on a small thread pool, so a slow disk stalls only the reads that miss the cache,
never the event loop.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor

from vhostfs.storage.backend import BackendError, LocalFile
from vhostfs.storage.defaults import IO_THREADS
from vhostfs.storage.fileio import pread_full

_MAX_FILE_OFFSET = (1 << 63) - 1

StrPath = str | os.PathLike[str]


class LocalFsBackend:
    def __init__(
        self,
        *,
        dir: StrPath | None = None,
        alt_dirs: Sequence[StrPath] = (),
        blob_file: StrPath | None = None,
        files: Mapping[str, StrPath] | None = None,
        executor: Executor | None = None,
        threads: int = IO_THREADS,
    ) -> None:
        self._dirs = [os.fspath(d) for d in ([dir] if dir is not None else []) + list(alt_dirs)]
        self._blob_file = None if blob_file is None else os.fspath(blob_file)
        self._files = {name: os.fspath(path) for name, path in (files or {}).items()}
        self._own_executor = executor is None
        self._executor = executor or ThreadPoolExecutor(threads, thread_name_prefix="localfs")
        self._open_lock = threading.Lock()  # the pool's threads open files concurrently
        self._open: dict[str, LocalFile] = {}

    def path_of(self, blob_id: str) -> str:
        if blob_id in self._files:
            return self._files[blob_id]
        if self._blob_file is not None:
            return self._blob_file
        if not self._dirs:
            raise BackendError(f"blob {blob_id}: no file given for it and no blob directory")
        if blob_id in ("", ".", "..") or "/" in blob_id or "\0" in blob_id:
            raise BackendError(f"blob {blob_id!r}: not a file name, cannot look it up")
        candidates = [os.path.join(d, blob_id) for d in self._dirs]
        for path in candidates:
            if os.path.exists(path):
                return path
        raise BackendError(f"blob {blob_id}: not found in {', '.join(self._dirs)}")

    def local_file(self, blob_id: str) -> LocalFile:
        with self._open_lock:
            opened = self._open.get(blob_id)
            if opened is None:
                path = self.path_of(blob_id)
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError as e:
                    raise BackendError(f"blob {blob_id}: {path}: {e.strerror}") from e
                opened = LocalFile(fd, os.fstat(fd).st_size)
                self._open[blob_id] = opened
            return opened

    async def read(self, blob_id: str, offset: int, size: int) -> bytes:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._pread, blob_id, offset, size)

    async def blob_size(self, blob_id: str) -> int:
        loop = asyncio.get_running_loop()
        opened = await loop.run_in_executor(self._executor, self.local_file, blob_id)
        return opened.size

    def _pread(self, blob_id: str, offset: int, size: int) -> bytes:
        if offset < 0 or size < 0 or offset + size > _MAX_FILE_OFFSET:
            raise BackendError(f"blob {blob_id}: {offset}+{size} is not a file range")
        blob = self.local_file(blob_id)
        try:
            data = pread_full(blob.fd, size, offset)
        except OSError as e:
            raise BackendError(
                f"blob {blob_id}: bytes {offset}..{offset + size}: {e.strerror}"
            ) from e
        if len(data) < size:
            raise BackendError(
                f"blob {blob_id}: bytes {offset}..{offset + size} run past the end of the "
                f"blob file {self.path_of(blob_id)} ({os.fstat(blob.fd).st_size} bytes)"
            )
        return data

    async def aclose(self) -> None:
        if self._own_executor:
            await asyncio.to_thread(self._executor.shutdown, wait=True)
        with self._open_lock:
            opened, self._open = self._open, {}
        for blob in opened.values():
            os.close(blob.fd)
