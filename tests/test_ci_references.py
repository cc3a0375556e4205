"""tests/ci_references.py: on CI, a missing reference library fails instead of skipping."""

from __future__ import annotations

import subprocess
import sys
import types

import pytest

from tests import ci_references
from tests.conftest import REPO


def _skipped(message: str):
    return types.SimpleNamespace(
        skipped=True, outcome="skipped", longrepr=("test_x.py", 3, f"Skipped: {message}")
    )


def test_reference_skips_fail_on_ci_only(monkeypatch):
    missing = "could not import 'peft': No module named 'peft'"
    monkeypatch.delenv("CI", raising=False)
    report = _skipped(missing)
    ci_references.fail_reference_skip(report)
    assert report.outcome == "skipped"  # off CI: a skip stays a skip

    monkeypatch.setenv("CI", "true")
    ci_references.fail_reference_skip(report)
    assert report.outcome == "failed" and "'peft' is missing" in report.longrepr
    for other in ("could not import 'tensorflow': No module named 'tensorflow'", "no GPU"):
        report = _skipped(other)  # other skips are left alone, on CI too
        ci_references.fail_reference_skip(report)
        assert report.outcome == "skipped", other


def test_session_start_names_the_missing_reference(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # imports of sklearn now fail
    assert ci_references.missing_references() == ["sklearn"]
    monkeypatch.delenv("CI", raising=False)
    ci_references.check_references_at_start()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.UsageError, match=r"\['sklearn'\]"):
        ci_references.check_references_at_start()


_INNER_TESTS = """
import sys
import pytest

sys.modules["sklearn"] = None  # as if scikit-learn were not installed, after session start
pytest.importorskip("sklearn")
"""
_INNER_TEST_IN_FUNCTION = """
import sys
import pytest

def test_needs_transformers():
    sys.modules["transformers"] = None
    pytest.importorskip("transformers")

def test_skips_for_another_reason():
    pytest.skip("no GPU")
"""


def test_hooks_in_a_child_pytest(tmp_path):
    """The hooks as pytest runs them, with CI=true: a module skipped at collection and a test
    skipped inside for a missing reference fail; the other skip stays a skip. (Off CI they do
    nothing: test_reference_skips_fail_on_ci_only.)"""
    (tmp_path / "test_module_skip.py").write_text(_INNER_TESTS)
    (tmp_path / "test_function_skip.py").write_text(_INNER_TEST_IN_FUNCTION)
    env = {"PATH": "", "PYTHONPATH": str(REPO), "CI": "true", "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.ci_references", "-p", "no:cacheprovider"]
        + ["-q", "--continue-on-collection-errors", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "1 failed, 1 skipped, 1 error" in out, out
    assert "'sklearn' is missing" in out and "'transformers' is missing" in out, out
