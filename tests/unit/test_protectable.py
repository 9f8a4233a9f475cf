"""mftvm_openstack.nova.protectable: what FT can protect (no Nova)."""

from __future__ import annotations

import doctest
from typing import Any

import testtools

from mftvm_openstack.contract.limits import MAX_DISKS, MAX_NICS
from mftvm_openstack.nova import protectable
from mftvm_openstack.nova.protectable import Devices


class Flavor:

    def __init__(self, ephemeral_gb: int = 0, swap: int = 0,
                 extra_specs: dict | None = None) -> None:
        self.ephemeral_gb = ephemeral_gb
        self.swap = swap
        self.extra_specs = extra_specs or {}


class Server:

    def __init__(self, flavor: Any) -> None:
        self.flavor = flavor


def _devices(flavor: Any = None, info: Any = None, ports: int = 1,
             config_drive: bool = False) -> Devices:
    return protectable.devices(flavor or Flavor(), info,
                               [{'id': f'p{i}'} for i in range(ports)],
                               config_drive=config_drive)


class TestDevices(testtools.TestCase):

    def test_image_root_one_port_is_protectable(self) -> None:
        found = _devices(info={'root_device_name': '/dev/vda',
                               'image': [{'boot_index': 0}],
                               'ephemerals': [], 'swap': None,
                               'block_device_mapping': []})
        self.assertEqual(Devices(ports=1), found)
        self.assertIsNone(protectable.cannot_protect(found))

    def test_nothing_known_is_protectable(self) -> None:
        # no block_device_info, no network: a bare local root disk
        found = protectable.devices(Flavor(), None, None,
                                    config_drive=False)
        self.assertIsNone(protectable.cannot_protect(found))

    def test_boot_from_volume(self) -> None:
        found = _devices(info={'block_device_mapping': [
            {'boot_index': 0, 'mount_device': '/dev/vda'}]})
        self.assertEqual('boot from volume',
                         protectable.cannot_protect(found))

    def test_data_volumes(self) -> None:
        found = _devices(info={'block_device_mapping': [
            {'boot_index': None}, {'boot_index': -1}]})
        self.assertEqual(2, found.data_volumes)
        self.assertFalse(found.root_volume)
        self.assertEqual('2 attached volumes',
                         protectable.cannot_protect(found))

    # Every local disk and every port is protected since issue 13 (each
    # of these was refused before); what the agents cannot take is past
    # their limits.

    def test_ephemerals_from_mappings_or_flavor(self) -> None:
        by_mapping = _devices(info={'ephemerals': [{'size': 1},
                                                   {'size': 2}]})
        self.assertEqual(2, by_mapping.ephemerals)
        self.assertIsNone(protectable.cannot_protect(by_mapping))
        # libvirt makes disk.local from the flavor when no mapping names it
        by_flavor = _devices(Flavor(ephemeral_gb=1), info={})
        self.assertEqual(1, by_flavor.ephemerals)
        self.assertIsNone(protectable.cannot_protect(by_flavor))
        too_many = _devices(info={'ephemerals': [{'size': 1}] * MAX_DISKS})
        self.assertEqual(f'{MAX_DISKS + 1} local disks (at most '
                         f'{MAX_DISKS})',
                         protectable.cannot_protect(too_many))

    def test_swap_from_mapping_or_flavor(self) -> None:
        self.assertTrue(_devices(info={'swap': {'swap_size': 64}}).swap)
        self.assertFalse(_devices(info={'swap': {'swap_size': 0}}).swap)
        self.assertTrue(_devices(Flavor(swap=64)).swap)
        self.assertIsNone(protectable.cannot_protect(_devices(Flavor(
            swap=1))))

    def test_config_drive(self) -> None:
        found = _devices(config_drive=True)
        self.assertTrue(found.config_drive)
        self.assertIsNone(protectable.cannot_protect(found))
        self.assertEqual(2, protectable.local_disks(found))

    def test_ports(self) -> None:
        self.assertIsNone(protectable.cannot_protect(_devices(ports=0)))
        self.assertIsNone(protectable.cannot_protect(_devices(ports=1)))
        self.assertIsNone(protectable.cannot_protect(_devices(ports=3)))
        self.assertIsNone(protectable.cannot_protect(_devices(
            ports=MAX_NICS)))
        self.assertEqual(f'{MAX_NICS + 1} ports (at most {MAX_NICS})',
                         protectable.cannot_protect(_devices(
                             ports=MAX_NICS + 1)))

    def test_local_disks_counted_against_the_limit(self) -> None:
        # root, swap and a config drive leave room for five ephemerals
        most = Devices(ephemerals=MAX_DISKS - 3, swap=True,
                       config_drive=True)
        self.assertEqual(MAX_DISKS, protectable.local_disks(most))
        self.assertIsNone(protectable.cannot_protect(most))
        self.assertIsNotNone(protectable.cannot_protect(Devices(
            ephemerals=MAX_DISKS - 2, swap=True, config_drive=True)))
        # booted from a volume: no local root disk (and refused for that)
        self.assertEqual(1, protectable.local_disks(Devices(
            root_volume=True, swap=True)))

    def test_everything_named_in_order(self) -> None:
        found = Devices(root_volume=True, data_volumes=1,
                        ephemerals=MAX_DISKS, swap=True, config_drive=True,
                        ports=MAX_NICS + 1)
        self.assertEqual(
            f'boot from volume, an attached volume, {MAX_DISKS + 2} local '
            f'disks (at most {MAX_DISKS}), {MAX_NICS + 1} ports (at most '
            f'{MAX_NICS})', protectable.cannot_protect(found))


class TestRequiredByFlavor(testtools.TestCase):

    def test_flavor(self) -> None:
        for value, required in (('true', True), ('False', False),
                                ('maybe', True)):
            self.assertEqual(required, protectable.required_by_flavor(
                Server(Flavor(extra_specs={'ft:enabled': value}))), value)
        self.assertFalse(protectable.required_by_flavor(Server(Flavor())))
        self.assertFalse(protectable.required_by_flavor(Server(None)))


class TestMessages(testtools.TestCase):

    def test_status_is_unprotected(self) -> None:
        self.assertEqual('unprotected: cannot protect 2 ports',
                         protectable.status('2 ports'))

    def test_refusals_name_what_and_why(self) -> None:
        text = protectable.change_refused(protectable.SWAP_VOLUME, 'undo')
        self.assertEqual('Swapping a volume of a fault-tolerant server is '
                         'refused (only local disks (up to 8) and the ports '
                         'a server is built with (up to 8) are '
                         'replicated): undo', text)
        self.assertIn('a swap disk', protectable.build_refused('a swap disk'))

    def test_doctests(self) -> None:
        result = doctest.testmod(protectable)
        self.assertGreater(result.attempted, 0)
        self.assertEqual(0, result.failed)


def _volume(boot_index: Any, kind: Any) -> dict:
    return {'boot_index': boot_index,
            'connection_info': {'driver_volume_type': kind}}


class TestRbdVolumes(testtools.TestCase):
    """``[ft] rbd_volumes``: Ceph RBD volumes are protected, any other
    volume refused with its backend named."""

    def test_rbd_boot_and_data_volumes_are_protectable(self) -> None:
        found = _devices(info={'block_device_mapping': [
            _volume(0, 'rbd'), _volume(None, 'rbd')]})
        self.assertEqual(('rbd', 'rbd'), found.volume_backends)
        self.assertIsNone(protectable.cannot_protect(found,
                                                     rbd_volumes=True))
        # off: refused as before
        self.assertEqual('boot from volume, an attached volume',
                         protectable.cannot_protect(found))

    def test_other_backends_are_named(self) -> None:
        found = _devices(info={'block_device_mapping': [
            _volume(0, 'iscsi'), _volume(None, 'rbd'),
            _volume(None, 'nfs'), {'boot_index': None}]})
        self.assertEqual('3 volumes on iscsi, nfs, unknown (not Ceph RBD)',
                         protectable.cannot_protect(found,
                                                    rbd_volumes=True))

    def test_a_hostile_backend_name_is_not_repeated(self) -> None:
        self.assertEqual('unknown', protectable.backend(
            {'connection_info': {'driver_volume_type': 'x" <b>'}}))
        self.assertEqual('unknown', protectable.backend(
            {'connection_info': 'not json'}))

    def test_volumes_count_against_the_disks(self) -> None:
        found = _devices(Flavor(ephemeral_gb=1), info={
            'block_device_mapping': [_volume(None, 'rbd')] * MAX_DISKS})
        self.assertEqual(f'{MAX_DISKS + 2} disks (at most {MAX_DISKS})',
                         protectable.cannot_protect(found,
                                                    rbd_volumes=True))

    def test_the_refusal_says_what_is_supported(self) -> None:
        self.assertIn('Ceph RBD volumes', protectable.build_refused(
            'a volume on iscsi (not Ceph RBD)', rbd_volumes=True))
        self.assertNotIn('RBD', protectable.build_refused('x'))
