"""The secondary chosen through Placement, and FT servers steered to FT
hosts, in Nova's harness.

Real API, conductor, scheduler and Placement; fake-libvirt computes
running FTLibvirtDriver. ``SchedulerQueryClient.select_destinations``
raises when called from this package (a compute cannot reach the
scheduler under a superconductor: ``test_driver.NoSchedulerFromCompute``),
so every boot here proves that the secondary was chosen without it.
"""

from __future__ import annotations

import doctest
import time
import types
from typing import Any
from unittest import mock
from urllib import parse

import fixtures
import testtools
from nova.scheduler.client import report as scheduler_report

from mftvm_openstack.nova import (
    driver,
    scheduler_filter,
    secondary_choice,
    steering,
)
from tests.nova import test_driver, test_lifecycle

USAGE = test_driver.USAGE
NO_USAGE = test_driver.NO_USAGE

#: seconds to wait for the watcher's look and the trait to follow
TRAIT_TIMEOUT = 15.0


def _asks_for_ft_root(resources: Any) -> bool:
    """The allocation candidates query is the driver's (FT trait on the
    root provider), not the scheduler's for the primary."""
    query = parse.parse_qs(resources.to_querystring())
    return any(steering.TRAIT in value.split(',')
               for value in query.get('root_required', []))


def wait_for_trait(test: Any, host: str, present: bool) -> None:
    """Run the resource updates until ``host`` has the FT trait (or
    not), as the watcher's looks at its agent decide."""
    start = time.monotonic()
    while (steering.TRAIT in test._traits(host)) != present:
        if time.monotonic() - start > TRAIT_TIMEOUT:
            test.fail(f'trait on {host} still {not present} after '
                      f'{TRAIT_TIMEOUT} s')
        time.sleep(0.1)
        test._run_periodics()


class PlacementChoiceBase(test_driver.FTDriverTestBase):

    def _traits(self, host: str) -> list[str]:
        return self._get_provider_traits(self.compute_rp_uuids[host])

    def _assert_no_scheduler_from_compute(self, servers: int) -> None:
        self.assertEqual(0, self.no_scheduler.from_here)
        self.assertEqual(servers, self.no_scheduler.calls)


class TestChoice(PlacementChoiceBase):

    def test_other_host_through_placement(self) -> None:
        server = self._boot(self.ft_flavor)
        primary = server['OS-EXT-SRV-ATTR:host']
        secondary = self._other(primary)
        sysmeta = self._sysmeta(server)
        self.assertEqual('protected', sysmeta[driver.STATUS])
        self.assertEqual(secondary, sysmeta[driver.SECONDARY_HOST])
        self.assertEqual(secondary, sysmeta[driver.SECONDARY_NODE])
        allocs = self._get_allocations_by_server_uuid(
            driver.secondary_consumer(server['id']))
        self.assertEqual({self.compute_rp_uuids[secondary]: USAGE},
                         {rp: a['resources'] for rp, a in allocs.items()})
        self.assertEqual([secondary], [kw['secondary_host'] for _, kw in
                                       self.agent.of('protect')])
        self._assert_no_scheduler_from_compute(servers=1)

        self._delete_server(server)
        self.assertEqual({h: NO_USAGE for h in self.HOSTS}, self._usages())

    def test_trait_on_ft_capable_hosts(self) -> None:
        for host in self.HOSTS:
            self.assertIn(steering.TRAIT, self._traits(host))


class TestClaimRace(PlacementChoiceBase):
    """Another claim takes the first candidate between the question and
    the claim: the next one is claimed."""

    HOSTS = ('host1', 'host2', 'host3')

    def setUp(self) -> None:
        super().setUp()
        self.taken: list[str] = []
        self.claims: list[str] = []
        original = scheduler_report.SchedulerReportClient.\
            get_allocation_candidates
        put = scheduler_report.SchedulerReportClient.put_allocations

        def racing(client: Any, context: Any, resources: Any) -> Any:
            answer = original(client, context, resources)
            if self.taken or not _asks_for_ft_root(resources):
                return answer
            requests, summaries, _version = answer
            first = secondary_choice.rank(requests, summaries)[0].provider
            self.taken.append(first)
            # all its memory (allocation ratio 1: capacity is max_unit)
            memory = summaries[first]['resources']['MEMORY_MB']
            self.placement.put(
                '/allocations/' + RACER,
                {'allocations': {first: {'resources': {
                    'MEMORY_MB': memory['capacity'] - memory['used']}}},
                 'project_id': 'racer', 'user_id': 'racer',
                 'consumer_generation': None}, version='1.28')
            return answer

        def recorded(client: Any, context: Any, consumer: str,
                     payload: dict) -> Any:
            self.claims.extend(payload['allocations'])
            return put(client, context, consumer, payload)

        self.useFixture(fixtures.MonkeyPatch(
            'nova.scheduler.client.report.SchedulerReportClient.'
            'get_allocation_candidates', racing))
        self.useFixture(fixtures.MonkeyPatch(
            'nova.scheduler.client.report.SchedulerReportClient.'
            'put_allocations', recorded))

    def test_claim_conflict_moves_to_next_candidate(self) -> None:
        server = self._boot(self.flavor, {'ft': 'true'})
        primary = server['OS-EXT-SRV-ATTR:host']
        hosts = {rp: h for h, rp in self.compute_rp_uuids.items()}
        (taken,) = [hosts[rp] for rp in self.taken]
        self.assertNotEqual(primary, taken)
        (other,) = set(self.HOSTS) - {primary, taken}
        sysmeta = self._sysmeta(server)
        self.assertEqual('protected', sysmeta[driver.STATUS])
        self.assertEqual(other, sysmeta[driver.SECONDARY_HOST])
        # the taken host was claimed first, and refused
        self.assertEqual([taken, other], [hosts[rp] for rp in self.claims])
        allocs = self._get_allocations_by_server_uuid(
            driver.secondary_consumer(server['id']))
        self.assertEqual([self.compute_rp_uuids[other]], list(allocs))
        self._assert_no_scheduler_from_compute(servers=1)


RACER = '5b2e1c6a-0a53-4a0e-9d43-6f0c9d7b1a11'


class TestNoCandidate(PlacementChoiceBase):
    """host2 is not FT-capable: nothing to hold a secondary."""

    NOT_FT_HOSTS = ('host2',)

    def test_trait_only_on_ft_capable_hosts(self) -> None:
        self.assertIn(steering.TRAIT, self._traits('host1'))
        self.assertNotIn(steering.TRAIT, self._traits('host2'))

    def test_no_candidate_says_so(self) -> None:
        server = self._boot(self.ft_flavor)
        self.assertEqual('host1', server['OS-EXT-SRV-ATTR:host'])
        status = server['metadata'][driver.STATUS]
        self.assertEqual('unprotected: no secondary host (no other '
                         'FT-capable host has room)', status)
        sysmeta = self._sysmeta(server)
        self.assertEqual(status, sysmeta[driver.STATUS])
        self.assertNotIn(driver.SECONDARY_HOST, sysmeta)
        self.assertEqual({'host1': USAGE, 'host2': NO_USAGE},
                         self._usages())
        self.assertEqual([], self.agent.calls)
        self._assert_no_scheduler_from_compute(servers=1)


class SteeringBase(PlacementChoiceBase):
    """host1 FT-capable but disabled; host2 has room but is not
    FT-capable."""

    NOT_FT_HOSTS = ('host2',)

    def setUp(self) -> None:
        super().setUp()
        self._host1_status('disabled')
        # an FT flavor whose operator forgot the trait
        self.untraited_flavor = self._create_flavor(
            name='mftvm.ft-untraited', extra_spec={'ft:enabled': 'true'},
            **test_driver.FLAVOR)

    def _host1_status(self, status: str) -> None:
        (service,) = self.admin_api.get_services(binary='nova-compute',
                                                 host='host1')
        self.admin_api.put_service(service['id'], {'status': status})


class TestSteering(SteeringBase):

    def test_ft_flavor_never_lands_on_a_non_ft_host(self) -> None:
        server = self._boot(self.ft_flavor, expected_state='ERROR')
        self.assertIn('No valid host', server['fault']['message'])
        self.assertEqual({h: NO_USAGE for h in self.HOSTS}, self._usages())
        # while a plain server goes there
        plain = self._boot(self.flavor)
        self.assertEqual('host2', plain['OS-EXT-SRV-ATTR:host'])
        # and the FT flavor to the FT host, once it takes servers again
        self._host1_status('enabled')
        server = self._boot(self.ft_flavor)
        self.assertEqual('host1', server['OS-EXT-SRV-ATTR:host'])

    def test_untraited_ft_flavor_on_a_non_ft_host_says_why(self) -> None:
        # without FTHostFilter nothing keeps it off host2
        server = self._boot(self.untraited_flavor)
        self.assertEqual('host2', server['OS-EXT-SRV-ATTR:host'])
        self.assertTrue(server['metadata'][driver.STATUS].startswith(
            'unprotected: this host cannot protect ('))
        self.assertEqual([], self.agent.calls)

    def test_ft_metadata_on_a_non_ft_host_says_why(self) -> None:
        server = self._boot(self.flavor, {'ft': 'true'})
        self.assertEqual('host2', server['OS-EXT-SRV-ATTR:host'])
        status = server['metadata'][driver.STATUS]
        self.assertEqual('unprotected: this host cannot protect ([libvirt] '
                         'file_backed_memory is not set in its nova.conf)',
                         status)
        self.assertEqual(status, self._sysmeta(server)[driver.STATUS])
        self.assertNotIn(driver.SECONDARY_HOST, self._sysmeta(server))
        self.assertEqual({'host1': NO_USAGE, 'host2': USAGE},
                         self._usages())
        self.assertEqual([], self.agent.calls)


class TestTraitFollowsTheAgent(PlacementChoiceBase):
    """The trait goes while the local agent does not answer."""

    def setUp(self) -> None:
        # before the computes start: the watcher reads it in init_host
        self.useFixture(fixtures.MonkeyPatch(
            'mftvm_openstack.nova.driver.FTDriverMixin.handoff_interval',
            0.1))
        super().setUp()

    def test_silent_agent_drops_the_trait(self) -> None:
        self.agent.silent.add('host2')
        wait_for_trait(self, 'host2', present=False)
        self.assertIn(steering.TRAIT, self._traits('host1'))
        # no secondary there now
        server = self._boot(self.ft_flavor)
        self.assertEqual('host1', server['OS-EXT-SRV-ATTR:host'])
        self.assertTrue(server['metadata'][driver.STATUS].startswith(
            'unprotected: no secondary host'))

        self.agent.silent.clear()
        wait_for_trait(self, 'host2', present=True)


class TestSteeringFilter(SteeringBase):
    """FTHostFilter enabled in nova-scheduler."""

    ADDITIONAL_FILTERS = ['FTHostFilter']

    def _setup_scheduler_service(self) -> Any:
        self.flags(available_filters=[
            'nova.scheduler.filters.all_filters',
            'mftvm_openstack.nova.scheduler_filter.FTHostFilter'],
            group='filter_scheduler')
        return super()._setup_scheduler_service()

    def test_untraited_ft_flavor_never_lands_on_a_non_ft_host(self) -> None:
        server = self._boot(self.untraited_flavor, expected_state='ERROR')
        self.assertIn('No valid host', server['fault']['message'])
        self.assertEqual({h: NO_USAGE for h in self.HOSTS}, self._usages())
        plain = self._boot(self.flavor)
        self.assertEqual('host2', plain['OS-EXT-SRV-ATTR:host'])
        self._host1_status('enabled')
        server = self._boot(self.untraited_flavor)
        self.assertEqual('host1', server['OS-EXT-SRV-ATTR:host'])


class TestFilterAlone(testtools.TestCase):
    """FTHostFilter's decisions, Placement replaced."""

    def setUp(self) -> None:
        super().setUp()
        self.placement = mock.Mock()
        self.useFixture(fixtures.MonkeyPatch(
            'nova.scheduler.client.report.report_client_singleton',
            lambda: self.placement))
        self.host = types.SimpleNamespace(host='hv1', uuid='rp-hv1')

    def passes(self, extra_specs: dict) -> bool:
        spec = types.SimpleNamespace(flavor=types.SimpleNamespace(
            name='f', extra_specs=extra_specs))
        return scheduler_filter.FTHostFilter().host_passes(self.host, spec)

    def test_doctests(self) -> None:
        result = doctest.testmod(scheduler_filter)
        self.assertGreater(result.attempted, 0)
        self.assertEqual(0, result.failed)

    def test_no_placement_call_unless_needed(self) -> None:
        for specs in ({}, {'ft:enabled': 'false'},
                      {'ft:enabled': 'true',
                       steering.FLAVOR_TRAIT_SPEC: 'required'}):
            self.assertTrue(self.passes(specs), specs)
        self.placement.get_provider_traits.assert_not_called()

    def test_host_traits_decide(self) -> None:
        traits = self.placement.get_provider_traits.return_value
        traits.traits = {'COMPUTE_NODE', steering.TRAIT}
        self.assertTrue(self.passes({'ft:enabled': 'true'}))
        traits.traits = {'COMPUTE_NODE'}
        self.assertFalse(self.passes({'ft:enabled': 'yes'}))
        self.assertFalse(self.passes({'ft:enabled': 'maybe'}))
        self.assertEqual('rp-hv1',
                         self.placement.get_provider_traits.call_args[0][1])

    def test_placement_failure_leaves_the_host_out(self) -> None:
        self.placement.get_provider_traits.side_effect = RuntimeError('x')
        self.assertFalse(self.passes({'ft:enabled': 'true'}))


class TestStartLeavesASecondaryThatCannotProtect(PlacementChoiceBase):
    """A stopped FT server's secondary host loses the trait (its agent
    went silent): the start chooses the third host."""

    HOSTS = ('host1', 'host2', 'host3')

    def setUp(self) -> None:
        # before the computes start: the watcher reads it in init_host
        self.useFixture(fixtures.MonkeyPatch(
            'mftvm_openstack.nova.driver.FTDriverMixin.handoff_interval',
            0.1))
        super().setUp()
        self.agent = test_lifecycle.LifecycleAgentAPI()
        for compute in self.computes.values():
            compute.driver._ft_agent_api = self.agent

    def test_start_moves_the_secondary_off_a_host_that_cannot_protect(
            self) -> None:
        server = self._boot(self.ft_flavor)
        primary = server['OS-EXT-SRV-ATTR:host']
        secondary = self._sysmeta(server)[driver.SECONDARY_HOST]
        (third,) = set(self.HOSTS) - {primary, secondary}
        server = self._stop_server(server)

        self.agent.silent.add(secondary)
        wait_for_trait(self, secondary, present=False)
        self.agent.calls.clear()
        server = self._start_server(server)
        self.assertEqual(third, self._sysmeta(server)[driver.SECONDARY_HOST])
        self.assertEqual([third], [kw['secondary_host'] for _, kw in
                                   self.agent.of('protect')])
        allocs = self._get_allocations_by_server_uuid(
            driver.secondary_consumer(server['id']))
        self.assertEqual([self.compute_rp_uuids[third]], list(allocs))
        self.assertEqual(NO_USAGE, self._usages()[secondary])


class TestPlacementFaults(PlacementChoiceBase):
    """Placement failing the driver: the server runs on, saying why."""

    def _fail_candidates(self) -> None:
        original = scheduler_report.SchedulerReportClient.\
            get_allocation_candidates

        def failing(client: Any, context: Any, resources: Any) -> Any:
            if _asks_for_ft_root(resources):
                return None, None, None     # what it gives on an error
            return original(client, context, resources)

        self.useFixture(fixtures.MonkeyPatch(
            'nova.scheduler.client.report.SchedulerReportClient.'
            'get_allocation_candidates', failing))

    def test_no_candidates_answer(self) -> None:
        self._fail_candidates()
        server = self._boot(self.ft_flavor)
        self.assertEqual(
            'unprotected: no secondary host (Placement gave no allocation '
            'candidates (its answer is in this nova-compute\'s log))',
            server['metadata'][driver.STATUS])
        primary = server['OS-EXT-SRV-ATTR:host']
        self.assertEqual({primary: USAGE, self._other(primary): NO_USAGE},
                         self._usages())
        self.assertEqual([], self.agent.calls)

    def test_consumer_already_holding_is_not_added_to(self) -> None:
        # a leftover allocation of the secondary's consumer (a release
        # that failed): the claim does not double it up
        put = scheduler_report.SchedulerReportClient.put_allocations
        leftover: list[str] = []

        def leftover_first(client: Any, context: Any, consumer: str,
                           payload: dict) -> Any:
            if not leftover:
                leftover.append(consumer)
                assert put(client, context, consumer, payload)
            return put(client, context, consumer, payload)

        self.useFixture(fixtures.MonkeyPatch(
            'nova.scheduler.client.report.SchedulerReportClient.'
            'put_allocations', leftover_first))
        server = self._boot(self.ft_flavor)
        consumer = driver.secondary_consumer(server['id'])
        self.assertEqual([consumer], leftover)
        self.assertEqual(
            f'unprotected: no secondary host (its Placement consumer '
            f'{consumer} already holds an allocation)',
            server['metadata'][driver.STATUS])
        # the leftover, once, not twice
        allocs = self._get_allocations_by_server_uuid(consumer)
        self.assertEqual([USAGE], [a['resources'] for a in allocs.values()])
        self.assertEqual([], self.agent.calls)
