"""The metrics counters and the read-latency histogram."""

from __future__ import annotations

import json

from vhostfs.storage.metrics import LATENCY_BUCKETS, LatencyHistogram, Metrics


def test_latency_buckets_are_log2_microseconds() -> None:
    histogram = LatencyHistogram()
    for elapsed_ns in (0, 999, 1000, 1999, 2000, 3999, 4000, 1_000_000, 10**12):
        histogram.observe_ns(elapsed_ns)
    counts = histogram.counts
    assert counts[0] == 2  # under 1 µs
    assert counts[1] == 2  # [1, 2) µs
    assert counts[2] == 2  # [2, 4) µs
    assert counts[3] == 1  # [4, 8) µs
    assert counts[10] == 1  # 1000 µs lies in [512, 1024)
    assert counts[-1] == 1  # everything longer lands in the last bucket
    snapshot = histogram.snapshot()
    assert snapshot["le_us"][:4] == [1, 2, 4, 8] and snapshot["le_us"][-1] is None
    assert len(snapshot["le_us"]) == len(snapshot["counts"]) == LATENCY_BUCKETS


def test_snapshot_is_json_and_a_copy() -> None:
    metrics = Metrics()
    metrics.fops["READ"] += 1
    metrics.fops["READ"] += 1
    metrics.fops["LOOKUP"] += 1
    metrics.observe_read(4096, 1500)
    snapshot = metrics.snapshot()
    json.dumps(snapshot)
    assert snapshot["fops"] == {"READ": 2, "LOOKUP": 1}
    assert snapshot["read_bytes"] == 4096
    assert snapshot["read_latency"]["counts"][1] == 1
    metrics.fops["READ"] += 1
    assert snapshot["fops"]["READ"] == 2
    assert set(snapshot) >= {
        "cache_hits",
        "cache_misses",
        "backend_requests",
        "backend_bytes",
        "prefetch_bytes",
        "digest_failures",
    }
