"""Hand-off on failover in Nova's in-process harness.

Three fake-libvirt computes run FTLibvirtDriver; the agents are a
:class:`TakeoverAgentAPI` whose ``list()`` reports, per host, what the
test says the agent runs. A server is booted FT (primary P, secondary S
chosen by the scheduler, third host T free), then the agent on S
"takes it over": S's nova-compute must move Nova's record there, with
no reboot, and P coming back must not start a second copy.
"""

from __future__ import annotations

import doctest
import json
import os
import time
from typing import Any

import fixtures
import nova.conf
import nova.context as nova_context
import nova.objects.instance as instance_obj
import testtools
from nova import utils
from nova.tests.fixtures import libvirt as fakelibvirt
from nova.virt.libvirt import driver as libvirt_driver

from mftvm_openstack.agent import exception as agent_exception
from mftvm_openstack.nova import driver, handoff, settle, steering
from tests.nova import test_driver

CONF = nova.conf.CONF
USAGE = test_driver.USAGE
NO_USAGE = test_driver.NO_USAGE
#: how long the API may take to show the hand-off (the watcher polls
#: every 0.1 s here)
HANDOFF_TIMEOUT = 15.0


class TakeoverAgentAPI(test_driver.FakeAgentAPI):
    """The fake agents, plus ``list()`` of what each host runs.

    ``list`` is polled by the driver's watcher: it is not recorded in
    ``calls``.
    """

    def __init__(self) -> None:
        super().__init__()
        self.running: dict[str, list[dict[str, Any]]] = {}
        self.list_calls: dict[str, int] = {}
        #: how many of the next ``protect`` calls fail (recorded, the
        #: agent's list unchanged)
        self.protect_failures = 0

    def list(self, ctxt: Any, host: str) -> list[dict[str, Any]]:
        self.list_calls[host] = self.list_calls.get(host, 0) + 1
        return [dict(e) for e in self.running.get(host, [])]

    def protect(self, ctxt: Any, host: str, instance: str, spec: dict,
                options: dict, secondary_host: Any = None) -> dict:
        """Recorded; the agent on ``host`` then lists ``instance``
        protected onto ``secondary_host``, one epoch committed."""
        if self.protect_failures:
            self.protect_failures -= 1
            self.calls.append(('protect', host, {
                'instance': instance, 'secondary_host': secondary_host}))
            raise agent_exception.PeerUnreachable(host=secondary_host,
                                                  reason='no answer')
        answer = super().protect(ctxt, host, instance, spec, options,
                                 secondary_host=secondary_host)
        self.running[host] = [
            e for e in self.running.get(host, [])
            if e['instance'] != instance] + [
            {'instance': instance, 'role': 'primary', 'state': 'protected',
             'alive': True, 'host': host, 'peer': secondary_host,
             'last_committed_epoch': 1}]
        return answer

    def lose_secondary(self, host: str, instance: str,
                       reason: str) -> None:
        """The primary on ``host`` runs ``instance`` on unprotected."""
        for entry in self.running[host]:
            if entry['instance'] == instance:
                entry.update(state='unprotected', reason=reason)

    def take_over(self, host: str, instance: str,
                  state: str = 'active') -> None:
        """The agent on ``host`` now runs ``instance`` as primary."""
        self.running.setdefault(host, []).append(
            {'instance': instance, 'role': 'primary', 'state': state,
             'alive': True, 'host': host, 'peer': None})


class TestDocstrings(testtools.TestCase):

    def test_handoff_doctests(self) -> None:
        result = doctest.testmod(handoff)
        self.assertGreater(result.attempted, 0)
        self.assertEqual(0, result.failed)

    def test_keys_match_the_driver(self) -> None:
        self.assertEqual(
            (driver.SECONDARY_HOST, driver.SECONDARY_NODE,
             driver.SECONDARY_CONSUMER, driver.STATUS),
            (handoff.SECONDARY_HOST, handoff.SECONDARY_NODE,
             handoff.SECONDARY_CONSUMER, handoff.STATUS))


class HandoffTestBase(test_driver.FTDriverTestBase):

    HOSTS = ('host1', 'host2', 'host3')
    REPROTECT = False

    def setUp(self) -> None:
        # before the computes start: the watcher reads it in init_host
        self.useFixture(fixtures.MonkeyPatch(
            'mftvm_openstack.nova.driver.FTDriverMixin.handoff_interval',
            0.1))
        self.useFixture(fixtures.MonkeyPatch(
            'mftvm_openstack.nova.driver.FTDriverMixin.'
            'reprotect_after_handoff', self.REPROTECT))
        super().setUp()
        self.takeover = TakeoverAgentAPI()
        self.agent = self.takeover
        # the drivers build their client on first use: give them ours
        for compute in self.computes.values():
            compute.driver._ft_agent_api = self.agent
        self.power_calls: list[tuple[str, str]] = []
        for name in ('power_on', 'power_off', 'reboot', 'spawn',
                     'resume_state_on_host_boot'):
            self._spy(name)

    def _spy(self, name: str) -> None:
        original = getattr(libvirt_driver.LibvirtDriver, name)
        calls = self.power_calls

        def spy(drv: Any, *args: Any, **kwargs: Any) -> Any:
            calls.append((name, drv._ft_host))
            return original(drv, *args, **kwargs)

        self.useFixture(fixtures.MonkeyPatch(
            f'nova.virt.libvirt.driver.LibvirtDriver.{name}', spy))

    def _boot_ft(self, networks: Any = 'none', flavor: Any = None,
                 **more: Any) -> dict:
        body = self._build_server(flavor_id=flavor or self.ft_flavor,
                                  networks=networks)
        body.update(more)
        server = self.api.post_server({'server': body})
        return self._wait_for_state_change(server, 'ACTIVE')

    def _roles(self, server: dict) -> tuple[str, str, str]:
        primary = server['OS-EXT-SRV-ATTR:host']
        secondary = self._sysmeta(server)[driver.SECONDARY_HOST]
        (third,) = set(self.HOSTS) - {primary, secondary}
        return primary, secondary, third

    def _wait_for_host(self, server: dict, host: str) -> tuple[dict, float]:
        start = time.monotonic()
        while True:
            server = self.api.get_server(server['id'])
            if server['OS-EXT-SRV-ATTR:host'] == host:
                return server, time.monotonic() - start
            if time.monotonic() - start > HANDOFF_TIMEOUT:
                self.fail(f'server still on {server["OS-EXT-SRV-ATTR:host"]}'
                          f' after {HANDOFF_TIMEOUT} s')
            time.sleep(0.05)

    def _take_over(self, server: dict) -> tuple[dict, str]:
        """The secondary's agent restored the guest there as a (transient)
        domain and took it over: the server once Nova names that host,
        and the host."""
        primary, secondary, _ = self._roles(server)
        xml = self.computes[primary].driver._host.get_connection(
        ).lookupByUUIDString(server['id']).XMLDesc(0)
        self.computes[secondary].driver._host.get_connection().createXML(
            xml, 0)
        self.agent.calls.clear()
        self.takeover.take_over(secondary, server['id'])
        server, _ = self._wait_for_host(server, secondary)
        return server, secondary

    def _domains(self, host: str) -> list[str]:
        conn = self.computes[host].driver._host.get_connection()
        flags = (fakelibvirt.VIR_CONNECT_LIST_DOMAINS_ACTIVE |
                 fakelibvirt.VIR_CONNECT_LIST_DOMAINS_INACTIVE)
        return [d.UUIDString() for d in conn.listAllDomains(flags)]

    def _migrations(self, server: dict) -> list[dict]:
        return [m for m in self.admin_api.get_migrations()
                if m['instance_uuid'] == server['id']]


class TestHandoff(HandoffTestBase):

    def test_takeover_moves_record_and_old_host_stays_clean(self) -> None:
        port = self.neutron.port_1['id']
        server = self._boot_ft(networks=[{'port': port}])
        primary, secondary, third = self._roles(server)
        self.assertEqual([server['id']], self._domains(primary))
        self.assertEqual({primary: USAGE, secondary: USAGE,
                          third: NO_USAGE}, self._usages())
        self.assertEqual(
            primary, self.neutron.show_port(port)['port']['binding:host_id'])
        del self.power_calls[:]
        calls_before = len(self.agent.calls)

        self.takeover.take_over(secondary, server['id'])
        server, waited = self._wait_for_host(server, secondary)
        self.addDetail('handoff_seconds',
                       testtools.content.text_content(f'{waited:.2f}'))

        # the API: ACTIVE, running, no task, on the new host
        self.assertEqual('ACTIVE', server['status'])
        self.assertEqual(1, server['OS-EXT-STS:power_state'])
        self.assertIsNone(server['OS-EXT-STS:task_state'])
        self.assertEqual(secondary,
                         server['OS-EXT-SRV-ATTR:hypervisor_hostname'])
        (migration,) = self._migrations(server)
        self.assertEqual(
            ('evacuation', 'done', primary, secondary, secondary),
            (migration['migration_type'], migration['status'],
             migration['source_compute'], migration['dest_compute'],
             migration['dest_node']))
        # Placement: the instance on the new host only, the secondary's
        # hold gone (moved into it)
        self.assertEqual({primary: NO_USAGE, secondary: USAGE,
                          third: NO_USAGE}, self._usages())
        self.assertEqual([self.compute_rp_uuids[secondary]],
                         list(self._get_allocations_by_server_uuid(
                             server['id'])))
        self.assertEqual({}, self._get_allocations_by_server_uuid(
            driver.secondary_consumer(server['id'])))
        # no reboot, nothing started
        self.assertEqual([], self.power_calls)
        self.assertEqual(calls_before, len(self.agent.calls))
        # status, secondary forgotten, port bound to the new host
        status = f'failed-over from {primary}; unprotected'
        self.assertEqual(status, server['metadata'][driver.STATUS])
        sysmeta = self._sysmeta(server)
        self.assertEqual(status, sysmeta[driver.STATUS])
        for key in (driver.SECONDARY_HOST, driver.SECONDARY_NODE,
                    driver.SECONDARY_CONSUMER):
            self.assertNotIn(key, sysmeta)
        self.assertEqual(
            secondary,
            self.neutron.show_port(port)['port']['binding:host_id'])
        actions = [a['action'] for a in
                   self.api.get_instance_actions(server['id'])]
        self.assertIn(handoff.ACTION, actions)
        ctxt = nova_context.get_admin_context()
        instance = instance_obj.Instance.get_by_uuid(ctxt, server['id'])
        self.assertEqual(self.computes[secondary].manager.rt
                         .compute_nodes[secondary].id, instance.compute_id)

        # the old host comes back: its copy is destroyed, not started
        self.restart_compute_service(primary)
        self.computes[primary].driver._ft_agent_api = self.agent
        self.assertEqual([], self._domains(primary))
        server = self.api.get_server(server['id'])
        self.assertEqual(secondary, server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual('ACTIVE', server['status'])
        self.assertEqual([], self.power_calls)
        self.assertEqual(calls_before, len(self.agent.calls))
        self.assertEqual('completed', self._migrations(server)[0]['status'])
        self.assertEqual({primary: NO_USAGE, secondary: USAGE,
                          third: NO_USAGE}, self._usages())
        # the watcher keeps quiet once the record is here
        time.sleep(0.3)
        self.assertEqual(1, len(self._migrations(server)))

        # deleting it now is the new host's business
        self._delete_server(server)
        self.assertEqual({h: NO_USAGE for h in self.HOSTS}, self._usages())
        self.assertEqual([(secondary, {'instance': server['id']})],
                         self.agent.of('stop_instance'))

    def test_takeover_by_a_host_nova_did_not_choose_is_ignored(self) -> None:
        server = self._boot_ft()
        primary, secondary, third = self._roles(server)
        self.takeover.take_over(third, server['id'])
        deadline = time.monotonic() + 5
        while self.takeover.list_calls.get(third, 0) < 3:
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        server = self.api.get_server(server['id'])
        self.assertEqual(primary, server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual([], self._migrations(server))
        self.assertEqual({primary: USAGE, secondary: USAGE,
                          third: NO_USAGE}, self._usages())


class TestHandoffReprotect(HandoffTestBase):
    """``reprotect_after_handoff``: a new secondary on the third host."""

    REPROTECT = True

    def test_takeover_then_reprotected_on_third_host(self) -> None:
        server = self._boot_ft()
        primary, secondary, third = self._roles(server)
        self.takeover.take_over(secondary, server['id'])
        server, _ = self._wait_for_host(server, secondary)
        deadline = time.monotonic() + HANDOFF_TIMEOUT
        while self._sysmeta(server).get(driver.STATUS) != 'protected':
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        sysmeta = self._sysmeta(server)
        self.assertEqual(third, sysmeta[driver.SECONDARY_HOST])
        self.assertEqual({primary: NO_USAGE, secondary: USAGE,
                          third: USAGE}, self._usages())
        self.assertEqual(secondary, self.agent.of('protect')[-1][0])
        self.assertEqual(third,
                         self.agent.of('protect')[-1][1]['secondary_host'])
        self.assertEqual([], [c for c in self.power_calls
                              if c[0] != 'spawn'])


class TestSettle(HandoffTestBase):
    """After the hand-off, before re-protection: the guest's disk moves
    where LibvirtDriver expects it, its domain made persistent (the move
    itself runs on a real libvirtd in tests/functional/test_libvirt)."""

    REPROTECT = True

    def test_taken_over_guest_settles_before_reprotection(self) -> None:
        moved: list[tuple[str, str, list[str]]] = []

        def into_place(dom: Any, path: str) -> bool:
            moved.append((dom.UUIDString(), path,
                          [m for m, _, _ in self.agent.calls]))
            return True
        self.useFixture(fixtures.MonkeyPatch(
            'mftvm_openstack.nova.settle.into_place', into_place))
        server, secondary = self._take_over(self._boot_ft())
        deadline = time.monotonic() + HANDOFF_TIMEOUT
        while self._sysmeta(server).get(driver.STATUS) != 'protected':
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        instance_dir = os.path.join(CONF.instances_path, server['id'])
        disk = os.path.join(instance_dir, 'disk')
        # once, before the new secondary's protect (its mirror would be a
        # second block job on the disk)
        self.assertEqual([(server['id'], disk, [])], moved)
        self.assertEqual('protect', self.agent.calls[-1][0])
        with open(os.path.join(instance_dir, 'disk.info')) as f:
            self.assertEqual({disk: 'qcow2'}, json.load(f))
        # The agent there keeps the replica a guest ran from, which may
        # be its only copy: once settled it is nobody's disk, and the
        # agent is told so (else a stop or delete on the new host left
        # it in the agent's ended/, as seen in the cloud lab).
        self.assertEqual([('disk_settled', secondary,
                           {'instance': server['id']}), 'protect'],
                         [c if c[0] == 'disk_settled' else c[0]
                          for c in self.agent.calls])

    def test_a_guest_not_settled_keeps_its_replica(self) -> None:
        # the copy failed: the guest runs on from its replica, which the
        # agent must keep (it is the guest's only disk)
        def into_place(dom: Any, path: str) -> bool:
            raise settle.SettleError('block copy refused')
        self.useFixture(fixtures.MonkeyPatch(
            'mftvm_openstack.nova.settle.into_place', into_place))
        server, secondary = self._take_over(self._boot_ft())
        deadline = time.monotonic() + HANDOFF_TIMEOUT
        while not self.agent.of('protect'):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        self.assertEqual([], self.agent.of('disk_settled'))


    def test_every_local_disk_settles_where_nova_expects_it(self) -> None:
        # ephemeral (Nova's disk.eph0: its mapping at boot), swap and
        # config drive too (issue 13), before the
        # root disk (whose move makes the domain persistent)
        calls: list[tuple[str, Any]] = []

        def others(dom: Any, targets: dict) -> dict:
            calls.append(('others', dict(targets)))
            return {p: 'qcow2' for p in targets.values()
                    if not p.endswith('disk.config')}

        def into_place(dom: Any, path: str) -> bool:
            calls.append(('root', path))
            return True
        for name, fake in (('others_into_place', others),
                           ('into_place', into_place)):
            self.useFixture(fixtures.MonkeyPatch(
                f'mftvm_openstack.nova.settle.{name}', fake))
        flavor = self._create_flavor(
            name='mftvm.ft.eph.swap', extra_spec={
                'ft:enabled': 'true',
                steering.FLAVOR_TRAIT_SPEC: 'required'},
            **{**test_driver.FLAVOR, 'ephemeral': 1, 'swap': 128})
        server = self._boot_ft(flavor=flavor, config_drive=True)
        self.assertEqual('protected', self._sysmeta(server)[driver.STATUS])
        server, secondary = self._take_over(server)
        deadline = time.monotonic() + HANDOFF_TIMEOUT
        while not any(c[0] == 'root' for c in calls):
            self.assertLess(time.monotonic(), deadline)
            time.sleep(0.05)
        instance_dir = os.path.join(CONF.instances_path, server['id'])
        (kind, targets), root = calls[0], calls[1]
        self.assertEqual('others', kind)
        self.assertEqual({'disk.eph0', 'disk.swap', 'disk.config'},
                         {os.path.basename(p) for p in targets.values()})
        self.assertTrue(all(os.path.dirname(p) == instance_dir
                            for p in targets.values()))
        self.assertEqual(('root', os.path.join(instance_dir, 'disk')), root)
        with open(os.path.join(instance_dir, 'disk.info')) as f:
            self.assertEqual({os.path.join(instance_dir, n): 'qcow2'
                              for n in ('disk', 'disk.eph0', 'disk.swap')},
                             json.load(f))


class TestDeleteAfterHandoff(HandoffTestBase):
    """Deleting a server handed off here tells the agent here, whatever
    its ``ft_status`` says by then: the agent runs the guest, or keeps
    the replica it ran from, and lets both go only when told."""

    HOSTS = ('host1', 'host2')
    REPROTECT = True

    def test_delete_stops_the_agent_here_after_a_failed_reprotect(
            self) -> None:
        server = self._boot_ft()
        primary = server['OS-EXT-SRV-ATTR:host']
        secondary = self._other(primary)
        # the old primary's host is gone (here: disabled), so the
        # server's re-protection finds no host for a secondary
        (service,) = self.admin_api.get_services(binary='nova-compute',
                                                 host=primary)
        self.admin_api.put_service(service['id'], {'status': 'disabled'})
        self.agent.calls.clear()
        self.takeover.take_over(secondary, server['id'])
        server, _ = self._wait_for_host(server, secondary)
        # no third host: re-protection finds no secondary, and says so
        deadline = time.monotonic() + HANDOFF_TIMEOUT
        while not self._sysmeta(server).get(driver.STATUS, '').startswith(
                driver.STATUS_NO_SECONDARY):
            self.assertLess(time.monotonic(), deadline,
                            self._sysmeta(server).get(driver.STATUS))
            time.sleep(0.05)
        self._delete_server(server)
        self.assertEqual([(secondary, {'instance': server['id']})],
                         self.agent.of('stop_instance'))
        self.assertEqual({h: NO_USAGE for h in self.HOSTS}, self._usages())


class TestRebuildAfterHandoff(HandoffTestBase):
    """A server handed off here and not re-protected, rebuilt: the agent
    here (which runs the guest it took over) is stopped, and the new
    guest is protected anew, a secondary chosen through Placement."""

    def test_rebuild_stops_the_agent_here_and_protects_anew(self) -> None:
        server = self._boot_ft()
        primary, secondary, _ = self._roles(server)
        self.takeover.take_over(secondary, server['id'])
        server, _ = self._wait_for_host(server, secondary)
        self.agent.calls.clear()
        with utils.temporary_mutation(self.api, microversion='2.35'):
            image = self.api.get_images()[1]['id']
        server = self._rebuild_server(server, image)
        self.assertEqual(secondary, server['OS-EXT-SRV-ATTR:host'])
        again = self._sysmeta(server)[driver.SECONDARY_HOST]
        self.assertNotEqual(secondary, again)
        self.assertEqual(
            [('stop_instance', secondary), ('protect', secondary)],
            [(m, h) for m, h, _ in self.agent.calls])
        self.assertEqual(again, self.agent.of('protect')[0][1][
            'secondary_host'])
        self.assertEqual('protected', self._sysmeta(server)[driver.STATUS])


class TestStandbyVifs(HandoffTestBase):
    """The secondary's host plugs the server's VIFs while it stands by,
    so that the agent's restore finds them (os-vif's taps), and unplugs
    them when it stops standing by without taking over."""

    def setUp(self) -> None:
        super().setUp()
        self.vif_calls: list[tuple[str, str, str, list[str]]] = []
        for name in ('plug_vifs', 'unplug_vifs'):
            self._record(name)

    def _record(self, name: str) -> None:
        calls = self.vif_calls

        def record(drv: Any, instance: Any, network_info: Any) -> None:
            calls.append((name, drv._ft_host, instance.uuid,
                          [vif['id'] for vif in network_info]))
        self.useFixture(fixtures.MonkeyPatch(
            f'nova.virt.libvirt.driver.LibvirtDriver.{name}', record))

    def _stand_by(self, server: dict, host: str, primary: str) -> None:
        self.takeover.running[host] = [
            {'instance': server['id'], 'role': 'secondary',
             'state': 'standby', 'alive': True, 'host': host,
             'peer': primary}]

    def _wait_calls(self, count: int) -> None:
        deadline = time.monotonic() + HANDOFF_TIMEOUT
        while len(self.vif_calls) < count:
            self.assertLess(time.monotonic(), deadline, self.vif_calls)
            time.sleep(0.05)

    def test_plugged_while_standing_by_kept_when_taken_over(self) -> None:
        port = self.neutron.port_1['id']
        server = self._boot_ft(networks=[{'port': port}])
        primary, secondary, _ = self._roles(server)
        self.vif_calls.clear()          # the primary's own, at spawn

        self._stand_by(server, secondary, primary)
        self._wait_calls(1)
        self.assertEqual(
            [('plug_vifs', secondary, server['id'], [port])],
            self.vif_calls)
        # once, not at every look
        time.sleep(0.5)
        self.assertEqual(1, len(self.vif_calls))

        self.takeover.running[secondary] = []
        self.takeover.take_over(secondary, server['id'])
        self._wait_for_host(server, secondary)
        time.sleep(0.5)
        self.assertEqual(1, len(self.vif_calls))    # not unplugged

    def test_kept_while_it_fails_over(self) -> None:
        # Seen in the cloud lab: the secondary's watcher looked while the
        # agent was winning the fence (failing-over: neither standby nor
        # a primary yet) and unplugged the taps the restore then opened;
        # the guest ran on with no network.
        port = self.neutron.port_1['id']
        server = self._boot_ft(networks=[{'port': port}])
        primary, secondary, _ = self._roles(server)
        self.vif_calls.clear()
        self._stand_by(server, secondary, primary)
        self._wait_calls(1)
        self.takeover.running[secondary] = [
            {'instance': server['id'], 'role': 'secondary',
             'state': 'failing-over', 'alive': True, 'host': secondary,
             'peer': primary}]
        time.sleep(0.5)                 # five looks
        self.assertEqual(
            [('plug_vifs', secondary, server['id'], [port])],
            self.vif_calls)
        # (one entry per instance, as an agent lists it)
        self.takeover.running[secondary] = [
            {'instance': server['id'], 'role': 'primary', 'state': 'active',
             'alive': True, 'host': secondary, 'peer': None}]
        self._wait_for_host(server, secondary)
        time.sleep(0.5)
        self.assertEqual(
            [('plug_vifs', secondary, server['id'], [port])],
            self.vif_calls)

    def test_plugged_if_first_seen_failing_over(self) -> None:
        # a takeover that began before a look saw it standing by: its
        # taps are made then, for the restore to open
        port = self.neutron.port_1['id']
        server = self._boot_ft(networks=[{'port': port}])
        primary, secondary, _ = self._roles(server)
        self.vif_calls.clear()
        self.takeover.running[secondary] = [
            {'instance': server['id'], 'role': 'secondary',
             'state': 'failing-over', 'alive': True, 'host': secondary,
             'peer': primary}]
        self._wait_calls(1)
        self.assertEqual(
            [('plug_vifs', secondary, server['id'], [port])],
            self.vif_calls)

    def test_unplugged_when_it_no_longer_stands_by(self) -> None:
        port = self.neutron.port_1['id']
        server = self._boot_ft(networks=[{'port': port}])
        primary, secondary, third = self._roles(server)
        self.vif_calls.clear()
        # a host Nova did not choose plugs nothing
        self._stand_by(server, third, primary)
        self._stand_by(server, secondary, primary)
        self._wait_calls(1)
        self.takeover.running[secondary] = []       # unprotected
        self._wait_calls(2)
        self.assertEqual(
            [('plug_vifs', secondary, server['id'], [port]),
             ('unplug_vifs', secondary, server['id'], [port])],
            self.vif_calls)
