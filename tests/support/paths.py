"""Where the test data that lives outside the checkout is."""

from pathlib import Path

# shared/ sits beside the checkout, here and in CI.
FIXTURES = Path(__file__).resolve().parents[3] / "shared" / "fixtures" / "nydus"
