"""QMP access for the engine.

Everything the engine asks of QEMU (or of ``qemu-storage-daemon``) goes
through a :class:`Monitor`: one async ``execute`` and a stream of events.
The default backend speaks QMP over a unix socket with ``qemu.qmp``; a
libvirt backend (``libvirt_qemu.qemuMonitorCommand``) can sit behind the
same interface, so the engine never knows which one it talks to.

Example::

    mon = await QMPMonitor.connect('/run/mftvm/vm0/qmp.sock')
    await mon.execute('stop')
    status = await mon.execute('query-status')
    event = await mon.wait_event('MIGRATION', lambda e: ...)
    await mon.close()
"""

from __future__ import annotations

import abc
import asyncio
import logging
from collections.abc import Callable
from typing import Any, Optional

from qemu.qmp import EventListener, ExecuteError, QMPClient

LOG = logging.getLogger(__name__)

Event = dict[str, Any]


class MonitorError(Exception):
    """A QMP command failed; ``str()`` names the command and QEMU's reason."""


class Monitor(abc.ABC):
    """The engine's view of one QMP endpoint."""

    @abc.abstractmethod
    async def execute(self, command: str, **arguments: Any) -> Any:
        """Run ``command``; its ``return`` value, or MonitorError."""

    #: how messages name this endpoint
    _name = 'monitor'

    async def _next_event(self) -> Event:
        """The next event from QEMU, in order (backends that use the
        shared :meth:`wait_event` provide this)."""
        raise NotImplementedError

    async def wait_event(self, name: str,
                         match: Optional[Callable[[Event], bool]] = None,
                         timeout: Optional[float] = None) -> Event:
        """Wait for the next event called ``name`` (and accepted by match);
        events before it are consumed."""
        async def _wait() -> Event:
            while True:
                event = await self._next_event()
                if event['event'] == name and (match is None or match(event)):
                    return event
        try:
            return await asyncio.wait_for(_wait(), timeout)
        except TimeoutError:
            raise MonitorError(
                f'{self._name}: no {name} event within {timeout}s') from None

    @abc.abstractmethod
    async def close(self) -> None:
        """Disconnect; never raises."""


class QMPMonitor(Monitor):
    """:class:`Monitor` over a QMP unix socket, using ``qemu.qmp``.

    Events are queued from the moment of connection, so an event that
    arrives before ``wait_event`` is called is not lost; ``wait_event``
    consumes (and drops) the events it passes over.
    """

    def __init__(self, client: QMPClient, name: str) -> None:
        self._client = client
        self._name = name
        self._listener = EventListener()
        client.register_listener(self._listener)

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

    async def _next_event(self) -> Event:
        return dict(await self._listener.get())

    def clear_events(self) -> None:
        """Forget buffered events (call before starting what emits them)."""
        self._listener.clear()

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
