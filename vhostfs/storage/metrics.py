"""In-memory counters for one mounted image, which the daemon logs and reports.

Everything is updated on the event loop thread, so plain integer attributes suffice: no locks,
and an increment costs what an attribute store costs.
"""

from __future__ import annotations

from collections import Counter
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


class Metrics:
    def __init__(self) -> None:
        self.fops: Counter[str] = Counter()  # by opcode name ("READ"...), merged in by the daemon
        self.read_bytes = 0  # file bytes handed out by reads
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

    def observe_read(self, size: int, elapsed_ns: int) -> None:
        self.read_bytes += size
        self.read_latency.observe_ns(elapsed_ns)

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of every counter."""
        return {
            "fops": dict(self.fops),
            "read_bytes": self.read_bytes,
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
