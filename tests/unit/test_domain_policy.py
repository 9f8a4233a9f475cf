"""The secondary's allow-list for domain XML from the wire (no libvirt).

A Nova-shaped domain and the engine's own (as libvirt 9 gives it back)
restore; each hostile construct is refused with its element path, and
nothing the wire says about host paths, the emulator, the security
label or QEMU's command line reaches the document the secondary starts.
"""

from __future__ import annotations

import unittest
import xml.etree.ElementTree as ET

from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.ft import domain_policy, libvirt_domain
from mftvm_openstack.ft.domain_policy import DomainRefused

UUID = '2b4f0c71-2f0b-4fd8-9e5d-0b1b5d0a7a11'
IDIR = f'/var/lib/nova/instances/{UUID}'

#: what Nova's libvirt driver defines, as XMLDesc(MIGRATABLE) gives it
#: back: metadata, SMBIOS, a qcow2 disk on an image, a config drive, an
#: OVS port, a pty console with a log, tablet, VNC, balloon, RNG, channel
NOVA = f"""<domain type='kvm'>
  <name>instance-00000007</name>
  <uuid>{UUID}</uuid>
  <metadata>
    <nova:instance xmlns:nova="http://openstack.org/xmlns/libvirt/nova/1.1">
      <nova:package version="27.1.0"/>
      <nova:name>web-1</nova:name>
      <nova:creationTime>2026-12-07 10:00:00</nova:creationTime>
      <nova:flavor name="m1.ft">
        <nova:memory>512</nova:memory><nova:disk>1</nova:disk>
        <nova:swap>0</nova:swap><nova:ephemeral>0</nova:ephemeral>
        <nova:vcpus>1</nova:vcpus>
      </nova:flavor>
      <nova:owner>
        <nova:user uuid="1e1f9a0e9f2c4c61b2d6b9d0e7f1a2b3">admin</nova:user>
        <nova:project uuid="9a8b7c6d5e4f4a3b2c1d0e9f8a7b6c5d"
          >demo</nova:project>
      </nova:owner>
      <nova:root type="image" uuid="8e2f0c71-2f0b-4fd8-9e5d-0b1b5d0a7a11"/>
      <nova:ports>
        <nova:port uuid="5d1f0c71-2f0b-4fd8-9e5d-0b1b5d0a7a11">
          <nova:ip type="fixed" address="10.0.0.5" ipVersion="4"/>
        </nova:port>
      </nova:ports>
    </nova:instance>
  </metadata>
  <memory unit='KiB'>524288</memory>
  <currentMemory unit='KiB'>524288</currentMemory>
  <memoryBacking><source type='file'/><access mode='shared'/>
  </memoryBacking>
  <vcpu placement='static'>1</vcpu>
  <cputune><shares>1024</shares></cputune>
  <resource><partition>/machine</partition></resource>
  <sysinfo type='smbios'>
    <system>
      <entry name='manufacturer'>OpenStack Foundation</entry>
      <entry name='product'>OpenStack Nova</entry>
      <entry name='version'>27.1.0</entry>
      <entry name='serial'>{UUID}</entry>
      <entry name='uuid'>{UUID}</entry>
      <entry name='family'>Virtual Machine</entry>
    </system>
  </sysinfo>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <boot dev='hd'/>
    <smbios mode='sysinfo'/>
  </os>
  <features><acpi/><apic/><vmcoreinfo state='on'/></features>
  <cpu mode='custom' match='exact' check='partial'>
    <model fallback='forbid'>qemu64</model>
    <topology sockets='1' dies='1' cores='1' threads='1'/>
    <feature policy='require' name='x2apic'/>
  </cpu>
  <clock offset='utc'>
    <timer name='pit' tickpolicy='delay'/>
    <timer name='rtc' tickpolicy='catchup'/>
    <timer name='hpet' present='no'/>
  </clock>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>restart</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2' cache='none'/>
      <source file='{IDIR}/disk'/>
      <backingStore type='file'>
        <format type='raw'/>
        <source file='/var/lib/nova/instances/_base/abc'/>
        <backingStore/>
      </backingStore>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x04'
               function='0x0'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='{IDIR}/disk.config'/>
      <target dev='hda' bus='ide'/>
      <readonly/>
      <address type='drive' controller='0' bus='0' target='0' unit='0'/>
    </disk>
    <controller type='usb' index='0' model='piix3-uhci'>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x01'
               function='0x2'/>
    </controller>
    <controller type='pci' index='0' model='pci-root'/>
    <controller type='ide' index='0'/>
    <interface type='bridge'>
      <mac address='fa:16:3e:00:00:01'/>
      <source bridge='br-int'/>
      <virtualport type='openvswitch'>
        <parameters interfaceid='5d1f0c71-2f0b-4fd8-9e5d-0b1b5d0a7a11'/>
      </virtualport>
      <target dev='tap5d1f0c71-2f'/>
      <model type='virtio'/>
      <driver name='vhost' rx_queue_size='512'/>
      <mtu size='1442'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03'
               function='0x0'/>
    </interface>
    <serial type='pty'>
      <log file='{IDIR}/console.log' append='off'/>
      <target type='isa-serial' port='0'><model name='isa-serial'/>
      </target>
    </serial>
    <console type='pty'>
      <log file='{IDIR}/console.log' append='off'/>
      <target type='serial' port='0'/>
    </console>
    <channel type='unix'>
      <source mode='bind'
        path='/var/lib/libvirt/qemu/channel/target/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
    <input type='tablet' bus='usb'><address type='usb' bus='0' port='1'/>
    </input>
    <input type='mouse' bus='ps2'/>
    <input type='keyboard' bus='ps2'/>
    <graphics type='vnc' port='-1' autoport='yes' listen='0.0.0.0'>
      <listen type='address' address='0.0.0.0'/>
    </graphics>
    <audio id='1' type='none'/>
    <video><model type='virtio' heads='1' primary='yes'/></video>
    <memballoon model='virtio'><stats period='10'/></memballoon>
    <rng model='virtio'><backend model='random'>/dev/urandom</backend>
    </rng>
  </devices>
  <seclabel type='dynamic' model='apparmor' relabel='yes'/>
</domain>"""

#: the engine's own domain_xml as libvirt 9 gives it back (XMLDesc with
#: VIR_DOMAIN_XML_MIGRATABLE of a domain restored once: it carries the
#: engine's -incoming defer)
OURS = """<domain type='qemu'
    xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>mftvm-xmlprobe</name>
  <uuid>65c016cd-e42a-43d8-9e2b-08c880b8d9c2</uuid>
  <memory unit='KiB'>131072</memory>
  <currentMemory unit='KiB'>131072</currentMemory>
  <memoryBacking><source type='file'/><access mode='shared'/>
  </memoryBacking>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-i440fx-7.2'>hvm</type>
    <kernel>/boot/k</kernel>
    <initrd>/boot/i</initrd>
    <cmdline>console=ttyS0 quiet</cmdline>
    <boot dev='hd'/>
  </os>
  <features><acpi/></features>
  <cpu mode='custom' match='exact' check='none'>
    <model fallback='allow'>qemu64</model>
  </cpu>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' cache='none'/>
      <source file='/tmp/d.raw'/>
      <target dev='vda' bus='virtio'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x03'
               function='0x0'/>
    </disk>
    <controller type='usb' index='0' model='none'/>
    <interface type='user'>
      <mac address='52:54:00:c2:3d:56'/>
      <model type='virtio'/>
      <rom enabled='no'/>
      <address type='pci' domain='0x0000' bus='0x00' slot='0x02'
               function='0x0'/>
    </interface>
    <serial type='file'>
      <source path='/tmp/serial.log' append='on'/>
      <target type='isa-serial' port='0'><model name='isa-serial'/>
      </target>
    </serial>
    <console type='file'>
      <source path='/tmp/serial.log' append='on'/>
      <target type='serial' port='0'/>
    </console>
    <input type='mouse' bus='ps2'/>
    <video><model type='none'/></video>
    <memballoon model='none'/>
  </devices>
  <seclabel type='static' model='dac' relabel='no'>
    <label>+0:+0</label>
  </seclabel>
  <qemu:commandline>
    <qemu:arg value='-incoming'/>
    <qemu:arg value='defer'/>
  </qemu:commandline>
</domain>"""

QEMU = f'{{{domain_policy.QEMU_NS}}}'
LAYERS = [('/srv/mftvm/vm0/secondary/disk/base.raw', 'raw'),
          ('/srv/mftvm/vm0/secondary/disk/ov-4.qcow2', 'qcow2')]
SERIAL = '/srv/mftvm/vm0/secondary/serial.log'


def restore(xml: str, **kw: object) -> ET.Element:
    kw.setdefault('readonly_dirs', (IDIR,))
    kw.setdefault('host_files', ('/boot/k', '/boot/i'))
    return ET.fromstring(libvirt_domain.restore_xml(
        xml, LAYERS, SERIAL, **kw))  # type: ignore[arg-type]


def paths_in(root: ET.Element) -> set[str]:
    """Every absolute path the document names, in attributes or text."""
    found = set()
    for el in root.iter():
        for value in [*el.attrib.values(), (el.text or '').strip()]:
            if value.startswith('/'):
                found.add(value)
    return found


class AllowedDomainsTest(unittest.TestCase):

    def test_nova_domain_restores_onto_this_hosts_files_only(self):
        root = restore(NOVA, uuid=UUID)
        self.assertEqual('instance-00000007', root.findtext('name'))
        self.assertEqual(UUID, root.findtext('uuid'))
        # Nova's metadata and SMBIOS are kept (Nova on this host reads
        # the metadata; the guest sees the same SMBIOS)
        self.assertEqual('web-1', root.findtext(
            'metadata/{http://openstack.org/xmlns/libvirt/nova/1.1}'
            'instance/{http://openstack.org/xmlns/libvirt/nova/1.1}name'))
        self.assertEqual(6, len(root.findall('sysinfo/system/entry')))
        # the only host paths: the replica, this side's serial log, the
        # config drive in the instance's own dir, the host's QEMU, the
        # cgroup partition and the RNG's device
        self.assertEqual(
            {p for p, _ in LAYERS} | {SERIAL, f'{IDIR}/disk.config',
                                      libvirt_domain.EMULATOR, '/machine',
                                      '/dev/urandom'},
            paths_in(root))
        # the guest agent's socket: libvirt picks it
        self.assertIsNone(root.find('devices/channel/source'))
        self.assertEqual('org.qemu.guest_agent.0',
                         root.find('devices/channel/target').get('name'))
        # same hardware: every device kind is still there
        self.assertEqual(
            ['emulator', 'disk', 'disk', 'controller', 'controller',
             'controller', 'interface', 'serial', 'console', 'channel',
             'input', 'input', 'input', 'graphics', 'audio', 'video',
             'memballoon', 'rng'],
            [d.tag for d in root.find('devices')])

    def test_the_engines_own_domain_restores(self):
        root = restore(OURS)
        self.assertEqual('/boot/k', root.findtext('os/kernel'))
        self.assertEqual(SERIAL, root.find('devices/serial/source')
                         .get('path'))
        args = [a.get('value') for a in root.find(f'{QEMU}commandline')]
        self.assertEqual(['-incoming', 'defer'], args)
        self.assertEqual(1, len(root.findall(f'{QEMU}commandline')))

    def test_emulator_and_seclabel_are_the_hosts_own(self):
        hostile = NOVA.replace('/usr/bin/qemu-system-x86_64',
                               '/tmp/evil-qemu').replace(
            "<seclabel type='dynamic' model='apparmor' relabel='yes'/>",
            "<seclabel type='none'/><seclabel type='static' model='dac' "
            "relabel='no'><label>+1000:+1000</label></seclabel>")
        root = restore(hostile)
        self.assertEqual([libvirt_domain.EMULATOR],
                         [e.text for e in root.findall('devices/emulator')])
        labels = root.findall('seclabel')
        self.assertEqual(1, len(labels))
        self.assertEqual('+0:+0', labels[0].findtext('label'))

    def test_nova_quota_and_realtime_tuning(self):
        tuned = NOVA.replace('<cputune><shares>1024</shares></cputune>',
                             "<cputune><shares>1024</shares><vcpusched "
                             "vcpus='0' scheduler='fifo' priority='1'/>"
                             "</cputune><memtune><hard_limit unit='KiB'>"
                             "1048576</hard_limit></memtune><blkiotune>"
                             "<weight>500</weight></blkiotune>")
        root = restore(tuned)
        self.assertEqual('1048576', root.findtext('memtune/hard_limit'))
        self.assertEqual('fifo', root.find('cputune/vcpusched')
                         .get('scheduler'))
        with self.assertRaises(DomainRefused):
            restore(tuned.replace('<weight>500</weight>',
                                  "<device><path>/dev/sda</path></device>"))

    def test_nic_offload_switches_are_kept(self):
        # Nova's driver with [ft] nic_checksum_offload = false writes
        # <host csum='off'/> into each virtio NIC (the cloud lab's
        # Geneve on OVS's userspace datapath): a secondary refused to
        # restore such a domain, so no FT server was protected.
        off = NOVA.replace("<driver name='vhost' rx_queue_size='512'/>",
                           "<driver name='vhost' rx_queue_size='512'>"
                           "<host csum='off' tso4='off'/>"
                           "<guest csum='off'/></driver>")
        root = restore(off)
        driver = root.find('devices/interface/driver')
        self.assertEqual(('off', 'off'), (driver.find('host').get('csum'),
                                          driver.find('host').get('tso4')))
        self.assertEqual('off', driver.find('guest').get('csum'))
        # switches only: anything else in them is refused
        with self.assertRaises(DomainRefused):
            restore(off.replace("<host csum='off'", "<host csum='maybe'"))
        with self.assertRaises(DomainRefused):
            restore(off.replace("<guest csum='off'/>",
                                "<guest path='/etc/shadow'/>"))

    def test_a_file_console_writes_only_this_sides_log(self):
        root = restore(OURS.replace('/tmp/serial.log', '/etc/cron.d/x'))
        self.assertNotIn('/etc/cron.d/x', paths_in(root))


class RefusedDomainsTest(unittest.TestCase):
    """Each construct that would let the wire choose what runs as root."""

    def refused(self, xml: str, where: str, **kw: object) -> str:
        with self.assertRaises(DomainRefused) as ctx:
            restore(xml, **kw)
        self.assertIsInstance(ctx.exception, ContractError)
        self.assertIn(where, str(ctx.exception))
        return str(ctx.exception)

    def device(self, text: str) -> str:
        return NOVA.replace('<audio id=', f'{text}\n<audio id=')

    def test_disk_on_a_host_block_device(self):
        msg = self.refused(NOVA.replace(
            "<disk type='file' device='disk'>",
            "<disk type='block' device='disk'>").replace(
            f"<source file='{IDIR}/disk'/>", "<source dev='/dev/sda'/>"),
            'domain/devices/disk@type')
        self.assertIn("'block'", msg)

    def test_other_disk_sources(self):
        for kind in ('dir', 'network', 'volume', 'nvme', 'vhostuser'):
            self.refused(NOVA.replace("<disk type='file' device='disk'>",
                                      f"<disk type='{kind}' "
                                      f"device='disk'>"),
                         'domain/devices/disk@type')

    def test_second_disk_or_cdrom_outside_the_instance(self):
        self.refused(self.device(
            "<disk type='file' device='disk'><source file='/etc/shadow'/>"
            "<target dev='vdb' bus='virtio'/></disk>"),
            'domain/devices/disk')
        for path in ('/etc/shadow', f'{IDIR}/../../../../etc/shadow',
                     f'{IDIR}-other/disk.config'):
            self.refused(NOVA.replace(f'{IDIR}/disk.config', path),
                         'domain/devices/disk/source@file')

    def test_backing_file_that_is_a_block_device(self):
        self.refused(NOVA.replace("<backingStore type='file'>",
                                  "<backingStore type='block'>"),
                     'domain/devices/disk/backingStore@type')

    def test_hostdev_filesystem_and_friends(self):
        for text, where in (
                ("<hostdev mode='subsystem' type='pci' managed='yes'>"
                 "<source><address domain='0' bus='1' slot='0' "
                 "function='0'/></source></hostdev>",
                 'domain/devices/hostdev'),
                ("<filesystem type='mount'><source dir='/'/>"
                 "<target dir='root'/></filesystem>",
                 'domain/devices/filesystem'),
                ("<shmem name='x'/>", 'domain/devices/shmem'),
                ("<smartcard mode='passthrough' type='tcp'/>",
                 'domain/devices/smartcard'),
                ("<parallel type='file'><source path='/etc/x'/>"
                 "</parallel>", 'domain/devices/parallel'),
                ("<input type='evdev'><source dev='/dev/input/event0'/>"
                 "</input>", 'domain/devices/input@type'),
                ("<rng model='virtio'><backend model='egd' type='unix'>"
                 "<source mode='connect' path='/run/x'/></backend></rng>",
                 'domain/devices/rng/backend@model'),
                ("<rng model='virtio'><backend model='random'>/etc/shadow"
                 "</backend></rng>", 'domain/devices/rng/backend'),
                ("<watchdog model='i6300esb' action='dump'/>",
                 'domain/devices/watchdog@action'),
                ("<tpm model='tpm-tis'><backend type='passthrough'>"
                 "<device path='/dev/tpm0'/></backend></tpm>",
                 'domain/devices/tpm'),
                ("<graphics type='vnc' socket='/etc/x'/>",
                 'domain/devices/graphics@socket'),
                ("<graphics type='spice'><listen type='socket' "
                 "socket='/x'/></graphics>",
                 'domain/devices/graphics/listen@type')):
            with self.subTest(where):
                self.refused(self.device(text), where)

    def test_qemu_commandline_and_other_qemu_namespace(self):
        ns = "xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'"
        base = NOVA.replace("<domain type='kvm'>", f"<domain type='kvm' "
                                                   f"{ns}>")
        for tail, where in (
                ("<qemu:commandline><qemu:arg value='-object'/>"
                 "<qemu:arg value='memory-backend-file,mem-path=/etc'/>"
                 "</qemu:commandline>", 'domain/qemu:commandline/qemu:arg'),
                ("<qemu:commandline><qemu:env name='LD_PRELOAD' "
                 "value='/tmp/x.so'/></qemu:commandline>",
                 'domain/qemu:commandline/qemu:env'),
                ("<qemu:override/>", 'domain/qemu:override'),
                ("<qemu:capabilities><qemu:add capability='x'/>"
                 "</qemu:capabilities>", 'domain/qemu:capabilities')):
            with self.subTest(where):
                self.refused(base.replace('</domain>', tail + '</domain>'),
                             where)

    def test_nics_that_run_scripts_or_reach_host_devices(self):
        for text, where in (
                ("<interface type='ethernet'><target dev='tap0'/>"
                 "<script path='/tmp/x.sh'/></interface>",
                 'domain/devices/interface/script'),
                ("<interface type='ethernet'><downscript path='/tmp/x'/>"
                 "</interface>", 'domain/devices/interface/downscript'),
                ("<interface type='vhostuser'><source type='unix' "
                 "path='/run/x' mode='server'/></interface>",
                 'domain/devices/interface@type'),
                ("<interface type='direct'><source dev='eth0' "
                 "mode='passthrough'/></interface>",
                 'domain/devices/interface@type'),
                ("<interface type='hostdev'/>",
                 'domain/devices/interface@type'),
                ("<interface type='user'><rom file='/etc/shadow'/>"
                 "</interface>", 'domain/devices/interface/rom@file'),
                ("<interface type='user'><backend tap='/dev/net/tun'/>"
                 "</interface>", 'domain/devices/interface/backend'),
                ("<interface type='user'><ip address='10.0.2.9' "
                 "family='ipv4'/></interface>",
                 'domain/devices/interface/ip')):
            with self.subTest(where):
                self.refused(self.device(text), where)

    def test_char_devices_outside_the_instance(self):
        for kind in ('unix', 'pipe', 'dev', 'tcp', 'udp', 'spiceport',
                     'nmdm', 'exec'):
            with self.subTest(kind):
                self.refused(NOVA.replace("<serial type='pty'>",
                                          f"<serial type='{kind}'>"),
                             'domain/devices/serial@type')
        self.refused(self.device(
            "<channel type='file'><source path='/etc/x'/>"
            "<target type='virtio' name='x'/></channel>"),
            'domain/devices/channel@type')
        self.refused(self.device(
            "<channel type='unix'><target type='guestfwd' "
            "address='10.0.2.1' port='4600'/></channel>"),
            'domain/devices/channel/target@type')

    def test_kernel_initrd_and_firmware_are_the_hosts_own(self):
        self.refused(OURS.replace('/boot/i', '/etc/shadow'),
                     'domain/os/initrd')
        self.refused(OURS, 'domain/os/kernel', host_files=())
        self.refused(OURS.replace("<boot dev='hd'/>",
                                  "<loader readonly='yes' type='pflash'>"
                                  "/etc/shadow</loader>"),
                     'domain/os/loader')
        self.refused(OURS.replace("<boot dev='hd'/>",
                                  "<nvram>/etc/passwd</nvram>"),
                     'domain/os/nvram')

    def test_security_label_shapes_and_launch_security(self):
        self.refused(NOVA.replace("relabel='yes'/>",
                                  "relabel='yes' evil='1'/>"),
                     'domain/seclabel@evil')
        self.refused(NOVA.replace('</devices>', '</devices><launchSecurity '
                                  "type='sev'/>"), 'domain/launchSecurity')

    def test_memory_must_stay_shared_in_a_file(self):
        self.refused(NOVA.replace("<access mode='shared'/>",
                                  "<access mode='private'/>"),
                     'domain/memoryBacking/access@mode')
        self.refused(NOVA.replace("<source type='file'/>",
                                  "<source type='file' path='/etc'/>"),
                     'domain/memoryBacking/source@path')

    def test_unknown_elements_attributes_and_values(self):
        self.refused(NOVA.replace('<features>', '<features><x-new/>'),
                     'domain/features/x-new')
        self.refused(NOVA.replace("<domain type='kvm'>",
                                  "<domain type='xen'>"), 'domain@type')
        self.refused(NOVA.replace("<mac address='fa:16:3e:00:00:01'/>",
                                  "<mac address='fa:16:3e:00:00:01,x'/>"),
                     'domain/devices/interface/mac@address')
        self.refused(NOVA.replace("<source bridge='br-int'/>",
                                  "<source bridge='br-int\n'/>"),
                     'domain/devices/interface/source@bridge')
        self.refused(NOVA.replace('<acpi/>', '<acpi>x</acpi>'),
                     'domain/features/acpi')
        self.refused(NOVA.replace('<nova:name>web-1</nova:name>',
                                  '<x:y xmlns:x="urn:other"/>'),
                     'domain/metadata')

    def test_a_bridge_outside_the_hosts_allowed_bridges(self):
        # before, any bridge the primary named: a management or storage
        # network's, say
        on = NOVA.replace("<source bridge='br-int'/>",
                          "<source bridge='br-mgmt'/>")
        msg = self.refused(on, 'domain/devices/interface/source@bridge')
        self.assertIn("'br-mgmt' is not a bridge guests may join", msg)
        self.assertIn('[agent] allowed_bridges', msg)
        self.assertEqual(1, len(msg.splitlines()))
        # the operator's list decides, wildcards and all
        root = restore(on, bridges=('br-m*',))
        self.assertEqual('br-mgmt', root.find(
            'devices/interface/source').get('bridge'))
        self.refused(NOVA, 'source@bridge', bridges=())

    def test_a_bridge_name_the_kernel_would_not_take(self):
        for name in ('b' * 16, '..', '.', 'br/x', 'br:0', 'br x', ''):
            with self.subTest(name=name):
                self.refused(NOVA.replace("<source bridge='br-int'/>",
                                          f"<source bridge='{name}'/>"),
                             'domain/devices/interface/source@bridge',
                             bridges=('*',))

    def test_uuid_of_another_instance(self):
        self.refused(NOVA, 'domain/uuid',
                     uuid='00000000-0000-4000-8000-000000000000')

    def test_doctype_entities_and_garbage(self):
        bomb = ('<?xml version="1.0"?><!DOCTYPE domain [<!ENTITY a "aa">'
                '<!ENTITY b "&a;&a;&a;">]><domain><name>&b;</name>'
                '</domain>')
        self.refused(bomb, 'DOCTYPE')
        self.refused('<!doctype domain SYSTEM "file:///etc/passwd">'
                     '<domain/>', 'DOCTYPE')
        self.refused('<domain><name>x</name>', 'not well-formed')
        self.refused('<notdomain/>', 'must be a <domain>')
        self.refused(NOVA.replace('</devices>', '</devices>' + '<cpu/>' *
                                  (domain_policy.MAX_ELEMENTS + 1)),
                     'more than')
        with self.assertRaises(DomainRefused):
            domain_policy.parse(b'<domain/>')  # type: ignore[arg-type]


if __name__ == '__main__':
    unittest.main()
