"""The engine's :class:`~mftvm_openstack.ft.monitor.Monitor` over libvirt.

When libvirt owns the QEMU, the engine reaches its QMP monitor through
libvirt: commands go through ``libvirt_qemu.qemuMonitorCommand`` (a
blocking call, so it runs in a worker thread) and QMP events come from
``libvirt_qemu.qemuMonitorEventRegister``. Libvirt delivers events only
while an event loop runs: this module runs libvirt's default event loop
in one daemon thread per process, started on first use, so it works
whatever asyncio loop (or loops, one after another) the caller runs.

libvirt-python is imported lazily: the engine imports and runs without
it; only :meth:`LibvirtMonitor.open` needs it.

Libvirt marks a domain driven this way as tainted (``custom-monitor``);
it still tracks the guest's pause and resume from QEMU's own events.

Example::

    mon = await LibvirtMonitor.open('qemu:///system', 'vm0')
    with mon.events('STOP') as events:
        await mon.execute('stop')
        await events.wait(timeout=5)
    await mon.execute('cont')
    await mon.close()
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from typing import Any, Optional

from mftvm_openstack.ft.monitor import Event, Monitor, MonitorError

LOG = logging.getLogger(__name__)

_loop_lock = threading.Lock()
_loop_thread: Optional[threading.Thread] = None


def _libvirt() -> tuple[Any, Any]:
    """The ``libvirt`` and ``libvirt_qemu`` modules, or MonitorError."""
    try:
        import libvirt  # type: ignore[import-untyped,unused-ignore]
        import libvirt_qemu  # type: ignore[import-untyped,unused-ignore]
    except ImportError as exc:
        raise MonitorError(
            'the libvirt monitor needs libvirt-python: apt-get install '
            'libvirt-dev pkg-config; pip install libvirt-python') from exc
    return libvirt, libvirt_qemu


def start_event_loop() -> None:
    """Run libvirt's default event loop in a daemon thread (once).

    Must happen before the connection that registers event callbacks is
    opened; later calls do nothing.
    """
    global _loop_thread
    libvirt, _ = _libvirt()
    with _loop_lock:
        if _loop_thread is not None:
            return
        libvirt.virEventRegisterDefaultImpl()
        # libvirt prints every error to stderr besides raising it: the
        # exceptions are enough (a vanished domain is expected here).
        libvirt.registerErrorHandler(lambda _ctx, _err: None, None)

        def run() -> None:
            while True:
                try:
                    libvirt.virEventRunDefaultImpl()
                except Exception:  # keep delivering events
                    LOG.exception('libvirt event loop iteration failed')

        _loop_thread = threading.Thread(
            target=run, name='libvirt-events', daemon=True)
        _loop_thread.start()


async def connect(uri: str) -> Any:
    """Open a ``libvirt.virConnect`` to ``uri`` that can deliver events."""
    libvirt, _ = _libvirt()
    start_event_loop()
    try:
        return await asyncio.to_thread(libvirt.open, uri)
    except libvirt.libvirtError as exc:
        raise MonitorError(f'cannot connect to libvirt at {uri}: '
                           f'{exc}') from exc


class LibvirtMonitor(Monitor):
    """:class:`Monitor` of one libvirt domain (QMP passed through libvirt).

    Libvirt's event thread hands each event to the asyncio loop, which
    gives it to the open :meth:`~Monitor.events` streams.
    """

    def __init__(self, conn: Any, dom: Any, name: str,
                 owns_conn: bool = True) -> None:
        super().__init__()
        self._conn = conn
        self._dom = dom
        self._name = name
        self._owns_conn = owns_conn
        self._loop = asyncio.get_running_loop()
        self._callback_id: Optional[int] = None
        self._closed = False

    @classmethod
    async def open(cls, uri: str, domain: str,
                   name: Optional[str] = None) -> LibvirtMonitor:
        """Connect to ``uri`` and watch the running domain ``domain``."""
        libvirt, _ = _libvirt()
        conn = await connect(uri)
        try:
            dom = await asyncio.to_thread(conn.lookupByName, domain)
        except libvirt.libvirtError as exc:
            await asyncio.to_thread(conn.close)
            raise MonitorError(f'no domain {domain} at {uri}: '
                               f'{exc}') from exc
        monitor = cls(conn, dom, name or domain)
        try:
            await asyncio.to_thread(monitor._register)
        except libvirt.libvirtError as exc:
            await monitor.close()
            raise MonitorError(f'{monitor._name}: cannot watch QMP events: '
                               f'{exc}') from exc
        return monitor

    @classmethod
    async def for_domain(cls, conn: Any, dom: Any,
                         name: Optional[str] = None) -> LibvirtMonitor:
        """Watch ``dom`` over an open connection (left open by close()).

        ``conn`` must come from :func:`connect` (events need libvirt's
        event loop running before the connection opens).
        """
        monitor = cls(conn, dom, name or dom.name(), owns_conn=False)
        await asyncio.to_thread(monitor._register)
        return monitor

    @property
    def domain(self) -> Any:
        """The ``libvirt.virDomain`` behind this monitor."""
        return self._dom

    def _register(self) -> None:
        _, libvirt_qemu = _libvirt()
        self._callback_id = libvirt_qemu.qemuMonitorEventRegister(
            self._conn, self._dom, None, self._on_event, None, 0)

    def _on_event(self, conn: Any, dom: Any, event: str, seconds: int,
                  micros: int, details: Optional[str], opaque: Any) -> None:
        # Runs on the libvirt event thread.
        try:
            data = json.loads(details) if details else {}
        except ValueError:
            data = {'details': details}
        item: Event = {'event': event, 'data': data,
                       'timestamp': {'seconds': seconds,
                                     'microseconds': micros}}
        try:
            self._loop.call_soon_threadsafe(self._dispatch, item)
        except RuntimeError:  # the asyncio loop is gone
            pass

    async def execute(self, command: str, **arguments: Any) -> Any:
        libvirt, libvirt_qemu = _libvirt()
        request: dict[str, Any] = {'execute': command}
        if arguments:
            request['arguments'] = arguments
        try:
            reply = await asyncio.to_thread(
                libvirt_qemu.qemuMonitorCommand, self._dom,
                json.dumps(request), 0)
        except libvirt.libvirtError as exc:
            raise MonitorError(f'{self._name}: {command} failed: '
                               f'{exc}') from exc
        answer = json.loads(reply)
        if 'error' in answer:
            raise MonitorError(f'{self._name}: {command} failed: '
                               f'{answer["error"].get("desc")}')
        return answer.get('return')

    async def close(self) -> None:
        """Stop watching events and disconnect; never raises."""
        if self._closed:
            return
        self._closed = True

        def tidy() -> None:
            if self._callback_id is not None:
                try:
                    _, libvirt_qemu = _libvirt()
                    libvirt_qemu.qemuMonitorEventDeregister(
                        self._conn, self._callback_id)
                except Exception:  # the connection may be gone
                    pass
            if self._owns_conn:
                try:
                    self._conn.close()
                except Exception:
                    pass
        await asyncio.to_thread(tidy)
