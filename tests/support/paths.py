"""Where the tests find data that lives outside the repository."""

from pathlib import Path

# Real nydus images (bootstraps, blobs, and the listings they must give): shared/ sits beside
# the checkout, here and in CI.
NYDUS_FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "nydus"
