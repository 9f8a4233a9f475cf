"""Live, trustworthy ``ft_status`` in Nova's in-process harness.

The computes run FTLibvirtDriver with its watcher looking at the (fake)
local agent every 0.1 s (:class:`~tests.nova.test_handoff.
TakeoverAgentAPI`: what a host's agent lists follows the driver's
``protect`` calls, and the test can make a primary lose its secondary).
What is checked: a tenant's change of the ``ft_status`` property is
undone, a lost secondary shows in ``ft_status`` and its Placement
allocation is released, and the server is protected again through
Placement, onto another host, or says why not.
"""

from __future__ import annotations

import doctest
import time
from typing import Any

import fixtures
import testtools
import testtools.content

from mftvm_openstack.contract.status import UNPROTECTED_BY_REQUEST
from mftvm_openstack.nova import driver, live_status, status
from tests.nova import test_driver, test_handoff

USAGE = test_driver.USAGE
NO_USAGE = test_driver.NO_USAGE
#: how long a status may take to show (the watcher looks every 0.1 s)
TIMEOUT = test_handoff.HANDOFF_TIMEOUT


class TestDocstrings(testtools.TestCase):

    def test_doctests(self) -> None:
        for module in (status, live_status):
            result = doctest.testmod(module)
            self.assertGreater(result.attempted, 0, module)
            self.assertEqual(0, result.failed, module)


class StatusTestBase(test_handoff.HandoffTestBase):

    REPROTECT = True
    #: [ft] reprotect_retry_interval
    RETRY = 3600.0
    #: seconds between two looks at all of a host's servers
    SWEEP = status.SWEEP_INTERVAL

    def setUp(self) -> None:
        self.statuses: list[str] = []
        #: time.monotonic() of each of ``statuses``
        self.status_times: list[float] = []
        original = driver.FTDriverMixin._set_status

        def record(drv: Any, instance: Any, value: str) -> None:
            self.statuses.append(value)
            self.status_times.append(time.monotonic())
            original(drv, instance, value)
        self.useFixture(fixtures.MonkeyPatch(
            'mftvm_openstack.nova.driver.FTDriverMixin._set_status',
            record))
        self.useFixture(fixtures.MonkeyPatch(
            'mftvm_openstack.nova.status.StatusKeeper.sweep_interval',
            self.SWEEP))
        super().setUp()
        self.flags(reprotect_retry_interval=self.RETRY, group='ft')

    def _wait(self, what: str, check: Any) -> Any:
        deadline = time.monotonic() + TIMEOUT
        while True:
            value = check()
            if value:
                return value
            if time.monotonic() > deadline:
                self.fail(f'{what}: not within {TIMEOUT} s')
            time.sleep(0.05)

    def _wait_looks(self, host: str, count: int = 3) -> None:
        """Until the watcher of ``host`` has looked ``count`` more
        times."""
        start = self.takeover.list_calls.get(host, 0)
        self._wait(f'{count} looks on {host}', lambda: self.takeover.
                   list_calls.get(host, 0) >= start + count + 1)

    def _wait_protected(self, server: dict, secondary: str) -> dict:
        def protected() -> bool:
            sysmeta = self._sysmeta(server)
            return (sysmeta.get(driver.STATUS) == 'protected' and
                    sysmeta.get(driver.SECONDARY_HOST) == secondary)
        self._wait(f'protected onto {secondary}', protected)
        return self._sysmeta(server)

    def _secondary_allocation(self, server: dict) -> list[str]:
        return list(self._get_allocations_by_server_uuid(
            driver.secondary_consumer(server['id'])))


class TestMirror(StatusTestBase):
    """The server's ``ft_status`` property mirrors system metadata."""

    def test_tenant_change_and_deletion_undone(self) -> None:
        server = self._boot_ft()
        self.assertEqual('protected', server['metadata'][driver.STATUS])

        self.api.post_server_metadata(
            server['id'], {driver.STATUS: 'protected, trust me'})
        self._wait('ft_status written back', lambda: self.api.get_server(
            server['id'])['metadata'].get(driver.STATUS) == 'protected')
        self.assertEqual('protected', self._sysmeta(server)[driver.STATUS])

        self.api.delete_server_metadata(server['id'], driver.STATUS)
        self._wait('ft_status put back', lambda: self.api.get_server(
            server['id'])['metadata'].get(driver.STATUS) == 'protected')


class TestMirrorSweep(StatusTestBase):
    """Servers the agent does not list as primaries: only the looks at
    all of the host's servers see them (every look, here)."""

    SWEEP = 0.0

    def test_kept_for_a_server_the_agent_does_not_list(self) -> None:
        server = self._boot_ft()
        self.takeover.running.clear()

        self.api.post_server_metadata(server['id'],
                                      {driver.STATUS: 'protected!'})
        self._wait('ft_status written back', lambda: self.api.get_server(
            server['id'])['metadata'].get(driver.STATUS) == 'protected')

    def test_other_servers_metadata_left_alone(self) -> None:
        server = self._boot(self.flavor, {'ft': 'false'})
        host = server['OS-EXT-SRV-ATTR:host']
        self.api.post_server_metadata(server['id'],
                                      {driver.STATUS: 'mine'})
        self._wait_looks(host)
        self.assertEqual('mine', self.api.get_server(
            server['id'])['metadata'][driver.STATUS])


class TestSecondaryLost(StatusTestBase):

    def test_released_and_reprotected_onto_another_host(self) -> None:
        server = self._boot_ft()
        primary, secondary, third = self._roles(server)
        self.assertEqual([self.compute_rp_uuids[secondary]],
                         self._secondary_allocation(server))
        self.statuses.clear()
        self.status_times.clear()

        lost_at = time.monotonic()
        self.takeover.lose_secondary(primary, server['id'],
                                     'no ack for 0.8 s')
        sysmeta = self._wait_protected(server, third)
        # seen, not asserted (a noisy machine): the watcher looks every
        # 0.1 s here
        self.addDetail('seconds_to_unprotected', testtools.content.
                       text_content(f'{self.status_times[0] - lost_at:.2f}'))
        self.addDetail('seconds_to_reprotected', testtools.content.
                       text_content(f'{self.status_times[-1] - lost_at:.2f}'))

        self.assertEqual(
            [f'unprotected: secondary {secondary} lost (no ack for 0.8 s)',
             'protecting', 'protected'], self.statuses)
        # the lost secondary's hold is gone, the new one's held under
        # the same consumer
        self.assertEqual({primary: USAGE, secondary: NO_USAGE,
                          third: USAGE}, self._usages())
        self.assertEqual([self.compute_rp_uuids[third]],
                         self._secondary_allocation(server))
        self.assertEqual(driver.secondary_consumer(server['id']),
                         sysmeta[driver.SECONDARY_CONSUMER])
        self.assertEqual((primary, third), (
            self.agent.of('protect')[-1][0],
            self.agent.of('protect')[-1][1]['secondary_host']))
        self.assertEqual('protected', self.api.get_server(
            server['id'])['metadata'][driver.STATUS])
        # the Nova server itself was not touched
        self.assertEqual([], [c for c in self.power_calls
                              if c[0] != 'spawn'])

    def test_unprotected_by_request_left_to_the_driver(self) -> None:
        server = self._boot_ft()
        primary, secondary, _ = self._roles(server)
        self.statuses.clear()
        protects = len(self.agent.of('protect'))

        self.takeover.lose_secondary(primary, server['id'],
                                     UNPROTECTED_BY_REQUEST)
        self._wait_looks(primary)
        self.assertEqual([], self.statuses)
        self.assertEqual(protects, len(self.agent.of('protect')))
        self.assertEqual(secondary,
                         self._sysmeta(server)[driver.SECONDARY_HOST])
        self.assertEqual([self.compute_rp_uuids[secondary]],
                         self._secondary_allocation(server))


class TestSecondaryLostNoOtherHost(StatusTestBase):
    """Two hosts: the first attempt avoids the host just lost, so the
    status says why the server runs unprotected; the next attempt, a
    retry interval later, may take that host again."""

    HOSTS = ('host1', 'host2')
    RETRY = 1.0

    def test_says_why_then_retries(self) -> None:
        server = self._boot_ft()
        primary = server['OS-EXT-SRV-ATTR:host']
        secondary = self._other(primary)
        self.statuses.clear()

        self.takeover.lose_secondary(primary, server['id'], 'link down')
        # the same host again: wait for the statuses, not the host
        self._wait('re-protected', lambda: 'protected' in self.statuses)
        self._wait_protected(server, secondary)

        lost, why, *rest = self.statuses
        self.assertEqual(f'unprotected: secondary {secondary} lost (link '
                         'down)', lost)
        self.assertTrue(why.startswith('unprotected: no secondary host ('),
                        why)
        self.assertEqual(['protecting', 'protected'], rest)
        self.assertEqual({primary: USAGE, secondary: USAGE}, self._usages())
        self.assertEqual((primary, secondary), (
            self.agent.of('protect')[-1][0],
            self.agent.of('protect')[-1][1]['secondary_host']))


class TestReprotectionFails(StatusTestBase):
    """The re-protection's ``protect`` fails: its error is the status,
    the secondary it chose is released, and the next attempt (a retry
    interval later) protects."""

    RETRY = 1.0

    def test_error_said_secondary_released_then_retried(self) -> None:
        server = self._boot_ft()
        primary, secondary, third = self._roles(server)
        self.statuses.clear()
        self.takeover.protect_failures = 1

        self.takeover.lose_secondary(primary, server['id'], 'no ack')
        self._wait('re-protected', lambda: 'protected' in self.statuses)

        lost, protecting, failed, *rest = self.statuses
        self.assertEqual(f'unprotected: secondary {secondary} lost (no '
                         'ack)', lost)
        self.assertEqual('protecting', protecting)
        self.assertTrue(failed.startswith('error: protect failed: '),
                        failed)
        self.assertEqual(['protecting', 'protected'], rest)
        # first onto the third host (failed, released), then onto any
        # but the primary (the lost host has come back, here)
        first, second = [kw['secondary_host']
                         for _, kw in self.agent.of('protect')[1:]]
        self.assertEqual(third, first)
        self.assertIn(second, (secondary, third))
        sysmeta = self._wait_protected(server, second)
        self.assertEqual(driver.secondary_consumer(server['id']),
                         sysmeta[driver.SECONDARY_CONSUMER])
        self.assertEqual(
            {primary: USAGE, second: USAGE,
             ({secondary, third} - {second}).pop(): NO_USAGE},
            self._usages())


class TestAfterHandoff(StatusTestBase):
    """Two hosts: after a takeover, the re-protection avoids the failed
    host and finds none; the status says so, and an attempt a retry
    interval later takes the old host once it is back."""

    HOSTS = ('host1', 'host2')
    RETRY = 1.0

    def test_reprotection_retried_after_a_handoff(self) -> None:
        server = self._boot_ft()
        primary = server['OS-EXT-SRV-ATTR:host']
        secondary = self._other(primary)
        self.statuses.clear()

        self.takeover.take_over(secondary, server['id'])
        self._wait_for_host(server, secondary)
        self._wait('re-protected', lambda: 'protected' in self.statuses)

        why, protecting, protected = self.statuses
        self.assertTrue(why.startswith('unprotected: no secondary host ('),
                        why)
        self.assertEqual(['protecting', 'protected'],
                         [protecting, protected])
        self._wait_protected(server, primary)
        self.assertEqual((secondary, primary), (
            self.agent.of('protect')[-1][0],
            self.agent.of('protect')[-1][1]['secondary_host']))
        self.assertEqual({primary: USAGE, secondary: USAGE}, self._usages())
