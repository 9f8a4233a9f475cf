"""The epoch engine on real QEMU: checkpoints advance, and any committed
checkpoint restores into a guest that runs on from exactly there."""

import asyncio
import os
import random
import shutil

from mftvm_openstack.ft import epoch, trackers, vm
from mftvm_openstack.ft.monitor import QMPMonitor
from mftvm_openstack.images import records, workload
from tests.functional import base


class EpochRestoreTest(base.GuestTestCase):

    def test_committed_epochs_restore_into_running_guests(self):
        asyncio.run(self._run())

    async def _run(self):
        disk = self.make_disk()
        spec = vm.GuestSpec(
            name='ep', kernel=self.image.kernel, initrd=self.image.initrd,
            disk=disk, append='console=ttyS0 quiet mftvm.run=writer '
            'mftvm.writer_interval_ms=5', disk_size=64 << 20)
        paths = vm.Paths(os.path.join(self.tmp, 'primary'))
        os.makedirs(paths.root)
        ram = vm.ram_path(f'ep-{os.getpid()}', 'test-primary')
        self.addCleanup(os.unlink, ram)
        with open(ram, 'wb') as f:
            f.truncate(spec.memory_bytes)
        proc = await vm.ChildProcess.start(vm.qemu_argv(spec, paths, ram),
                                           paths.log)
        monitor = await QMPMonitor.connect(paths.qmp)
        tracker = trackers.ScanTracker(ram, spec.memory_bytes, proc.pid)
        capturer = epoch.CheckpointCapturer(monitor, tracker, paths.root)
        await capturer.setup()
        replica_dir = os.path.join(self.tmp, 'replica')
        os.makedirs(replica_dir)
        replica_ram = vm.ram_path(f'ep-{os.getpid()}', 'test-replica')
        self.addCleanup(os.unlink, replica_ram)
        replica = epoch.ReplicaImage(replica_ram, spec.memory_bytes,
                                     replica_dir)
        serial = base.SerialWatcher(paths.serial)
        self.addCleanup(serial.stop)
        base.wait_for(lambda: len(serial.acks) > 3, 60, what='writer')

        # The disk of checkpoint N is copied while the guest is stopped
        # (this test is about RAM and device state; disk replication has
        # tests of its own).
        saved = {}
        picks = set(random.sample(range(3, 25), 3))

        async def mark(n):
            if n in picks:
                shutil.copy(disk, f'{disk}.{n}')

        pauses = []
        for n in range(1, 26):
            await asyncio.sleep(0.1)
            ckpt = await capturer.capture(n, mark)
            replica.apply(n, ckpt.devstate, ckpt.delta)
            pauses.append(ckpt.pause_s)
            if n in picks:
                # Keep RAM image + device state of this committed epoch.
                shutil.copy(replica_ram, f'{replica_ram}.{n}')
                shutil.copy(replica.devstate_path, f'{disk}.{n}.dev')
                saved[n] = True
                self.addCleanup(os.unlink, f'{replica_ram}.{n}')
        self.assertEqual(25, replica.committed)
        await proc.kill()
        await monitor.close()
        serial.stop()
        tracker.close()
        replica.close()

        for n in sorted(saved):
            rpaths = vm.Paths(os.path.join(self.tmp, f'restore{n}'))
            os.makedirs(rpaths.root)
            rproc, rmon = await epoch.restore(
                spec, rpaths, f'{replica_ram}.{n}', f'{disk}.{n}.dev',
                [(f'{disk}.{n}', 'raw')])
            try:
                on_disk = records.verify_chain(records.read_records(
                    f'{disk}.{n}'))
                watcher = base.SerialWatcher(rpaths.serial)
                self.addCleanup(watcher.stop)
                await asyncio.to_thread(
                    base.wait_for, lambda: len(watcher.acks) >= 10, 60,
                    0.05, f'ACKs from the guest restored at epoch {n}')
                status = await rmon.execute('query-status')
                self.assertEqual('running', status['status'])
            finally:
                await rmon.close()
                await rproc.kill()
            watcher.stop()
            base.assert_ran_on_from_checkpoint(
                self, workload.read_text(rpaths.serial), on_disk,
                f'{disk}.{n}')
