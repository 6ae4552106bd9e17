"""Python's cyclic garbage collector in a serving process: startup objects frozen, pauses counted.

A router or rank process holds a few hundred thousand objects once it has started (Ray, torch,
the tokenizer, the model's modules) that live until it exits. Every full (generation-2)
collection walks all of them: 50-200 ms with the GIL held, which stalls a rank's engine step or
every stream of the router. `freeze_startup_objects` moves them to the permanent generation
(`gc.freeze`), so that later collections walk only what serving allocated; `GcPauses` sums
the time spent in collections and keeps the longest pause, for the stats and `/metrics`.
"""

from __future__ import annotations

import gc
import logging
import os
import time

logger = logging.getLogger(__name__)


class GcPauses:
    """The seconds spent in collections since `install`, and the longest one."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.longest_s = 0.0
        self._started = 0.0

    def install(self) -> GcPauses:
        if self._callback not in gc.callbacks:
            gc.callbacks.append(self._callback)
        return self

    def uninstall(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        pause = time.perf_counter() - self._started
        self.seconds += pause
        self.longest_s = max(self.longest_s, pause)


PROCESS = GcPauses()  # this process's; `install` it once it serves


def freeze_startup_objects(what: str) -> int:
    """Collect once, then exempt every object alive now from later collections (call when a
    process has started, before it serves); `PDSERVE_GC_FREEZE=0` turns it off (to measure
    what it saves). The number of objects frozen."""
    if os.environ.get("PDSERVE_GC_FREEZE", "1") == "0":
        return 0
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    logger.debug("%s: %d startup objects exempted from garbage collection", what, frozen)
    return frozen
