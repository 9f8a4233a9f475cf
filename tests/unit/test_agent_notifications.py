"""The agent's notifications: which state changes say what, the versioned
payload, and what reaches oslo.messaging (its in-memory test driver)."""

from __future__ import annotations

import dataclasses
import threading
import unittest
import warnings
from unittest import mock

from oslo_config import cfg

from mftvm_openstack.agent import notifier as agent_notifier
from mftvm_openstack.agent.watch import ProtectionWatch
from mftvm_openstack.contract.notifications import (
    Event,
    InstanceFTPayload,
    versioned,
)
from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import (
    UNPROTECTED_BY_REQUEST,
    InstanceStatus,
    Takeover,
)

with warnings.catch_warnings():
    warnings.simplefilter('ignore')       # eventlet, via oslo.messaging
    from oslo_messaging import opts as messaging_opts
    from oslo_messaging.notify import _impl_test


def primary(state: State, epoch: int = 5, **kw) -> InstanceStatus:
    return InstanceStatus(role=Role.PRIMARY, state=state, instance='vm0',
                          host='hv1', peer='hv2', pair_id='p1',
                          last_committed_epoch=epoch, alive=True, **kw)


def secondary(state: State, epoch: int = 5, **kw) -> InstanceStatus:
    """A secondary side: once it runs the guest, it reports itself the
    primary (as ft/pair/secondary.py does)."""
    role = Role.PRIMARY if state.runs_guest else Role.SECONDARY
    return InstanceStatus(role=role, state=state, instance='vm0',
                          host='hv2', peer='hv1', pair_id='p1',
                          last_committed_epoch=epoch, alive=True, **kw)


RESUMED = Takeover(detected=1.0, fenced=1.5, resumed=2.0)


class WatchTest(unittest.TestCase):

    def setUp(self):
        self.now = 1000.0
        self.watch = ProtectionWatch('hv1', clock=lambda: self.now)
        self.watch.observe([])          # the agent started with nothing

    def events(self, *statuses: InstanceStatus) -> list[list[Event]]:
        return [[e for e, _ in self.watch.observe([st])] for st in statuses]

    def test_protect_then_secondary_lost_then_reprotected(self):
        self.assertEqual(
            [[], [], [Event.PROTECT_END], [], [Event.SECONDARY_LOST],
             [], [Event.REPROTECT_END]],
            self.events(primary(State.STARTING, 0), primary(State.SYNCING, 0),
                        primary(State.PROTECTED, 1),
                        primary(State.PROTECTED, 9),
                        primary(State.UNPROTECTED, 9, reason='stream: EOF'),
                        primary(State.SYNCING, 0),
                        primary(State.PROTECTED, 1)))

    def test_protected_counts_from_the_first_committed_epoch(self):
        self.assertEqual([[], [Event.PROTECT_END]],
                         self.events(primary(State.PROTECTED, 0),
                                     primary(State.PROTECTED, 1)))

    def test_unprotect_on_request_and_protect_again_is_a_protect(self):
        self.assertEqual(
            [[Event.PROTECT_END], [Event.UNPROTECT_END], [],
             [Event.PROTECT_END]],
            self.events(primary(State.PROTECTED),
                        primary(State.UNPROTECTED,
                                reason=UNPROTECTED_BY_REQUEST),
                        primary(State.SYNCING, 0),
                        primary(State.PROTECTED, 1)))

    def test_a_loss_and_new_sync_between_two_polls_is_still_a_loss(self):
        self.assertEqual([[Event.PROTECT_END], [Event.SECONDARY_LOST]],
                         self.events(primary(State.PROTECTED),
                                     primary(State.SYNCING, 0,
                                             reason='ack timeout')))

    def test_failed_protection(self):
        [_, (event, payload)] = [
            self.watch.observe([primary(State.SYNCING, 0)]),
            *self.watch.observe([primary(State.UNPROTECTED, 0,
                                         error='NBD refused')])]
        self.assertEqual(Event.PROTECT_ERROR, event)
        self.assertEqual('NBD refused', payload.reason)

    def test_failover_seen_step_by_step(self):
        self.assertEqual(
            [[], [], [Event.FAILOVER_START], [Event.FAILOVER_END], [],
             [Event.REPROTECT_END]],
            self.events(secondary(State.WAITING_FOR_PRIMARY, 0),
                        secondary(State.STANDBY),
                        secondary(State.FAILING_OVER),
                        secondary(State.ACTIVE, takeover=RESUMED),
                        secondary(State.SYNCING, 0, takeover=RESUMED),
                        secondary(State.PROTECTED, 1, takeover=RESUMED)))

    def test_a_takeover_faster_than_a_poll_is_both_events(self):
        self.assertEqual(
            [[], [Event.FAILOVER_START, Event.FAILOVER_END]],
            self.events(secondary(State.STANDBY),
                        secondary(State.ACTIVE, takeover=RESUMED)))

    def test_failed_takeover(self):
        self.assertEqual(
            [[], [Event.FAILOVER_START, Event.FAILOVER_ERROR]],
            self.events(secondary(State.STANDBY),
                        secondary(State.LOST, error='no checkpoint')))

    def test_a_primary_starting_is_no_failover(self):
        self.assertEqual([[], [], [Event.PROTECT_END]],
                         self.events(primary(State.STARTING, 0),
                                     primary(State.UNPROTECTED, 0),
                                     primary(State.PROTECTED, 1)))

    def test_a_secondary_told_to_stop_says_nothing(self):
        self.assertEqual([[], []], self.events(
            secondary(State.STANDBY),
            secondary(State.STOPPED, reason='the primary ended protection')))

    def test_what_the_agent_found_at_start_is_not_announced(self):
        watch = ProtectionWatch('hv1')
        self.assertEqual([], watch.observe([primary(State.PROTECTED)]))
        # ...but what happens to it afterwards is, as a re-protection
        # once it was protected
        self.assertEqual([Event.SECONDARY_LOST], [
            e for e, _ in watch.observe([primary(State.UNPROTECTED,
                                                 reason='lost')])])
        self.assertEqual([Event.REPROTECT_END], [
            e for e, _ in watch.observe([primary(State.PROTECTED)])])

    def test_found_at_start_unprotected_why_decides_protect_or_reprotect(
            self):
        for reason, event in ((UNPROTECTED_BY_REQUEST, Event.PROTECT_END),
                              ('data stream: reset', Event.REPROTECT_END),
                              ('', Event.PROTECT_END)):
            watch = ProtectionWatch('hv1')
            watch.observe([primary(State.UNPROTECTED, reason=reason)])
            self.assertEqual([event], [
                e for e, _ in watch.observe([primary(State.PROTECTED)])],
                reason)

    def test_a_dead_instance_process_tells_nothing(self):
        self.watch.observe([primary(State.PROTECTED)])
        dead = dataclasses.replace(primary(State.UNPROTECTED), alive=False)
        self.assertEqual([], self.watch.observe([dead]))

    def test_payloads_name_the_hosts_of_each_role(self):
        self.watch.observe([primary(State.PROTECTED)])
        [(_, lost)] = self.watch.observe(
            [primary(State.UNPROTECTED, 812, reason='data stream: reset')])
        self.assertEqual(
            InstanceFTPayload(instance='vm0', state=State.UNPROTECTED,
                              role=Role.PRIMARY, host='hv1',
                              primary_host='hv1', secondary_host='hv2',
                              pair_id='p1', last_committed_epoch=812,
                              reason='data stream: reset'), lost)
        watch = ProtectionWatch('hv2')
        watch.observe([])
        watch.observe([secondary(State.STANDBY)])
        [(_, start), (_, end)] = watch.observe(
            [secondary(State.ACTIVE, 40, takeover=RESUMED,
                       failover_ms=812.5, reason='primary silent')])
        self.assertEqual(('hv1', 'hv2', None),
                         (start.primary_host, start.secondary_host,
                          start.failover_ms))
        self.assertEqual(('hv2', None, 812.5, 40, 'primary silent'),
                         (end.primary_host, end.secondary_host,
                          end.failover_ms, end.last_committed_epoch,
                          end.reason))

    def test_bounded_guests_gone_are_forgotten(self):
        for i in range(2000):
            st = dataclasses.replace(primary(State.UNPROTECTED),
                                     instance=f'vm{i}')
            self.watch.observe([st])
        snap = self.watch.snapshot()
        self.assertEqual(['vm1999'], [s.instance for s in snap.statuses])
        self.assertEqual(['vm1999'], list(snap.unprotected_since))

    def test_unprotected_since_is_kept_until_protected(self):
        self.watch.observe([primary(State.UNPROTECTED)])
        self.now += 60
        self.watch.observe([primary(State.SYNCING, 0)])
        self.assertEqual({'vm0': 1000.0},
                         self.watch.snapshot().unprotected_since)
        self.watch.observe([primary(State.PROTECTED)])
        self.assertEqual({}, self.watch.snapshot().unprotected_since)


class PayloadTest(unittest.TestCase):

    PAYLOAD = InstanceFTPayload(instance='vm0', state=State.ACTIVE,
                                role=Role.SECONDARY, host='hv2',
                                primary_host='hv2', failover_ms=300.0)

    def test_envelope_round_trip(self):
        body = versioned(self.PAYLOAD)
        self.assertEqual(
            {'mftvm_object.name': 'InstanceFTPayload',
             'mftvm_object.namespace': 'mftvm',
             'mftvm_object.version': '1.0'},
            {k: v for k, v in body.items() if not k.endswith('.data')})
        self.assertEqual('active', body['mftvm_object.data']['state'])
        self.assertEqual(self.PAYLOAD,
                         InstanceFTPayload.from_versioned(body))

    def test_a_newer_minor_version_is_read_a_new_major_refused(self):
        body = versioned(self.PAYLOAD)
        newer = {**body, 'mftvm_object.version': '1.4',
                 'mftvm_object.data': {**body['mftvm_object.data'],
                                       'added_in_1_4': 'x'}}
        self.assertEqual(self.PAYLOAD,
                         InstanceFTPayload.from_versioned(newer))
        with self.assertRaisesRegex(ContractError, 'version'):
            InstanceFTPayload.from_versioned(
                {**body, 'mftvm_object.version': '2.0'})
        with self.assertRaisesRegex(ContractError, 'name'):
            InstanceFTPayload.from_versioned(
                {**body, 'mftvm_object.name': 'Other'})
        with self.assertRaisesRegex(ContractError, 'unknown|not a field'):
            InstanceFTPayload.from_versioned(
                {**body, 'mftvm_object.data': {
                    **body['mftvm_object.data'], 'extra': 1}})

    def test_event_types_and_priorities(self):
        self.assertEqual(
            {'mftvm.instance.protect.end': 'info',
             'mftvm.instance.protect.error': 'error',
             'mftvm.instance.unprotect.end': 'info',
             'mftvm.instance.secondary_lost': 'error',
             'mftvm.instance.failover.start': 'info',
             'mftvm.instance.failover.end': 'info',
             'mftvm.instance.failover.error': 'error',
             'mftvm.instance.reprotect.end': 'info'},
            {e.event_type: str(e.priority) for e in Event})


class NotifierTest(unittest.TestCase):

    def conf(self, driver: list[str]) -> cfg.ConfigOpts:
        c = cfg.ConfigOpts()
        for group, options in messaging_opts.list_opts():
            c.register_opts(options, group=group)
        c([], project='mftvm-test')
        c.set_override('transport_url', 'fake:/',
                       group='oslo_messaging_notifications')
        c.set_override('driver', driver,
                       group='oslo_messaging_notifications')
        return c

    def notices(self):
        watch = ProtectionWatch('hv1')
        watch.observe([])
        watch.observe([primary(State.PROTECTED)])
        return watch.observe([primary(State.UNPROTECTED, reason='gone')])

    def test_sent_with_publisher_priority_and_versioned_payload(self):
        _impl_test.reset()
        n = agent_notifier.AgentNotifier(self.conf(['test']), 'hv1')
        self.assertTrue(n.enabled)
        n.send(self.notices())
        n.stop()
        [(ctxt, message, priority, _)] = _impl_test.NOTIFICATIONS
        self.assertEqual(
            ('mftvm-agent:hv1', 'mftvm.instance.secondary_lost', 'ERROR'),
            (message['publisher_id'], message['event_type'], priority))
        payload = InstanceFTPayload.from_versioned(message['payload'])
        self.assertEqual(('vm0', 'gone', 'hv2'),
                         (payload.instance, payload.reason,
                          payload.secondary_host))

    def test_no_driver_sends_nothing(self):
        _impl_test.reset()
        n = agent_notifier.AgentNotifier(self.conf([]), 'hv1')
        self.assertFalse(n.enabled)
        n.send(self.notices())
        n.stop()
        self.assertEqual([], _impl_test.NOTIFICATIONS)

    def test_a_stuck_broker_never_holds_the_caller_and_the_queue_is_bounded(
            self):
        stuck = threading.Event()
        self.addCleanup(stuck.set)
        n = agent_notifier.AgentNotifier(self.conf(['test']), 'hv1')
        with mock.patch.object(_impl_test.TestDriver, 'notify',
                               lambda *a: stuck.wait()):
            n.send(self.notices() * (agent_notifier.QUEUE_SIZE + 50))
            # send() returned although nothing gets through
            self.assertGreaterEqual(n.dropped, 49)
            self.assertLessEqual(n.pending, agent_notifier.QUEUE_SIZE)
            stuck.set()
            n.stop()

if __name__ == '__main__':
    unittest.main()
