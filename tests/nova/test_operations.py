"""Rescue, snapshot, interfaces, shelve and evacuation of FT servers.

The same harness as :mod:`tests.nova.test_lifecycle` (three
fake-libvirt computes, the agents recorded). Each operation either works
with protection kept, the agents told before the guest changes under
them (never a ``failover``, never a lost primary), or is refused before
anything happens:

* rescue: ``unprotect`` before, ``protect`` onto the same secondary at
  unrescue; ``ft_status`` 'unprotected: rescued' meanwhile;
* snapshot (createImage) and interface attach/detach: ``unprotect``
  before, ``protect`` after (the domain's XML is shipped anew);
* shelve: stop, then offload releases both sides; unshelve protects
  anew;
* evacuate: refused on the destination, the server as it was;
* a guest that powers itself off: Nova's stop of a stopped guest tells
  no agent (the engine stood its secondary down already: no failover).
"""

from __future__ import annotations

from typing import Any

import fixtures
import testtools
from nova import utils
from nova.compute import task_states
from nova.virt import event as virtevent

from mftvm_openstack.nova import driver
from tests.nova import test_lifecycle

NO_USAGE = test_lifecycle.NO_USAGE


class TestMessages(testtools.TestCase):

    def test_evacuation_refusal_fits_in_a_fault(self) -> None:
        prefix = ('Build of instance 2b4f0c71-2f0b-4fd8-9e5d-0b1b5d0a7a11 '
                  'aborted: ')
        for remedy in (driver.REMEDY_METADATA, driver.REMEDY_FLAVOR):
            text = prefix + driver.EVACUATE_REFUSED % {'remedy': remedy}
            self.assertLessEqual(len(text), 255, text)


class OperationsTestBase(test_lifecycle.LifecycleTestBase):

    def _fake_libvirt(self, method: str,
                      then: Any = None) -> list[list[str]]:
        """Replace ``LibvirtDriver.<method>`` (fake libvirt cannot rescue
        nor snapshot: Nova's own tests mock these too); each call appends
        the agent calls made before it; ``then(*args)`` follows."""
        seen: list[list[str]] = []

        def call(*args: Any, **kwargs: Any) -> None:
            seen.append([m for m, _, _ in self.agent.calls])
            if then is not None:
                then(*args)
        self.useFixture(fixtures.MockPatch(
            f'nova.virt.libvirt.driver.LibvirtDriver.{method}',
            side_effect=call))
        return seen

    def _assert_held_and_back(self, server: dict, primary: str,
                              secondary: str, held: dict) -> None:
        """Unprotected once, protected again onto the same secondary,
        nothing stopped nor failed over, allocations untouched."""
        self.assertEqual([self._unprotect_call(primary, server),
                          self._protect_call(primary, server, secondary)],
                         self.agent.calls)
        self.assertEqual('protected', self._status(server))
        self.assertEqual(held, self._secondary_allocs(server))
        self.assertEqual(self._usage_of(primary, secondary), self._usages())


class TestRescue(OperationsTestBase):

    def setUp(self) -> None:
        super().setUp()
        self.rescued = self._fake_libvirt('rescue')
        self.unrescued = self._fake_libvirt('unrescue')

    def test_rescue_unprotects_unrescue_reprotects(self) -> None:
        server, primary, secondary, _ = self._boot_ft()
        held = self._secondary_allocs(server)

        server = self._rescue_server(server)
        self.assertEqual(primary, server['OS-EXT-SRV-ATTR:host'])
        # unprotected before libvirt stops the guest: the secondary never
        # takes it for a lost primary (a failover: two copies)
        self.assertEqual([['unprotect']], self.rescued)
        self.assertEqual([self._unprotect_call(primary, server)],
                         self.agent.calls)
        self.assertEqual('unprotected: rescued', self._status(server))
        self.assertEqual(held, self._secondary_allocs(server))

        server = self._unrescue_server(server)
        # protected again once the guest runs as before
        self.assertEqual([['unprotect']], self.unrescued)
        self._assert_held_and_back(server, primary, secondary, held)

    def test_non_ft_server_untouched(self) -> None:
        server = self._boot(self.flavor)
        server = self._rescue_server(server)
        server = self._unrescue_server(server)
        self.assertEqual([], self.agent.calls)


class TestSnapshot(OperationsTestBase):

    def setUp(self) -> None:
        super().setUp()
        def uploaded(context: Any, instance: Any, image_id: Any,
                     update_task_state: Any) -> None:
            # what LibvirtDriver.snapshot tells the manager on its way
            update_task_state(task_state=task_states.IMAGE_PENDING_UPLOAD)
            update_task_state(
                task_state=task_states.IMAGE_UPLOADING,
                expected_state=task_states.IMAGE_PENDING_UPLOAD)
        self.snapshots = self._fake_libvirt('snapshot', uploaded)

    def _snapshot(self, server: dict) -> None:
        self._snapshot_server(server, 'ft-snap')
        self.notifier.wait_for_versioned_notifications(
            'instance.snapshot.end')
        self._wait_for_state_change(server, 'ACTIVE')

    def test_snapshot_unprotects_and_reprotects(self) -> None:
        server, primary, secondary, _ = self._boot_ft()
        held = self._secondary_allocs(server)
        self._snapshot(server)
        # unprotected while libvirt took it, protected again after
        self.assertEqual([['unprotect']], self.snapshots)
        self._assert_held_and_back(server, primary, secondary, held)

    def test_snapshot_of_stopped_server_tells_no_agent(self) -> None:
        server, primary, secondary, _ = self._boot_ft()
        server = self._stop_server(server)
        self.agent.calls.clear()
        self._snapshot_server(server, 'ft-snap')
        self.notifier.wait_for_versioned_notifications(
            'instance.snapshot.end')
        self._wait_for_state_change(server, 'SHUTOFF')
        self.assertEqual([[]], self.snapshots)
        self.assertEqual([], self.agent.calls)
        self.assertEqual('stopped', self._status(server))


class TestInterfaces(OperationsTestBase):

    def test_detach_interface_reprotects(self) -> None:
        # A second port cannot be protected, so attaching one is refused
        # (tests/nova/test_refusals.py); detaching the one port the
        # server was built with changes the domain under the engine:
        # protection off around it, on again with the new XML.
        port = self.neutron.port_1['id']
        body = self._build_server(flavor_id=self.ft_flavor,
                                  networks=[{'port': port}])
        server = self._wait_for_state_change(
            self.api.post_server({'server': body}), 'ACTIVE')
        primary = server['OS-EXT-SRV-ATTR:host']
        secondary = self._sysmeta(server)[driver.SECONDARY_HOST]
        self.assertEqual('protected', self._status(server))
        held = self._secondary_allocs(server)

        self.agent.calls.clear()
        self._detach_interface(server, port)
        self._assert_held_and_back(server, primary, secondary, held)


class TestShelve(OperationsTestBase):

    def test_shelve_releases_unshelve_protects_anew(self) -> None:
        server, primary, secondary, _ = self._boot_ft()

        server = self._shelve_server(server)
        # stopped first (protection off), then offloaded: both sides
        # stopped, the secondary's allocation deleted
        self.assertEqual([self._unprotect_call(primary, server),
                          ('stop_instance', primary,
                           {'instance': server['id']}),
                          ('stop_instance', secondary,
                           {'instance': server['id']})],
                         self.agent.calls)
        self.assertEqual({}, self._secondary_allocs(server))
        self.assertNotIn(driver.SECONDARY_HOST, self._sysmeta(server))
        self.assertEqual({h: NO_USAGE for h in self.HOSTS}, self._usages())

        self.agent.calls.clear()
        server = self._unshelve_server(server)
        now = server['OS-EXT-SRV-ATTR:host']
        again = self._sysmeta(server)[driver.SECONDARY_HOST]
        self.assertNotEqual(now, again)
        self.assertEqual([self._protect_call(now, server, again)],
                         self.agent.calls)
        self.assertEqual('protected', self._status(server))
        self.assertEqual(self._usage_of(now, again), self._usages())


class TestEvacuateRefused(OperationsTestBase):

    def _host_down(self, host: str) -> None:
        self.computes[host].stop()
        (service,) = self.admin_api.get_services(
            binary='nova-compute', host=host)
        self.admin_api.put_service_force_down(service['id'], True)

    def _test_refused(self, by_metadata: bool, remedy: str) -> None:
        server, primary, secondary, _ = self._boot_ft(
            {'ft': 'true'} if by_metadata else None)
        held = self._secondary_allocs(server)
        self._host_down(primary)

        server = self._evacuate_server(
            server, expected_state='ACTIVE', expected_host=primary,
            expected_migration_status='failed')
        self._assert_refused_as_it_was(
            server, primary, secondary, held, 'evacuate',
            'compute_rebuild_instance',
            'Evacuation of a fault-tolerant instance is refused', remedy)

    def test_evacuate_refused(self) -> None:
        self._test_refused(True, driver.REMEDY_METADATA)

    def test_evacuate_refused_ft_flavor(self) -> None:
        self._test_refused(False, driver.REMEDY_FLAVOR)

    def test_non_ft_server_evacuates(self) -> None:
        server = self._boot(self.flavor)
        source = server['OS-EXT-SRV-ATTR:host']
        self._host_down(source)
        # (since microversion 2.95 an evacuated server arrives stopped)
        server = self._evacuate_server(server, expected_state='SHUTOFF')
        self.assertNotEqual(source, server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual([], self.agent.calls)


class TestGuestPoweroff(OperationsTestBase):

    def test_guest_poweroff_is_a_stop(self) -> None:
        server, primary, secondary, _ = self._boot_ft()
        held = self._secondary_allocs(server)
        compute = self.computes[primary]
        # the guest powered itself off: its domain is shut off, libvirt
        # says so, and Nova stops the server (_sync_instance_power_state)
        conn = compute.driver._host.get_connection()
        conn.lookupByUUIDString(server['id']).destroy()
        compute.manager.handle_events(virtevent.LifecycleEvent(
            server['id'], virtevent.EVENT_LIFECYCLE_STOPPED))
        server = self._wait_for_state_change(server, 'SHUTOFF')
        # its instance processes ended on their own (the secondary stood
        # down): nothing to unprotect, nothing failed over
        self.assertEqual([], self.agent.calls)
        self.assertEqual('stopped', self._status(server))
        self.assertEqual(held, self._secondary_allocs(server))
        self.assertEqual(self._usage_of(primary, secondary), self._usages())

        server = self._start_server(server)
        self.assertEqual([self._protect_call(primary, server, secondary)],
                         self.agent.calls)
        self.assertEqual('protected', self._status(server))


class TestRebuild(OperationsTestBase):
    """Rebuild (a new guest from an image, on the same host): Nova stops
    the server (protection off first: no failover), destroys it (both
    agents stopped, the secondary's hold released) and spawns it anew,
    which protects it anew (a secondary chosen and held again)."""

    def test_rebuild_destroys_then_protects_anew(self) -> None:
        server, primary, secondary, _ = self._boot_ft()
        with utils.temporary_mutation(self.api, microversion='2.35'):
            image = self.api.get_images()[1]['id']
        self.assertNotEqual(server['image']['id'], image)
        server = self._rebuild_server(server, image)
        self.assertEqual(image, server['image']['id'])
        self.assertEqual(primary, server['OS-EXT-SRV-ATTR:host'])
        again = self._sysmeta(server)[driver.SECONDARY_HOST]
        self.assertNotEqual(primary, again)
        self.assertEqual(
            [self._unprotect_call(primary, server),
             ('stop_instance', primary, {'instance': server['id']}),
             ('stop_instance', secondary, {'instance': server['id']}),
             self._protect_call(primary, server, again)],
            self.agent.calls)
        self.assertEqual([], self.agent.of('failover'))
        self.assertEqual('protected', self._status(server))
        self.assertEqual(self._usage_of(primary, again), self._usages())
        self.assertEqual([self.compute_rp_uuids[again]],
                         list(self._secondary_allocs(server)))
