"""Stop, start, reboot and moves of FT servers in Nova's harness.

Three fake-libvirt computes run FTLibvirtDriver; the agents are a
:class:`LifecycleAgentAPI` recording calls. An FT server is booted
(primary P, secondary S chosen by the scheduler, third host T free),
then driven through the API:

* stop: the primary's agent is told ``unprotect`` before the guest
  stops; the secondary's allocation stays; ``ft_status`` 'stopped';
* start: ``protect`` onto the same secondary (another one if it no
  longer fits);
* reboot (soft, hard): ``unprotect`` before, ``protect`` after, never
  a ``failover`` nor a ``stop_instance``, allocations untouched;
* resize, cold and live migration: refused, the server ACTIVE on P,
  the reason in the action event's details, Placement unchanged.
"""

from __future__ import annotations

from typing import Any

import fixtures
import nova.context as nova_context
import nova.objects.instance_fault as fault_obj
import testtools
from nova.compute import power_state
from nova.tests.functional.api import client as api_client
from nova.virt.libvirt import driver as libvirt_driver

from mftvm_openstack.agent import exception as agent_exception
from mftvm_openstack.nova import driver
from tests.nova import test_driver

USAGE = test_driver.USAGE
NO_USAGE = test_driver.NO_USAGE


class TestMessages(testtools.TestCase):

    def test_refusals_fit_in_a_fault(self) -> None:
        # instance_faults.message and the action event's details are cut
        # at 255 characters, Nova's prefix included
        for prefix in ('Migration pre-check error: ',
                       'No valid host was found. '):
            for what in ('Resize or cold migration', 'Live migration'):
                for remedy in (driver.REMEDY_METADATA,
                               driver.REMEDY_FLAVOR):
                    text = prefix + driver.MOVE_REFUSED % {
                        'what': what, 'remedy': remedy}
                    self.assertLessEqual(len(text), 255, text)


class LifecycleAgentAPI(test_driver.FakeAgentAPI):
    """The fake agents, with ``unprotect`` and ``failover`` recorded."""

    def unprotect(self, ctxt: Any, host: str, instance: str) -> dict:
        return self._call('unprotect', host, instance=instance)

    def failover(self, ctxt: Any, host: str, instance: str) -> dict:
        return self._call('failover', host, instance=instance)


class LifecycleTestBase(test_driver.FTDriverTestBase):

    HOSTS = ('host1', 'host2', 'host3')
    # casts stay casts, as in a deployment: a refused move must not
    # come back to the API as the harness' synchronous error
    CAST_AS_CALL = False

    def setUp(self) -> None:
        super().setUp()
        self.agent = LifecycleAgentAPI()
        for compute in self.computes.values():
            compute.driver._ft_agent_api = self.agent

    def _assert_refused_as_it_was(self, server: dict, primary: str,
                                  secondary: str, held: dict, action: str,
                                  event: str, refused: str,
                                  remedy: str) -> None:
        """Nova's ``action`` failed at ``event`` saying ``refused`` and
        ``remedy`` (in the event and the instance fault), and nothing
        moved: the server's allocation on its primary only, its
        secondary's held, still protected, no agent told anything."""
        failed = self._wait_for_action_fail_completion(
            server, action, event)
        self.assertIn(refused, failed['details'])
        self.assertIn(remedy, failed['details'])
        # the instance fault too (the API shows it on ERROR servers only)
        ctxt = nova_context.get_admin_context()
        faults = fault_obj.InstanceFaultList.get_by_instance_uuids(
            ctxt, [server['id']])
        self.assertIn(remedy, faults[0].message)
        self.assertEqual({self.compute_rp_uuids[primary]},
                         set(self._get_allocations_by_server_uuid(
                             server['id'])))
        self.assertEqual(held, self._secondary_allocs(server))
        self.assertEqual(self._usage_of(primary, secondary), self._usages())
        self.assertEqual('protected', self._status(server))
        self.assertEqual([], self.agent.calls)

    def _boot_ft(self, metadata: dict | None = None
                 ) -> tuple[dict, str, str, str]:
        """An FT server (its flavor asks, or ``metadata``)."""
        if metadata is None:
            server = self._boot(self.ft_flavor)
        else:
            server = self._boot(self.flavor, metadata)
        primary = server['OS-EXT-SRV-ATTR:host']
        secondary = self._sysmeta(server)[driver.SECONDARY_HOST]
        (third,) = set(self.HOSTS) - {primary, secondary}
        self.assertEqual('protected', self._status(server))
        # what the boot did is not what the tests look at
        self.agent.calls.clear()
        return server, primary, secondary, third

    def _status(self, server: dict) -> str:
        status = self._sysmeta(server)[driver.STATUS]
        shown = self.api.get_server(server['id'])['metadata'][driver.STATUS]
        self.assertEqual(status, shown)
        return status

    def _protect_call(self, primary: str, server: dict,
                      secondary: str) -> tuple[str, str, dict]:
        return ('protect', primary, {
            'instance': server['id'],
            'spec': {'name': server['id'],
                     'domain': server['OS-EXT-SRV-ATTR:instance_name'],
                     'memory_mib': 512, 'smp': 1},
            'options': {'epoch_ms': 100}, 'secondary_host': secondary})

    def _unprotect_call(self, primary: str,
                        server: dict) -> tuple[str, str, dict]:
        return ('unprotect', primary, {'instance': server['id']})

    def _secondary_allocs(self, server: dict) -> dict:
        """{provider: resources} of the secondary's consumer (provider
        generations left out: other consumers move them)."""
        allocs = self._get_allocations_by_server_uuid(
            driver.secondary_consumer(server['id']))
        return {rp: a['resources'] for rp, a in allocs.items()}

    def _usage_of(self, primary: str, secondary: str) -> dict:
        return {h: USAGE if h in (primary, secondary) else NO_USAGE
                for h in self.HOSTS}


class TestStopStart(LifecycleTestBase):

    def test_stop_unprotects_keeps_secondary_start_reprotects(self) -> None:
        server, primary, secondary, _ = self._boot_ft()
        held = self._secondary_allocs(server)

        server = self._stop_server(server)
        self.assertEqual([self._unprotect_call(primary, server)],
                         self.agent.calls)
        self.assertEqual('stopped', self._status(server))
        # still FT: the secondary is kept for the start
        self.assertEqual(secondary,
                         self._sysmeta(server)[driver.SECONDARY_HOST])
        self.assertEqual(held, self._secondary_allocs(server))
        self.assertEqual(self._usage_of(primary, secondary), self._usages())

        self.agent.calls.clear()
        server = self._start_server(server)
        self.assertEqual(primary, server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual([self._protect_call(primary, server, secondary)],
                         self.agent.calls)
        self.assertEqual('protected', self._status(server))
        self.assertEqual(held, self._secondary_allocs(server))
        self.assertEqual(self._usage_of(primary, secondary), self._usages())

        # power_on's destroy-and-recreate released nothing; delete does
        self._delete_server(server)
        self.assertEqual({h: NO_USAGE for h in self.HOSTS}, self._usages())

    def test_stop_during_a_checkpoint_pause_unprotects(self) -> None:
        # Seen in the cloud lab: Nova's stop looked at the domain while
        # the engine had it paused for a checkpoint (every epoch pauses
        # it), took it for a guest that no longer runs, did not
        # unprotect, and the clean shutdown's destroy then failed the
        # guest over to its secondary instead of stopping it.
        server, primary, secondary, _ = self._boot_ft()
        running = libvirt_driver.LibvirtDriver.get_info

        def paused_for_a_checkpoint(drv: Any, instance: Any,
                                    *args: Any, **kwargs: Any) -> Any:
            info = running(drv, instance, *args, **kwargs)
            if info.state == power_state.RUNNING:
                info.state = power_state.PAUSED
            return info
        self.useFixture(fixtures.MonkeyPatch(
            'nova.virt.libvirt.driver.LibvirtDriver.get_info',
            paused_for_a_checkpoint))

        server = self._stop_server(server)
        self.assertEqual([self._unprotect_call(primary, server)],
                         self.agent.calls)
        self.assertEqual('stopped', self._status(server))

    def test_start_chooses_another_secondary_if_it_no_longer_fits(
            self) -> None:
        server, primary, secondary, third = self._boot_ft()
        server = self._stop_server(server)
        (service,) = self.admin_api.get_services(
            binary='nova-compute', host=secondary)
        self.admin_api.put_service(service['id'], {'status': 'disabled'})

        self.agent.calls.clear()
        server = self._start_server(server)
        self.assertEqual([self._protect_call(primary, server, third)],
                         self.agent.calls)
        self.assertEqual('protected', self._status(server))
        self.assertEqual(third, self._sysmeta(server)[driver.SECONDARY_HOST])
        self.assertEqual([self.compute_rp_uuids[third]],
                         list(self._secondary_allocs(server)))
        self.assertEqual(self._usage_of(primary, third), self._usages())

    def test_start_after_ft_unset_releases_secondary(self) -> None:
        server, primary, secondary, _ = self._boot_ft({'ft': 'true'})
        server = self._stop_server(server)
        self.api.delete_server_metadata(server['id'], 'ft')

        self.agent.calls.clear()
        server = self._start_server(server)
        self.assertEqual(primary, server['OS-EXT-SRV-ATTR:host'])
        # not protected again: its secondary is let go instead
        self.assertEqual([], self.agent.of('protect'))
        self.assertEqual({}, self._secondary_allocs(server))
        self.assertNotIn(driver.SECONDARY_HOST, self._sysmeta(server))
        self.assertEqual('unprotected: ft off', self._status(server))
        self.assertEqual(
            {h: USAGE if h == primary else NO_USAGE for h in self.HOSTS},
            self._usages())

    def test_agent_failures_never_fail_stop_start(self) -> None:
        server, primary, secondary, _ = self._boot_ft()
        self.agent.fail['unprotect'] = agent_exception.PeerUnreachable(
            host=primary, reason='no answer')
        self.agent.fail['protect'] = agent_exception.PeerUnreachable(
            host=primary, reason='no answer')

        server = self._stop_server(server)
        status = self._status(server)
        self.assertTrue(status.startswith(
            'stopped; error: unprotect failed: the agent on host '), status)
        server = self._start_server(server)
        status = self._status(server)
        self.assertTrue(status.startswith(
            'error: protect failed: the agent on host '), status)
        self.assertEqual(['unprotect', 'protect'],
                         [m for m, _, _ in self.agent.calls])
        # the agent may be using it: kept
        self.assertEqual(self._usage_of(primary, secondary), self._usages())

    def test_non_ft_server_untouched(self) -> None:
        server = self._boot(self.flavor)
        server = self._stop_server(server)
        server = self._start_server(server)
        self._reboot_server(server, hard=True)
        self.assertEqual([], self.agent.calls)
        self.assertNotIn(driver.STATUS, self._sysmeta(server))


class TestPauseSuspend(LifecycleTestBase):
    """Each epoch ends with ``cont``: protection must end before a pause
    or a suspend, or the next epoch would undo it."""

    def _test_hold(self, hold, release, held_state: str,
                   status: str) -> None:
        server, primary, secondary, _ = self._boot_ft()
        held = self._secondary_allocs(server)

        server = hold(server)
        self.assertEqual(held_state, server['status'])
        self.assertEqual([self._unprotect_call(primary, server)],
                         self.agent.calls)
        self.assertEqual(status, self._status(server))
        self.assertEqual(held, self._secondary_allocs(server))

        self.agent.calls.clear()
        server = release(server)
        self.assertEqual([self._protect_call(primary, server, secondary)],
                         self.agent.calls)
        self.assertEqual('protected', self._status(server))
        self.assertEqual(held, self._secondary_allocs(server))
        self.assertEqual(self._usage_of(primary, secondary), self._usages())

    def test_pause_unprotects_unpause_reprotects(self) -> None:
        def pause(server: dict) -> dict:
            self.api.post_server_action(server['id'], {'pause': None})
            return self._wait_for_state_change(server, 'PAUSED')

        def unpause(server: dict) -> dict:
            self.api.post_server_action(server['id'], {'unpause': None})
            return self._wait_for_state_change(server, 'ACTIVE')
        self._test_hold(pause, unpause, 'PAUSED', 'unprotected: paused')

    def test_suspend_unprotects_resume_reprotects(self) -> None:
        self._test_hold(self._suspend_server, self._resume_server,
                        'SUSPENDED', 'unprotected: suspended')


class TestReboot(LifecycleTestBase):

    def _test_reboot(self, hard: bool) -> None:
        server, primary, secondary, _ = self._boot_ft()
        held = self._secondary_allocs(server)

        server = self._reboot_server(server, hard=hard)
        self.assertEqual(primary, server['OS-EXT-SRV-ATTR:host'])
        # protection off across the restart, on again after: the
        # secondary never takes the restart for a lost primary
        self.assertEqual([self._unprotect_call(primary, server),
                          self._protect_call(primary, server, secondary)],
                         self.agent.calls)
        self.assertEqual([], self.agent.of('failover'))
        self.assertEqual([], self.agent.of('stop_instance'))
        self.assertEqual('protected', self._status(server))
        self.assertEqual(held, self._secondary_allocs(server))
        self.assertEqual(self._usage_of(primary, secondary), self._usages())

    def test_soft_reboot(self) -> None:
        self._test_reboot(hard=False)

    def test_hard_reboot(self) -> None:
        # LibvirtDriver's hard reboot goes through destroy(): it must not
        # stop the agents nor release the secondary
        self._test_reboot(hard=True)

    def test_agent_failures_never_fail_reboot(self) -> None:
        server, primary, secondary, _ = self._boot_ft()
        self.agent.fail['unprotect'] = agent_exception.Conflict(
            instance=server['id'], reason='busy')
        server = self._reboot_server(server, hard=True)
        self.assertEqual(['unprotect', 'protect'],
                         [m for m, _, _ in self.agent.calls])
        self.assertEqual('protected', self._status(server))


class TestMovesRefused(LifecycleTestBase):

    def _assert_unmoved(self, server: dict, primary: str, secondary: str,
                        held: dict, action: str, event: str,
                        remedy: str = driver.REMEDY_METADATA) -> None:
        flavor = server['flavor']['original_name']
        server = self._wait_for_state_change(server, 'ACTIVE')
        self.assertEqual(primary, server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual(flavor, server['flavor']['original_name'])
        self._assert_refused_as_it_was(
            server, primary, secondary, held, action, event,
            'of a fault-tolerant instance is refused', remedy)
        self._wait_for_migration_status(server, ['error'])

    def _start(self, by_metadata: bool = True
               ) -> tuple[dict, str, str, dict]:
        """An FT server: asked by its ``ft`` property, or its flavor."""
        server, primary, secondary, _ = self._boot_ft(
            {'ft': 'true'} if by_metadata else None)
        return server, primary, secondary, self._secondary_allocs(server)

    def test_resize_refused(self) -> None:
        server, primary, secondary, held = self._start()
        bigger = self._create_flavor(
            name='mftvm.big', memory_mb=1024, vcpu=1, disk=1)
        self.api.post_server_action(
            server['id'], {'resize': {'flavorRef': bigger}})
        self._assert_unmoved(server, primary, secondary, held, 'resize',
                             'compute_resize_instance')

    def test_cold_migrate_refused_ft_flavor(self) -> None:
        server, primary, secondary, held = self._start(by_metadata=False)
        self.admin_api.post_server_action(server['id'], {'migrate': None})
        self._assert_unmoved(server, primary, secondary, held, 'migrate',
                             'compute_resize_instance',
                             remedy=driver.REMEDY_FLAVOR)

    def test_cold_migrate_after_ft_unset_releases_secondary(self) -> None:
        # the way out the refusal names: unset ft, then move
        self.useFixture(fixtures.MockPatch(
            'nova.virt.libvirt.driver.LibvirtDriver.'
            'migrate_disk_and_power_off', return_value='{}'))
        server, primary, secondary, _ = self._start()
        self.api.delete_server_metadata(server['id'], 'ft')
        server = self._migrate_server(server)
        self.assertNotEqual(primary, server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual([self._unprotect_call(primary, server)],
                         self.agent.calls)
        self.assertEqual({}, self._secondary_allocs(server))
        self.assertNotIn(driver.SECONDARY_HOST, self._sysmeta(server))
        self.assertEqual('unprotected: ft off', self._status(server))

    def test_live_migrate_refused(self) -> None:
        server, primary, secondary, held = self._start()
        self.admin_api.post_server_action(
            server['id'],
            {'os-migrateLive': {'host': None, 'block_migration': 'auto'}})
        self._wait_for_migration_status(server, ['error'])
        self._assert_unmoved(server, primary, secondary, held,
                             'live-migration',
                             'conductor_live_migrate_instance')

    def test_live_migrate_refused_sync_api(self) -> None:
        # before 2.25 the API waits for the conductor: the user gets the
        # reason in the 400 response itself
        server, primary, secondary, held = self._start(by_metadata=False)
        self.admin_api.microversion = '2.24'
        exc = self.assertRaises(
            api_client.OpenStackApiException,
            self.admin_api.post_server_action, server['id'],
            {'os-migrateLive': {'host': None, 'block_migration': False,
                                'disk_over_commit': False}})
        self.assertEqual(400, exc.response.status_code)
        self.assertIn(driver.REMEDY_FLAVOR, exc.response.text)
        self.admin_api.microversion = 'latest'
        self._assert_unmoved(server, primary, secondary, held,
                             'live-migration',
                             'conductor_migrate_server',
                             remedy=driver.REMEDY_FLAVOR)

    def test_non_ft_server_migrates(self) -> None:
        # fake libvirt cannot move disks (Nova's own tests mock it too):
        # what is checked is that the mixin passes the call on
        moved = self.useFixture(fixtures.MockPatch(
            'nova.virt.libvirt.driver.LibvirtDriver.'
            'migrate_disk_and_power_off', return_value='{}')).mock
        server = self._boot(self.flavor)
        source = server['OS-EXT-SRV-ATTR:host']
        server = self._migrate_server(server)
        self.assertNotEqual(source, server['OS-EXT-SRV-ATTR:host'])
        self.assertEqual(1, moved.call_count)
        self.assertEqual([], self.agent.calls)
