"""The agent's Prometheus endpoint: the series of its guests, read over
HTTP and parsed with prometheus_client's own parser, and gone with the
guest."""

from __future__ import annotations

import dataclasses
import unittest
import urllib.request

from oslo_config import cfg
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from mftvm_openstack import conf
from mftvm_openstack.agent import metrics, rpcapi, service
from mftvm_openstack.agent.watch import ProtectionWatch
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus, Takeover
from mftvm_openstack.local.demo import free_port
from mftvm_openstack.waiting import wait_until


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of an exposition."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples}


def of(text: str, instance: str) -> dict[str, float]:
    """{sample name[quantile]: value} of one guest's series."""
    out = {}
    for (name, labels), value in samples(text).items():
        labels = dict(labels)
        if labels.get('instance') == instance:
            out[name + (f'[{labels["quantile"]}]' if 'quantile' in labels
                        else '')] = value
    return out


PRIMARY = InstanceStatus(
    role=Role.PRIMARY, state=State.PROTECTED, instance='vm0', host='hv1',
    peer='hv2', pair_id='p1', alive=True, epochs=120,
    last_committed_epoch=118, replication_lag_epochs=2, pause_ms_p50=12.5,
    pause_ms_p99=40.0, held_bytes=4096, held_output_full=False,
    ms_since_last_ack=150.0)


class CollectorTest(unittest.TestCase):

    def setUp(self):
        self.now = 5000.0
        self.watch = ProtectionWatch('hv1', clock=lambda: self.now)
        self.registry = metrics.registry_for(self.watch)

    def scrape(self) -> str:
        return generate_latest(self.registry).decode()

    def test_a_protected_primary(self):
        self.watch.observe([PRIMARY])
        text = self.scrape()
        self.assertEqual(
            {'mftvm_instance_info': 1, 'mftvm_instance_protected': 1,
             'mftvm_instance_epochs_total': 120,
             'mftvm_instance_last_committed_epoch': 118,
             'mftvm_instance_replication_lag_epochs': 2,
             'mftvm_instance_seconds_since_last_ack': 0.15,
             'mftvm_instance_pause_seconds[0.5]': 0.0125,
             'mftvm_instance_pause_seconds[0.99]': 0.04,
             'mftvm_instance_held_output_bytes': 4096,
             'mftvm_instance_held_output_full': 0}, of(text, 'vm0'))
        info = [dict(labels) for (name, labels) in samples(text)
                if name == 'mftvm_instance_info']
        self.assertEqual([{'instance': 'vm0', 'role': 'primary',
                           'state': 'protected', 'peer': 'hv2',
                           'pair_id': 'p1'}], info)
        # the agent's own process is there too
        self.assertIn('process_resident_memory_bytes', text)

    def test_unprotected_since_and_the_host_counters(self):
        self.watch.observe([])
        self.watch.observe([PRIMARY])
        self.now = 6000.0
        lost = dataclasses.replace(PRIMARY, state=State.UNPROTECTED,
                                   reason='stream reset')
        self.watch.observe([lost])
        text = self.scrape()
        got = of(text, 'vm0')
        self.assertEqual(0, got['mftvm_instance_protected'])
        self.assertEqual(
            6000.0, got['mftvm_instance_unprotected_since_timestamp_seconds'])
        all_samples = samples(text)
        self.assertEqual(1, all_samples[('mftvm_secondaries_lost_total',
                                         ())])
        self.assertEqual(0, all_samples[('mftvm_failovers_total',
                                         (('outcome', 'resumed'),))])

    def test_a_takeover_is_counted(self):
        standby = InstanceStatus(role=Role.SECONDARY, state=State.STANDBY,
                                 instance='vm0', alive=True, peer='hv1')
        self.watch.observe([])
        self.watch.observe([standby])
        self.watch.observe([dataclasses.replace(
            standby, state=State.ACTIVE, failover_ms=900.0,
            takeover=Takeover(resumed=1.0))])
        text = self.scrape()
        self.assertEqual(1, samples(text)[('mftvm_failovers_total',
                                           (('outcome', 'resumed'),))])
        self.assertEqual(
            0.9, of(text, 'vm0')['mftvm_instance_failover_seconds'])
        # a secondary in standby has no protected series: an alert on
        # "protected == 0" is about guests that run unprotected
        self.watch.observe([standby])
        self.assertNotIn('mftvm_instance_protected', of(self.scrape(), 'vm0'))

    def test_series_go_with_the_guest_and_stay_bounded(self):
        self.watch.observe([PRIMARY])
        base = len(samples(self.scrape()))
        for i in range(500):
            self.watch.observe([dataclasses.replace(PRIMARY,
                                                    instance=f'vm{i}')])
        text = self.scrape()
        self.assertEqual({}, of(text, 'vm0'))
        self.assertEqual(base, len(samples(text)))
        self.watch.observe([])
        self.assertEqual(
            set(), {dict(labels).get('instance')
                    for (name, labels) in samples(self.scrape())
                    if name.startswith('mftvm_instance')})


class ServerTest(unittest.TestCase):

    def test_off_unless_a_port_is_set(self):
        c = cfg.ConfigOpts()
        conf.register_opts(c)
        c([], project='mftvm-test')
        self.assertIsNone(c.metrics.port)
        self.assertEqual('127.0.0.1', c.metrics.bind_address)
        self.assertIsNone(metrics.start(ProtectionWatch('hv1'),
                                        c.metrics.bind_address,
                                        c.metrics.port))

    def test_served_over_http(self):
        watch = ProtectionWatch('hv1')
        watch.observe([PRIMARY])
        server = metrics.MetricsServer(watch, '127.0.0.1', 0)
        self.addCleanup(server.stop)
        with urllib.request.urlopen(
                f'http://127.0.0.1:{server.port}/metrics', timeout=10) as r:
            self.assertTrue(r.headers['Content-Type'].startswith(
                'text/plain; version=0.0.4'))
            text = r.read().decode()
        self.assertEqual(1, of(text, 'vm0')['mftvm_instance_protected'])


class ObservedManager:
    """A manager whose periodic look finds one guest, then none."""

    def __init__(self) -> None:
        self.observers: list = []
        self.guests = [PRIMARY]

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def periodic(self) -> None:
        for observe in self.observers:
            observe(list(self.guests))


class ServiceTest(unittest.TestCase):
    """The agent service feeds its manager's looks to the endpoint."""

    def test_the_service_serves_what_its_manager_sees(self):
        c = conf.CONF
        port = free_port()
        for name, value, group in (('host', 'hv1', 'agent'),
                                   ('monitor_interval', 0.1, 'agent'),
                                   ('port', port, 'metrics')):
            c.set_override(name, value, group=group)
            self.addCleanup(c.clear_override, name, group=group)
        transport = rpcapi.get_transport(c, 'fake://')
        self.addCleanup(transport.cleanup)
        manager = ObservedManager()
        svc = service.AgentService(c, manager_factory=lambda: manager,
                                   transport=transport)
        svc.start()
        self.addCleanup(svc.wait)
        self.addCleanup(svc.stop)

        def scraped() -> dict[str, float]:
            with urllib.request.urlopen(
                    f'http://127.0.0.1:{port}/metrics', timeout=10) as r:
                return of(r.read().decode(), 'vm0')
        self.assertTrue(wait_until(lambda: scraped(), timeout=30))
        self.assertEqual(1, scraped()['mftvm_instance_protected'])
        manager.guests = []
        self.assertTrue(wait_until(lambda: scraped() == {}, timeout=30))
        svc.stop()
        with self.assertRaises(OSError):
            scraped()


if __name__ == '__main__':
    unittest.main()
