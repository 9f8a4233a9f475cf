"""The agent's Prometheus endpoint: its guests' protection, as metrics.

Off unless ``[metrics] port`` is set; it then serves the text exposition
format on ``http://[metrics] bind_address:port/metrics``::

    server = MetricsServer(watch, '10.0.0.11', 9787)   # serves at once
    # $ curl -s http://10.0.0.11:9787/metrics | grep protected
    # mftvm_instance_protected{instance="4f1c...",role="primary"} 1.0
    server.stop()

Every sample is made at scrape time from the watch's latest list of this
host's guests (:meth:`ProtectionWatch.snapshot
<mftvm_openstack.agent.watch.ProtectionWatch.snapshot>`), so a guest's
series go with the guest and an agent running for months exports what
its guests are now, nothing more. A scrape reads no file and asks no
instance process. Label values are the guest's name and role only; the
state and peer live in ``mftvm_instance_info``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Optional

from prometheus_client import registry as prom_registry
from prometheus_client import start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)
from prometheus_client.process_collector import ProcessCollector

from mftvm_openstack.agent.watch import ProtectionWatch
from mftvm_openstack.contract.notifications import Event
from mftvm_openstack.contract.states import State

LOG = logging.getLogger(__name__)

LABELS = ('instance', 'role')


class ProtectionCollector(prom_registry.Collector):
    """The metrics of the guests a watch saw last (a custom collector:
    nothing is registered per guest, so nothing outlives one)."""

    def __init__(self, watch: ProtectionWatch) -> None:
        self.watch = watch

    def collect(self) -> Iterator[Metric]:
        snap = self.watch.snapshot()

        def gauge(name: str, doc: str,
                  labels: tuple[str, ...] = LABELS) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)
        info = gauge('mftvm_instance_info', 'A guest side on this host '
                     '(value 1): its state and its peer host',
                     LABELS + ('state', 'peer', 'pair_id'))
        protected = gauge('mftvm_instance_protected', 'Whether the guest, '
                          'running here, is protected (1) or not (0)')
        since = gauge('mftvm_instance_unprotected_since_timestamp_seconds',
                      'Unix time since which the guest runs here '
                      'unprotected (as seen by this agent, at the '
                      'latest since it started)')
        epochs = CounterMetricFamily(
            'mftvm_instance_epochs', 'Epochs checkpointed (primary) or '
            'applied (secondary) by this pair', labels=LABELS)
        committed = gauge('mftvm_instance_last_committed_epoch',
                          'The last epoch the secondary acknowledged')
        lag = gauge('mftvm_instance_replication_lag_epochs',
                    'Epochs checkpointed but not yet acknowledged')
        since_ack = gauge('mftvm_instance_seconds_since_last_ack',
                          'Time since the secondary last acknowledged '
                          '(primary) or the primary last spoke '
                          '(secondary)')
        pause = Metric('mftvm_instance_pause_seconds',
                       'How long the guest was paused per checkpoint, '
                       'over the pair\'s latest epochs', 'summary')
        held = gauge('mftvm_instance_held_output_bytes',
                     'Guest network output held until its epoch commits')
        held_full = gauge('mftvm_instance_held_output_full',
                          'Whether the held output is at its bound (the '
                          'guest is paused until acks free room)')
        failover = gauge('mftvm_instance_failover_seconds',
                         'How long this side\'s takeover of the guest '
                         'took, from detection to running')
        for st in snap.statuses:
            key = [st.instance, str(st.role)]
            info.add_metric(key + [str(st.state), st.peer or '',
                                   st.pair_id], 1)
            if st.state.runs_guest:
                protected.add_metric(
                    key, 1 if st.state is State.PROTECTED else 0)
            if st.instance in snap.unprotected_since:
                since.add_metric(key, snap.unprotected_since[st.instance])
            epochs.add_metric(key, st.epochs)
            committed.add_metric(key, st.last_committed_epoch)
            lag.add_metric(key, st.replication_lag_epochs)
            if st.ms_since_last_ack is not None:
                since_ack.add_metric(key, st.ms_since_last_ack / 1000)
            labels = dict(zip(LABELS, key))
            for q, ms in (('0.5', st.pause_ms_p50), ('0.99', st.pause_ms_p99)):
                if ms is not None:
                    pause.add_sample('mftvm_instance_pause_seconds',
                                     {**labels, 'quantile': q}, ms / 1000)
            if st.held_bytes is not None:
                held.add_metric(key, st.held_bytes)
            if st.held_output_full is not None:
                held_full.add_metric(key, int(st.held_output_full))
            if st.failover_ms is not None:
                failover.add_metric(key, st.failover_ms / 1000)
        yield from (info, protected, since, epochs, committed, lag,
                    since_ack, pause, held, held_full, failover)

        failovers = CounterMetricFamily(
            'mftvm_failovers', 'Takeovers by secondaries of this host '
            'since the agent started, by outcome', labels=('outcome',))
        failovers.add_metric(['resumed'],
                             snap.counts.get(Event.FAILOVER_END, 0))
        failovers.add_metric(['failed'],
                             snap.counts.get(Event.FAILOVER_ERROR, 0))
        lost = CounterMetricFamily(
            'mftvm_secondaries_lost', 'Secondaries the guests running on '
            'this host lost since the agent started')
        lost.add_metric([], snap.counts.get(Event.SECONDARY_LOST, 0))
        yield from (failovers, lost)


def registry_for(watch: ProtectionWatch) -> prom_registry.CollectorRegistry:
    """The agent's registry: its guests, and its own process (memory,
    CPU, open files)."""
    reg = prom_registry.CollectorRegistry(auto_describe=False)
    reg.register(ProtectionCollector(watch))
    ProcessCollector(registry=reg)
    return reg


class MetricsServer:
    """The HTTP endpoint (prometheus_client's, on a thread of its own)."""

    def __init__(self, watch: ProtectionWatch, address: str,
                 port: int) -> None:
        self._httpd, self._thread = start_http_server(
            port, address, registry_for(watch))
        self.address, self.port = self._httpd.server_address[:2]
        LOG.info('metrics at http://%s:%d/metrics', address, self.port)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(10)


def start(watch: ProtectionWatch, address: str,
          port: Optional[int]) -> Optional[MetricsServer]:
    """The endpoint ``[metrics]`` asks for, or None (no port: off)."""
    if not port:
        return None
    return MetricsServer(watch, address, port)

