"""`Periodic`: a router task that looks at something every few seconds — the ranks' KV
(`kv_relief.KVReliefWatch`), the other routers' load (`peer_load.PeerLoadWatch`), the EPLB
service's restarts (`eplb_watch.EplbWatch`), a deployment's record (`front.FrontWatch`).

It runs on the event loop it is started on, from `start()` until `stop()`. A look that fails
(a rank or the GCS not answering for a moment) is logged, once until a look works again, and
the next look comes as usual: a watch never dies of an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from workers.engine.messages import short_error


class Periodic:
    """Subclasses set `interval_s` and define `look()`."""

    interval_s: float
    task_name = "periodic"  # the asyncio task's name
    failure = "a look failed"  # what the warning of a failed look says before the error
    failure_traceback = False  # the warning carries the traceback (an error not expected)
    look_at_start = False  # the first look comes at `start()`, not `interval_s` after
    _task: asyncio.Task[None] | None = None

    async def look(self) -> Any:
        raise NotImplementedError

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        logger = logging.getLogger(type(self).__module__)
        failing = False  # the last look failed (logged once, until one works again)
        if not self.look_at_start:
            await asyncio.sleep(self.interval_s)
        while True:
            try:
                await self.look()
                failing = False
            except asyncio.CancelledError:
                raise
            except Exception as e:
                if not failing:
                    logger.warning("%s: %s", self.failure, short_error(e),
                                   exc_info=self.failure_traceback)  # fmt: skip
                failing = True
            await asyncio.sleep(self.interval_s)
