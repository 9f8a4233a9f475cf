"""What FT cannot protect yet is refused, or said, in Nova's harness.

Local disks and the ports a server is built with are replicated, Cinder
volumes not (:mod:`mftvm_openstack.nova.protectable`). Through the real
API on fake-libvirt computes running FTLibvirtDriver, agents faked:

* an FT *flavor* server with an ephemeral or swap disk, a config drive
  or two ports is protected (each was refused before issue 13);
* an FT *flavor* server with a volume (booted from or attached at
  boot) is not built: ERROR, its fault says why, no agent told, no
  secondary held;
* the same asked by server metadata (``ft=true``) runs ACTIVE with
  ``ft_status`` ``unprotected: cannot protect <what>``, no agent told,
  no secondary held; so does a server given ``ft=true`` later, at its
  next reboot;
* attaching a volume or an interface to a server that asks for FT is
  refused by the API (400, the reason), nothing attached; a volume
  swap (Cinder's migration) is refused on the compute, the old volume
  stays attached and the reason is the instance fault.
"""

from __future__ import annotations

from typing import Any

import nova.context as nova_context
import nova.objects.block_device as bdm_obj
import testtools
from nova.tests import fixtures as nova_fixtures
from nova.tests.functional.api import client as api_client

from mftvm_openstack.nova import driver, protectable, steering
from tests.nova import test_driver, test_lifecycle

USAGE = test_driver.USAGE
NO_USAGE = test_driver.NO_USAGE
CINDER = nova_fixtures.CinderFixture
DATA_VOLUME = '0a0a11b4-5c3e-4f43-9fb0-6a2cbbf0f1d7'


class TestMessages(testtools.TestCase):

    def test_build_refusal_fits_in_a_fault(self) -> None:
        # instance_faults.message is cut at 255 characters, Nova's
        # "Build of instance <uuid> aborted: " included
        every = protectable.cannot_protect(protectable.Devices(
            root_volume=True, data_volumes=2, ephemerals=2, swap=True,
            config_drive=True, ports=2))
        assert every is not None
        text = ('Build of instance 2b4f0c71-2f0b-4fd8-9e5d-0b1b5d0a7a11 '
                'aborted: ' + protectable.build_refused(every))
        self.assertLessEqual(len(text), 255, text)

    def test_change_refusals_fit_in_a_fault(self) -> None:
        for what in (protectable.ATTACH_VOLUME, protectable.SWAP_VOLUME,
                     protectable.ATTACH_INTERFACE):
            for remedy in (driver.REMEDY_METADATA, driver.REMEDY_FLAVOR):
                text = 'Invalid volume: ' + protectable.change_refused(
                    what, remedy)
                self.assertLessEqual(len(text), 255, text)


class RefusalTestBase(test_driver.FTDriverTestBase):

    def _post(self, flavor: str, metadata: dict | None = None,
              expected_state: str = 'ACTIVE', **body: Any) -> dict:
        server = self._build_server(flavor_id=flavor, networks='none')
        server.update(body)
        if metadata is not None:
            server['metadata'] = metadata
        created = self.api.post_server({'server': server})
        return self._wait_for_state_change(created, expected_state)

    def _assert_refused(self, server: dict, what: str) -> None:
        """Not built: ERROR with the reason, nothing told or held."""
        self.assertEqual('ERROR', server['status'])
        message = server['fault']['message']
        self.assertIn(protectable.build_refused(what), message)
        self.assertEqual([], self.agent.calls)
        self.assertEqual({h: NO_USAGE for h in self.HOSTS}, self._usages())
        self.assertEqual({}, self._get_allocations_by_server_uuid(
            driver.secondary_consumer(server['id'])))

    def _assert_unprotected(self, server: dict, what: str) -> None:
        """ACTIVE, saying it runs unprotected, nothing told or held."""
        self.assertEqual('ACTIVE', server['status'])
        status = protectable.status(what)
        self.assertEqual(status, self._sysmeta(server)[driver.STATUS])
        self.assertEqual(status, self.api.get_server(
            server['id'])['metadata'][driver.STATUS])
        self.assertNotIn(driver.SECONDARY_HOST, self._sysmeta(server))
        self.assertEqual([], self.agent.of('protect'))
        self.assertEqual({}, self._get_allocations_by_server_uuid(
            driver.secondary_consumer(server['id'])))

    def _bfv(self) -> dict:
        return {'imageRef': '', 'block_device_mapping_v2': [{
            'boot_index': 0, 'uuid': CINDER.IMAGE_BACKED_VOL,
            'source_type': 'volume', 'destination_type': 'volume'}]}

    def _data_volume(self) -> dict:
        image = self._build_server()['imageRef']
        return {'block_device_mapping_v2': [
            {'boot_index': 0, 'uuid': image, 'source_type': 'image',
             'destination_type': 'local'},
            {'boot_index': -1, 'uuid': DATA_VOLUME,
             'source_type': 'volume', 'destination_type': 'volume'}]}

    def _two_ports(self) -> dict:
        return {'networks': [{'port': self.neutron.port_1['id']},
                             {'uuid': self.neutron.network_1['id']}]}

    def _ft_flavor_with(self, **sizes: int) -> str:
        specs = {'ft:enabled': 'true', steering.FLAVOR_TRAIT_SPEC:
                 'required'}
        return self._create_flavor(
            name='mftvm.ft.' + '.'.join(sizes), extra_spec=specs,
            **{**test_driver.FLAVOR, **sizes})


class TestBuildRefused(RefusalTestBase):
    """An FT flavor requires FT: what cannot be protected is not built."""

    def test_boot_from_volume(self) -> None:
        server = self._post(self.ft_flavor, expected_state='ERROR',
                            **self._bfv())
        self._assert_refused(server, 'boot from volume')

    def test_data_volume_at_boot(self) -> None:
        server = self._post(self.ft_flavor, expected_state='ERROR',
                            **self._data_volume())
        self._assert_refused(server, 'an attached volume')

    def test_one_port_protected(self) -> None:
        server = self._post(
            self.ft_flavor, networks=[{'port': self.neutron.port_1['id']}])
        self.assertEqual('protected', self._sysmeta(server)[driver.STATUS])
        self.assertEqual(1, len(self.agent.of('protect')))


class TestEveryLocalDiskAndPortProtected(RefusalTestBase):
    """What issue 13 protects: every local disk (ephemeral, swap, config
    drive) and every port; each of these servers was refused before."""

    def _assert_protected(self, server: dict) -> None:
        self.assertEqual('ACTIVE', server['status'])
        self.assertEqual('protected', self._sysmeta(server)[driver.STATUS])
        self.assertIn(driver.SECONDARY_HOST, self._sysmeta(server))
        self.assertEqual(1, len(self.agent.of('protect')))

    def test_config_drive(self) -> None:
        self._assert_protected(self._post(self.ft_flavor,
                                          config_drive=True))

    def test_ephemeral_disk(self) -> None:
        self._assert_protected(self._post(self._ft_flavor_with(
            ephemeral=1)))

    def test_swap_disk(self) -> None:
        self._assert_protected(self._post(self._ft_flavor_with(swap=128)))

    def test_two_ports(self) -> None:
        self._assert_protected(self._post(self.ft_flavor,
                                          **self._two_ports()))

    def test_all_of_them_asked_by_metadata(self) -> None:
        flavor = self._create_flavor(
            name='mftvm.plain.eph.swap',
            **{**test_driver.FLAVOR, 'ephemeral': 1, 'swap': 128})
        self._assert_protected(self._post(
            flavor, {'ft': 'true'}, config_drive=True, **self._two_ports()))


class TestMetadataRunsUnprotected(RefusalTestBase):
    """``ft=true`` is a wish: the server runs, saying it is unprotected."""

    def test_boot_from_volume(self) -> None:
        server = self._post(self.flavor, {'ft': 'true'}, **self._bfv())
        self._assert_unprotected(server, 'boot from volume')
        self._delete_server(server)
        self.assertEqual([], self.agent.calls)

    def test_volume_ephemeral_and_swap(self) -> None:
        # the volume is what keeps it unprotected (the local disks are
        # protected, TestEveryLocalDiskAndPortProtected)
        flavor = self._create_flavor(
            name='mftvm.plain.eph.swap',
            **{**test_driver.FLAVOR, 'ephemeral': 1, 'swap': 128})
        server = self._post(flavor, {'ft': 'true'}, config_drive=True,
                            **self._data_volume())
        self._assert_unprotected(server, 'an attached volume')

    def test_servers_without_ft_untouched(self) -> None:
        server = self._post(self.flavor, config_drive=True,
                            **self._bfv(), **self._two_ports())
        self.assertNotIn(driver.STATUS, self._sysmeta(server))
        self.api.post_server_volume(
            server['id'], {'volumeAttachment': {'volumeId': DATA_VOLUME}})
        self._wait_for_volume_attach(server['id'], DATA_VOLUME)
        self.assertEqual([], self.agent.calls)

    def test_ft_set_later_on_a_volume_backed_server(self) -> None:
        # "ft=true on a running server takes effect at its next reboot":
        # it must not be protected then either
        server = self._post(self.flavor, **self._bfv())
        self.api.post_server_metadata(server['id'], {'ft': 'true'})
        server = self._reboot_server(server, hard=True)
        self._assert_unprotected(server, 'boot from volume')


class TestChangesRefused(RefusalTestBase):
    """No volume nor port is added to a server that asks for FT."""

    def _bdms(self, server: dict) -> list[str]:
        return [b.volume_id for b in
                bdm_obj.BlockDeviceMappingList.get_by_instance_uuid(
                    nova_context.get_admin_context(), server['id'])
                if b.is_volume]

    def test_attach_volume_to_protected_server(self) -> None:
        server = self._post(self.ft_flavor)
        self.assertEqual('protected', self._sysmeta(server)[driver.STATUS])
        calls = list(self.agent.calls)
        exc = self.assertRaises(
            api_client.OpenStackApiException, self.api.post_server_volume,
            server['id'], {'volumeAttachment': {'volumeId': DATA_VOLUME}})
        self.assertEqual(400, exc.response.status_code)
        self.assertIn(protectable.change_refused(
            protectable.ATTACH_VOLUME, driver.REMEDY_FLAVOR), str(exc))
        self.assertEqual([], self._bdms(server))
        self.assertEqual([], self.api.get_server_volumes(server['id']))
        self.assertEqual(calls, self.agent.calls)
        self.assertEqual('protected', self._sysmeta(server)[driver.STATUS])

    def test_attach_volume_once_ft_is_unset(self) -> None:
        server = self._post(self.flavor, {'ft': 'true'})
        exc = self.assertRaises(
            api_client.OpenStackApiException, self.api.post_server_volume,
            server['id'], {'volumeAttachment': {'volumeId': DATA_VOLUME}})
        self.assertIn(protectable.change_refused(
            protectable.ATTACH_VOLUME, driver.REMEDY_METADATA), str(exc))
        self.api.post_server_metadata(server['id'], {'ft': 'false'})
        self.api.post_server_volume(
            server['id'], {'volumeAttachment': {'volumeId': DATA_VOLUME}})
        self._wait_for_volume_attach(server['id'], DATA_VOLUME)

    def test_attach_interface_to_protected_server(self) -> None:
        server = self._post(self.ft_flavor)
        calls = list(self.agent.calls)
        exc = self.assertRaises(
            api_client.OpenStackApiException, self.api.attach_interface,
            server['id'],
            {'interfaceAttachment': {'port_id': self.neutron.port_1['id']}})
        self.assertEqual(400, exc.response.status_code)
        self.assertIn(protectable.change_refused(
            protectable.ATTACH_INTERFACE, driver.REMEDY_FLAVOR), str(exc))
        self.assertEqual([], self.api.get_port_interfaces(server['id']))
        # the port was never bound to the server
        port = self.neutron.show_port(self.neutron.port_1['id'])['port']
        self.assertEqual('', port['device_id'])
        self.assertEqual(calls, self.agent.calls)


class TestSwapRefused(RefusalTestBase):

    # casts stay casts, as in a deployment: the swap's error is the
    # instance fault, not the harness' synchronous answer
    CAST_AS_CALL = False

    def test_swap_volume_of_ft_server(self) -> None:
        old, new = (CINDER.MULTIATTACH_RO_MIGRATE_OLD_VOL,
                    CINDER.MULTIATTACH_RO_MIGRATE_NEW_VOL)
        server = self._post(self.flavor)
        self.api.post_server_volume(
            server['id'], {'volumeAttachment': {'volumeId': old}})
        self._wait_for_volume_attach(server['id'], old)
        self.api.post_server_metadata(server['id'], {'ft': 'true'})
        # Cinder migrating the volume calls Nova's swap
        self.api.put_server_volume(server['id'], old, new)
        event = self._wait_for_instance_action_event(
            server, 'swap_volume', 'compute_swap_volume', 'Error')
        reason = protectable.change_refused(protectable.SWAP_VOLUME,
                                            driver.REMEDY_METADATA)
        self.assertIn(reason, event['details'])
        self.assertEqual([old], [v['volumeId'] for v in
                                 self.api.get_server_volumes(server['id'])])
        self.assertEqual('ACTIVE',
                         self.api.get_server(server['id'])['status'])


class TestHeldSecondaryReleased(test_lifecycle.LifecycleTestBase):
    """A server that holds a secondary and has gained a volume (FT off
    meanwhile, then on again) is not protected onto it at its reboot:
    the secondary is released and the server says why."""

    def test_reboot_releases_secondary(self) -> None:
        server, primary, secondary, _ = self._boot_ft({'ft': 'true'})
        self.api.post_server_metadata(server['id'], {'ft': 'false'})
        self.api.post_server_volume(
            server['id'], {'volumeAttachment': {'volumeId': DATA_VOLUME}})
        self._wait_for_volume_attach(server['id'], DATA_VOLUME)
        self.api.post_server_metadata(server['id'], {'ft': 'true'})
        self.assertEqual(secondary,
                         self._sysmeta(server)[driver.SECONDARY_HOST])

        server = self._reboot_server(server, hard=True)
        self.assertEqual([self._unprotect_call(primary, server)],
                         self.agent.calls)
        self.assertEqual(protectable.status('an attached volume'),
                         self._status(server))
        self.assertNotIn(driver.SECONDARY_HOST, self._sysmeta(server))
        self.assertEqual({}, self._secondary_allocs(server))
        self.assertEqual(self._usage_of(primary, primary), self._usages())
