"""Where the tests find the project's real data subsets (shared/data beside the checkout).

CI clones the repository with ``shared/`` beside it; set MLIT_TEST_DATA to point elsewhere.
"""

import os
from pathlib import Path

import pytest

_CANDIDATES = [
    Path(os.environ["MLIT_TEST_DATA"]) if os.environ.get("MLIT_TEST_DATA") else None,
    Path(__file__).resolve().parents[1] / "shared" / "data",
    Path(__file__).resolve().parents[2] / "shared" / "data",
]
SHARED_DATA = next((d for d in _CANDIDATES if d is not None and d.is_dir()), None)

# The 1,017 / 1,000-image CIFAR-10 subset in the official pickle format (read with verify=False).
CIFAR10_MINI = next(
    (p for d in _CANDIDATES if d is not None for p in [d / "cifar10-mini" / "cifar-10-python-mini.tar.gz"] if p.is_file()),
    None,
)
needs_cifar10_mini = pytest.mark.skipif(
    CIFAR10_MINI is None, reason="shared/data/cifar10-mini not found beside the checkout (set MLIT_TEST_DATA)"
)
