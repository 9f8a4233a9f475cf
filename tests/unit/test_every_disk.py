"""Every disk and every NIC of a guest: the contract, its hostile cases,
and the engine's sets of stores, syncs and output buffers (fakes for
QEMU; tests/functional/test_every_disk.py runs the real thing)."""

import asyncio
import dataclasses
import os
import shutil
import struct
import tempfile
import unittest
import xml.etree.ElementTree as ET

import testtools

from mftvm_openstack.contract.hello import (
    PROTOCOL_VERSION,
    Hello,
    NbdTargetInfo,
    Ready,
)
from mftvm_openstack.contract.limits import MAX_DISKS, MAX_NICS
from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.spec import GuestSpec
from mftvm_openstack.ft import disk, disks, domain_policy, libvirt_domain, vm
from mftvm_openstack.ft.network import OutputBuffer, OutputBuffers
from mftvm_openstack.local import operations
from tests.unit.test_disk import FakeMonitor, FakeStore

SPEC = {'name': 'vm0', 'kernel': '/k', 'initrd': '/i', 'disk': '/d/a.raw'}
HELLO = {'version': PROTOCOL_VERSION, 'qemu_pid': 1, 'host_pid': 2,
         'boot_id': 'b', 'pair_id': 'pair-1', 'disk_size': 1 << 30}


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


class SpecTest(testtools.TestCase):

    def test_one_disk_spec_and_hello_are_as_they_always_were(self):
        # A single-disk pair's wire format is unchanged: no new keys.
        self.assertNotIn('more_disks', GuestSpec.from_dict(SPEC).to_dict())
        self.assertNotIn('more_nics', GuestSpec.from_dict(SPEC).to_dict())
        self.assertNotIn('disks', Hello.from_dict(HELLO).to_dict())
        ready = Ready(target=NbdTargetInfo(socket='/s')).to_dict()
        self.assertEqual({'target'}, set(ready))
        # the first NIC's MAC is the one it always had
        spec = GuestSpec.from_dict(SPEC)
        self.assertEqual('52:54:00:', spec.mac[:9])
        self.assertEqual(spec.mac, spec.nic_mac(0))

    def test_every_disk_and_nic_round_trips(self):
        spec = GuestSpec.from_json(dict(SPEC, more_disks=[
            {'path': '/d/b.qcow2', 'format': 'qcow2', 'size': 5}],
            more_nics=[{'forwards': [{'host_addr': '127.0.0.1',
                                      'host_port': 2222,
                                      'guest_port': 22}]}]))
        self.assertEqual(spec, GuestSpec.from_json(spec.to_json()))
        self.assertEqual([('/d/a.raw', 'raw', 0), ('/d/b.qcow2', 'qcow2', 5)],
                         spec.all_disks)
        self.assertEqual(2, len(spec.nic_forwards))
        macs = {spec.nic_mac(i) for i in range(MAX_NICS)}
        self.assertEqual(MAX_NICS, len(macs))   # each NIC its own MAC

    def test_at_most_the_limit_of_disks_and_nics(self):
        more = [{'path': f'/d/{i}.raw'} for i in range(MAX_DISKS - 1)]
        GuestSpec.from_json(dict(SPEC, more_disks=more))
        with self.assertRaises(ContractError) as ctx:
            GuestSpec.from_json(dict(SPEC, more_disks=more + [
                {'path': '/d/x.raw'}]))
        self.assertIn('more_disks', ctx.exception.field)
        nics = [{}] * (MAX_NICS - 1)
        GuestSpec.from_json(dict(SPEC, more_nics=nics))
        self.assertRaises(ContractError, GuestSpec.from_json,
                          dict(SPEC, more_nics=nics + [{}]))

    def test_hostile_disk_paths_are_refused(self):
        for bad in ('', 'rel.raw', '/d/../etc/shadow', '/a,b', '/a\nb',
                    '/..', 5, None):
            with self.subTest(path=bad):
                with self.assertRaises(ContractError) as ctx:
                    GuestSpec.from_json(dict(SPEC, more_disks=[
                        {'path': bad}]))
                self.assertIn('more_disks[0].path', ctx.exception.field)
        for bad in ({'path': '/d/b', 'format': 'vmdk'},
                    {'path': '/d/b', 'size': -1},
                    {'path': '/d/b', 'extra': 1}, {}):
            self.assertRaises(ContractError, GuestSpec.from_json,
                              dict(SPEC, more_disks=[bad]))
        # one file as two disks
        for twice in ('/d/a.raw', '/d/b.raw'):
            with self.assertRaises(ContractError):
                GuestSpec.from_json(dict(SPEC, more_disks=[
                    {'path': '/d/b.raw'}, {'path': twice}]))
        # a libvirt domain's disks are its XML's
        self.assertRaises(ContractError, GuestSpec.from_json, {
            'name': 'vm0', 'domain': 'instance-1',
            'more_disks': [{'path': '/d/b.raw'}]})
        self.assertRaises(ContractError, GuestSpec.from_json, dict(
            SPEC, more_nics=[{'forwards': [{'host_addr': '127.0.0.1',
                                            'host_port': '1-:2,guestfwd=x',
                                            'guest_port': 2}]}]))

    def test_hello_names_each_disk_in_order(self):
        hello = Hello.from_dict(dict(HELLO, disks=[
            {'name': 'disk1', 'size': 7}, {'name': 'disk2', 'size': 9}]))
        self.assertEqual([1 << 30, 7, 9], hello.disk_sizes())
        for names in (['disk2'], ['disk1', 'disk1'], ['disk0'],
                      ['disk1', 'disk3']):
            hello = Hello.from_dict(dict(HELLO, disks=[
                {'name': n, 'size': 1} for n in names]))
            with self.subTest(names=names):
                self.assertRaises(ContractError, hello.disk_sizes)
        for bad in ([{'name': 'disk1'}], [{'name': '../x', 'size': 1}],
                    [{'name': 'disk1', 'size': -1}],
                    [{'name': f'disk{i}', 'size': 1}
                     for i in range(1, MAX_DISKS + 1)], 'disk1', None):
            with self.subTest(disks=bad):
                self.assertRaises(ContractError, Hello.from_dict,
                                  dict(HELLO, disks=bad))

    def test_ready_exports_are_checked(self):
        target = {'socket': '/s'}
        Ready.from_dict({'target': target, 'exports': ['disk1']})
        for bad in (['../x'], ['a b'], [''], [1], 'disk1', None,
                    ['d'] * MAX_DISKS):
            with self.subTest(exports=bad):
                self.assertRaises(ContractError, Ready.from_dict,
                                  {'target': target, 'exports': bad})


class DiskDirsTest(unittest.TestCase):
    """Every disk must be where the first must be (issue 11)."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp)
        self.dir = os.path.join(self.tmp, 'disks')
        os.makedirs(self.dir)

    def file(self, path):
        with open(path, 'wb') as f:
            f.write(b'x')
        return path

    def spec(self, second):
        return vm.GuestSpec(name='g', disk=self.file(
            os.path.join(self.dir, 'a.raw')),
            more_disks=(vm.GuestDisk(path=second),))

    def test_a_second_disk_elsewhere_is_refused(self):
        outside = self.file(os.path.join(self.tmp, 'secret'))
        with self.assertRaises(operations.UserError) as ctx:
            operations.check_disk(self.spec(outside), [self.dir])
        self.assertIn('is not in an allowed directory', str(ctx.exception))
        link = os.path.join(self.dir, 'link.raw')
        os.symlink(outside, link)
        with self.assertRaises(operations.UserError) as ctx:
            operations.check_disk(self.spec(link), [self.dir])
        self.assertIn('symbolic link', str(ctx.exception))
        operations.check_disk(self.spec(self.file(
            os.path.join(self.dir, 'b.raw'))), [self.dir])

    def test_the_agent_refuses_it_too(self):
        from mftvm_openstack.agent import exception
        from tests.unit.test_agent_manager import manager_on
        outside = self.file(os.path.join(self.tmp, 'secret'))
        manager = manager_on(self, disk_dirs=[self.dir])
        with self.assertRaises(exception.InvalidRequest) as ctx:
            manager.check_disk(self.spec(outside))
        self.assertIn('more_disks[0]', str(ctx.exception))


class QemuArgvTest(testtools.TestCase):

    def spec(self):
        return vm.GuestSpec(
            name='g', kernel='/k', initrd='/i', disk='/d/a.raw',
            forwards=(vm.HostForward('127.0.0.1', 8080, 80),),
            more_disks=(vm.GuestDisk(path='/d/b.qcow2', format='qcow2'),),
            more_nics=(vm.GuestNic(forwards=(
                vm.HostForward('127.0.0.1', 8081, 80),)),))

    def test_every_disk_and_nic_on_the_command_line(self):
        spec = self.spec()
        argv = ' '.join(vm.qemu_argv(spec, vm.Paths('/r'), '/ram'))
        for part in ('drive=disk0,id=vd0', 'drive=disk1,id=vd1',
                     '"filename": "/d/b.qcow2"', '"driver": "qcow2"',
                     'user,id=n0,ipv6=off,hostfwd=tcp:127.0.0.1:8080-:80',
                     'user,id=n1,ipv6=off,net=10.0.3.0/24,'
                     'hostfwd=tcp:127.0.0.1:8081-:80',
                     f'netdev=n1,id=nic1,mac={spec.nic_mac(1)}'):
            self.assertIn(part, argv)
        # a restore: every disk on its replica chain, forwards added later
        argv = ' '.join(vm.qemu_argv(
            spec, vm.Paths('/r'), '/ram', incoming=True,
            disk_chains=[[('/s/base.raw', 'raw')],
                         [('/s1/base.raw', 'raw'), ('/s1/ov.qcow2',
                                                    'qcow2')]]))
        self.assertNotIn('hostfwd', argv)
        self.assertNotIn('/d/b.qcow2', argv)
        self.assertIn('"filename": "/s1/ov.qcow2"', argv)
        self.assertRaises(vm.VMError, vm.qemu_argv, spec, vm.Paths('/r'),
                          '/ram', disk_chains=[[('/s/base.raw', 'raw')]])


def store(root, i, first=None):
    return FakeStore(disks.replica_dir(root, i), 1 << 20, pool_size=2,
                     **({} if first is None else {
                         'name': f'disk{i}', 'server': first}))


class ReplicaDisksTest(testtools.TestCase):
    """Every disk's replica in one qsd, marked and failed over together."""

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.mon = FakeMonitor()
        mon = self.mon

        class Store(FakeStore):
            async def start(self):
                if self.server is None:     # the qsd: our fake
                    os.makedirs(self.workdir, exist_ok=True)
                    return await self.attach(mon)
                return await super().start()
        self.replicas = disks.ReplicaDisks(self.tmp, [1 << 20, 1 << 21],
                                           store_class=Store, pool_size=2,
                                           merge_at=1)

    def test_one_server_an_export_per_disk_nodes_apart(self):
        async def scenario():
            targets = await self.replicas.start()
            self.assertEqual(['disk0', 'disk1'],
                             [t.export for t in targets])
            self.assertEqual(1, self.mon.names().count('nbd-server-start'))
            self.assertEqual({t.socket for t in targets},
                             {os.path.join(self.tmp, 'disk', 'nbd.sock')})
            exports = self.mon.args('block-export-add')
            self.assertEqual([('disk0', 'top', 'exp0'),
                              ('disk1', 'disk1-top', 'disk1-exp')],
                             [(e['name'], e['node-name'], e['id'])
                              for e in exports])
            nodes = [a['node-name'] for a in self.mon.args('blockdev-add')]
            self.assertEqual(len(nodes), len(set(nodes)))
            self.assertTrue(os.path.exists(os.path.join(
                self.tmp, 'disk1', 'base.raw')))
            await self.replicas.stop()
            self.assertEqual(1, self.mon.names().count('quit'))
        run(scenario())

    def test_marks_reach_every_disk_and_failover_keeps_each_chain(self):
        async def scenario():
            await self.replicas.start()
            for epoch in (1, 2, 3):
                await self.replicas.mark(epoch)
            snaps = [a['node'] for a in self.mon.args('blockdev-snapshot')]
            self.assertIn('base', snaps)
            self.assertIn('disk1-base', snaps)
            self.assertEqual(6, len(snaps))
            await self.replicas.commit(2)
            await asyncio.sleep(0)
            # each disk merges in the one qsd under a job id of its own
            merges = [a['job-id'] for a in self.mon.args('block-commit')]
            self.assertEqual(2, len(merges))
            self.assertEqual(len(merges), len(set(merges)))
            self.mon.calls.clear()
            chains = await self.replicas.failover_layers(2)
            names = self.mon.names()
            # every export fenced before the qsd quits, the server once
            self.assertEqual(2, names.count('block-export-del'))
            self.assertEqual(1, names.count('nbd-server-stop'))
            self.assertLess(max(i for i, n in enumerate(names)
                                if n == 'block-export-del'),
                            names.index('quit'))
            self.assertEqual(
                [[os.path.join(self.tmp, d, f) for f in
                  ('base.raw', 'ov-2.qcow2')] for d in ('disk', 'disk1')],
                [[path for path, _ in chain] for chain in chains])
        run(scenario())

    def test_failover_to_an_unmarked_epoch_changes_nothing(self):
        async def scenario():
            await self.replicas.start()
            await self.replicas.mark(1)
            self.mon.calls.clear()
            with testtools.ExpectedException(disk.DiskError):
                await self.replicas.failover_layers(5)
            self.assertEqual([], self.mon.names())
            await self.replicas.stop()
        run(scenario())


class DiskSyncsTest(testtools.TestCase):

    def test_each_disk_mirrored_to_its_own_export(self):
        async def scenario():
            mon = FakeMonitor()
            mon.ready_mirrors = True
            syncs = disks.DiskSyncs([
                disk.load_disk_sync('write-replication', mon, node, i)
                for i, node in enumerate(('disk0', 'disk1'))])
            lost = []
            syncs.on_failure = lost.append
            target = disk.NbdTarget(socket='/s')
            await syncs.start([target, disk.NbdTarget(socket='/s',
                                                      export='disk1')])
            nbd = mon.args('blockdev-add')
            self.assertEqual([('replica', 'disk0'), ('replica1', 'disk1')],
                             [(a['node-name'], a['export']) for a in nbd])
            mirrors = mon.args('blockdev-mirror')
            self.assertEqual([('repl0', 'disk0', 'replica'),
                              ('repl1', 'disk1', 'replica1')],
                             [(m['job-id'], m['device'], m['target'])
                              for m in mirrors])
            await syncs.checkpoint(1)
            # the second disk's replication breaks: the secondary is lost
            mon.set_job('repl1', 'concluded', 'No space left')
            for _ in range(20):
                await asyncio.sleep(0)
            self.assertTrue(syncs.failed.is_set())
            self.assertEqual(1, len(lost))
            with testtools.ExpectedException(disk.DiskError):
                await syncs.checkpoint(2)
            await syncs.stop()
            self.assertEqual({'replica', 'replica1'}, {
                a['node-name'] for a in mon.args('blockdev-del')})
            with testtools.ExpectedException(disk.DiskError):
                await syncs.start([target])     # one target, two disks
        run(scenario())


class QemuSockets(FakeMonitor):
    """A fake QEMU for output commit: ``chardev-add`` connects to the
    buffer's unix sockets as QEMU does."""

    def __init__(self):
        super().__init__()
        self.streams = {}

    async def execute(self, command, **arguments):
        if command == 'chardev-add':
            path = arguments['backend']['data']['addr']['data']['path']
            self.streams[arguments['id']] = \
                await asyncio.open_unix_connection(path)
        return await super().execute(command, **arguments)


class OutputBuffersTest(testtools.TestCase):

    def test_each_nic_held_until_its_epoch_commits(self):
        tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, tmp, True)
        paths = vm.Paths(tmp)

        async def scenario():
            qemu = QemuSockets()
            out = OutputBuffers([
                OutputBuffer(paths.net_out(i), paths.net_in(i),
                             vm.netdev_id(i), index=i) for i in (0, 1)])
            held = []
            out.on_held = held.append
            await out.attach(qemu)
            filters = qemu.args('object-add')
            self.assertEqual([('oc0', 'n0', 'oc-out', 'oc-in'),
                              ('oc1', 'n1', 'oc-out1', 'oc-in1')],
                             [(f['id'], f['netdev'], f['outdev'],
                               f['indev']) for f in filters])

            def send(chardev, frame):
                qemu.streams[chardev][1].write(
                    struct.pack('!I', len(frame)) + frame)

            send('oc-out1', b'second-nic')
            await asyncio.wait_for(out.waiting.wait(), 5)
            send('oc-out', b'first')
            while out.held < 2:
                await asyncio.sleep(0.01)
            self.assertEqual([10, 15], held)     # both NICs together
            # (the adaptive cadence waits for the ACK of the oldest held)
            self.assertEqual(1, out.oldest_epoch)
            out.seal(1)
            self.assertFalse(out.waiting.is_set())
            await out.release(0)
            self.assertEqual(0, out.frames_released)
            await out.release(1)
            self.assertEqual(2, out.frames_released)
            self.assertIsNone(out.oldest_epoch)
            reader = qemu.streams['oc-in1'][0]
            length, = struct.unpack('!I', await reader.readexactly(4))
            self.assertEqual(b'second-nic', await reader.readexactly(length))
            reader = qemu.streams['oc-in'][0]
            length, = struct.unpack('!I', await reader.readexactly(4))
            self.assertEqual(b'first', await reader.readexactly(length))
            await out.detach(qemu)
            self.assertEqual({'oc0', 'oc1'},
                             {a['id'] for a in qemu.args('object-del')})
        run(scenario())


class LibvirtDisksTest(testtools.TestCase):

    XML = '''<domain type="kvm"><name>instance-1</name><devices>
      <disk type="file" device="disk"><driver name="qemu" type="qcow2"/>
        <source file="/var/lib/nova/instances/u/disk"/>
        <target dev="vda" bus="virtio"/></disk>
      <disk type="file" device="disk"><driver name="qemu" type="qcow2"/>
        <source file="/var/lib/nova/instances/u/disk.eph0"/>
        <target dev="vdb" bus="virtio"/></disk>
      <disk type="file" device="disk"><driver name="qemu" type="raw"/>
        <source file="/var/lib/nova/instances/u/disk.swap"/>
        <target dev="vdc" bus="virtio"/></disk>
    </devices></domain>'''

    def test_each_disk_restored_onto_its_own_chain(self):
        chains = [[(f'/s/d{i}/base.raw', 'raw'),
                   (f'/s/d{i}/ov-3.qcow2', 'qcow2')] for i in range(3)]
        root = ET.fromstring(libvirt_domain.restore_xml(
            self.XML, chains[0], '/s/serial.log', disk_chains=chains))
        found = root.findall("devices/disk[@device='disk']")
        self.assertEqual([f'/s/d{i}/ov-3.qcow2' for i in range(3)],
                         [d.find('source').get('file') for d in found])
        self.assertEqual([f'/s/d{i}/base.raw' for i in range(3)],
                         [d.find('backingStore/source').get('file')
                          for d in found])
        self.assertNotIn('/var/lib/nova', libvirt_domain.restore_xml(
            self.XML, chains[0], '/s/serial.log', disk_chains=chains))
        # as many replicas as disks, or nothing is restored
        self.assertRaises(domain_policy.DomainRefused,
                          libvirt_domain.restore_xml, self.XML, chains[0],
                          '/s/serial.log', disk_chains=chains[:2])

    def test_a_config_drive_is_restored_onto_its_replica(self):
        xml = self.XML.replace('</devices>', '''
          <disk type="file" device="cdrom"><driver name="qemu" type="raw"/>
            <source file="/var/lib/nova/instances/u/disk.config"/>
            <target dev="sda" bus="sata"/><readonly/></disk>
          <disk type="file" device="cdrom"><target dev="sdb" bus="sata"/>
            <readonly/></disk></devices>''')
        chains = [[(f'/s/d{i}/base.raw', 'raw')] for i in range(4)]
        root = ET.fromstring(libvirt_domain.restore_xml(
            xml, chains[0], '/s/serial.log', disk_chains=chains))
        cdrom = root.find("devices/disk[@device='cdrom']")
        self.assertEqual('/s/d3/base.raw', cdrom.find('source').get('file'))
        self.assertIsNotNone(cdrom.find('readonly'))
        self.assertNotIn('/var/lib/nova', ET.tostring(root, 'unicode'))
        # (without the replicas, a config drive outside the instance's
        # own directory is refused, as it always was)
        self.assertRaises(domain_policy.DomainRefused,
                          libvirt_domain.restore_xml, xml, chains[0],
                          '/s/serial.log')

    def test_more_disks_than_the_limit_or_than_replicas_are_refused(self):
        disk_el = ('<disk type="file" device="disk"><source file="/x/{}"/>'
                   '<target dev="vd{}"/></disk>')
        many = '<domain><devices>' + ''.join(
            disk_el.format(i, chr(97 + i)) for i in range(MAX_DISKS + 1)) \
            + '</devices></domain>'
        with self.assertRaises(domain_policy.DomainRefused) as ctx:
            domain_policy.rebuild(many, '/usr/bin/qemu',
                                  replicated=MAX_DISKS + 1)
        self.assertIn(f'at most {MAX_DISKS}', str(ctx.exception))
        # without replicas for them, more than one disk is refused
        self.assertRaises(domain_policy.DomainRefused,
                          domain_policy.rebuild, self.XML, '/usr/bin/qemu')
        self.assertRaises(domain_policy.DomainRefused,
                          domain_policy.rebuild, self.XML, '/usr/bin/qemu',
                          replicated=2)

    def test_the_guests_disks_and_nics_from_qmp(self):
        class Qmp(FakeMonitor):
            async def execute(self, command, **arguments):
                if command == 'query-block':
                    return [
                        {'inserted': {'node-name': 'libvirt-3-format',
                                      'ro': False,
                                      'image': {'virtual-size': 10}}},
                        # (a device with an id: qdev is the id)
                        {'removable': True, 'qdev': 'ide0-1-0',
                         'inserted': {
                             'node-name': 'cd', 'ro': True,
                             'image': {'virtual-size': 1}}},
                        {'removable': True,         # an empty drive
                         'qdev': '/machine/peripheral/sata0-0-1'},
                        {'qdev': '/machine/system.flash1',  # UEFI vars
                         'inserted': {'node-name': 'nvram', 'ro': False,
                                      'image': {'virtual-size': 1}}},
                        {'inserted': {'node-name': 'libvirt-2-format',
                                      'ro': False,
                                      'image': {'virtual-size': 20}}}]
                if command == 'qom-list':
                    return [{'name': 'type', 'type': 'string'},
                            {'name': 'net1', 'type': 'child<e1000>'},
                            {'name': 'net0',
                             'type': 'child<virtio-net-pci>'},
                            {'name': 'virtio-disk0',
                             'type': 'child<virtio-blk-pci>'}]
                if command == 'qom-get':
                    nic = arguments['path'].rsplit('/', 1)[1]
                    if nic.startswith('net'):
                        return 'host' + nic
                    raise disk.MonitorError('no property netdev')
                raise AssertionError(command)

        async def scenario():
            # the config drive is replicated too, in its place
            self.assertEqual(
                [('libvirt-3-format', 10), ('cd', 1),
                 ('libvirt-2-format', 20)],
                await libvirt_domain.guest_disks(Qmp()))
            self.assertEqual(['hostnet0', 'hostnet1'],
                             await libvirt_domain.guest_netdevs(
                                 Qmp(), 'hostnet0'))
        run(scenario())


class SecondaryRefusesTest(unittest.IsolatedAsyncioTestCase):
    """A primary whose HELLO names other disks than the guest has (or
    names them wrongly) is refused before any replica is made: the
    restore runs this host's spec, one replica per disk."""

    async def test_hello_disks_must_be_the_guests(self):
        from mftvm_openstack.contract.hello import DiskInfo
        from mftvm_openstack.instance.secondary import SecondarySide
        from tests.unit.test_instance import guest_dir
        gdir = guest_dir(self)
        side = SecondarySide(gdir)
        hello = Hello.from_dict(HELLO)
        for named in ((DiskInfo(name='disk1', size=5),),
                      (DiskInfo(name='disk2', size=5),)):
            with self.subTest(disks=named):
                with self.assertRaises(ContractError):
                    await side.prepare(dataclasses.replace(hello,
                                                           disks=named))
                self.assertIsNone(side.store)
                self.assertFalse(os.path.exists(disks_dir(side)))


def disks_dir(side):
    return disks.replica_dir(side.paths.root, 0)


class SettleNamesTest(unittest.TestCase):

    def test_doctests(self):
        import doctest

        from mftvm_openstack.nova import settle
        result = doctest.testmod(settle)
        self.assertGreater(result.attempted, 1)
        self.assertEqual(0, result.failed)
