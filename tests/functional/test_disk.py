"""Disk replication against real qemu-storage-daemon and QEMU processes."""

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time

import testtools
from testtools import content

from mftvm_openstack.ft import disk, vm
from mftvm_openstack.ft.monitor import QMPMonitor

MiB = 1 << 20
SIZE = 16 * MiB
CHUNK = 64 * 1024


def chain_spec(layers):
    """A json: filename opening (filename, fmt) layers, base first."""
    spec = None
    for filename, fmt in layers:
        node = {'driver': fmt,
                'file': {'driver': 'file', 'filename': filename}}
        if fmt == 'qcow2':
            node['backing'] = spec
        spec = node
    return 'json:' + json.dumps(spec)


def read_chain(layers):
    """The guest-visible bytes of a layer chain, as the restored QEMU
    would see them (the qcow2 headers' backing names are not used)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, 'flat.raw')
        subprocess.run(['qemu-img', 'convert', '-O', 'raw',
                        chain_spec(layers), out], check=True)
        with open(out, 'rb') as f:
            return f.read()


async def nbd_write(target, pattern, offset, length=CHUNK):
    proc = await asyncio.create_subprocess_exec(
        'qemu-io', '-f', 'raw', target.uri(),
        '-c', f'write -P {pattern:#x} {offset} {length}',
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0 and b'wrote' in out, out


class Guest:
    """A paused QEMU (-S) with ``disk0`` behind virtio-blk ``vd0``."""

    def __init__(self, workdir, disk_path):
        self.workdir = workdir
        self.disk_path = disk_path
        self.proc = None
        self.monitor = None

    async def start(self):
        qmp = os.path.join(self.workdir, 'qemu.sock')
        argv = [vm.QEMU_BINARY, '-accel', 'tcg', '-machine', 'pc',
                '-nodefaults', '-S', '-display', 'none',
                *vm.disk_blockdevs('disk0', [(self.disk_path, 'raw')]),
                '-device', 'virtio-blk-pci,drive=disk0,id=vd0',
                '-qmp', f'unix:{qmp},server=on,wait=off']
        self.proc = await vm.ChildProcess.start(
            argv, os.path.join(self.workdir, 'qemu.log'))
        self.monitor = await QMPMonitor.connect(qmp)

    async def write(self, pattern, offset, length=CHUNK):
        """Write through the device (the node name would bypass the
        mirror); return how long the write took, in seconds."""
        t0 = time.perf_counter()
        out = await self.monitor.execute('human-monitor-command', **{
            'command-line': f'qemu-io -d /machine/peripheral/vd0/'
                            f'virtio-backend "write -P {pattern:#x} '
                            f'{offset} {length}"'})
        assert 'error' not in out.lower(), out
        return time.perf_counter() - t0

    async def close(self):
        if self.monitor is not None:
            await self.monitor.close()
        if self.proc is not None:
            await self.proc.kill()


def expect(data, offset, pattern, length=CHUNK):
    return data[offset:offset + length] == bytes([pattern]) * length


class DiskTestCase(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp(prefix='mftvm-disk-')
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.store_dir = os.path.join(self.tmp, 'store')

    def run_async(self, coro, timeout=30):
        return asyncio.run(asyncio.wait_for(coro, timeout))


class TestEpochOverlayStore(DiskTestCase):

    async def _abc_scenario(self, failover_epoch):
        store = disk.EpochOverlayStore(self.store_dir, SIZE)
        target = await store.start()
        try:
            self.assertEqual('disk0', target.export)
            await nbd_write(target, 0xaa, 0)             # epoch 1
            await store.mark(1)
            await nbd_write(target, 0xbb, 1 * MiB)       # epoch 2
            await store.commit(1)
            await store.mark(2)
            await nbd_write(target, 0xcc, 2 * MiB)       # epoch 3
            await nbd_write(target, 0xdd, 0)             # epoch 3
            layers = await store.failover_layers(failover_epoch)
        finally:
            await store.stop()
        for path, _ in layers:
            self.assertTrue(os.path.exists(path), path)
        self.assertEqual([], [p for p in os.listdir(self.store_dir)
                              if p.endswith('.qcow2')
                              and os.path.join(self.store_dir, p)
                              not in dict(layers)])
        return layers, read_chain(layers)

    def test_failover_keeps_marked_epochs(self):
        layers, data = self.run_async(self._abc_scenario(2))
        self.assertEqual(2, len(layers))         # base, ov2 (ov3 dropped)
        self.assertEqual(('raw', 'qcow2'), (layers[0][1], layers[1][1]))
        self.assertTrue(expect(data, 0, 0xaa))
        self.assertTrue(expect(data, 1 * MiB, 0xbb))
        self.assertTrue(expect(data, 2 * MiB, 0))

    def test_failover_to_first_epoch(self):
        layers, data = self.run_async(self._abc_scenario(1))
        self.assertEqual(1, len(layers))
        self.assertTrue(expect(data, 0, 0xaa))
        self.assertTrue(expect(data, 1 * MiB, 0))
        self.assertTrue(expect(data, 2 * MiB, 0))

    async def _merging(self):
        store = disk.EpochOverlayStore(self.store_dir, SIZE)
        target = await store.start()
        marks = []
        try:
            for epoch in range(1, 16):
                # Each epoch writes its own chunk and overwrites a shared one.
                await nbd_write(target, epoch, epoch * CHUNK)
                await nbd_write(target, epoch, 8 * MiB)
                await store.mark(epoch)
                marks.append(store.stats()['last_mark_ms'])
                await store.commit(epoch - 1)     # acks lag one epoch
                await asyncio.sleep(0.03)
            stats = store.stats()
            layers = await store.failover_layers(13)
        finally:
            await store.stop()
        return stats, marks, layers, read_chain(layers)

    def test_merges_keep_exactly_committed_data(self):
        stats, marks, layers, data = self.run_async(self._merging())
        self.assertGreater(stats['merges'], 0)
        self.assertEqual(0, stats['merge_errors'])
        self.assertLessEqual(stats['chain_length'], 6)
        self.addDetail('mark_ms', content.text_content(
            ' '.join(f'{m:.1f}' for m in marks)))
        self.assertLess(sorted(marks)[len(marks) // 2], 50)
        for epoch in range(1, 16):
            self.assertTrue(expect(data, epoch * CHUNK,
                                   epoch if epoch <= 13 else 0), epoch)
        self.assertTrue(expect(data, 8 * MiB, 13))
        self.assertLessEqual(len(layers), 4)

    def test_replica_files_are_private_and_removed_on_stop(self):
        # Whatever the umask: the replica is a copy of a tenant's disk.
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)

        def mode(path):
            return os.stat(path).st_mode & 0o777

        async def scenario():
            store = disk.EpochOverlayStore(self.store_dir, SIZE)
            target = await store.start()
            try:
                await nbd_write(target, 0xaa, 0)
                await store.mark(1)
                await nbd_write(target, 0xbb, 0)
                images = [os.path.join(self.store_dir, p)
                          for p in os.listdir(self.store_dir)
                          if p.endswith(('.raw', '.qcow2'))]
            finally:
                await store.stop()
            return images
        images = self.run_async(scenario())
        self.assertEqual(0o700, mode(self.store_dir))
        self.assertIn(os.path.join(self.store_dir, 'base.raw'), images)
        self.assertIn(os.path.join(self.store_dir, 'ov-2.qcow2'), images)
        self.assertEqual([], [p for p in os.listdir(self.store_dir)
                              if p.endswith(('.raw', '.qcow2'))])

    def test_replica_files_are_created_0600(self):
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)

        async def scenario():
            store = disk.EpochOverlayStore(self.store_dir, SIZE)
            await store.start()
            try:
                await store.mark(1)
                return {p: os.stat(os.path.join(self.store_dir, p)).st_mode
                        & 0o777 for p in os.listdir(self.store_dir)
                        if p.endswith(('.raw', '.qcow2'))}
            finally:
                await store.stop()
        modes = self.run_async(scenario())
        self.assertIn('base.raw', modes)
        self.assertIn('ov-2.qcow2', modes)
        self.assertEqual({p: 0o600 for p in modes}, modes)

    def test_failover_refuses_unmarked_epoch(self):
        async def scenario():
            store = disk.EpochOverlayStore(self.store_dir, SIZE)
            await store.start()
            try:
                await store.mark(1)
                with testtools.ExpectedException(disk.DiskError):
                    await store.failover_layers(2)
            finally:
                await store.stop()
        self.run_async(scenario())


class TestWriteReplication(DiskTestCase):

    SYNC = disk.WriteReplication

    def make_guest(self):
        src = os.path.join(self.tmp, 'src.raw')
        with open(src, 'wb') as f:
            f.truncate(SIZE)
            f.write(b'\x11' * CHUNK)        # there before the initial sync
        return Guest(self.tmp, src)

    async def _replicate(self):
        guest = self.make_guest()
        store = disk.EpochOverlayStore(self.store_dir, SIZE)
        await guest.start()
        sync = self.SYNC(guest.monitor)
        try:
            target = await store.start()
            await sync.start(target)
            await guest.write(0x5c, 1 * MiB)          # epoch 1
            await sync.checkpoint(1)
            await store.mark(1)
            await guest.write(0x77, 2 * MiB)          # epoch 2
            await store.commit(1)
            layers = await store.failover_layers(1)
            # The export is gone: the next write breaks the mirror.
            await guest.write(0x99, 3 * MiB)
            await asyncio.wait_for(sync.failed.wait(), 5)
            with testtools.ExpectedException(disk.DiskError):
                await sync.checkpoint(2)
            await sync.stop()
            await guest.monitor.execute('query-status')
        finally:
            await sync.stop()
            await store.stop()
            await guest.close()
        with open(guest.disk_path, 'rb') as f:
            source = f.read()
        return source, read_chain(layers), sync.failure

    def test_replica_matches_source_at_mark(self):
        source, replica, failure = self.run_async(self._replicate())
        self.assertIsNotNone(failure)
        self.assertTrue(expect(source, 2 * MiB, 0x77))
        self.assertTrue(expect(replica, 0, 0x11))
        self.assertTrue(expect(replica, 1 * MiB, 0x5c))
        self.assertTrue(expect(replica, 2 * MiB, 0))
        self.assertEqual(source[:2 * MiB], replica[:2 * MiB])
        self.assertEqual(source[2 * MiB + CHUNK:3 * MiB],
                         replica[2 * MiB + CHUNK:3 * MiB])

    async def _peer_killed(self):
        guest = self.make_guest()
        store = disk.EpochOverlayStore(self.store_dir, SIZE)
        await guest.start()
        sync = self.SYNC(guest.monitor)
        try:
            await sync.start(await store.start())
            before = [await guest.write(0x21, i * CHUNK) for i in range(5)]
            store.process.proc.kill()                # the peer dies
            after = [await guest.write(0x22, i * CHUNK) for i in range(5)]
            await asyncio.wait_for(sync.failed.wait(), 5)
            t0 = time.perf_counter()
            await sync.stop()
            stop_s = time.perf_counter() - t0
            late = await guest.write(0x23, 4 * MiB)
            status = await guest.monitor.execute('query-status')
            jobs = await guest.monitor.execute('query-jobs')
        finally:
            await sync.stop()
            await store.stop()
            await guest.close()
        with open(guest.disk_path, 'rb') as f:
            source = f.read()
        return before, after, stop_s, late, status, jobs, source

    def test_dead_peer_does_not_stall_guest(self):
        before, after, stop_s, late, status, jobs, source = \
            self.run_async(self._peer_killed())
        self.addDetail('write_ms', content.text_content(
            f'before {[round(s * 1000, 1) for s in before]} '
            f'after {[round(s * 1000, 1) for s in after]} '
            f'stop {stop_s * 1000:.1f} late {late * 1000:.1f}'))
        self.assertLess(max(after), 2.0)
        self.assertLess(stop_s, 5.0)
        self.assertEqual([], jobs)
        self.assertIn(status['status'], ('prelaunch', 'paused'))
        self.assertTrue(expect(source, 0, 0x22))
        self.assertTrue(expect(source, 4 * MiB, 0x23))


class TestAsyncReplication(TestWriteReplication):
    """The same, with the background mirror drained at each checkpoint:
    the replica holds exactly the epochs marked, and a dead peer costs
    the guest nothing."""

    SYNC = disk.AsyncReplication


class TestBlockCopy(DiskTestCase):

    async def _copy(self):
        src = os.path.join(self.tmp, 'src.raw')
        with open(src, 'wb') as f:
            f.truncate(SIZE)
            f.write(b'\x11' * CHUNK)
        guest = Guest(self.tmp, src)
        store = disk.EpochOverlayStore(self.store_dir, SIZE)
        await guest.start()
        sync = disk.BlockCopy(guest.monitor)
        try:
            await sync.start(await store.start())
            await guest.write(0x5c, 1 * MiB)          # epoch 1
            await sync.checkpoint(1)
            await store.mark(1)
            await guest.write(0x77, 2 * MiB)          # epoch 2
            await sync.checkpoint(2)
            await store.mark(2)
            await guest.write(0x88, 3 * MiB)          # epoch 3, not copied
            await store.commit(1)
            stats = sync.stats()
            await sync.stop()
            layers = await store.failover_layers(2)
        finally:
            await sync.stop()
            await store.stop()
            await guest.close()
        return stats, read_chain(layers)

    def test_incremental_copies_per_epoch(self):
        stats, replica = self.run_async(self._copy())
        self.assertEqual(2, stats['copies'])
        self.assertTrue(expect(replica, 0, 0x11))
        self.assertTrue(expect(replica, 1 * MiB, 0x5c))
        self.assertTrue(expect(replica, 2 * MiB, 0x77))
        self.assertTrue(expect(replica, 3 * MiB, 0))
