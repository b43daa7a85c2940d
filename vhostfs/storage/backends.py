"""Opening the backend a config names: one factory per backend type.

The config's backend is a tagged union (vhostfs.storage.config.BackendConfig); the factory
registered under its `kind` builds it. The network backends are imported when one is opened:
httpx and ssl cost ~18 MiB of RSS and ~0.1 s of start-up that a daemon serving local blobs
should not pay.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from typing import Final

from vhostfs.storage.backend import BlobBackend
from vhostfs.storage.backend_config import (
    BackendConfig,
    HttpProxyConfig,
    LocalFsConfig,
    RegistryConfig,
)
from vhostfs.storage.config_fields import ConfigError
from vhostfs.storage.localfs import LocalFsBackend

# (the backend's config, the name of each blob of the image in table order, the I/O pool)
BackendFactory = Callable[[BackendConfig, Sequence[str], Executor], BlobBackend]


def open_backend(
    config: BackendConfig, blob_names: Sequence[str], executor: Executor
) -> BlobBackend:
    """The backend for an image whose blobs have these names. ConfigError if it cannot be."""
    return BACKEND_FACTORIES[config.kind](config, blob_names, executor)


def _localfs(config: BackendConfig, blob_names: Sequence[str], executor: Executor) -> BlobBackend:
    assert isinstance(config, LocalFsConfig)
    if len(config.blob_files) > len(blob_names):
        raise ConfigError(
            f"--blob: {len(config.blob_files)} files given, but the image has "
            f"{len(blob_names)} blobs"
        )
    return LocalFsBackend(
        dir=config.dir,
        alt_dirs=config.alt_dirs,
        blob_file=config.blob_file,
        files=dict(zip(blob_names, config.blob_files, strict=False)),
        executor=executor,
    )


def _registry(config: BackendConfig, blob_names: Sequence[str], executor: Executor) -> BlobBackend:
    assert isinstance(config, RegistryConfig)
    from vhostfs.storage.registry_backend import RegistryBackend

    return RegistryBackend.from_config(config)


def _http_proxy(
    config: BackendConfig, blob_names: Sequence[str], executor: Executor
) -> BlobBackend:
    assert isinstance(config, HttpProxyConfig)
    from vhostfs.storage.http_proxy import HttpProxyBackend

    return HttpProxyBackend.from_config(config)


BACKEND_FACTORIES: Final[dict[str, BackendFactory]] = {
    LocalFsConfig.kind: _localfs,
    RegistryConfig.kind: _registry,
    HttpProxyConfig.kind: _http_proxy,
}
