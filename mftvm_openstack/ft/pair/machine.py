"""What both machines are made of: an event queue handled in order, the
helper tasks they spawn, and the counters a status reports::

    class MyMachine(Machine[MyEvent]):
        async def handle(self, event: MyEvent) -> None: ...
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, Generic, Optional, TypeVar

import numpy as np

from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus, PauseParts
from mftvm_openstack.ft import transport
from mftvm_openstack.ft.pair.interfaces import Clock
from mftvm_openstack.ft.transport import Message

LOG = logging.getLogger(__name__)

#: the events a machine handles
E = TypeVar('E')
T = TypeVar('T')


class Stats:
    """Counters both sides report through their status."""

    #: epochs kept for the pause percentiles and the timeline
    WINDOW = 10000

    def __init__(self) -> None:
        self.epochs = 0
        self.committed = 0
        # The latest epochs only: a guest protected for months must not
        # grow these (nor the pauses.json written from them) for ever.
        self.pauses_ms: collections.deque[float] = collections.deque(
            maxlen=self.WINDOW)
        # where the pause went: (device state, RAM delta, disk mark) in ms
        self.parts_ms: collections.deque[tuple[float, float, float]] = \
            collections.deque(maxlen=self.WINDOW)
        # primary: sending each checkpoint, and its send → ACK (ms)
        self.ship_ms: collections.deque[float] = collections.deque(
            maxlen=self.WINDOW)
        self.ack_ms: collections.deque[float] = collections.deque(
            maxlen=self.WINDOW)
        self.dirty_bytes = 0
        self.last_ack_at: Optional[float] = None
        self.failover_ms: Optional[float] = None
        self.reason = ''

    def percentile(self, q: float) -> Optional[float]:
        if not self.pauses_ms:
            return None
        return float(np.percentile(self.pauses_ms, q))

    @staticmethod
    def _p50(values: collections.deque[float]) -> Optional[float]:
        return round(float(np.median(values)), 2) if values else None

    def _parts_p50(self) -> Optional[PauseParts]:
        if not self.parts_ms:
            return None
        devstate, ram, disk_mark = (
            round(float(ms), 2)
            for ms in np.median(np.array(self.parts_ms), axis=0))
        return PauseParts(devstate=devstate, ram=ram, disk_mark=disk_mark)

    def status(self, role: Role, state: State) -> InstanceStatus:
        p50, p99 = self.percentile(50), self.percentile(99)
        return InstanceStatus(
            role=role, state=state, epochs=self.epochs,
            last_committed_epoch=self.committed,
            replication_lag_epochs=self.epochs - self.committed,
            pause_ms_p50=None if p50 is None else round(p50, 2),
            pause_ms_p99=None if p99 is None else round(p99, 2),
            pause_parts_ms_p50=self._parts_p50(),
            ship_ms_p50=self._p50(self.ship_ms),
            ack_ms_p50=self._p50(self.ack_ms),
            dirty_mib_total=round(self.dirty_bytes / 2**20, 2),
            failover_ms=self.failover_ms, reason=self.reason)


#: how often a task that is still running after a cancel is cancelled again
CANCEL_RETRY_S = 0.005


class Machine(Generic[E]):
    """An event queue and the loop that handles its events in order.

    A final state is final: once there, the state no longer changes. An
    event that must not wait (a lost lease: the guest must stop before
    another host may start it) is :meth:`interrupt`-ed: it is handled
    next, and a handler still waiting (on a peer or a backend that no
    longer answers) is cancelled for it.
    """

    def __init__(self, clock: Clock, state: State,
                 stats: Optional[Stats] = None) -> None:
        self.clock = clock
        self._state = state
        self.events: asyncio.Queue[E] = asyncio.Queue()
        self.stats = stats or Stats()
        #: what went wrong, for a side that failed or could not protect
        self.error = ''
        self._tasks: list[asyncio.Task[Any]] = []
        self._urgent: collections.deque[E] = collections.deque()
        # what the loop awaits: the next event, or a handler
        self._waiting: Optional[asyncio.Task[Any]] = None
        self.finished = asyncio.Event()

    @property
    def state(self) -> State:
        return self._state

    @state.setter
    def state(self, state: State) -> None:
        if self._state.final and state != self._state:
            LOG.debug('%s: stays %s (not %s)', type(self).__name__,
                      self._state.value, state.value)
            return
        self._state = state

    def post(self, event: E) -> None:
        self.events.put_nowait(event)

    def interrupt(self, event: E) -> None:
        """Handle ``event`` before any queued one, cutting short the
        handler that runs now."""
        self._urgent.append(event)
        if self._waiting is not None and not self._waiting.done():
            self._waiting.cancel()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        # Forget it: the primary ships every epoch in a task of its own,
        # and a list of every task ever run grew without end.
        with contextlib.suppress(ValueError):
            self._tasks.remove(task)
        # A helper task that dies of a bug must not die silently: the
        # machine would wait for it for ever.
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            LOG.error('%s task failed', type(self).__name__, exc_info=exc)
            self.post(self._on_task_failure(exc))

    def _on_task_failure(self, exc: BaseException) -> E:
        raise NotImplementedError

    async def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        pending = {task for task in self._tasks if task is not current}
        self._tasks = []
        # Cancel until done, not once: Python 3.11's asyncio.wait_for
        # swallows a cancellation that arrives as what it waits for
        # completes (fixed in 3.12), and a task that swallowed it runs on.
        # Awaiting it then hung the machine for good: a primary whose
        # guest had died never released the fence its secondary needed.
        while pending:
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending,
                                            timeout=CANCEL_RETRY_S)

    def _finish(self, state: State) -> None:
        self.state = state
        self.finished.set()

    async def handle(self, event: E) -> None:
        raise NotImplementedError

    async def _wait(self, aw: Awaitable[T]) -> Optional[T]:
        """``aw``'s result, or None if :meth:`interrupt` cut it short."""
        self._waiting = asyncio.ensure_future(aw)
        try:
            return await self._waiting
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise               # the machine itself is cancelled
            return None
        finally:
            self._waiting = None

    async def run(self) -> None:
        try:
            while not self.finished.is_set():
                if self._urgent:
                    event = self._urgent.popleft()
                else:
                    got = await self._wait(self.events.get())
                    if got is None:
                        continue        # woken for an urgent event
                    event = got
                LOG.debug('%s: %s in %s', type(self).__name__, event,
                          self.state.value)
                await self._wait(self.handle(event))
        finally:
            await self._cancel_tasks()
            self.finished.set()


def error_text(message: Message) -> str:
    try:
        data = message.json()
    except transport.ProtocolError:
        return '(unreadable)'
    return str(data.get('error') if isinstance(data, dict) else data)
