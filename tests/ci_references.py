"""On CI (environment variable CI == "true"), a missing reference library fails the run.

The parity tests compare with PyTorch references (torch, transformers, Hugging Face peft,
scikit-learn) and skip, through pytest.importorskip, where one is not installed: right on a
laptop, wrong on CI, where a skipped parity test is a passed one nobody ran. tests/conftest.py
installs the hooks below:

  check_references_at_start: the session stops at once, naming what is missing;
  fail_reference_skip: a skip caused by importorskip of a reference (a module's, at collection,
    or a test's) is reported as a failure.

Kept apart from conftest.py (which imports jax) so that its own test (tests/test_ci_references.py)
can load it alone as a plugin in a child pytest.
"""

from __future__ import annotations

import importlib.util
import os

import pytest

REFERENCES = ("torch", "transformers", "peft", "sklearn")


def on_ci() -> bool:
    return os.environ.get("CI") == "true"


def missing_references(names=REFERENCES) -> list[str]:
    missing = []
    for name in names:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):  # e.g. sys.modules[name] is None
            found = False
        if not found:
            missing.append(name)
    return missing


def check_references_at_start() -> None:
    """Raises pytest.UsageError on CI when a reference library cannot be imported."""
    if not on_ci():
        return
    missing = missing_references()
    if missing:
        raise pytest.UsageError(
            f"CI=true but the reference libraries {missing} are not installed: the parity tests "
            "would be skipped (install the test extras: pip install -e '.[test]')"
        )


def _skip_message(longrepr) -> str:
    # A skip's longrepr is (path, line, message); importorskip's message is
    # "could not import 'name': <the ImportError>".
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2])
    return str(longrepr)


def reference_of_skip(report) -> str | None:
    """The reference library whose missing import skipped `report`, or None."""
    if not report.skipped:
        return None
    message = _skip_message(report.longrepr)
    for name in REFERENCES:
        if f"could not import '{name}'" in message:
            return name
    return None


def fail_reference_skip(report) -> None:
    """On CI, turns a report skipped for a missing reference library into a failure."""
    if not on_ci():
        return
    name = reference_of_skip(report)
    if name is None:
        return
    report.outcome = "failed"
    report.longrepr = (
        f"CI=true: skipped because the reference library {name!r} is missing, which CI does "
        f"not allow ({_skip_message(report.longrepr)})"
    )


# The hooks (tests/conftest.py imports them; `-p tests.ci_references` loads them as a plugin).
def pytest_sessionstart(session) -> None:
    check_references_at_start()


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    fail_reference_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    fail_reference_skip(outcome.get_result())
