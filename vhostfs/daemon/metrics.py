"""The counters of a RAFS mount in nydusd's JSON shapes (`/api/v1/metrics*`) and in
Prometheus' text format (`/metrics`).

nydusd's shapes are kept field for field where vhostfs measures the same thing, so nydusctl
and dashboards built for nydusd read them. What vhostfs does not measure is not invented:
per-operation latencies are not timed (so `measure_latency` is false and, as in nydusd with
it off, the latency totals stay 0), and per-file statistics and access patterns are refused
with 404 until they are collected.

Request counts come from the FUSE sessions, which serve every mount of the daemon, so each
mount reports the daemon's counts; data and cache figures are the mount's own.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from vhostfs.storage import ImageStorage

# nydusd's StatsFop order: fop_hits[i] and fop_errors[i] count FUSE opcode FOPS[i].
FOPS: Final = (
    "GETATTR",
    "READLINK",
    "OPEN",
    "RELEASE",
    "READ",
    "STATFS",
    "GETXATTR",
    "LISTXATTR",
    "OPENDIR",
    "LOOKUP",
    "READDIR",
    "READDIRPLUS",
    "ACCESS",
    "FORGET",
    "BATCH_FORGET",
)


def fs_metrics(
    mountpoint: str, storage: ImageStorage, requests: Mapping[str, int], errors: Mapping[str, int]
) -> dict[str, Any]:
    """nydusd's FsIoStats."""
    metrics = storage.metrics
    hits = [requests.get(name, 0) - errors.get(name, 0) for name in FOPS]
    return {
        "files_account_enabled": False,
        "access_pattern_enabled": False,
        "record_latest_read_files_enabled": False,
        "measure_latency": False,
        "id": mountpoint,
        "nr_opens": max(requests.get("OPEN", 0) - requests.get("RELEASE", 0), 0),
        "data_read": metrics.read_bytes,
        "block_count_read": list(metrics.read_size_classes),
        "fop_hits": hits,
        "fop_errors": [errors.get(name, 0) for name in FOPS],
        "fop_cumulative_latency_total": [0] * len(FOPS),
        "read_latency_dist": list(metrics.read_latency_classes),
    }


def backend_metrics(storage: ImageStorage) -> dict[str, Any]:
    """nydusd's BackendMetrics, the counts vhostfs keeps."""
    metrics = storage.metrics
    backend = storage.config.backend.kind if storage.config is not None else "localfs"
    return {
        "backend_type": backend,
        "read_count": metrics.backend_requests,
        "read_errors": metrics.backend_errors,
        "read_amount_total": metrics.backend_bytes,
    }


def blobcache_metrics(storage: ImageStorage) -> dict[str, Any]:
    """nydusd's BlobcacheMetrics, the counts vhostfs keeps."""
    metrics = storage.metrics
    config = storage.config
    cache = config.cache if config is not None else None
    return {
        "store_path": cache.work_dir if cache is not None else "",
        "whole_hits": metrics.cache_hits,
        "total": metrics.cache_hits + metrics.cache_misses,
        "prefetch_data_amount": metrics.prefetch_bytes,
        "prefetch_requests_count": metrics.prefetch_requests,
    }


def prometheus_lines(mountpoint: str, storage: ImageStorage) -> list[str]:
    """A mount's counters as Prometheus samples (counters; the names say their unit)."""
    metrics = storage.metrics
    label = f'{{mountpoint="{_escape(mountpoint)}"}}'
    samples = {
        "vhostfs_read_bytes_total": metrics.read_bytes,
        "vhostfs_cache_hits_total": metrics.cache_hits,
        "vhostfs_cache_misses_total": metrics.cache_misses,
        "vhostfs_backend_requests_total": metrics.backend_requests,
        "vhostfs_backend_bytes_total": metrics.backend_bytes,
        "vhostfs_backend_errors_total": metrics.backend_errors,
        "vhostfs_prefetch_requests_total": metrics.prefetch_requests,
        "vhostfs_prefetch_bytes_total": metrics.prefetch_bytes,
        "vhostfs_digest_failures_total": metrics.digest_failures,
        "vhostfs_chunk_errors_total": metrics.chunk_errors,
    }
    return [f"{name}{label} {value}" for name, value in samples.items()]


def prometheus_requests(requests: Mapping[str, int], errors: Mapping[str, int]) -> list[str]:
    lines = []
    for name, count in sorted(requests.items()):
        lines.append(f'vhostfs_fuse_requests_total{{opcode="{_escape(name)}"}} {count}')
    for name, count in sorted(errors.items()):
        lines.append(f'vhostfs_fuse_errors_total{{opcode="{_escape(name)}"}} {count}')
    return lines


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
