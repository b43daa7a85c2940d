"""In-memory counters for one mounted image, which the daemon logs and reports.

Everything is updated on the event loop thread, so plain integer attributes suffice: no locks,
and an increment costs what an attribute store costs.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Sequence
from typing import Any, Final

# Bucket 0 holds latencies under 1 µs, bucket i (i >= 1) those in [2^(i-1), 2^i) µs; the last
# bucket also takes everything longer (2^25 µs is about 34 s).
LATENCY_BUCKETS: Final = 26


class LatencyHistogram:
    def __init__(self) -> None:
        self.counts = [0] * LATENCY_BUCKETS

    def observe_ns(self, elapsed_ns: int) -> None:
        bucket = (max(elapsed_ns, 0) // 1000).bit_length()
        self.counts[min(bucket, LATENCY_BUCKETS - 1)] += 1

    def snapshot(self) -> dict[str, list[int | None] | list[int]]:
        """`le_us[i]` is bucket i's exclusive upper bound in µs (None: unbounded)."""
        bounds: list[int | None] = [1 << i for i in range(LATENCY_BUCKETS - 1)]
        return {"le_us": [*bounds, None], "counts": list(self.counts)}


# nydusd's classes for its API (utils/src/metrics.rs): read sizes < 1K, 1K.., 4K.., 16K..,
# 64K.., 128K.., 512K.., 1M..; read latencies <= 200 µs, 1 ms, 20 ms, 50 ms, 500 ms, 1 s, 2 s,
# and longer.
READ_SIZE_CLASSES: Final = (1 << 10, 4 << 10, 16 << 10, 64 << 10, 128 << 10, 512 << 10, 1 << 20)
READ_LATENCY_CLASSES_NS: Final = tuple(
    us * 1000 for us in (200, 1000, 20_000, 50_000, 500_000, 1_000_000, 2_000_000)
)


class Metrics:
    def __init__(self) -> None:
        self.fops: Counter[str] = Counter()  # by opcode name ("READ"...), merged in by the daemon
        self.read_bytes = 0  # file bytes handed out by reads
        self.direct_reads = 0  # of the reads, those the transport answered without Python
        self.cache_hits = 0  # chunks found ready in the cache (or local and uncached)
        self.cache_misses = 0  # chunks a read had to wait for
        self.backend_requests = 0
        self.backend_bytes = 0
        self.backend_errors = 0
        self.prefetch_requests = 0
        self.prefetch_bytes = 0  # backend bytes fetched on behalf of prefetch
        self.digest_failures = 0
        self.chunk_refetches = 0  # chunks fetched again because their bytes did not decode
        self.chunk_errors = 0  # chunks that failed to fetch, decode or verify (digest included)
        self.read_latency = LatencyHistogram()
        self.read_size_classes = [0] * (len(READ_SIZE_CLASSES) + 1)
        self.read_latency_classes = [0] * (len(READ_LATENCY_CLASSES_NS) + 1)

    def observe_read(self, size: int, elapsed_ns: int) -> None:
        self.read_bytes += size
        self.read_latency.observe_ns(elapsed_ns)
        self.read_size_classes[bisect_right(READ_SIZE_CLASSES, size)] += 1
        self.read_latency_classes[bisect_left(READ_LATENCY_CLASSES_NS, elapsed_ns)] += 1

    def observe_direct_reads(
        self, reads: int, size: int, size_classes: Sequence[int], latency_classes: Sequence[int]
    ) -> None:
        """READs the transport answered from the cache (or a local blob) by itself, counted
        in nydusd's size and latency classes already."""
        self.read_bytes += size
        self.direct_reads += reads
        for i, count in enumerate(size_classes[: len(self.read_size_classes)]):
            self.read_size_classes[i] += count
        for i, count in enumerate(latency_classes[: len(self.read_latency_classes)]):
            self.read_latency_classes[i] += count

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of every counter."""
        return {
            "fops": dict(self.fops),
            "read_bytes": self.read_bytes,
            "direct_reads": self.direct_reads,
            "cache_hits": self.cache_hits,
            "cache_misses": self.cache_misses,
            "backend_requests": self.backend_requests,
            "backend_bytes": self.backend_bytes,
            "backend_errors": self.backend_errors,
            "prefetch_requests": self.prefetch_requests,
            "prefetch_bytes": self.prefetch_bytes,
            "digest_failures": self.digest_failures,
            "chunk_refetches": self.chunk_refetches,
            "chunk_errors": self.chunk_errors,
            "read_latency": self.read_latency.snapshot(),
        }
