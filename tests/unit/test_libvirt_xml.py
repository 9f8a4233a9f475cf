"""The domain XML a failover restores from (no libvirt needed)."""

from __future__ import annotations

import unittest
import xml.etree.ElementTree as ET

from mftvm_openstack.ft import libvirt_domain, vm

# The shape of a Nova domain's XML (pty serial with a log file, a qcow2
# disk on an image, a bridge NIC), cut down to what restore_xml touches.
NOVA_XML = """<domain type="kvm">
  <name>instance-00000007</name>
  <uuid>2b4f0c71-2f0b-4fd8-9e5d-0b1b5d0a7a11</uuid>
  <memory unit="KiB">524288</memory>
  <memoryBacking><source type="file"/><access mode="shared"/>
  </memoryBacking>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="qcow2" cache="none"/>
      <source file="/var/lib/nova/instances/2b4f/disk"/>
      <backingStore type="file">
        <format type="raw"/>
        <source file="/var/lib/nova/instances/_base/abc"/>
      </backingStore>
      <target dev="vda" bus="virtio"/>
    </disk>
    <disk type="file" device="cdrom">
      <source file="/var/lib/nova/instances/2b4f/disk.config"/>
      <target dev="sda" bus="sata"/>
    </disk>
    <interface type="bridge">
      <mac address="fa:16:3e:00:00:01"/>
      <source bridge="br-int"/>
      <virtualport type="openvswitch"/>
    </interface>
    <serial type="pty">
      <log file="/var/lib/nova/instances/2b4f/console.log" append="off"/>
      <target port="0"/>
    </serial>
    <console type="pty">
      <log file="/var/lib/nova/instances/2b4f/console.log" append="off"/>
    </console>
  </devices>
</domain>"""

QEMU = f'{{{libvirt_domain.QEMU_NS}}}'
CHAIN = [('/r/base.raw', 'raw'), ('/r/ov-3.qcow2', 'qcow2'),
         ('/r/ov-5.qcow2', 'qcow2')]
#: what the secondary allows: the config drive in the instance's own
#: directory, the kernel and initrd its own spec names
OWN = {'readonly_dirs': ('/var/lib/nova/instances/2b4f',),
       'host_files': ('/k', '/i')}


class RestoreXmlTest(unittest.TestCase):

    def restore(self, xml=NOVA_XML, layers=CHAIN, name=None):
        return ET.fromstring(libvirt_domain.restore_xml(
            xml, layers, '/state/secondary/serial.log', name=name, **OWN))

    def test_disk_is_the_replica_chain_top_first(self):
        disk = self.restore().find("devices/disk[@device='disk']")
        self.assertEqual('qcow2', disk.find('driver').get('type'))
        self.assertEqual({'file': '/r/ov-5.qcow2'},
                         disk.find('source').attrib)
        chain, store = [], disk.find('backingStore')
        while store is not None and store.find('source') is not None:
            chain.append((store.find('source').get('file'),
                          store.find('format').get('type')))
            store = store.find('backingStore')
        # the image's own backing chain is gone; the replica's is there
        self.assertEqual([CHAIN[1], CHAIN[0]], chain)
        self.assertIsNotNone(store)     # and it ends explicitly
        self.assertEqual([], list(store))
        # other disks are left alone
        cdrom = self.restore().find("devices/disk[@device='cdrom']")
        self.assertEqual('/var/lib/nova/instances/2b4f/disk.config',
                         cdrom.find('source').get('file'))

    def test_single_raw_layer(self):
        disk = self.restore(layers=[('/r/base.raw', 'raw')]).find(
            "devices/disk[@device='disk']")
        self.assertEqual('raw', disk.find('driver').get('type'))
        self.assertEqual('/r/base.raw', disk.find('source').get('file'))

    def test_console_logs_go_to_this_host(self):
        root = self.restore()
        for tag in ('serial', 'console'):
            self.assertEqual('/state/secondary/serial.log',
                             root.find(f'devices/{tag}/log').get('file'))

    def test_waits_for_device_state_once(self):
        root = ET.fromstring(libvirt_domain.restore_xml(
            libvirt_domain.restore_xml(NOVA_XML, CHAIN, '/s', **OWN), CHAIN,
            '/s', **OWN))
        args = [a.get('value') for a in root.find(f'{QEMU}commandline')]
        self.assertEqual(['-incoming', 'defer'], args)

    def test_same_name_keeps_the_uuid_nova_finds_it_by(self):
        for name in (None, 'instance-00000007'):
            root = self.restore(name=name)
            self.assertEqual('instance-00000007', root.findtext('name'))
            self.assertEqual('2b4f0c71-2f0b-4fd8-9e5d-0b1b5d0a7a11',
                             root.findtext('uuid'))

    def test_new_name_is_another_domain(self):
        root = self.restore(name='instance-00000007-b')
        self.assertEqual('instance-00000007-b', root.findtext('name'))
        self.assertIsNone(root.find('uuid'))

    def test_our_own_domain_xml_restores(self):
        spec = vm.GuestSpec(name='vm0', kernel='/k', initrd='/i',
                            disk='/d.raw')
        root = self.restore(libvirt_domain.domain_xml(spec, '/p/serial'))
        self.assertEqual('/state/secondary/serial.log',
                         root.find('devices/serial/source').get('path'))
        self.assertEqual('/r/ov-5.qcow2', root.find(
            "devices/disk[@device='disk']/source").get('file'))

    def test_no_disk_is_an_error(self):
        with self.assertRaisesRegex(ValueError, 'no disk'):
            libvirt_domain.restore_xml('<domain><name>x</name>'
                                       '<devices/></domain>', CHAIN, '/s')
