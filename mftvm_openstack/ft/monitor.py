"""QMP access for the engine.

Everything the engine asks of QEMU (or of ``qemu-storage-daemon``) goes
through a :class:`Monitor`: one async ``execute`` and a stream of events.
The default backend speaks QMP over a unix socket with ``qemu.qmp``; a
libvirt backend (``libvirt_qemu.qemuMonitorCommand``) can sit behind the
same interface, so the engine never knows which one it talks to.

Events are received by subscription: open a stream *before* asking for
what will send the event, so it cannot slip by unseen; every stream gets
every event of its names (the engine and a disk sync may wait on one
monitor at once), and none is kept for nobody::

    mon = await QMPMonitor.connect('/run/mftvm/vm0/qmp.sock')
    with mon.events('JOB_STATUS_CHANGE') as events:
        await mon.execute('blockdev-backup', **{'job-id': 'j1', ...})
        event = await events.wait(
            lambda e: e['data']['id'] == 'j1'
            and e['data']['status'] == 'concluded', timeout=60)
    status = await mon.execute('query-status')
    await mon.close()
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Optional

from qemu.qmp import EventListener, ExecuteError, QMPClient

LOG = logging.getLogger(__name__)

Event = dict[str, Any]

#: the states a migration ends in (QEMU's MigrationStatus), as its
#: MIGRATION events announce them
MIGRATION_ENDED = frozenset({'completed', 'failed', 'cancelled'})


class MonitorError(Exception):
    """A QMP command failed; ``str()`` names the command and QEMU's reason."""


class EventStream:
    """The events of some names a monitor received since it was opened,
    in order (see :meth:`Monitor.events`)."""

    def __init__(self, get: Callable[[], Awaitable[Event]],
                 names: tuple[str, ...], monitor_name: str) -> None:
        self._get = get
        self.names = names
        self._monitor_name = monitor_name

    async def wait(self, match: Optional[Callable[[Event], bool]] = None,
                   timeout: float = 10.0) -> Event:
        """The next event ``match`` accepts (any, without ``match``);
        those before it are dropped. MonitorError after ``timeout`` s."""
        async def first() -> Event:
            while True:
                event = await self._get()
                if match is None or match(event):
                    return event
        try:
            return await asyncio.wait_for(first(), timeout)
        except TimeoutError:
            raise MonitorError(
                f'{self._monitor_name}: no {"/".join(self.names) or "event"}'
                f' event within {timeout}s') from None


class Monitor(abc.ABC):
    """The engine's view of one QMP endpoint.

    Backends that receive events hand each to :meth:`_dispatch`, which
    feeds the open streams; QMPMonitor uses qemu.qmp's listeners instead.
    """

    #: how messages name this endpoint
    _name = 'monitor'

    def __init__(self) -> None:
        self._streams: list[tuple[frozenset[str], asyncio.Queue[Event]]] = []

    @abc.abstractmethod
    async def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command``; its ``return`` value, or MonitorError."""

    @contextlib.contextmanager
    def events(self, *names: str) -> Iterator[EventStream]:
        """A stream of the events called ``names`` (all, without names)
        from now until the block ends."""
        queue: asyncio.Queue[Event] = asyncio.Queue()
        entry = (frozenset(names), queue)
        self._streams.append(entry)
        try:
            yield EventStream(queue.get, names, self._name)
        finally:
            self._streams.remove(entry)

    def _dispatch(self, event: Event) -> None:
        """Give ``event`` to every open stream that wants it."""
        for names, queue in self._streams:
            if not names or event.get('event') in names:
                queue.put_nowait(event)

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; never raises."""


def _no_event(event: Any) -> bool:
    return False


class _Listener(EventListener):
    """A qemu.qmp listener that keeps only what is still to be read.

    qemu.qmp's own keeps a history of every event it ever took, for as
    long as it is registered: the disk sync's job watch, open for the
    whole protection, grew by each checkpoint's JOB_STATUS_CHANGE."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__(names or None)
        self.pending: asyncio.Queue[Any] = asyncio.Queue()

    async def put(self, event: Any) -> None:
        if self.accept(event):
            self.pending.put_nowait(event)


class QMPMonitor(Monitor):
    """:class:`Monitor` over a QMP unix socket, using ``qemu.qmp``.

    Each event stream is a qemu.qmp ``EventListener``, registered for the
    stream's lifetime only.
    """

    def __init__(self, client: QMPClient, name: str) -> None:
        super().__init__()
        self._client = client
        self._name = name
        # qemu.qmp gives every client a default listener that queues (and
        # keeps a history of) every event, and cannot be removed. Nobody
        # reads it here: it grew by each checkpoint's STOP, RESUME and
        # MIGRATION events, for as long as the guest ran. It takes none.
        client.events.event_filter = _no_event

    @contextlib.contextmanager
    def events(self, *names: str) -> Iterator[EventStream]:
        listener = _Listener(names)

        async def get() -> Event:
            return dict(await listener.pending.get())
        with self._client.listen(listener):
            yield EventStream(get, names, self._name)

    @classmethod
    async def connect(cls, path: str, name: str = 'qemu',
                      timeout: float = 30.0) -> QMPMonitor:
        """Connect to the QMP server at ``path``, retrying until timeout.

        QEMU creates its QMP socket shortly after it starts, so a caller
        that has just spawned QEMU can connect right away.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            client = QMPClient(name)
            # Keep qemu.qmp's own logger quiet about disconnects we expect.
            client.logger.setLevel(logging.CRITICAL)
            try:
                await client.connect(path)
                return cls(client, name)
            except Exception as exc:  # ConnectError, OSError
                if loop.time() > deadline:
                    raise MonitorError(
                        f'cannot connect to QMP socket {path}: {exc}') from exc
                await asyncio.sleep(0.05)

    async def execute(self, command: str, **arguments: Any) -> Any:
        try:
            return await self._client.execute(command, arguments or None)
        except ExecuteError as exc:
            raise MonitorError(f'{self._name}: {command} failed: '
                               f'{exc.error.error.desc}') from exc
        except Exception as exc:
            raise MonitorError(f'{self._name}: {command} failed: '
                               f'{type(exc).__name__}: {exc}') from exc

    async def close(self) -> None:
        """Disconnect; never raises."""
        try:
            await self._client.disconnect()
        except Exception:  # already gone: nothing to tidy
            pass


def quiet_lost_connections(loop: asyncio.AbstractEventLoop) -> None:
    """Don't print qemu.qmp's internal tracebacks when a QEMU dies.

    A killed QEMU is an event the engine handles (failover); qemu.qmp
    leaves an unretrieved EOFError behind for asyncio to complain about.
    """
    def handler(loop: asyncio.AbstractEventLoop,
                context: dict[str, Any]) -> None:
        exc = context.get('exception')
        if isinstance(exc, (EOFError, ConnectionResetError)):
            LOG.debug('QMP connection lost: %r', exc)
            return
        loop.default_exception_handler(context)
    loop.set_exception_handler(handler)
