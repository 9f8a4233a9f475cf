"""A guest's disk on shared storage, as the instance process and the agent
see it (doc/volumes.rst, "The instance process"): the spec's flag, the
HELLO's names (from a peer: typed, checked, and never a path), the
guest's QEMU opening the image, the primary's buffer and the secondary's
store on the image (real QEMU: tests/functional/test_shared_volume)."""

import asyncio
import json
import os
import tempfile
import unittest
from unittest import mock

import fixtures
import testtools

from mftvm_openstack.agent import exception
from mftvm_openstack.contract.hello import PROTOCOL_VERSION, Hello
from mftvm_openstack.contract.options import HostOptions
from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.spec import (
    GuestDisk,
    GuestSpec,
    ProtectionOptions,
)
from mftvm_openstack.contract.volume import SharedDisk
from mftvm_openstack.ft import disk, shared_image, vm
from mftvm_openstack.instance import protection
from mftvm_openstack.instance.guest import own_guest
from mftvm_openstack.instance.secondary import SecondarySide
from tests.unit.test_agent_manager import manager_on
from tests.unit.test_disk import FakeMonitor, run

HELLO = {'version': PROTOCOL_VERSION, 'qemu_pid': 4242, 'host_pid': 4243,
         'boot_id': 'b0', 'pair_id': 'pair-1', 'disk_size': 1 << 20}


def spec(**more):
    return GuestSpec.from_dict(dict({'name': 'g', 'kernel': '/k',
                                     'initrd': '/i', 'disk': '/v/g.raw',
                                     'disk_size': 1 << 20}, **more))


class SharedFlagTest(testtools.TestCase):

    def test_the_spec_names_its_shared_disks(self):
        self.assertEqual((), spec().shared_disks)
        # left out of the dict while not given: older peers read it
        self.assertNotIn('shared', spec().to_dict())
        self.assertEqual(('disk0',), spec(shared=True).shared_disks)
        two = spec(more_disks=[{'path': '/v/d1.raw', 'shared': True},
                               {'path': '/v/d2.raw'}])
        self.assertEqual(('disk1',), two.shared_disks)
        self.assertEqual({1: SharedDisk(driver='file', path='/v/d1.raw')},
                         shared_image.spec_shared_disks(two))

    def test_a_shared_disk_is_a_raw_image_of_a_guest_of_ours(self):
        for bad, where in (
                (spec(shared=True, disk_format='qcow2'),
                 'spec.disk_format'),
                (spec(more_disks=[{'path': '/v/d1', 'format': 'qcow2',
                                   'shared': True}]),
                 'spec.more_disks[0].format'),
                (GuestSpec(name='g', domain='instance-1', shared=True),
                 'spec.shared')):
            with self.subTest(where=where):
                with self.assertRaises(ContractError) as ctx:
                    bad.check_runnable()
                self.assertEqual(where, ctx.exception.field)
        for garbage in ('yes', 1, None, [True]):
            self.assertRaises(ContractError, GuestSpec.from_dict,
                              {'name': 'g', 'shared': garbage})
            self.assertRaises(ContractError, GuestDisk.from_dict,
                              {'path': '/d', 'shared': garbage})

    def test_the_guests_qemu_opens_the_image_unlocked_not_the_path(self):
        argv = vm.qemu_argv(spec(shared=True), vm.Paths('/run/g'), '/r')
        nodes = [json.loads(a) for a in argv if a.startswith('{')]
        self.assertIn({'driver': 'file', 'node-name': 'disk0-file',
                       'filename': '/v/g.raw', 'locking': 'off'}, nodes)
        local = vm.qemu_argv(spec(), vm.Paths('/run/g'), '/r')
        self.assertIn({'driver': 'file', 'node-name': 'disk0-file',
                       'filename': '/v/g.raw'},
                      [json.loads(a) for a in local if a.startswith('{')])

    def test_a_chain_on_the_image_flattens(self):
        layers = [(shared_image.chain_filename(
            SharedDisk(driver='file', path='/v/g.raw')), 'raw'),
            ('/r/ov-3.qcow2', 'qcow2')]
        node = json.loads(vm.chain_filename(layers)[5:])
        self.assertEqual({'driver': 'file', 'filename': '/v/g.raw',
                          'locking': 'off'}, node['backing']['file'])


class HelloSharedTest(testtools.TestCase):

    def test_names_only_and_checked(self):
        hello = Hello.from_dict(dict(HELLO, shared=['disk0']))
        self.assertEqual(('disk0',), hello.shared)
        self.assertNotIn('shared', Hello.from_dict(HELLO).to_dict())
        for bad in ('/etc/shadow', 'disk0,file=/x', '../disk0', 'disk',
                    'rbd:volumes/volume-1', 'disk100', 'x' * 5000, '',
                    None, 0, True, {'pool': 'volumes'}):
            with self.subTest(bad=repr(bad)[:30]):
                with self.assertRaises(ContractError) as ctx:
                    Hello.from_dict(dict(HELLO, shared=[bad]))
                self.assertTrue(ctx.exception.field.startswith('shared'))
        self.assertRaises(ContractError, Hello.from_dict,
                          dict(HELLO, shared=['disk0'] * 9))
        self.assertRaises(ContractError, Hello.from_dict,
                          dict(HELLO, shared=None))

    def test_the_secondary_refuses_a_hello_that_disagrees(self):
        def check(theirs, mine, disks=2):
            Hello.from_dict(dict(HELLO, **({'shared': theirs}
                                           if theirs is not None else {}))
                            ).check_shared(mine, disks)
        check(None, ())
        check(['disk1'], ('disk1',))
        check(['disk1', 'disk0'], ('disk0', 'disk1'))
        for theirs, mine, disks, why in (
                (['disk0'], (), 2, 'this side\'s guest none'),
                (None, ('disk0',), 2, 'the primary has none'),
                (['disk1'], ('disk0',), 2, "['disk1']"),
                (['disk2'], (), 2, 'disk2 is not a disk of the guest'),
                (['disk0', 'disk0'], ('disk0',), 2, 'named twice')):
            with self.subTest(theirs=theirs, mine=mine):
                with self.assertRaises(ContractError) as ctx:
                    check(theirs, mine, disks)
                self.assertEqual('HELLO.shared', ctx.exception.field)
                self.assertIn(why, str(ctx.exception))


def write_guest(tmp, the_spec):
    with open(os.path.join(tmp, 'guest.json'), 'w') as f:
        json.dump({'spec': the_spec.to_json(),
                   'options': {'epoch_ms': 200, 'tls': False}}, f)


class SecondaryPrepareTest(unittest.IsolatedAsyncioTestCase):
    """The secondary's store is built on the image its *own* spec
    names, and only when the HELLO agrees."""

    def side(self, the_spec):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        write_guest(tmp.name, the_spec)
        side = SecondarySide(tmp.name)
        self.stores = []

        class Store:
            def __init__(store, workdir, size, **kwargs):
                self.stores.append(kwargs.get('shared'))

            async def start(store):
                return disk.NbdTarget(socket='/run/nbd.sock')
        self.enterContext(mock.patch.object(disk, 'EpochOverlayStore',
                                            Store))
        self.enterContext(mock.patch('mftvm_openstack.ft.epoch.'
                                     'ReplicaImage'))
        self.enterContext(mock.patch('mftvm_openstack.ft.capacity.check'))
        return side

    async def test_the_store_is_on_its_own_specs_image(self):
        side = self.side(spec(shared=True, disk='/mine/g.raw'))
        await side.prepare(Hello.from_dict(dict(HELLO, shared=['disk0'])))
        self.assertEqual([SharedDisk(driver='file', path='/mine/g.raw')],
                         self.stores)

    async def test_a_hello_that_disagrees_is_refused_before_any_store(self):
        for the_spec, theirs in ((spec(shared=True), {}),
                                 (spec(), {'shared': ['disk0']})):
            side = self.side(the_spec)
            with self.assertRaises(ContractError):
                await side.prepare(Hello.from_dict(dict(HELLO, **theirs)))
            self.assertEqual([], self.stores)

    async def test_a_local_disk_stays_a_local_replica(self):
        side = self.side(spec())
        await side.prepare(Hello.from_dict(HELLO))
        self.assertEqual([None], self.stores)


class ProtectorTest(testtools.TestCase):
    """The primary: the HELLO names its shared disks; each is mirrored
    from a buffer over the image, which stays across protections."""

    def setUp(self):
        super().setUp()
        self.tmp = self.useFixture(fixtures.TempDir()).path
        self.mon = FakeMonitor()

        async def create(path, size):
            open(path, 'wb').close()
        self.patch(disk, 'create_qcow2', create)

    def protector(self, the_spec, guest):
        return protection.GuestProtector(
            the_spec, HostOptions(), vm.Paths(self.tmp), lambda: guest,
            lambda: None)

    def guest(self, the_spec):
        proc = mock.Mock(pid=4242)
        return own_guest(the_spec, proc, self.mon, '/r')

    def test_the_hello_names_the_shared_disks(self):
        the_spec = spec(more_disks=[{'path': '/v/d1', 'shared': True,
                                     'size': 1 << 20}])
        guest = self.guest(the_spec)
        hello = run(self.protector(the_spec, guest).hello('pair-1'))
        self.assertEqual(('disk1',), hello.shared)
        local = self.guest(spec())
        self.assertIsNone(run(self.protector(spec(), local).hello('p'))
                          .shared)

    def test_a_shared_disk_is_mirrored_from_its_buffer_top_only(self):
        the_spec = spec(shared=True)
        guest = self.guest(the_spec)
        prot = self.protector(the_spec, guest)
        sync = run(prot.disk_sync(guest, 0, 'disk0'))
        self.assertEqual(('vbuf0', 'top'), (sync.node, sync.initial_sync))
        self.assertEqual({'node': 'disk0', 'overlay': 'vbuf0'},
                         self.mon.args('blockdev-snapshot')[0])
        # the next protection: the same buffer, never a second one
        again = run(prot.disk_sync(guest, 0, 'disk0'))
        self.assertEqual(('vbuf0', 'top'), (again.node, again.initial_sync))
        self.assertEqual(1, len(self.mon.args('blockdev-snapshot')))

    def test_a_guest_on_unmerged_overlays_is_mirrored_whole(self):
        the_spec = spec(shared=True)
        guest = self.guest(the_spec)
        guest.shared = {0: False}
        sync = run(self.protector(the_spec, guest).disk_sync(guest, 0,
                                                              'disk0'))
        self.assertEqual(('vbuf0', 'full'), (sync.node, sync.initial_sync))

    def test_a_local_disk_is_mirrored_as_before(self):
        guest = self.guest(spec())
        sync = run(self.protector(spec(), guest).disk_sync(guest, 0,
                                                            'disk0'))
        self.assertEqual(('disk0', 'full'), (sync.node, sync.initial_sync))
        self.assertEqual([], self.mon.calls)

    def test_buffers_are_merged_or_dropped_as_the_end_says(self):
        the_spec = spec(shared=True)
        guest = self.guest(the_spec)
        prot = self.protector(the_spec, guest)
        run(prot.disk_sync(guest, 0, 'disk0'))
        path = prot.buffers[0].path
        order = []
        sync = mock.Mock(stop=mock.AsyncMock(
            side_effect=lambda: order.append('sync stopped')))
        prot._sync = sync
        with mock.patch.object(prot.buffers[0], 'release',
                               side_effect=lambda: order.append('merged')):
            run(prot.settle_buffers(running=True))
        # the mirror on the buffer goes first: a node under a job's
        # filter cannot be merged (QEMU: "Need a root block node")
        self.assertEqual(['sync stopped', 'merged'], order)
        self.assertEqual({}, prot.buffers)
        # another copy resumes: the buffer goes, never into the image
        run(prot.disk_sync(guest, 0, 'disk0'))
        self.assertEqual(2, len(self.mon.args('blockdev-snapshot')))
        run(prot.discard_buffers())
        self.assertFalse(os.path.exists(path))
        self.assertEqual([], self.mon.args('block-commit'))


class AgentSharedDiskTest(testtools.TestCase):
    """A secondary's agent checks a shared disk against its *own*
    ``[agent] disk_dirs``: its store writes that file."""

    def test_a_shared_disk_outside_disk_dirs_is_refused(self):
        m = manager_on(self)
        m.new_instance_dir = mock.Mock(
            side_effect=AssertionError('nothing may be started'))
        m.check_capacity = mock.Mock()
        for path in ('/etc/shadow', os.path.join(self.tmp, 'x.raw')):
            with self.subTest(path=path):
                with self.assertRaises(exception.InvalidRequest) as ctx:
                    m.prepare_secondary('g', spec(shared=True, disk=path),
                                        ProtectionOptions(), 'hv2')
                self.assertIn('spec.disk', str(ctx.exception))
        # a local disk is the primary's file: never opened here
        m.new_instance_dir = mock.Mock(side_effect=RuntimeError('started'))
        self.assertRaisesRegex(RuntimeError, 'started', m.prepare_secondary,
                               'g', spec(disk='/etc/shadow'),
                               ProtectionOptions(), 'hv2')



class MergeDownTest(unittest.IsolatedAsyncioTestCase):
    """After a failover the restored guest's committed overlays are
    merged into the shared image: the guest then runs on the image."""

    async def asyncSetUp(self):
        tmp = tempfile.TemporaryDirectory()
        self.addCleanup(tmp.cleanup)
        write_guest(tmp.name, spec(shared=True))
        self.side = SecondarySide(tmp.name)
        self.overlays = []
        for n in (3, 4):
            path = os.path.join(tmp.name, f'ov-{n}.qcow2')
            open(path, 'wb').close()
            self.overlays.append((path, 'qcow2'))
        self.image = (shared_image.chain_filename(
            SharedDisk(driver='file', path='/v/g.raw')), 'raw')
        self.side.disk_layers = [self.image, *self.overlays]
        self.mon = FakeMonitor()
        self.guest = own_guest(spec(shared=True), mock.Mock(pid=1),
                               self.mon, '/r')
        self.guest.shared = {0: False}

    def jobs_end(self, error=None):
        execute = self.mon.execute

        async def watched(command, **args):
            result = await execute(command, **args)
            loop = asyncio.get_running_loop()
            if command == 'block-commit':
                loop.call_soon(self.mon.set_job, args['job-id'],
                               'concluded' if error else 'ready', error)
            if command == 'block-job-complete':
                loop.call_soon(self.mon.set_job, args['device'],
                               'concluded')
            return result
        self.mon.execute = watched

    async def test_the_overlays_are_merged_and_go(self):
        self.jobs_end()
        await self.side._merge_shared_down(self.guest)
        commit = self.mon.args('block-commit')[0]
        self.assertEqual(('disk0', 'disk0', 'disk0-l0'),
                         (commit['device'], commit['top-node'],
                          commit['base-node']))
        self.assertIn('block-job-complete', self.mon.names())
        self.assertEqual([self.image], self.side.disk_layers)
        self.assertEqual({0: True}, self.guest.shared)
        for path, _ in self.overlays:
            self.assertFalse(os.path.exists(path))

    async def test_a_failed_merge_leaves_the_guest_on_its_chain(self):
        self.jobs_end(error='EIO')
        await self.side._merge_shared_down(self.guest)
        self.assertEqual([self.image, *self.overlays],
                         self.side.disk_layers)
        self.assertEqual({0: False}, self.guest.shared)
        for path, _ in self.overlays:
            self.assertTrue(os.path.exists(path))

    async def test_a_guest_on_the_image_is_left_alone(self):
        self.guest.shared = {0: True}
        await self.side._merge_shared_down(self.guest)
        self.assertEqual([], self.mon.calls)
