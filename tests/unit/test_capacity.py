"""Full disks and tmpfs (issue 11, item 7), without QEMU: RAM files
allocated up front, the capacity check, and the replica image applied
all or nothing. Each test mounts a small tmpfs of its own (root only)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import threading
from unittest import mock

import fixtures
import numpy as np
import testtools
from oslo_messaging._drivers import common as om_common

from mftvm_openstack.agent import exception
from mftvm_openstack.contract.spec import GuestSpec, ProtectionOptions
from mftvm_openstack.ft import capacity, epoch, vm
from mftvm_openstack.ft.trackers import PAGE_SIZE, RamDelta
from tests.tmpfs import SmallTmpfs
from tests.unit.test_agent_manager import allowed_disk, manager_on

MiB = 1 << 20


def delta_of(pages: int, value: int) -> RamDelta:
    """Every one of ``pages`` pages set to ``value``."""
    return RamDelta(np.arange(pages, dtype=np.uint32),
                    np.full((pages, PAGE_SIZE), value, np.uint8))


class RamFileTest(testtools.TestCase):

    def test_a_ram_file_that_does_not_fit_is_refused_at_creation(self):
        small = self.useFixture(SmallTmpfs(4 * MiB))
        ram = os.path.join(small.path, 'vm0.ram')
        workdir = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ['rm', '-rf', workdir])
        with testtools.ExpectedException(
                capacity.CapacityError,
                rf'not enough space in {small.path} for the replica of '
                rf'guest RAM: needs 8\.0 MiB, [0-9.]+ MiB available'):
            epoch.ReplicaImage(ram, 8 * MiB, workdir)
        self.assertFalse(os.path.exists(ram))
        self.assertEqual(4 * MiB, small.free())   # nothing kept

    def test_a_replica_survives_its_tmpfs_filling_up(self):
        # Sparse, the replica's RAM file took its pages as checkpoints
        # wrote them: once someone else had filled the tmpfs, the next
        # new page was a SIGBUS that killed the secondary. Run in a
        # child, so that the signal shows as its exit status.
        small = self.useFixture(SmallTmpfs(12 * MiB))
        workdir = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ['rm', '-rf', workdir])
        code = textwrap.dedent(f'''
            import numpy as np, os, sys
            sys.path.insert(0, {os.getcwd()!r})
            from mftvm_openstack.ft import epoch
            from tests.unit.test_capacity import delta_of
            from tests.tmpfs import SmallTmpfs
            replica = epoch.ReplicaImage({small.path!r} + '/r.ram',
                                         8 << 20, {workdir!r})
            filler = SmallTmpfs.__new__(SmallTmpfs)
            filler.path = {small.path!r}
            filler.fill()
            replica.apply(1, b'dev', delta_of(2048, 7))
            print('applied', replica.committed)
        ''')
        result = subprocess.run([sys.executable, '-c', code],
                                capture_output=True, text=True, timeout=60)
        self.assertEqual((0, 'applied 1'),
                         (result.returncode, result.stdout.strip()),
                         result.stderr)

    def test_the_primarys_ram_file_is_allocated_in_full(self):
        small = self.useFixture(SmallTmpfs(16 * MiB))
        fd = capacity.create_ram_file(os.path.join(small.path, 'p.ram'),
                                      8 * MiB, 'guest vm0 RAM (primary)')
        os.close(fd)
        self.assertEqual(8 * MiB, 16 * MiB - small.free())
        with testtools.ExpectedException(
                capacity.CapacityError,
                r'.*for guest vm0 RAM \(primary\): needs 16\.0 MiB, '
                r'8\.0 MiB available; free space there'):
            capacity.create_ram_file(os.path.join(small.path, 'q.ram'),
                                     16 * MiB, 'guest vm0 RAM (primary)')


class CheckTest(testtools.TestCase):

    def test_needs_on_one_filesystem_add_up(self):
        small = self.useFixture(SmallTmpfs(10 * MiB))
        not_yet = os.path.join(small.path, 'vm0', 'secondary', 'disk')
        capacity.check([capacity.Need(small.path, 6 * MiB, 'RAM')])
        capacity.check([capacity.Need(not_yet, 6 * MiB, 'disk')])
        with testtools.ExpectedException(
                capacity.CapacityError,
                rf'not enough space in {small.path} for RAM and disk: '
                rf'needs 12\.0 MiB, 10\.0 MiB available'):
            capacity.check([capacity.Need(small.path, 6 * MiB, 'RAM'),
                            capacity.Need(not_yet, 6 * MiB, 'disk')])
        self.assertEqual(small.path, capacity.existing(not_yet))

    def test_the_error_is_one_line(self):
        exc = capacity.CapacityError('/dev/shm', 3 * MiB, MiB, 'x')
        self.assertEqual(1, len(str(exc).splitlines()))


class ReplicaApplyTest(testtools.TestCase):
    """The image names an epoch only once RAM and device state are both
    in; a failed apply never leaves a mixed image that looks whole."""

    def setUp(self):
        super().setUp()
        self.ram_dir = self.useFixture(SmallTmpfs(8 * MiB)).path
        self.workdir = tempfile.mkdtemp()
        self.addCleanup(subprocess.run, ['rm', '-rf', self.workdir])
        self.replica = epoch.ReplicaImage(
            os.path.join(self.ram_dir, 'r.ram'), 4 * MiB, self.workdir)
        self.addCleanup(self.replica.close)
        self.replica.apply(1, b'dev-1', delta_of(16, 1))

    def ram(self) -> bytes:
        with open(self.replica.ram_file, 'rb') as f:
            return f.read(16 * PAGE_SIZE)

    def devstate(self) -> bytes:
        with open(self.replica.devstate_path, 'rb') as f:
            return f.read()

    def test_a_full_disk_for_the_device_state_leaves_the_image_whole(self):
        # The device state was written after the RAM pages: when its disk
        # was full, the image held epoch 2's RAM with epoch 1's devices.
        full = self.useFixture(SmallTmpfs(1 * MiB))
        self.replica.devstate_path = os.path.join(full.path, 'devstate.bin')
        self.replica.apply(1, b'dev-1', delta_of(16, 1))
        full.fill()
        self.assertRaises(OSError, self.replica.apply, 2, b'x' * MiB,
                          delta_of(16, 2))
        self.assertEqual(1, self.replica.committed)
        self.assertIsNone(self.replica.damaged)
        self.assertEqual(b'\x01' * 16 * PAGE_SIZE, self.ram())
        self.assertEqual(b'dev-1', self.devstate())

    def test_an_apply_that_fails_midway_marks_the_image_damaged(self):
        class Unreadable:
            """Pages that pass the checks and fail as they are copied
            (the step after the image began to change)."""

            shape = (16, PAGE_SIZE)

            def __array__(self, *args, **kwargs):
                raise OSError(5, 'Input/output error')
        pages = Unreadable()
        self.assertRaises(OSError, self.replica.apply, 2, b'dev-2',
                          RamDelta(np.arange(16, dtype=np.uint32), pages))
        self.assertEqual(1, self.replica.committed)
        self.assertIn('applying checkpoint 2 failed', self.replica.damaged)
        # Never resumed, never applied over.
        self.assertRaises(epoch.ReplicaDamaged, self.replica.check_whole)
        self.assertRaises(epoch.ReplicaDamaged, self.replica.apply, 3,
                          b'dev-3', delta_of(1, 3))

    def test_a_whole_apply_commits(self):
        first = self.replica.devstate_path
        self.replica.apply(2, b'dev-2', delta_of(16, 2))
        self.assertEqual((2, None), (self.replica.committed,
                                     self.replica.damaged))
        self.assertEqual(b'dev-2', self.devstate())
        self.assertEqual(b'\x02' * 16 * PAGE_SIZE, self.ram())
        # (the last epoch's device state is not kept)
        self.assertFalse(os.path.exists(first))
        self.assertEqual(['devstate-2.bin'], sorted(
            f for f in os.listdir(self.workdir) if 'devstate' in f))

    def test_a_staged_epoch_is_held_and_installs_with_no_room_left(self):
        # What is acked must go in: staging writes everything that
        # needs space; the install after the ACK needs none.
        full = self.useFixture(SmallTmpfs(1 * MiB))
        self.replica.devstate_path = os.path.join(full.path, 'devstate.bin')
        self.replica.apply(1, b'dev-1', delta_of(16, 1))
        staged = self.replica.stage(2, b'dev-2', delta_of(16, 2))
        # Staged: nothing of the image changed yet.
        self.assertEqual((1, None), (self.replica.committed,
                                     self.replica.damaged))
        self.assertEqual(b'\x01' * 16 * PAGE_SIZE, self.ram())
        self.assertEqual(b'dev-1', self.devstate())
        full.fill()
        self.replica.install(staged)
        self.assertEqual((2, None), (self.replica.committed,
                                     self.replica.damaged))
        self.assertEqual(b'\x02' * 16 * PAGE_SIZE, self.ram())
        self.assertEqual(b'dev-2', self.devstate())

    def test_the_next_epoch_stages_while_one_installs(self):
        # The ACK comes before the install, so the next checkpoint is
        # staged while the last one is still going in (the first one,
        # all of RAM, takes a while). Staging refused it: it read the
        # install under way as a damaged image, and the secondary gave
        # up (seen in the disk-rate benchmark: "applying checkpoint 2
        # failed: the replica is unusable: checkpoint 1 was cut short").
        copying, go_on = threading.Event(), threading.Event()

        class Slow:
            """Pages that take until ``go_on`` to copy."""

            shape = (16, PAGE_SIZE)

            def __array__(self, *args, **kwargs):
                copying.set()
                go_on.wait(10)
                return np.full(self.shape, 2, np.uint8)
        staged = self.replica.stage(2, b'dev-2', RamDelta(
            np.arange(16, dtype=np.uint32), Slow()))
        installing = threading.Thread(target=self.replica.install,
                                      args=(staged,))
        installing.start()
        self.addCleanup(installing.join, 10)
        self.addCleanup(go_on.set)
        self.assertTrue(copying.wait(10))
        self.assertIsNotNone(self.replica.damaged)      # under way
        third = self.replica.stage(3, b'dev-3', delta_of(16, 3))
        go_on.set()
        installing.join(10)
        self.assertEqual((2, None), (self.replica.committed,
                                     self.replica.damaged))
        self.replica.install(third)
        self.assertEqual(3, self.replica.committed)
        self.assertEqual(b'\x03' * 16 * PAGE_SIZE, self.ram())
        self.assertEqual(b'dev-3', self.devstate())

    def test_staging_checks_the_checkpoint_before_it_is_acked(self):
        staged = self.replica.stage(2, b'dev-2', delta_of(1, 2))
        beyond = RamDelta(np.array([4 * MiB // PAGE_SIZE], np.uint32),
                          np.zeros((1, PAGE_SIZE), np.uint8))
        short = RamDelta(np.arange(2, dtype=np.uint32),
                         np.zeros((1, PAGE_SIZE), np.uint8))
        for epoch_, delta, error in (
                (3, beyond, 'beyond guest RAM'),
                (3, short, 'page numbers for pages of shape'),
                (1, delta_of(1, 1), 'epochs must not go back')):
            with self.subTest(error):
                self.assertRaisesRegex(ValueError, error, self.replica.stage,
                                       epoch_, b'dev', delta)
        self.assertFalse(os.path.exists(
            os.path.join(self.workdir, 'devstate-3.bin')))
        self.replica.install(staged)
        self.assertEqual(2, self.replica.committed)

    def test_close_removes_what_was_staged_and_not_installed(self):
        self.replica.stage(2, b'dev-2', delta_of(1, 2))
        self.replica.stage(3, b'dev-3', delta_of(1, 3))
        self.replica.close()
        self.assertEqual(['devstate-1.bin'], sorted(
            f for f in os.listdir(self.workdir) if 'devstate' in f))


class AgentAdmissionTest(testtools.TestCase):
    """The agent refuses a guest it has no room for, with one line that
    survives the trip over RPC."""

    def setUp(self):
        super().setUp()
        self.shm = self.useFixture(SmallTmpfs(32 * MiB))
        self.useFixture(fixtures.EnvironmentVariable(vm.RAM_DIR_ENV,
                                                     self.shm.path))
        self.m = manager_on(self)
        self.m.new_instance_dir = mock.Mock(
            side_effect=AssertionError('nothing may be started'))

    def test_prepare_secondary_refuses_ram_that_does_not_fit(self):
        spec = GuestSpec(name='vm0', kernel='/k', initrd='/i', disk='/d',
                         memory_mib=64, disk_size=MiB)
        exc = self.assertRaises(
            exception.InsufficientCapacity, self.m.prepare_secondary,
            'vm0', spec, ProtectionOptions(), 'hv0')
        self.assertEqual(
            f'host hv1 has no room for guest vm0 RAM (secondary) in '
            f'{self.shm.path}: needs 64.0 MiB, 32.0 MiB available; free '
            f'space there or enlarge it, or choose another host', str(exc))
        self.assertFalse(os.path.exists(os.path.join(
            self.tmp, 'instances', 'vm0')))

    def test_prepare_secondary_refuses_a_disk_replica_that_does_not_fit(
            self):
        disk = self.useFixture(SmallTmpfs(32 * MiB))
        self.m.root = disk.path
        spec = GuestSpec(name='vm0', kernel='/k', initrd='/i', disk='/d',
                         memory_mib=16, disk_size=64 * MiB)
        exc = self.assertRaises(
            exception.InsufficientCapacity, self.m.prepare_secondary,
            'vm0', spec, ProtectionOptions(), 'hv0')
        self.assertIn(f'guest vm0 disk replica in {disk.path}/vm0/'
                      f'secondary/disk: needs 128.0 MiB', str(exc))

    def test_protect_refuses_a_primary_ram_file_that_does_not_fit(self):
        spec = GuestSpec(name='vm0', kernel='/k', initrd='/i',
                         disk=allowed_disk(self, self.m), memory_mib=64)
        self.m._prepare_peer = mock.Mock(
            side_effect=AssertionError('no peer may be asked'))
        exc = self.assertRaises(exception.InsufficientCapacity,
                                self.m.protect, 'vm0', spec,
                                ProtectionOptions(), 'hv2')
        self.assertIn('guest vm0 RAM (primary)', str(exc))

    def test_the_error_survives_rpc(self):
        original = exception.InsufficientCapacity(
            host='hv1', what='guest vm0 RAM (secondary)',
            directory='/dev/shm', needed_mib=64.0, available_mib=32.0)
        try:
            raise original
        except Exception:
            data = om_common.serialize_remote_exception(sys.exc_info())
        remote = om_common.deserialize_remote_exception(
            data, exception.ALLOWED_REMOTE_EXMODS)
        self.assertIsInstance(remote, exception.InsufficientCapacity)
        clean = exception.from_remote(remote)
        self.assertIs(exception.InsufficientCapacity, type(clean))
        self.assertEqual(str(original), str(clean))
        self.assertEqual(original.kwargs, clean.kwargs)
