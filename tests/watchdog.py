"""A last resort against a test that hangs where pytest-timeout cannot reach it.

pytest-timeout (signal method) fails a test that runs past its timeout, but its alarm fires
once per test: a teardown that then hangs (a server that does not stop, a Ray call in C code
that never returns to Python) would hang the whole run until CI's own limit ends it, and say
nothing of where. The watchdog thread ends the run instead, `GRACE_S` past the test's
timeout, after printing the test's id and every thread's stack to the real stderr.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

# After a test's timeout: pytest-timeout's own failure and the teardown (the environment
# variable lets the watchdog's own test wait less).
GRACE_S = float(os.environ.get("PDSERVE_TEST_WATCHDOG_GRACE_S", "120"))
EXIT_CODE = 3  # pytest's "internal error": the run is over, and it says so

_lock = threading.Lock()
_running: tuple[str, float] | None = None  # the test's id, and when it is past saving
_config: pytest.Config | None = None
_thread: threading.Thread | None = None


def _timeout_of(item: pytest.Item) -> float | None:
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        return float(marker.args[0])
    value = item.config.getoption("timeout", None) or item.config.getini("timeout")
    return float(value) if value else None


def _watch() -> None:
    while True:
        time.sleep(min(5.0, GRACE_S / 4))
        with _lock:
            running = _running
        if running is None or time.monotonic() < running[1]:
            continue
        # pytest holds stderr (fd 2 included) while a test runs: give it back first.
        capture = _config.pluginmanager.getplugin("capturemanager") if _config else None
        if capture is not None:
            capture.suspend(in_=False)
        out = sys.stderr
        print(
            f"\n\ntests/watchdog.py: {running[0]} is still running {GRACE_S:.0f} s after its "
            "timeout (a hang pytest-timeout could not end); every thread's stack follows, "
            "and the run ends here.",
            file=out,
            flush=True,
        )
        faulthandler.dump_traceback(file=out, all_threads=True)
        print(f"\ntests/watchdog.py: the run ended at {running[0]} (hung)", file=out, flush=True)
        os._exit(EXIT_CODE)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: Any) -> Iterator[None]:
    global _running, _thread, _config
    timeout = _timeout_of(item)
    with _lock:
        _config = item.config
        if timeout is not None:
            _running = (item.nodeid, time.monotonic() + timeout + GRACE_S)
        if _thread is None:
            _thread = threading.Thread(target=_watch, name="test-watchdog", daemon=True)
            _thread.start()
    try:
        yield
    finally:
        with _lock:
            _running = None
