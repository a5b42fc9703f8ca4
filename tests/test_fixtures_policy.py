"""The real-fixtures policy of conftest.py: a missing folder skips the tests that need it (naming
the path), fails them under PMOE_REQUIRE_FIXTURES=1, and PMOE_FIXTURES moves the folder.

Each case runs pytest in a subprocess on a one-test file that asks for ``real_fixtures``.
"""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
PROBE = "def test_probe(real_fixtures):\n    assert (real_fixtures / 'marker.txt').is_file()\n"


def run_probe(folder: Path, fixtures: Path, require: bool) -> subprocess.CompletedProcess:
    """pytest on a one-test file, with conftest.py loaded as its only plugin, fixtures looked for at ``fixtures``."""
    (folder / "test_probe.py").write_text(PROBE)
    env = {key: value for key, value in os.environ.items() if key not in ("PMOE_FIXTURES", "PMOE_REQUIRE_FIXTURES")}
    env.update(PMOE_FIXTURES=str(fixtures), PYTHONPATH=str(TESTS), PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    if require:
        env["PMOE_REQUIRE_FIXTURES"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "conftest", "-p", "no:cacheprovider",
                           "test_probe.py"], cwd=folder, env=env, capture_output=True, text=True, timeout=120)


def test_missing_fixtures_skip_naming_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "real"
    result = run_probe(tmp_path, missing, require=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 skipped" in result.stdout and f"real fixtures not found at {missing}" in result.stdout


def test_missing_fixtures_fail_when_required(tmp_path):
    missing = tmp_path / "nowhere" / "real"
    result = run_probe(tmp_path, missing, require=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "1 error" in result.stdout and "skipped" not in result.stdout
    assert f"real fixtures not found at {missing}" in result.stdout and "PMOE_REQUIRE_FIXTURES=1" in result.stdout


def test_pmoe_fixtures_points_to_the_folder(tmp_path):
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    (folder / "marker.txt").write_text("a real fixture")
    result = run_probe(tmp_path, folder, require=True)
    assert result.returncode == 0 and "1 passed" in result.stdout, result.stdout + result.stderr
