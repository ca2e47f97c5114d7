"""In CI (`CI=true`) a skipped test fails, unless its reason says the cause is outside the
project's control (root-only checks, an optional compiler scripts/setup does not install).

Otherwise CI could go green by running none of what a skip hides: a toolchain that
scripts/setup should have installed, a fixture that could not start. Loaded by conftest.
"""

from __future__ import annotations

import os
from collections.abc import Generator
from typing import Any

import pytest

OUTSIDE_OUR_CONTROL = "outside the project's control"
"""Put this in a skip reason (see `beyond_our_control`) to let the skip stand in CI."""


def beyond_our_control(why: str) -> str:
    """A skip reason that CI accepts: `why` the environment, not the project, is missing it."""
    return f"{OUTSIDE_OUR_CONTROL}: {why}"


def in_ci() -> bool:
    """True when running under CI (the CI variable set to true or 1, as CI services do)."""
    return os.environ.get("CI", "").strip().lower() in ("true", "1")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    """Turn a skip whose reason is not `beyond_our_control` into a failure under CI."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not (report.skipped and in_ci()) or hasattr(report, "wasxfail"):
        return
    longrepr = report.longrepr
    reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    if OUTSIDE_OUR_CONTROL in reason:
        return
    report.outcome = "failed"
    report.longrepr = (
        f"skipped under CI=true: {reason}\n"
        f"In CI a skip is a failure unless its reason says the cause is "
        f"{OUTSIDE_OUR_CONTROL!r} (tests/ci_skips.py): install what is missing in "
        f"scripts/setup, or fix the test."
    )
