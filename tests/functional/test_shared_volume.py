"""A disk on shared storage (doc/volumes.rst, design (a)) with real QEMU.

An image file both "hosts" open stands in for the RBD image (the same
QEMU graph as rbd: a raw node on a protocol node): the guest's QEMU
buffers its writes over it (:class:`~mftvm_openstack.ft.volume.
VolumeBuffer`), the buffer is mirrored to an epoch store whose base is
the image itself, and the image must only ever hold committed epochs.
"""

import asyncio
import json
import os
import subprocess
import tempfile

from mftvm_openstack.contract.volume import SharedDisk
from mftvm_openstack.ft import disk, shared_image, vm, volume
from mftvm_openstack.ft.monitor import QMPMonitor
from tests.functional.test_disk import CHUNK, DiskTestCase, expect

MiB = 1 << 20
SIZE = 16 * MiB


def read_layers(layers, shared=None, key=None):
    """The guest-visible bytes of a chain whose base may be a shared
    image's ``json:`` filename (``key``: its cephx key's file)."""
    spec = None
    objects = []
    for filename, fmt in layers:
        if shared_image.is_chain_filename(filename):
            protocol = json.loads(filename[5:])
            protocol.pop('node-name')
            if shared is not None and shared.user:
                objects = ['--object', f'secret,id=k0,file={key},'
                                       f'format=base64']
                protocol['key-secret'] = 'k0'
        else:
            protocol = {'driver': 'file', 'filename': filename}
        node = {'driver': fmt, 'file': protocol}
        if fmt == 'qcow2':
            node['backing'] = spec
        spec = node
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'flat.raw')
        subprocess.run(['qemu-img', 'convert', '-U', *objects, '-O', 'raw',
                        'json:' + json.dumps(spec), out], check=True)
        with open(out, 'rb') as f:
            return f.read()


class SharedGuest:
    """A paused QEMU whose disk ``disk0`` is the shared image, opened as
    the store opens it (shared_image: no QEMU file lock on a file; an
    rbd image with its own client)."""

    def __init__(self, workdir, shared):
        self.workdir = workdir
        self.shared = shared
        self.proc = self.monitor = None

    async def start(self):
        qmp = os.path.join(self.workdir, 'qemu.sock')
        key = shared_image.secret_object(self.shared, 'k0')
        secret = []
        if key is not None:
            secret = ['-object', f'secret,id=k0,file={key["file"]},'
                                 f'format=base64']
        argv = [vm.QEMU_BINARY, '-accel', 'tcg', '-machine', 'pc',
                '-nodefaults', '-S', '-display', 'none', *secret,
                '-blockdev', json.dumps(shared_image.base_blockdev(
                    self.shared, 'disk0', 'k0' if key else None)),
                '-device', 'virtio-blk-pci,drive=disk0,id=vd0',
                '-qmp', f'unix:{qmp},server=on,wait=off']
        self.proc = await vm.ChildProcess.start(
            argv, os.path.join(self.workdir, 'qemu.log'))
        self.monitor = await QMPMonitor.connect(qmp)

    async def write(self, pattern, offset, length=CHUNK):
        out = await self.monitor.execute('human-monitor-command', **{
            'command-line': f'qemu-io -d /machine/peripheral/vd0/'
                            f'virtio-backend "write -P {pattern:#x} '
                            f'{offset} {length}"'})
        assert 'error' not in out.lower(), out

    async def close(self):
        if self.monitor is not None:
            await self.monitor.close()
        if self.proc is not None:
            await self.proc.kill()


class SharedVolumeTest(DiskTestCase):

    SYNC = disk.AsyncReplication

    #: the image's size
    SIZE = SIZE

    def setUp(self):
        super().setUp()
        self.shared = self.make_shared()

    def make_shared(self):
        """The shared image, 0x11 in its first chunk, zeros after."""
        self.vol = os.path.join(self.tmp, 'volume.raw')
        with open(self.vol, 'wb') as f:
            f.truncate(self.SIZE)
            f.write(b'\x11' * CHUNK)        # the volume's data before
        return SharedDisk(driver='file', path=self.vol)

    def image(self):
        """The shared image's bytes (up to 8 MiB) as its storage has them."""
        with open(self.vol, 'rb') as f:
            return f.read(8 * MiB)

    def read_layers(self, layers):
        return read_layers(layers)[:8 * MiB]

    async def _protected(self, guest, store):
        await guest.start()
        target = await store.start()
        buffer = volume.VolumeBuffer(guest.monitor, 'disk0',
                                     os.path.join(self.tmp, 'buf'), self.SIZE)
        sync = self.SYNC(guest.monitor, await buffer.insulate())
        sync.initial_sync = 'top'
        await sync.start(target)
        return buffer, sync

    async def _merged(self, store, count):
        for _ in range(200):
            if store.stats()['merges'] >= count and \
                    not store.stats()['merging']:
                return
            await asyncio.sleep(0.05)
        self.fail(f'no merge: {store.stats()}')

    async def _failover(self):
        guest = SharedGuest(self.tmp, self.shared)
        store = disk.EpochOverlayStore(self.store_dir, self.SIZE,
                                       shared=self.shared, merge_at=1)
        seen = {}
        try:
            buffer, sync = await self._protected(guest, store)
            await guest.write(0xa1, 1 * MiB)             # epoch 1
            await sync.checkpoint(1)
            await store.mark(1)
            seen['epoch 1 marked'] = self.image()
            await guest.write(0xa2, 2 * MiB)             # epoch 2
            await sync.checkpoint(2)
            await store.mark(2)
            await store.commit(1)
            await self._merged(store, 1)
            seen['epoch 1 committed'] = self.image()
            await guest.write(0xa3, 0)                   # epoch 3
            await sync.checkpoint(3)
            await store.commit(2)                        # 3 never is
            layers = await store.failover_layers(2)
            seen['failed over'] = self.image()
            seen['chain'] = self.read_layers(layers)
            seen['buffer'] = buffer.path
            await sync.stop()
            await buffer.discard()
        finally:
            await store.stop()
            await guest.close()
        return layers, seen

    def test_the_image_holds_committed_epochs_only(self):
        layers, seen = self.run_async(self._failover())
        before = seen['epoch 1 marked']
        # the primary's write never reached the image from the primary
        self.assertTrue(expect(before, 0, 0x11))
        self.assertTrue(expect(before, 1 * MiB, 0))
        # committed epoch 1 merged into it; epoch 2 not yet committed
        merged = seen['epoch 1 committed']
        self.assertTrue(expect(merged, 1 * MiB, 0xa1))
        self.assertTrue(expect(merged, 2 * MiB, 0))
        # never anything of epoch 3, which did not commit
        self.assertTrue(expect(seen['failed over'], 0, 0x11))
        # the failover's chain: the image under the committed overlays
        self.assertTrue(shared_image.is_chain_filename(layers[0][0]))
        chain = seen['chain']
        self.assertTrue(expect(chain, 0, 0x11))
        self.assertTrue(expect(chain, 1 * MiB, 0xa1))
        self.assertTrue(expect(chain, 2 * MiB, 0xa2))
        # the buffer file does not outlive the guest
        self.assertFalse(os.path.exists(seen['buffer']))

    async def _secondary_lost(self):
        guest = SharedGuest(self.tmp, self.shared)
        store = disk.EpochOverlayStore(self.store_dir, self.SIZE,
                                       shared=self.shared, merge_at=1)
        try:
            buffer, sync = await self._protected(guest, store)
            for epoch in range(1, 5):
                await guest.write(0xa0 + epoch, epoch * MiB)
                await sync.checkpoint(epoch)
                await store.mark(epoch)
                await store.commit(epoch - 1)
            await guest.write(0xb5, 5 * MiB)     # epoch 5, never marked
            await store.stop()                   # the secondary is gone
            await sync.stop()
            lost = self.image()
            await buffer.release()
            released = self.image()
            await guest.write(0xc6, 6 * MiB)     # unprotected, directly
            after = self.image()
            nodes = await guest.monitor.execute('query-named-block-nodes')
        finally:
            await store.stop()
            await guest.close()
        return buffer, lost, released, after, nodes

    def test_a_lost_secondary_leaves_the_guest_writing_the_image(self):
        buffer, lost, released, after, nodes = \
            self.run_async(self._secondary_lost())
        self.assertFalse(expect(lost, 5 * MiB, 0xb5))
        for epoch in range(1, 5):
            self.assertTrue(expect(released, epoch * MiB, 0xa0 + epoch))
        self.assertTrue(expect(released, 5 * MiB, 0xb5))
        self.assertTrue(expect(released, 0, 0x11))
        self.assertTrue(expect(after, 6 * MiB, 0xc6))
        self.assertFalse(os.path.exists(buffer.path))
        self.assertNotIn('vbuf', [n.get('node-name') for n in nodes])
        self.assertEqual([], [p for p in os.listdir(self.store_dir)
                              if p.endswith('.qcow2')])


class SharedVolumeWriteReplicationTest(SharedVolumeTest):
    SYNC = disk.WriteReplication
