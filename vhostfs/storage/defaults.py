"""The storage layer's defaults and limits, in one place.

The config parser, the CLI flags and the classes that can be built without a config (in tests,
in the offline tools) all take their defaults from here, so they cannot drift apart.
"""

from typing import Final

# Largest merged backend read for guest misses (nydusd's `amplify_io`).
DEFAULT_AMPLIFY_IO: Final = 1 << 20
# Largest prefetch batch (nydusd's `fs_prefetch.merging_size`), and the most nydusd accepts.
DEFAULT_MERGING_SIZE: Final = 1 << 20
MAX_MERGING_SIZE: Final = 0x10000000
# Prefetch batches in flight at once (nydusd's `fs_prefetch.threads_count`, which there counts
# worker threads; here batches are coroutines, so it bounds concurrency, not threads).
DEFAULT_PREFETCH_CONCURRENCY: Final = 8
MAX_PREFETCH_CONCURRENCY: Final = 1024
# Threads for the blocking work of one image: backend preads, decompression, digests, cache
# writes. zstandard, blake3, hashlib and pread release the GIL, so a few threads go a long way.
IO_THREADS: Final = 4
# Nothing the builders produce comes near this; a larger chunk is a corrupt image asking us to
# allocate without bound.
MAX_CHUNK_SIZE: Final = 1 << 26
