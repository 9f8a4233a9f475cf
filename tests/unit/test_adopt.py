"""A primary adopts only the named instance's own libvirt domain.

A fake libvirt holds three running domains: a Nova instance's (Nova's
metadata, its uuid the instance's), one of another Nova instance, and a
domain started by hand for guest ``vm0``. Adopting succeeds only for the
domain's owner; the engine is never attached to any other one.
"""

from __future__ import annotations

import asyncio
import unittest
from typing import Any

from mftvm_openstack.contract.limits import MAX_DISKS
from mftvm_openstack.ft import vm
from mftvm_openstack.instance import guest as guests

MINE = 'c0ffee00-0000-4000-8000-000000000001'
OTHER = 'deadbeef-0000-4000-8000-000000000002'


def nova_xml(name: str, uuid: str) -> str:
    return (f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid>"
            f"<metadata><nova:instance xmlns:nova='http://openstack.org/"
            f"xmlns/libvirt/nova/1.1'><nova:name>web</nova:name>"
            f"</nova:instance></metadata></domain>")


class FakeDomain:
    def __init__(self, name: str, xml: str) -> None:
        self._name, self.xml = name, xml

    def name(self) -> str:
        return self._name

    def isActive(self) -> int:  # noqa: N802
        return 1

    def destroy(self) -> int:
        raise AssertionError('adopting never destroys a domain')

    def XMLDesc(self, flags: int = 0) -> str:  # noqa: N802
        return self.xml


class FakeConnection:
    def __init__(self, *domains: FakeDomain) -> None:
        self.domains = {d.name(): d for d in domains}

    def lookupByName(self, name: str) -> FakeDomain:  # noqa: N802
        try:
            return self.domains[name]
        except KeyError:
            raise LookupError(f'Domain not found: no domain with matching '
                              f'name {name!r}') from None


class RecordingLibvirt(guests.Libvirt):
    """Libvirt on the fake connection; attach() only records."""

    def __init__(self, conn: FakeConnection) -> None:
        super().__init__('qemu:///system')
        self._conn = conn
        self.attached: list[str] = []

    async def attach(self, dom: Any, monitor: Any = None) -> Any:
        self.attached.append(dom.name())
        return 'attached'


class AdoptTest(unittest.TestCase):

    def setUp(self) -> None:
        self.libvirt = RecordingLibvirt(FakeConnection(
            FakeDomain('instance-00000001', nova_xml('instance-00000001',
                                                     MINE)),
            FakeDomain('instance-00000002', nova_xml('instance-00000002',
                                                     OTHER)),
            FakeDomain('vm0', "<domain type='qemu'><name>vm0</name>"
                              "<uuid>65c016cd-e42a-43d8-9e2b-08c880b8d9c2"
                              "</uuid></domain>")))

    def adopt(self, name: str, instance: str) -> Any:
        return asyncio.run(self.libvirt.adopt(name, instance=instance))

    def refused(self, name: str, instance: str) -> str:
        with self.assertRaises(guests.StartError) as ctx:
            self.adopt(name, instance)
        self.assertEqual([], self.libvirt.attached)
        return str(ctx.exception)

    def test_nova_instance_adopts_its_own_domain(self):
        self.assertEqual('attached', self.adopt('instance-00000001', MINE))
        self.assertEqual(['instance-00000001'], self.libvirt.attached)

    def test_uuid_in_another_spelling_is_the_same(self):
        self.adopt('instance-00000001', MINE.upper().replace('-', ''))
        self.assertEqual(['instance-00000001'], self.libvirt.attached)

    def test_another_instances_domain_is_refused(self):
        msg = self.refused('instance-00000002', MINE)
        self.assertIn(f'is not instance {MINE}\'s own', msg)
        self.assertIn(f'Nova instance {OTHER}', msg)

    def test_a_nova_domain_is_not_adopted_by_its_name(self):
        self.refused('instance-00000001', 'instance-00000001')

    def test_a_domain_of_no_such_name_is_refused(self):
        msg = self.refused('instance-00000099', MINE)
        self.assertIn('no domain instance-00000099', msg)

    def test_a_non_nova_domain_is_its_namesakes_own(self):
        self.adopt('vm0', 'vm0')
        self.assertEqual(['vm0'], self.libvirt.attached)

    def test_a_non_nova_domain_of_another_name_is_refused(self):
        self.refused('vm0', 'vm1')


def nova_xml_with(uuid: str, devices: str) -> str:
    return nova_xml('instance-00000003', uuid).replace(
        '</domain>', f'<devices>{devices}</devices></domain>')


DISK = ("<disk type='file' device='disk'><source file='/var/lib/nova/"
        "instances/x/disk'/><target dev='vda' bus='virtio'/></disk>")
CONFIG_DRIVE = ("<disk type='file' device='cdrom'><source file='/var/lib/"
                "nova/instances/x/disk.config'/><target dev='sda' "
                "bus='sata'/><readonly/></disk>")


class RestorableTest(unittest.TestCase):
    """What a secondary would refuse to restore is refused protection at
    once, before the engine touches the domain, so a guest is never
    reported protected that a failover cannot bring back."""

    SPEC = vm.GuestSpec(name=MINE, domain='instance-00000003')

    def adopt(self, devices: str) -> Any:
        self.libvirt = RecordingLibvirt(FakeConnection(FakeDomain(
            'instance-00000003', nova_xml_with(MINE, devices))))
        return asyncio.run(self.libvirt.adopt(
            'instance-00000003', instance=MINE, spec=self.SPEC,
            readonly_dirs=('/var/lib/mftvm/instances/' + MINE,)))

    def test_a_domain_a_secondary_restores_is_adopted(self):
        self.assertEqual('attached', self.adopt(DISK))
        # A config drive is replicated with the disks now (issue 13): the
        # secondary restores it onto its replica, not from Nova's path.
        self.assertEqual('attached', self.adopt(DISK + CONFIG_DRIVE))

    def test_a_domain_a_secondary_would_refuse_is_not(self):
        more = ''.join(DISK.replace("dev='vda'", f"dev='vd{chr(98 + i)}'")
                       .replace("x/disk'", f"x/disk{i}'")
                       for i in range(MAX_DISKS))
        for devices, why in (
                (DISK + more, f'at most {MAX_DISKS} disks'),
                (DISK + "<interface type='bridge'><source bridge='br-ex'/>"
                 "</interface>", 'not a bridge guests may join'),
                ("<disk type='block' device='disk'><source dev='/dev/sda'/>"
                 "<target dev='vda' bus='virtio'/></disk>", 'disk@type'),
                ('', 'no disk to replicate')):
            with self.subTest(why=why):
                with self.assertRaises(guests.StartError) as ctx:
                    self.adopt(devices)
                self.assertIn('cannot be protected: its secondary would '
                              'refuse to restore it', str(ctx.exception))
                self.assertIn(why, str(ctx.exception))
                self.assertEqual([], self.libvirt.attached)


if __name__ == '__main__':
    unittest.main()
