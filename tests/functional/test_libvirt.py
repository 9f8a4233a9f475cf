"""The epoch engine on a libvirt domain (real libvirtd, real QEMU, TCG).

The primary is a libvirt domain; the engine drives it only through
:class:`LibvirtMonitor` (QMP passed through libvirt) and reads guest RAM
from the shared file libvirt gave the domain. After a few epochs the
domain's QEMU is killed and the last committed epoch is restored as a
second libvirt domain (the other "host"), which runs the guest on.

Needs the Debian packages libvirt-daemon-system (libvirtd, virtlogd) and
libvirt-dev + pkg-config (to build libvirt-python). libvirtd and
virtlogd are started here, as children of the test, unless a libvirtd
already answers on the system socket; no systemd is needed.
"""

import asyncio
import os
import shutil
import signal
import subprocess
import time

import fixtures
from testtools import content

from mftvm_openstack.ft import (
    epoch,
    libvirt_domain,
    libvirt_monitor,
    trackers,
    vm,
)
from mftvm_openstack.images import records, workload
from tests.functional import base

URI = 'qemu:///system'


def _libvirtd_answers():
    return subprocess.run(['virsh', '-c', URI, 'version'],
                          capture_output=True).returncode == 0


class LibvirtDaemons(fixtures.Fixture):
    """virtlogd + libvirtd started by hand (system sockets), if needed."""

    def _setUp(self):
        self.procs = []
        if _libvirtd_answers():
            return  # someone else's libvirtd: use it, leave it alone
        log_dir = self.useFixture(fixtures.TempDir()).path
        for daemon in ('virtlogd', 'libvirtd'):
            path = shutil.which(daemon) or f'/usr/sbin/{daemon}'
            log = open(os.path.join(log_dir, f'{daemon}.log'), 'ab')
            self.addCleanup(log.close)
            proc = subprocess.Popen([path], stdin=subprocess.DEVNULL,
                                    stdout=log, stderr=log,
                                    start_new_session=True)
            self.procs.append(proc)
            self.addCleanup(self._stop, proc)
        base.wait_for(_libvirtd_answers, 30, 0.2, 'libvirtd')

    @staticmethod
    def _stop(proc):
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _qemu_pid(name):
    with open(f'/run/libvirt/qemu/{name}.pid') as f:
        return int(f.read().strip())


class LibvirtEpochTest(base.GuestTestCase):

    def setUp(self):
        super().setUp()
        try:
            import libvirt  # noqa: F401
        except ImportError:
            self.skipTest('libvirt-python is not installed')
        if not shutil.which('libvirtd') and not os.path.exists(
                '/usr/sbin/libvirtd'):
            self.skipTest('libvirtd is not installed '
                          '(apt-get install libvirt-daemon-system)')
        self.useFixture(LibvirtDaemons())

    def test_checkpoints_through_libvirt_restore_into_libvirt(self):
        asyncio.run(self._run())

    async def _run(self):
        import libvirt

        conn = await libvirt_monitor.connect(URI)
        self.addCleanup(conn.close)
        name = f'mftvm-lv-{os.getpid()}'
        disk = self.make_disk()
        spec = vm.GuestSpec(
            name=name, kernel=self.image.kernel, initrd=self.image.initrd,
            disk=disk, append='console=ttyS0 quiet mftvm.run=writer '
            'mftvm.writer_interval_ms=5', disk_size=64 << 20)
        paths = vm.Paths(os.path.join(self.tmp, 'primary'))
        os.makedirs(paths.root)

        def destroy(dom):
            try:
                dom.destroy()
            except libvirt.libvirtError:
                pass  # already gone

        dom = await asyncio.to_thread(
            conn.createXML, libvirt_domain.domain_xml(spec, paths.serial), 0)
        self.addCleanup(destroy, dom)
        monitor = await libvirt_monitor.LibvirtMonitor.for_domain(
            conn, dom)
        self.addCleanup(asyncio.run, monitor.close())
        ram = await libvirt_domain.ram_file(monitor)
        self.assertTrue(os.path.exists(ram), ram)
        pid = _qemu_pid(name)
        tracker = trackers.ScanTracker(ram, spec.memory_bytes, pid)
        self.addCleanup(tracker.close)
        capturer = epoch.CheckpointCapturer(monitor, tracker, paths.root)
        await capturer.setup()
        replica_dir = os.path.join(self.tmp, 'replica')
        os.makedirs(replica_dir)
        replica_ram = vm.ram_path(f'lv-{os.getpid()}', 'test-replica')
        self.addCleanup(os.unlink, replica_ram)
        replica = epoch.ReplicaImage(replica_ram, spec.memory_bytes,
                                     replica_dir)
        self.addCleanup(replica.close)
        serial = base.SerialWatcher(paths.serial)
        self.addCleanup(serial.stop)
        await asyncio.to_thread(base.wait_for, lambda: len(serial.acks) > 3,
                                90, 0.05, 'the writer on the primary')

        # The last epoch's disk is copied while the guest is stopped (disk
        # replication has tests of its own).
        last = 12
        replica_disk = f'{disk}.replica'

        async def mark(n):
            if n == last:
                await asyncio.to_thread(shutil.copy, disk, replica_disk)

        pauses = []
        for n in range(1, last + 1):
            await asyncio.sleep(0.1)
            ckpt = await capturer.capture(n, mark)
            replica.apply(n, ckpt.devstate, ckpt.delta)
            pauses.append(ckpt.pause_s)
        self.assertEqual(last, replica.committed)
        self.addDetail('pauses_ms', content.text_content(
            ' '.join(f'{p * 1000:.0f}' for p in pauses)))
        # The guest runs on after the last checkpoint, then its host dies.
        acks_then = len(serial.acks)
        await asyncio.to_thread(base.wait_for,
                                lambda: len(serial.acks) > acks_then + 5,
                                30, 0.05, 'the primary running on')
        os.kill(pid, signal.SIGKILL)

        def gone():
            try:
                return not dom.isActive()
            except libvirt.libvirtError:
                return True  # a transient domain is undefined as it dies
        await asyncio.to_thread(base.wait_for, gone, 30, 0.1,
                                'libvirt to see its QEMU die')
        await monitor.close()
        serial.stop()

        # The other "host": a second domain from the replica.
        rpaths = vm.Paths(os.path.join(self.tmp, 'restored'))
        os.makedirs(rpaths.root)
        t0 = time.perf_counter()
        rdom, rmon = await libvirt_domain.restore(
            conn, spec, rpaths.serial, replica_ram, replica.devstate_path,
            [(replica_disk, 'raw')], name=f'{name}-b')
        restore_s = time.perf_counter() - t0
        self.addCleanup(destroy, rdom)
        self.addCleanup(asyncio.run, rmon.close())
        self.addDetail('restore_ms',
                       content.text_content(f'{restore_s * 1000:.0f}'))
        on_disk = records.verify_chain(records.read_records(replica_disk))
        watcher = base.SerialWatcher(rpaths.serial)
        self.addCleanup(watcher.stop)
        await asyncio.to_thread(
            base.wait_for, lambda: len(watcher.acks) >= 10, 60, 0.05,
            'ACKs from the restored guest')
        status = await rmon.execute('query-status')
        self.assertEqual('running', status['status'])
        state, _ = await asyncio.to_thread(rdom.state)
        self.assertEqual(libvirt.VIR_DOMAIN_RUNNING, state)
        await rmon.close()
        await asyncio.to_thread(destroy, rdom)
        watcher.stop()
        text = workload.read_text(rpaths.serial)
        # It ran on from exactly the checkpoint: no reboot, its next
        # record is the one after (or the one in flight at) the
        # checkpoint, and the chain it writes stays intact.
        self.assertNotIn('MFTVM-GUEST-READY', text)
        self.assertEqual([], workload.future_records(text))
        first = workload.serial_acks(text)[0][0]
        self.assertIn(first, (on_disk, on_disk + 1))
        records.verify_chain(records.read_records(replica_disk))
