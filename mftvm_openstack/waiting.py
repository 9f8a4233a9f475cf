"""Waiting for a condition that sends no event, with a deadline.

Where something announces itself (a QEMU event, a process exit through a
pidfd, an asyncio event), wait for that. What remains (a file another
process writes, a process that is not our child) is polled, here, in one
place::

    if not wait_until(lambda: not pid_alive(pid), timeout=5):
        ...                                       # still there after 5 s
    await async_wait_until(lambda: os.path.exists(path), timeout=2)

Both return whether the condition became true; neither raises on timeout.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

#: how often a condition is looked at, by default
INTERVAL = 0.05


def wait_until(condition: Callable[[], object], timeout: float,
               interval: float = INTERVAL) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if condition():
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(interval, left))


async def async_wait_until(condition: Callable[[], object], timeout: float,
                           interval: float = INTERVAL) -> bool:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        if condition():
            return True
        left = deadline - loop.time()
        if left <= 0:
            return False
        await asyncio.sleep(min(interval, left))
