"""What operators see of real agents: notifications and metrics.

Three real agents in the lab (as in test_agent_failover) protect a real
guest. One test listens on the notification topic of the lab's RabbitMQ
while the guest is protected, loses its secondary (its instance process
killed), is re-protected, and loses its primary (killed the same way);
it checks each notification's payload and prints how long each took
from the kill. The other scrapes the agents' Prometheus endpoints over
HTTP, and checks that a stopped guest's series are gone.
"""

from __future__ import annotations

import os
import signal
import threading
import time
import urllib.request
import warnings
from typing import Any

from oslo_config import cfg

from mftvm_openstack.contract.notifications import InstanceFTPayload
from mftvm_openstack.local import demo
from tests.functional import base
from tests.integration import lab as ftlab
from tests.integration.test_agent_failover import HOSTS, AgentLab

with warnings.catch_warnings():
    warnings.simplefilter('ignore')       # eventlet, via oslo.messaging
    import oslo_messaging

TOPIC = 'mftvm_ops_test'
NOTIFY_CONF = f"""
[oslo_messaging_notifications]
driver = messagingv2
topics = {TOPIC}
"""
METRICS_PORT = 9787
METRICS_CONF = """
[metrics]
bind_address = {ip}
port = {port}
"""


class Heard:
    """Notifications as they arrive: (monotonic time, publisher,
    event_type, priority, payload)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[tuple[float, str, str, str, InstanceFTPayload]] = []

    def _add(self, priority: str, publisher_id: str, event_type: str,
             payload: Any) -> None:
        got = time.monotonic()
        # every payload must be the contract's, checked field by field
        parsed = InstanceFTPayload.from_versioned(payload)
        with self.lock:
            self.items.append((got, publisher_id, event_type, priority,
                               parsed))

    def info(self, ctxt, publisher_id, event_type, payload, metadata):
        self._add('info', publisher_id, event_type, payload)

    def error(self, ctxt, publisher_id, event_type, payload, metadata):
        self._add('error', publisher_id, event_type, payload)

    def __repr__(self) -> str:
        with self.lock:
            return '\n'.join(f'{t:.3f} {pub} {ev} {prio} {p}'
                              for t, pub, ev, prio, p in self.items)

    def first(self, event_type: str, after: float = 0.0):
        with self.lock:
            for item in self.items:
                if item[2] == event_type and item[0] >= after:
                    return item
        return None


class NotificationsTest(AgentLab):

    def start_agent(self, host: str):
        return ftlab.start_agent(self.lab, host, self.tmp, self.rabbit,
                                 self.fencing, peers=HOSTS,
                                 extra_conf=NOTIFY_CONF)

    def listen(self) -> Heard:
        conf = cfg.ConfigOpts()
        conf([], project='mftvm-test')
        transport = oslo_messaging.get_notification_transport(
            conf, url=self.rabbit.url)
        self.addCleanup(transport.cleanup)
        heard = Heard()
        listener = oslo_messaging.get_notification_listener(
            transport, [oslo_messaging.Target(topic=TOPIC)], [heard],
            executor='threading')
        listener.start()
        self.addCleanup(listener.wait)
        self.addCleanup(listener.stop)
        return heard

    def wait_heard(self, heard: Heard, event_type: str, after: float,
                   timeout: float = 60):
        try:
            return base.wait_for(lambda: heard.first(event_type, after),
                                 timeout, 0.05, f'{event_type} notification')
        except AssertionError:
            print(f'heard so far:\n{heard!r}')
            raise

    def kill_instance_process(self, host: str) -> float:
        pid = self.status(host)['host_pid']
        os.kill(pid, signal.SIGKILL)
        return time.monotonic()

    def test_protect_secondary_lost_reprotect_failover(self):
        heard = self.listen()
        port = demo.free_port()
        self.protect(port)

        _, publisher, _, priority, p = self.wait_heard(
            heard, 'mftvm.instance.protect.end', 0)
        self.assertEqual(('mftvm-agent:h1', 'info'), (publisher, priority))
        self.assertEqual((self.name, 'protected', 'primary', 'h1', 'h1',
                          'h2'),
                         (p.instance, p.state, p.role, p.host,
                          p.primary_host, p.secondary_host))
        self.assertGreaterEqual(p.last_committed_epoch, 1)
        self.assertTrue(p.pair_id)

        # The secondary's instance process dies: h1 tells.
        killed = self.kill_instance_process('h2')
        got, publisher, _, priority, p = self.wait_heard(
            heard, 'mftvm.instance.secondary_lost', killed)
        lost_ms = (got - killed) * 1000
        self.assertEqual(('mftvm-agent:h1', 'error'), (publisher, priority))
        self.assertEqual((self.name, 'primary', 'h1', 'h2'),
                         (p.instance, p.role, p.primary_host,
                          p.secondary_host))
        self.assertIn(p.state, ('unprotected', 'syncing'))
        self.assertTrue(p.reason)
        print(f'secondary_lost: {p}')
        self.assertGreaterEqual(p.last_committed_epoch, 1)

        # h1's agent re-protects it onto the one peer left, h3.
        got, publisher, _, _, p = self.wait_heard(
            heard, 'mftvm.instance.reprotect.end', killed, 120)
        reprotect_s = got - killed
        self.assertEqual(('mftvm-agent:h1', 'h1', 'h3', 'protected'),
                         (publisher, p.primary_host, p.secondary_host,
                          p.state))
        self.assertIsNone(heard.first('mftvm.instance.protect.end', killed))

        # The primary's instance process dies (its QEMU with it): h3
        # takes over.
        killed = self.kill_instance_process('h1')
        start, publisher, _, _, p = self.wait_heard(
            heard, 'mftvm.instance.failover.start', killed)
        self.assertEqual(('mftvm-agent:h3', 'secondary', 'h1', 'h3'),
                         (publisher, p.role, p.primary_host,
                          p.secondary_host))
        self.assertTrue(p.reason)
        end, publisher, _, priority, p = self.wait_heard(
            heard, 'mftvm.instance.failover.end', killed)
        self.assertEqual(('mftvm-agent:h3', 'info', 'active', 'h3', None),
                         (publisher, priority, p.state, p.primary_host,
                          p.secondary_host))
        self.assertIsNotNone(p.failover_ms)
        self.assertGreaterEqual(p.last_committed_epoch, 1)
        print(f'failover.end: {p}')
        self.assertLessEqual(start, end)
        self.assertEqual(1, len(self.qemu_pids()))
        print(f'kill secondary -> secondary_lost {lost_ms:.0f} ms, -> '
              f'reprotect.end {reprotect_s:.1f} s; kill primary -> '
              f'failover.start {(start - killed) * 1000:.0f} ms, -> '
              f'failover.end {(end - killed) * 1000:.0f} ms (takeover '
              f'{p.failover_ms:.0f} ms)')


def scrape(ip: str) -> dict[tuple[str, frozenset], float]:
    """{(sample, labels): value} of an agent's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f'http://{ip}:{METRICS_PORT}/metrics',
                                timeout=10) as r:
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples}


def series(samples: dict, instance: str) -> dict[str, float]:
    """{name[role]: value} of one guest's series."""
    out = {}
    for (name, labels), value in samples.items():
        labels = dict(labels)
        if labels.get('instance') == instance:
            key = f'{name}[{labels["role"]}]'
            if 'quantile' in labels:
                key += f'[{labels["quantile"]}]'
            out[key] = value
    return out


class MetricsTest(AgentLab):

    def start_agent(self, host: str):
        return ftlab.start_agent(
            self.lab, host, self.tmp, self.rabbit, self.fencing, peers=HOSTS,
            extra_conf=METRICS_CONF.format(ip=self.lab.ip(host),
                                           port=METRICS_PORT))

    def test_scrape_and_series_gone_with_the_guest(self):
        ip = {h: self.lab.ip(h) for h in ('h1', 'h2')}
        # agents that serve no guest still answer, with their process
        self.assertIn(('process_resident_memory_bytes', frozenset()),
                      scrape(ip['h1']))
        port = demo.free_port()
        self.protect(port)
        on_h1 = base.wait_for(
            lambda: (s := series(scrape(ip['h1']), self.name)).get(
                'mftvm_instance_epochs_total[primary]', 0) >= 2 and s,
            30, 0.5, 'h1 to export its epochs')
        self.assertEqual(1, on_h1['mftvm_instance_protected[primary]'])
        self.assertEqual(1, on_h1['mftvm_instance_info[primary]'])
        self.assertGreaterEqual(
            on_h1['mftvm_instance_last_committed_epoch[primary]'], 1)
        for key in ('mftvm_instance_pause_seconds[primary][0.5]',
                    'mftvm_instance_pause_seconds[primary][0.99]',
                    'mftvm_instance_replication_lag_epochs[primary]',
                    'mftvm_instance_held_output_bytes[primary]',
                    'mftvm_instance_seconds_since_last_ack[primary]'):
            self.assertIn(key, on_h1)
        self.assertGreater(
            on_h1['mftvm_instance_pause_seconds[primary][0.5]'], 0)
        info = [dict(labels) for (name, labels) in scrape(ip['h1'])
                if name == 'mftvm_instance_info']
        self.assertEqual([('protected', 'h2')],
                         [(i['state'], i['peer']) for i in info])
        on_h2 = series(scrape(ip['h2']), self.name)
        self.assertEqual(1, on_h2['mftvm_instance_info[secondary]'])
        self.assertNotIn('mftvm_instance_protected[secondary]', on_h2)

        # Stopped (the primary tells its secondary to stop too): its
        # series are gone from both agents.
        self.api.stop_instance({}, 'h1', self.name)
        for host in ('h1', 'h2'):
            base.wait_for(
                lambda h=host: series(scrape(ip[h]), self.name) == {},
                30, 0.5, f'{host} to drop the guest\'s series')
        self.assertIn(('mftvm_failovers_total',
                       frozenset({('outcome', 'resumed')})),
                      scrape(ip['h1']))
