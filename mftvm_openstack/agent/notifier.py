"""Sends the agent's versioned notifications over oslo.messaging.

Configured, like every OpenStack service's, in
``[oslo_messaging_notifications]``: ``driver`` (``messagingv2`` for the
bus; empty, the default, sends nothing), ``topics`` and, for a broker
other than the RPC one, ``transport_url``::

    notifier = AgentNotifier(CONF, 'hv1')      # publisher mftvm-agent:hv1
    notifier.send(watch.observe(statuses))      # returns at once
    notifier.stop()                             # sends what is queued

What the notices mean is :mod:`mftvm_openstack.contract.notifications`.
They are sent by a thread of their own, from a queue of at most
:data:`QUEUE_SIZE` notices: a broker that is down (oslo.messaging retries
for ever by default) delays notifications, never the agent's monitor,
and notices beyond the bound are dropped with a warning rather than kept.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Iterable
from typing import Any, Optional

import oslo_messaging
from oslo_config import cfg

from mftvm_openstack.agent.watch import Notice
from mftvm_openstack.contract.notifications import Priority, versioned

LOG = logging.getLogger(__name__)

#: notices waiting for the broker, at most
QUEUE_SIZE = 1000
#: how long stop() waits for the queue to drain
STOP_TIMEOUT = 5.0

_STOP = object()


def publisher_id(host: str) -> str:
    return f'mftvm-agent:{host}'


class AgentNotifier:
    """See the module docstring."""

    def __init__(self, conf: cfg.ConfigOpts, host: str,
                 transport: Optional[oslo_messaging.Transport] = None
                 ) -> None:
        self.host = host
        self.dropped = 0
        self._own_transport = transport is None
        self._transport = transport or \
            oslo_messaging.get_notification_transport(conf)
        self._notifier = oslo_messaging.Notifier(
            self._transport, publisher_id=publisher_id(host))
        # no driver at all sends nowhere too (is_enabled() knows only of
        # 'noop')
        self.enabled = self._notifier.is_enabled() and \
            bool(conf.oslo_messaging_notifications.driver)
        self._queue: queue.Queue[Any] = queue.Queue(QUEUE_SIZE)
        self._thread: Optional[threading.Thread] = None
        if self.enabled:
            self._thread = threading.Thread(
                target=self._run, name='mftvm-notifier', daemon=True)
            self._thread.start()
            LOG.info('notifications on (publisher %s, topics %s)',
                     publisher_id(host),
                     ', '.join(conf.oslo_messaging_notifications.topics))

    @property
    def pending(self) -> int:
        """Notices waiting for the broker."""
        return self._queue.qsize()

    def send(self, notices: Iterable[Notice]) -> None:
        for event, payload in notices:
            LOG.info('%s: %s (%s)', payload.instance, event.event_type,
                     payload.reason or payload.state)
            if not self.enabled:
                continue
            try:
                self._queue.put_nowait((event, payload))
            except queue.Full:
                self.dropped += 1
                LOG.warning('%s: %s not sent: %d notifications wait for '
                            'the broker already', payload.instance,
                            event.event_type, QUEUE_SIZE)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            event, payload = item
            emit = (self._notifier.error if event.priority is Priority.ERROR
                    else self._notifier.info)
            try:
                emit({}, event.event_type, versioned(payload))
            except Exception:
                LOG.exception('%s: sending %s failed', payload.instance,
                              event.event_type)

    def stop(self) -> None:
        """Send what is queued (for up to :data:`STOP_TIMEOUT`), then
        let the transport go."""
        if self._thread is not None:
            try:
                self._queue.put(_STOP, timeout=STOP_TIMEOUT)
            except queue.Full:
                pass
            self._thread.join(STOP_TIMEOUT)
            self._thread = None
        if self._own_transport:
            self._transport.cleanup()
