"""Full disks and tmpfs with a real guest (issue 11, item 7).

Each test mounts a small tmpfs of its own (``tests.tmpfs``, root only)
where a side keeps its guest RAM (``$MFTVM_RAM_DIR``) or the secondary
keeps its disk replica, and fills it on purpose: a guest that does not fit
is refused in one line; a tmpfs that fills up under a protected guest
never kills or pauses the guest, and costs at most its protection.
"""

import os
import subprocess
import sys
import time

import fixtures

from mftvm_openstack.contract.states import State
from mftvm_openstack.ft import capacity, vm
from mftvm_openstack.images import records, workload
from mftvm_openstack.local import operations
from tests.functional import base
from tests.tmpfs import SmallTmpfs

MiB = 1 << 20


class AdmissionTest(base.GuestTestCase):
    """A guest that does not fit is refused before anything starts."""

    def mftvm_protect(self, name, memory_mib, env):
        disk = self.make_disk()
        # (Started after all, it is stopped: the test failed anyway.)
        self.addCleanup(self._stop_guest, name)
        return subprocess.run(
            [sys.executable, '-m', 'mftvm_openstack.cmd.mftvm',
             '--state-dir', self.state_dir, 'protect', name,
             '--kernel', self.image.kernel, '--initrd', self.image.initrd,
             '--disk', disk, '--disk-dir', self.tmp,
             '--memory', str(memory_mib)],
            capture_output=True, text=True, timeout=120,
            env=dict(os.environ, **env))

    def assertRefused(self, result, name, *words):
        # (Without the check this guest was started: the CLI said it was
        # protected, and its RAM files were sparse promises.)
        self.assertEqual(1, result.returncode, result.stdout)
        self.assertNotIn('Traceback', result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(1, len(lines), result.stderr)
        for word in words:
            self.assertIn(word, lines[0])
        self.assertEqual([], base.qemu_pids_for(name))
        left = subprocess.run(['pgrep', '-f', self.state_dir],
                              capture_output=True, text=True).stdout
        self.assertEqual('', left.strip())

    def test_guest_ram_that_does_not_fit_is_refused(self):
        shm = self.useFixture(SmallTmpfs(200 * MiB))
        result = self.mftvm_protect('big', 128,
                                    {vm.RAM_DIR_ENV: shm.path})
        self.assertRefused(
            result, 'big', f'not enough space in {shm.path} for guest big '
            f'RAM (both sides): needs 256.0 MiB, 200.0 MiB available',
            'mftvm: error: ', 'enlarge it')
        self.assertEqual([], os.listdir(shm.path))

    def test_a_disk_replica_that_does_not_fit_is_refused(self):
        # The state dir holds the secondary's replica of the 64 MiB disk.
        self.useFixture(SmallTmpfs(96 * MiB, self.state_dir))
        result = self.mftvm_protect('thin', 64, {})
        self.assertRefused(
            result, 'thin', 'guest thin disk replica: needs 128.0 MiB, '
            '96.0 MiB available')


class FillingUpTest(base.GuestTestCase):
    """A tmpfs that fills up while the guest is protected."""

    def test_ram_tmpfs_filling_up_harms_neither_side(self):
        # Both RAM files were sparse: a page first written after the
        # tmpfs filled up (by QEMU, or by the secondary applying a
        # checkpoint) was a SIGBUS that killed its writer.
        memory = 128
        shm = self.useFixture(SmallTmpfs(2 * memory * MiB + 8 * MiB))
        self.useFixture(fixtures.EnvironmentVariable(vm.RAM_DIR_ENV,
                                                     shm.path))
        spec, gdir = self.protect('shm', memory_mib=memory, writer_ms=10)
        last = self.wait_counter(gdir)
        shm.fill()
        self.assertLess(shm.free(), 4096 * 2)
        # Pages the guest has not touched yet, written while full: with
        # output commit each answer is a committed, applied epoch.
        last = self.talk(last, 5)
        prim = self.side('shm', 'primary')
        self.assertEqual(State.PROTECTED, prim['state'], prim)
        sec = self.side('shm', 'secondary')
        self.assertEqual(State.STANDBY, sec['state'], sec)
        # And the replica is still whole: the guest runs on from it.
        after, _ = self.kill_and_ask(prim['qemu_pid'], last)
        self.talk(after, 3)
        self.assertEqual(State.ACTIVE, self.wait_active('shm')['state'])


class ReplicaDiskFullTest(base.GuestTestCase):
    """The secondary's disk replica runs out of space: the secondary is
    lost, the guest runs on unprotected, its disk intact."""

    def test_full_overlay_dir_loses_the_secondary_not_the_guest(self):
        name = 'ovf'
        disk_dir = os.path.join(operations.guest_dir(self.state_dir, name),
                                'secondary', 'disk')
        disk = self.make_disk()
        room = capacity.replica_disk_bytes(64 * MiB) + 8 * MiB
        replica = self.useFixture(SmallTmpfs(room, disk_dir))
        spec, gdir = self.protect(name, disk=disk, writer_ms=10)
        last = self.wait_counter(gdir)
        watcher = base.SerialWatcher(os.path.join(gdir, 'primary',
                                                  'serial.log'))
        self.addCleanup(watcher.stop)
        base.wait_for(lambda: len(watcher.acks) > 10, 30, what='ACKs')
        replica.fill()
        t_full = time.monotonic()
        prim = base.wait_for(
            lambda: (s := self.side(name, 'primary')).get(
                'state') == State.UNPROTECTED and s, 30,
            what='the primary unprotected')
        self.assertIn('reason', prim)
        # The secondary gave its replica up; it never ran the guest.
        sec = base.wait_for(
            lambda: (s := self.side(name, 'secondary')).get('state') in (
                State.STOPPED, State.LOST) and s, 30,
            what='the secondary ended')
        self.assertIsNone(sec.get('takeover'), sec)
        self.assertEqual([prim['qemu_pid']], base.qemu_pids_for(name))
        # The guest was neither paused for good nor harmed: it answers,
        # and its disk writes go on.
        for _ in range(5):
            got = workload.counter_request('127.0.0.1', self.port)
            self.assertEqual(last + 1, got)
            last = got
        base.wait_for(lambda: watcher.acks[-1][0] > t_full + 3, 30,
                      what='ACKs after the replica filled up')
        operations.stop(self.state_dir, name)
        watcher.stop()
        seqs = [seq for _, seq in watcher.acks]
        self.assertEqual(list(range(seqs[0], seqs[-1] + 1)), seqs)
        last_record = records.verify_chain(
            workload.disk_records([(disk, 'raw')]))
        self.assertGreaterEqual(last_record, seqs[-1])
