"""The test watchdog ends a run whose test hangs past its timeout where pytest-timeout cannot
end it, naming the test and printing the stacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

HUNG = """
import time

import pytest


@pytest.fixture
def stuck_teardown():
    yield
    while True:  # pytest-timeout's alarm fired already, during the call
        time.sleep(0.1)


@pytest.mark.timeout(1)
def test_hangs_in_its_teardown(stuck_teardown):
    time.sleep(30)


def test_never_runs():
    pass
"""


@pytest.mark.timeout(120)
def test_a_teardown_that_hangs_past_the_timeout_ends_the_run_and_says_where(tmp_path: Path):
    (tmp_path / "test_hung.py").write_text(HUNG)
    root = Path(__file__).resolve().parent.parent
    # Without the watchdog, this run hangs for good: the alarm fired during the call.
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.watchdog",
         "--rootdir", str(tmp_path), "-c", "/dev/null", str(tmp_path / "test_hung.py")],
        capture_output=True, text=True, timeout=90, cwd=tmp_path,
        env={"PYTHONPATH": str(root), "PDSERVE_TEST_WATCHDOG_GRACE_S": "2", "PATH": "/usr/bin"},
    )  # fmt: skip
    assert done.returncode == 3, done.stdout + done.stderr
    assert "test_hung.py::test_hangs_in_its_teardown is still running 2 s after its timeout" in (
        done.stderr
    ), done.stderr
    assert "in stuck_teardown" in done.stderr, done.stderr  # the hung frame, in the stacks
    assert done.stderr.rstrip().endswith(
        "the run ended at test_hung.py::test_hangs_in_its_teardown (hung)"
    )
    assert "test_never_runs" not in done.stdout + done.stderr
