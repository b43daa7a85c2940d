"""Building RAFS v6 images (bootstrap + one data blob) from directories and OCI tar layers.

result = build_image(["rootfs/"], "out/", BuildOptions(compressor=Compressor.ZSTD))
# out/bootstrap, out/<result.blob.blob_id>
"""

from vhostfs.rafs.build.builder import (
    BOOTSTRAP_NAME,
    DEFAULT_CHUNK_SIZE,
    BuildOptions,
    BuildResult,
    build_image,
)
from vhostfs.rafs.build.errors import BuildError

__all__ = [
    "BOOTSTRAP_NAME",
    "DEFAULT_CHUNK_SIZE",
    "BuildError",
    "BuildOptions",
    "BuildResult",
    "build_image",
]
