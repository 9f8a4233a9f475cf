"""A clock whose time moves only when a test says so.

Implements ``ft.pair.Clock``: sleeps and timeouts wait for virtual time,
which :meth:`FakeClock.advance` moves forward, firing each timer due on
the way in order and letting the event loop run what that wakes::

    clock = FakeClock()
    machine = pair.PrimaryPair(..., clock=clock)
    await clock.advance(0.35)        # 0.35 s of the machine's life, now
"""

import asyncio
import heapq
import itertools

#: loop iterations that let woken tasks run to their next wait (a wait
#: may hop through a few tasks and futures before it settles)
SETTLE_ROUNDS = 50


async def settle(rounds=SETTLE_ROUNDS):
    """Let every task that can run, run (no time passes)."""
    for _ in range(rounds):
        await asyncio.sleep(0)


class FakeClock:

    def __init__(self, start=1000.0):
        self.now = start
        self._timers = []   # heap of (when, seq, future)
        self._seq = itertools.count()

    def monotonic(self):
        return self.now

    async def sleep(self, seconds):
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._timers, (self.now + seconds, next(self._seq),
                                      fut))
        await fut

    async def wait_for(self, aw, timeout):
        if timeout is None:
            return await aw
        task = asyncio.ensure_future(aw)
        timer = asyncio.ensure_future(self.sleep(timeout))
        try:
            await asyncio.wait({task, timer},
                               return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            raise TimeoutError
        finally:
            for t in (task, timer):
                if not t.done():
                    t.cancel()
            # Let a cancelled awaitable run its cleanup before we return.
            await asyncio.gather(task, timer, return_exceptions=True)

    def waiting(self):
        """How many sleeps and timeouts wait for virtual time now."""
        return sum(1 for _, _, fut in self._timers if not fut.done())

    async def advance(self, seconds):
        """Move time ``seconds`` on, firing the timers due meanwhile."""
        end = self.now + seconds
        await settle()
        while self._timers and self._timers[0][0] <= end:
            when, _, fut = heapq.heappop(self._timers)
            if fut.done():      # its sleeper was cancelled
                continue
            self.now = max(self.now, when)
            fut.set_result(None)
            await settle()
        self.now = end
        await settle()
