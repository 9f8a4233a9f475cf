"""The agent as an oslo.service service: RPC server, monitor, lifecycle.

:class:`AgentService` owns, in this order of start: the manager (built by
a factory, so tests inject a fake), the periodic monitor thread calling
``manager.periodic()`` every ``[agent] monitor_interval`` seconds, and an
RPC server on topic ``mftvm-agent`` / server ``[DEFAULT] host`` that
dispatches to :class:`~mftvm_openstack.agent.rpc.AgentEndpoint` with a
thread per request. It stops in the reverse order::

    from mftvm_openstack.agent import service

    svc = service.AgentService(CONF, manager_factory=FakeManager)
    svc.start()          # the agent answers from here on
    ...
    svc.stop()           # no new requests; monitor and manager stopped
    svc.wait()

    service.serve(svc)   # start, then run until SIGTERM/SIGINT (exit 0)

It runs on oslo.service's threading backend (native threads, no
eventlet). :func:`serve` keeps the agent in one process — the parent of
its QEMU processes, with a PID that systemd or a test can signal — rather
than oslo.service's forking ``ServiceLauncher``; SIGHUP reloads the
mutable options (log levels).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from typing import Any, Optional

from oslo_service import backend as _backend

if _backend.get_backend_type() is None:
    _backend.init_backend(_backend.BackendType.THREADING)

import oslo_messaging  # noqa: E402
from oslo_config import cfg  # noqa: E402
from oslo_service import service as os_service  # noqa: E402

from mftvm_openstack import conf as mftvm_conf  # noqa: E402
from mftvm_openstack.agent import rpc, rpcapi  # noqa: E402
from mftvm_openstack.agent.watch import ProtectionWatch  # noqa: E402

LOG = logging.getLogger(__name__)

ManagerFactory = Callable[[], Any]


def default_manager_factory(conf: cfg.ConfigOpts = mftvm_conf.CONF) -> Any:
    """The real manager (imported lazily: it pulls in the whole engine)."""
    from mftvm_openstack.agent import manager

    return manager.AgentManager(conf)


class AgentService(os_service.Service):
    """One agent: manager, monitor thread and RPC server."""

    def __init__(self, conf: cfg.ConfigOpts = mftvm_conf.CONF,
                 manager_factory: Optional[ManagerFactory] = None,
                 transport: Optional[oslo_messaging.Transport] = None,
                 ) -> None:
        super().__init__()
        self.conf = conf
        self.manager_factory = manager_factory or (
            lambda: default_manager_factory(conf))
        self.manager: Any = None
        self._transport = transport
        self._own_transport = transport is None
        self._rpcserver: Optional[oslo_messaging.MessageHandlingServer] = None
        self._monitor: Optional[threading.Thread] = None
        self.watch: Optional[ProtectionWatch] = None
        self._notifier: Any = None
        self._metrics: Any = None
        self._stopping = threading.Event()
        self._stopped = threading.Event()

    def start(self) -> None:
        super().start()
        self._stopping.clear()
        self._stopped.clear()
        host = self.conf.agent.host
        self.manager = self.manager_factory()
        self.manager.start()
        self._start_reporting(host)
        self._monitor = threading.Thread(
            target=self._monitor_loop, name='mftvm-monitor', daemon=True)
        self._monitor.start()
        if self._transport is None:
            self._transport = rpcapi.get_transport(self.conf)
        target = oslo_messaging.Target(exchange=rpcapi.EXCHANGE,
                                       topic=rpcapi.TOPIC, server=host)
        endpoint = rpc.AgentEndpoint(self.manager, host=host)
        self._rpcserver = oslo_messaging.get_rpc_server(
            self._transport, target, [endpoint], executor='threading',
            access_policy=oslo_messaging.DefaultRPCAccessPolicy)
        self._rpcserver.start()
        LOG.info('mftvm-agent %s serving topic %s', host, rpcapi.TOPIC)

    def _start_reporting(self, host: str) -> None:
        """Notifications and metrics, fed by the manager's periodic look
        at its instances (a manager without ``observers`` has neither)."""
        from mftvm_openstack.agent import metrics, notifier

        if not hasattr(self.manager, 'observers'):
            return
        watch = self.watch = ProtectionWatch(host)
        self._notifier = notifier.AgentNotifier(self.conf, host)
        self._metrics = metrics.start(watch, self.conf.metrics.bind_address,
                                      self.conf.metrics.port)
        send = self._notifier.send
        self.manager.observers.append(
            lambda statuses: send(watch.observe(statuses)))

    def _monitor_loop(self) -> None:
        interval = float(self.conf.agent.monitor_interval)
        while not self._stopping.wait(interval):
            started = time.monotonic()
            try:
                self.manager.periodic()
            except Exception:
                LOG.exception('periodic check failed')
            took = time.monotonic() - started
            if took > interval * 4:
                LOG.warning('periodic check took %.1f s (interval %.1f s)',
                            took, interval)

    def stop(self, graceful: bool = False) -> None:
        """Stop taking requests, then the monitor, then the manager.

        In-flight requests are waited for after the manager has stopped,
        so a long protect does not hold the agent's shutdown.
        """
        if self._stopping.is_set() and self._stopped.is_set():
            return
        self._stopping.set()
        LOG.info('mftvm-agent stopping')
        if self._rpcserver is not None:
            try:
                self._rpcserver.stop()
            except Exception:
                LOG.exception('stopping the RPC server failed')
        if (self._monitor is not None
                and self._monitor is not threading.current_thread()):
            self._monitor.join(timeout=30)
        if self.manager is not None:
            try:
                self.manager.stop()
            except Exception:
                LOG.exception('stopping the manager failed')
        for part in (self._metrics, self._notifier):
            if part is not None:
                try:
                    part.stop()
                except Exception:
                    LOG.exception('stopping %s failed', part)
        self._metrics = self._notifier = None
        if self._rpcserver is not None:
            try:
                self._rpcserver.wait()
            except Exception:
                LOG.exception('waiting for the RPC server failed')
            self._rpcserver = None
        if self._own_transport and self._transport is not None:
            self._transport.cleanup()
            self._transport = None
        super().stop(graceful)
        self._stopped.set()
        LOG.info('mftvm-agent stopped')

    def wait(self) -> None:
        self._stopped.wait()
        super().wait()


def serve(svc: os_service.Service,
          conf: cfg.ConfigOpts = mftvm_conf.CONF) -> int:
    """Start ``svc`` and run it in this process until SIGTERM or SIGINT.

    Must run in the main thread (signal handlers). Returns 0 once the
    service has stopped; a failure to start propagates.
    """
    stop = threading.Event()
    reload = threading.Event()

    def on_stop(signo: int, frame: Any) -> None:
        LOG.info('caught %s', signal.Signals(signo).name)
        stop.set()

    def on_hup(signo: int, frame: Any) -> None:
        reload.set()
        stop.set()

    previous = {sig: signal.getsignal(sig)
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, on_hup)
    try:
        svc.start()
        while True:
            while not stop.wait(1.0):
                pass
            if not reload.is_set():
                break
            reload.clear()
            stop.clear()
            LOG.info('SIGHUP: reloading mutable options')
            try:
                conf.mutate_config_files()
            except Exception:
                LOG.exception('reloading the configuration failed')
    finally:
        svc.stop()
        svc.wait()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
