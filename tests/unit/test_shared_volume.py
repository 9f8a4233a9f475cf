"""A disk on shared storage (doc/volumes.rst): the record, QEMU's
arguments, the store built on the image and the primary's buffer, with
a fake monitor (the real QEMU's: tests/functional/test_shared_volume)."""

import asyncio
import doctest
import os
import shutil
import tempfile

import testtools

from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.volume import SharedDisk
from mftvm_openstack.ft import disk, shared_image, vm, volume
from mftvm_openstack.ft.monitor import MonitorError
from tests.unit.test_disk import FakeMonitor, FakeStore, run

RBD = {'driver': 'rbd', 'pool': 'volumes', 'image': 'volume-1',
       'monitors': [{'host': '10.0.0.1', 'port': 6789}],
       'user': 'cinder', 'key_file': '/etc/mftvm/ceph.key'}


class SharedDiskTest(testtools.TestCase):

    def test_doctests(self):
        result = doctest.testmod(shared_image)
        self.assertEqual((0, 1), (result.failed, result.attempted))

    def test_rbd_reaches_blockdev_add_as_checked(self):
        shared = SharedDisk.from_dict(RBD)
        self.assertEqual('rbd:volumes/volume-1', shared.label)
        self.assertEqual({
            'driver': 'raw', 'node-name': 'base',
            'file': {'driver': 'rbd', 'node-name': 'base-file',
                     'pool': 'volumes', 'image': 'volume-1',
                     'server': [{'host': '10.0.0.1', 'port': '6789'}],
                     'cache': {'direct': True}, 'user': 'cinder',
                     'auth-client-required': ['cephx'],
                     'key-secret': 'k0'}},
            shared_image.base_blockdev(shared, 'base', 'k0'))
        self.assertEqual({'qom-type': 'secret', 'id': 'k0',
                          'file': '/etc/mftvm/ceph.key',
                          'format': 'base64'},
                         shared_image.secret_object(shared, 'k0'))

    def test_hostile_values_are_refused(self):
        for key, value in (('pool', 'a,b'), ('image', 'x:conf=/etc/p'),
                           ('image', 'a/b'), ('user', 'admin,x'),
                           ('key_file', 'relative'), ('driver', 'iscsi'),
                           ('monitors', [{'host': 'a b', 'port': 1}]),
                           ('monitors', [{'host': '10.0.0.1',
                                          'port': 70000}]),
                           ('monitors', [{'host': '10.0.0.1'}] * 17)):
            self.assertRaises(ContractError, SharedDisk.from_dict,
                              dict(RBD, **{key: value}))

    def test_incomplete_descriptions_are_refused(self):
        self.assertRaises(ContractError, SharedDisk.from_dict,
                          dict(RBD, monitors=[]))
        self.assertRaises(ContractError, SharedDisk.from_dict,
                          dict(RBD, key_file=''))
        self.assertRaises(ContractError, SharedDisk.from_dict,
                          {'driver': 'file'})

    def test_without_cephx_no_secret(self):
        shared = SharedDisk.from_dict(dict(RBD, user='', key_file=''))
        self.assertIsNone(shared_image.secret_object(shared, 'k0'))
        self.assertNotIn('user', shared_image.protocol_blockdev(shared, 'n'))

    def test_a_chain_on_the_image_opens_it_in_qemu(self):
        shared = SharedDisk(driver='file', path='/v/volume.raw')
        base = shared_image.chain_filename(shared)
        self.assertTrue(shared_image.is_chain_filename(base))
        args = vm.disk_blockdevs('disk0', [(base, 'raw'),
                                           ('/r/ov-3.qcow2', 'qcow2')])
        self.assertIn('"filename": "/v/volume.raw"', args[1])
        self.assertIn('"node-name": "disk0-l0-file"', args[1])
        self.assertIn('"locking": "off"', args[1])


class SharedStoreTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.mon = FakeMonitor()
        self.shared = SharedDisk.from_dict(RBD)

    async def attached(self):
        store = FakeStore(self.tmp, 1 << 20, pool_size=2,
                          shared=self.shared)
        await store.attach(self.mon)
        return store

    def test_the_image_is_buffered_before_the_export_takes_a_write(self):
        async def scenario():
            store = await self.attached()
            await store.stop()
            return store
        store = run(scenario())
        names = self.mon.names()
        self.assertEqual('secret', self.mon.args('object-add')[0]['qom-type'])
        base = self.mon.args('blockdev-add')[0]
        self.assertEqual(('base', 'rbd', 'base-key'),
                         (base['node-name'], base['file']['driver'],
                          base['file']['key-secret']))
        snapshot = names.index('blockdev-snapshot')
        self.assertLess(snapshot, names.index('block-export-add'))
        self.assertEqual('base',
                         self.mon.args('blockdev-snapshot')[0]['node'])
        self.assertEqual([0, 0], [la.first_epoch
                                  for la in store.chain.layers])

    def test_a_mark_before_the_first_lets_nothing_be_merged(self):
        async def scenario():
            store = await self.attached()
            await store.mark(1)
            await store.commit(0)     # epoch 1 not committed
            merges = self.mon.args('block-commit')
            await store.stop()
            return merges
        self.assertEqual([], run(scenario()))

    def test_committed_first_layer_is_merged_into_the_image(self):
        async def scenario():
            store = await self.attached()
            store.merge_at = 1
            await store.mark(1)
            await store.commit(1)
            await asyncio.sleep(0)
            merges = self.mon.args('block-commit')
            await store.stop()
            return merges
        merges = run(scenario())
        self.assertEqual(1, len(merges))
        self.assertEqual('base', merges[0]['base-node'])


class VolumeBufferTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.mon = FakeMonitor()
        self.created = []

        async def create(path, size):
            self.created.append((path, size))
            open(path, 'wb').close()
        self.patch(disk, 'create_qcow2', create)

    def buffer(self):
        return volume.VolumeBuffer(self.mon, 'libvirt-2-format',
                                   os.path.join(self.tmp, 'vb'), 1 << 30)

    def test_insulate_puts_the_buffer_over_the_image(self):
        buf = self.buffer()
        self.assertEqual('vbuf', run(buf.insulate()))
        self.assertEqual(['blockdev-add', 'blockdev-snapshot'],
                         self.mon.names())
        self.assertEqual({'node': 'libvirt-2-format', 'overlay': 'vbuf'},
                         self.mon.args('blockdev-snapshot')[0])
        self.assertEqual([(buf.path, 1 << 30)], self.created)
        run(buf.insulate())                       # once only
        self.assertEqual(2, len(self.mon.calls))

    def test_a_refused_snapshot_leaves_no_buffer(self):
        self.mon.fail['blockdev-snapshot'] = 'no'
        buf = self.buffer()
        self.assertRaises(MonitorError, run, buf.insulate())
        self.assertFalse(buf.insulated)
        self.assertFalse(os.path.exists(buf.path))
        self.assertEqual([{'node-name': 'vbuf'}],
                         self.mon.args('blockdev-del'))

    def test_release_commits_the_buffer_and_pivots(self):
        buf = self.buffer()
        run(buf.insulate())

        async def scenario():
            def progress(command, job):
                if command == 'block-commit':
                    asyncio.get_running_loop().call_soon(
                        self.mon.set_job, job, 'ready')
                if command == 'block-job-complete':
                    asyncio.get_running_loop().call_soon(
                        self.mon.set_job, job, 'concluded')
            execute = self.mon.execute

            async def watched(command, **args):
                result = await execute(command, **args)
                progress(command, args.get('job-id', args.get('device')))
                return result
            self.mon.execute = watched
            await buf.release()
        run(scenario())
        commit = self.mon.args('block-commit')[0]
        self.assertEqual(('vbuf', 'libvirt-2-format'),
                         (commit['top-node'], commit['base-node']))
        self.assertIn('block-job-complete', self.mon.names())
        self.assertEqual({'node-name': 'vbuf'},
                         self.mon.args('blockdev-del')[-1])
        self.assertFalse(os.path.exists(buf.path))
        self.assertFalse(buf.insulated)

    def test_a_failed_merge_keeps_the_buffer(self):
        buf = self.buffer()
        run(buf.insulate())

        async def scenario():
            execute = self.mon.execute

            async def failing(command, **args):
                result = await execute(command, **args)
                if command == 'block-commit':
                    asyncio.get_running_loop().call_soon(
                        self.mon.set_job, args['job-id'], 'concluded',
                        'EIO')
                return result
            self.mon.execute = failing
            with testtools.ExpectedException(disk.DiskError):
                await buf.release()
        run(scenario())
        self.assertTrue(buf.insulated)
        self.assertTrue(os.path.exists(buf.path))
        self.assertNotIn('block-job-complete', self.mon.names())
