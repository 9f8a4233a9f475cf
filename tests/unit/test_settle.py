"""A taken-over guest's kernel and initrd, where Nova's driver looks.

Seen in the cloud lab: Nova's start of a failed-over server that boots
from kernel and ramdisk images found no ``<instance dir>/kernel`` on the
new host, fetched the kernel from Glance again, and refused its ``aki``
image ("does not pass safety check"): the start failed. The restored
domain boots from the copies its primary shipped;
:func:`~mftvm_openstack.nova.settle.boot_files_into_place` copies them
to the names LibvirtDriver gives them (the driver's settle step calls it
after the disks).
"""

from __future__ import annotations

import os

import fixtures
import testtools

from mftvm_openstack.nova import settle


class FakeDomain:
    def __init__(self, xml: str) -> None:
        self.xml = xml

    def XMLDesc(self, flags: int) -> str:  # noqa: N802 (libvirt's name)
        return self.xml


class BootFilesTest(testtools.TestCase):

    def setUp(self) -> None:
        super().setUp()
        self.tmp = self.useFixture(fixtures.TempDir()).path
        self.shipped = os.path.join(self.tmp, 'agent', 'boot')
        self.instance_dir = os.path.join(self.tmp, 'instances', 'uuid')
        os.makedirs(self.shipped)
        os.makedirs(self.instance_dir)
        for role, content in (('kernel', b'KERNEL'), ('initrd', b'INITRD')):
            with open(os.path.join(self.shipped, role), 'wb') as f:
                f.write(content)

    def domain(self, kernel: bool = True, initrd: bool = True) -> FakeDomain:
        parts = ''.join(
            f'<{element}>{os.path.join(self.shipped, element)}</{element}>'
            for element, wanted in (('kernel', kernel), ('initrd', initrd))
            if wanted)
        return FakeDomain(f'<domain><os><type>hvm</type>{parts}</os>'
                          f'</domain>')

    def read(self, name: str) -> bytes:
        with open(os.path.join(self.instance_dir, name), 'rb') as f:
            return f.read()

    def test_copied_to_kernel_and_ramdisk(self) -> None:
        written = settle.boot_files_into_place(self.domain(),
                                               self.instance_dir)
        self.assertEqual([os.path.join(self.instance_dir, n)
                          for n in ('kernel', 'ramdisk')], written)
        self.assertEqual(b'KERNEL', self.read('kernel'))
        self.assertEqual(b'INITRD', self.read('ramdisk'))
        self.assertEqual(['kernel', 'ramdisk'],
                         sorted(os.listdir(self.instance_dir)))

    def test_a_file_already_there_is_kept(self) -> None:
        with open(os.path.join(self.instance_dir, 'kernel'), 'wb') as f:
            f.write(b'NOVA')
        written = settle.boot_files_into_place(self.domain(),
                                               self.instance_dir)
        self.assertEqual([os.path.join(self.instance_dir, 'ramdisk')],
                         written)
        self.assertEqual(b'NOVA', self.read('kernel'))

    def test_a_disk_boot_copies_nothing(self) -> None:
        self.assertEqual([], settle.boot_files_into_place(
            self.domain(kernel=False, initrd=False), self.instance_dir))
        self.assertEqual([], os.listdir(self.instance_dir))

    def test_a_copy_that_fails_is_an_error_and_leaves_nothing(self) -> None:
        os.unlink(os.path.join(self.shipped, 'initrd'))
        self.assertRaises(settle.SettleError, settle.boot_files_into_place,
                          self.domain(), self.instance_dir)
        self.assertEqual(['kernel'], os.listdir(self.instance_dir))
