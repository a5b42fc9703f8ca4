"""Test-wide settings: nothing may touch the network or the user's feature cache, and the real
fixtures are located.

The real sample files (DAGM, Kvasir-SEG, VisA split) live outside the repository, in
``../shared/fixtures/real`` beside the checkout, or wherever ``PMOE_FIXTURES`` points. Tests
that read them skip, naming the missing path, when they are absent (a fresh clone passes);
with ``PMOE_REQUIRE_FIXTURES=1`` (set by ``.ci/run``) a missing folder fails those tests instead.
"""

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["PMOE_CACHE"] = str(REPO / "build" / "test-feature-cache")  # never the user's own cache
os.environ.setdefault("MPLBACKEND", "Agg")
DEFAULT_FIXTURES = REPO.parent / "shared" / "fixtures" / "real"


def real_fixtures_path() -> Path:
    """Where the real sample files are expected: ``$PMOE_FIXTURES``, else ../shared/fixtures/real."""
    return Path(os.environ.get("PMOE_FIXTURES") or DEFAULT_FIXTURES).expanduser()


@pytest.fixture(scope="session")
def real_fixtures() -> Path:
    """The real sample files (never copied into the repo); skip, or fail under PMOE_REQUIRE_FIXTURES=1."""
    path = real_fixtures_path()
    if path.is_dir():
        return path
    message = (f"real fixtures not found at {path}; set PMOE_FIXTURES to the folder holding "
               "DAGM_KaggleUpload, Kvasir-SEG and VisA (CI lays shared/ beside the checkout)")
    if os.environ.get("PMOE_REQUIRE_FIXTURES") == "1":
        pytest.fail(f"{message}. PMOE_REQUIRE_FIXTURES=1 requires them.", pytrace=False)
    pytest.skip(message)
