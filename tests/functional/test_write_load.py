"""A guest that writes its disk at 16 MiB/s, protected in each disk mode.

Under such a load the disk's part of a checkpoint (the mirror's tail, or
the block-copy baseline's incremental copy) is still writing to the
replica when the device-state save of the same pause would end, and the
end of that save inactivates QEMU's block nodes: a write after it
aborted the primary QEMU (async-replication) or failed the checkpoint
(block-copy). Each test protects the project's guest running guestd's
``diskrate`` job (16 MiB/s of 16 KiB direct writes) beside the hash-chain
writer and the counter, checks that checkpoints keep committing while it
writes with the primary QEMU alive and protected, then kills the primary
QEMU: the secondary must resume from the committed epoch with the chain
intact, and the guest's writes go on.
"""

import os
import re
import signal
import threading
import time

from mftvm_openstack.contract.states import State
from mftvm_openstack.images import workload
from mftvm_openstack.local import operations
from tests.functional import base

_TOTAL = re.compile(r'^DISKRATE (\d+)\r?$', re.MULTILINE)
#: the diskrate job's area ends at 832 MiB of the guest's disk
DISK_MIB = 896
#: checkpoints that must commit while the guest writes
COMMITS = 30


def written(text):
    """The bytes the diskrate job says it wrote so far (0: none yet)."""
    totals = _TOTAL.findall(text)
    return int(totals[-1]) if totals else 0


def protect_writing(case, name, mib_s, disk_sync):
    """Protect guest ``name`` writing ``mib_s`` MiB/s of 16 KiB writes to
    its disk (and answering its counter), once it is writing: its
    directory, its primary's serial log, the counter's last answer and
    the primary's QEMU pid."""
    spec, gdir = case.protect(
        name, run=f'writer,counter,diskrate:{mib_s}:16',
        disk=case.make_disk(size_mib=DISK_MIB), disk_sync=disk_sync)
    serial = os.path.join(gdir, 'primary', 'serial.log')
    last = case.wait_counter(gdir)
    qemu_pid = case.side(name, 'primary')['qemu_pid']
    base.wait_for(lambda: written(workload.read_text(serial)), 60, 0.2,
                  'the guest writing its disk')
    return gdir, serial, last, qemu_pid


class WriteLoadMixin:
    """The test, for the disk mode ``DISK_SYNC``, on a guest named
    ``NAME`` (its own per class: the tier runs two at once, and a guest's
    name names its /dev/shm RAM file and its QEMU)."""

    DISK_SYNC = ''
    NAME = ''

    def test_checkpoints_commit_while_the_guest_writes_16_mib_s(self):
        name = self.NAME
        gdir, serial, last, qemu_pid = protect_writing(
            self, name, 16, self.DISK_SYNC)
        before = written(workload.read_text(serial))
        first = self.side(name, 'primary')['last_committed_epoch']

        def committed_on():
            s = self.side(name, 'primary')
            # Every look: still protected, its QEMU the same and alive
            # (the bug aborted it; a failed checkpoint unprotects).
            self.assertEqual(State.PROTECTED, s['state'],
                             f'{s.get("reason")} {s.get("error")}')
            self.assertEqual(qemu_pid, s['qemu_pid'])
            self.assertTrue(os.path.exists(f'/proc/{qemu_pid}'))
            return s['last_committed_epoch'] >= first + COMMITS
        base.wait_for(committed_on, 120, 0.2,
                      f'{COMMITS} commits while the guest writes')
        # The guest did write meanwhile (the load was there).
        self.assertGreater(written(workload.read_text(serial)), before)
        last = self.talk(last, 2)
        stats = self.side(name, 'primary')

        # Failover: the replica's disk chain is the committed epoch's.
        self.kill_and_ask(qemu_pid, last)
        sec = self.wait_active(name)
        self.assertEqual([sec['qemu_pid']], base.qemu_pids_for(name))
        after = os.path.join(gdir, 'secondary', 'serial.log')
        base.wait_for(lambda: len(workload.serial_acks(
            workload.read_text(after))) >= 5, 60, 0.2,
            'writer ACKs after failover')
        base.wait_for(lambda: written(workload.read_text(after)), 60, 0.2,
                      'the guest writing on after failover')
        operations.stop(self.state_dir, name)
        text = workload.read_text(after)
        self.assertNotIn('MFTVM-GUEST-READY', text)      # no reboot
        base.assert_acks_continue_chain(self, text, sec['disk_layers'])
        print(f'{self.DISK_SYNC} at 16 MiB/s: pause p50 '
              f'{stats.get("pause_ms_p50")} ms, parts '
              f'{stats.get("pause_parts_ms_p50")}, '
              f'{written(text) / 2**20:.0f} MiB written in all')


class AsyncReplicationWriteLoadTest(WriteLoadMixin, base.GuestTestCase):
    NAME = 'wla'
    DISK_SYNC = 'async-replication'


class WriteReplicationWriteLoadTest(WriteLoadMixin, base.GuestTestCase):
    NAME = 'wlw'
    DISK_SYNC = 'write-replication'


class BlockCopyWriteLoadTest(WriteLoadMixin, base.GuestTestCase):
    NAME = 'wlb'
    DISK_SYNC = 'block-copy'


def storage_daemons(under):
    """The pids of the qemu-storage-daemons whose QMP socket is under
    ``under`` (a guest directory)."""
    pids = []
    for pid in filter(str.isdigit, os.listdir('/proc')):
        try:
            with open(f'/proc/{pid}/cmdline', 'rb') as f:
                argv = f.read().split(b'\0')
        except OSError:
            continue
        if argv and argv[0].endswith(b'qemu-storage-daemon') and any(
                under.encode() in arg for arg in argv):
            pids.append(int(pid))
    return pids


class Starved(threading.Thread):
    """Lets ``pid`` run ``run_ms`` of every ``run_ms + stop_ms`` (SIGSTOP,
    SIGCONT): a replica path that takes a fraction of what it could."""

    def __init__(self, pid, run_ms=10, stop_ms=90):
        super().__init__(daemon=True)
        self.pid, self.run_s, self.stop_s = pid, run_ms / 1e3, stop_ms / 1e3
        self.done = threading.Event()

    def run(self):
        try:
            while not self.done.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                time.sleep(self.stop_s)
                os.kill(self.pid, signal.SIGCONT)
                self.done.wait(self.run_s)
        except ProcessLookupError:
            pass
        finally:
            try:
                os.kill(self.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass

    def stop(self):
        self.done.set()
        self.join(5)


class BackPressureTest(base.GuestTestCase):
    """A guest that asks to write its disk faster than the replica path
    takes, protected with async-replication: 64 MiB/s of 16 KiB writes,
    the secondary's storage daemon (the replica's end) let run a tenth
    of the time.

    The mirror's backlog used to grow from epoch to epoch until a pause
    could not drain it in 2 s, and the secondary was dropped (issue 15:
    at checkpoint 2 in the disk-rate benchmark, ``the replica did not
    catch up within 2.0s``). Now the checkpoint holds the guest while the
    replica still takes writes, and paces the guest's writes by the
    backlog it found: the guest stays protected, writes on, and fails
    over with its hash chain intact.
    """

    def test_a_guest_writing_faster_than_the_replica_stays_protected(self):
        name = 'wlp'
        gdir, serial, last, qemu_pid = protect_writing(
            self, name, 64, 'async-replication')
        qsd, = storage_daemons(os.path.join(gdir, 'secondary'))
        starved = Starved(qsd)
        starved.start()
        self.addCleanup(starved.stop)
        before = written(workload.read_text(serial))
        first = self.side(name, 'primary')['last_committed_epoch']

        def committed_on():
            s = self.side(name, 'primary')
            self.assertEqual(State.PROTECTED, s['state'],
                             f'{s.get("reason")} {s.get("error")}')
            self.assertEqual(qemu_pid, s['qemu_pid'])
            return s['last_committed_epoch'] >= first + COMMITS
        base.wait_for(committed_on, 300, 0.2,
                      f'{COMMITS} commits while the guest writes')
        self.assertGreater(written(workload.read_text(serial)), before)
        starved.stop()
        last = self.talk(last, 2)
        stats = self.side(name, 'primary')

        self.kill_and_ask(qemu_pid, last)
        sec = self.wait_active(name)
        after = os.path.join(gdir, 'secondary', 'serial.log')
        base.wait_for(lambda: len(workload.serial_acks(
            workload.read_text(after))) >= 5, 60, 0.2,
            'writer ACKs after failover')
        operations.stop(self.state_dir, name)
        text = workload.read_text(after)
        self.assertNotIn('MFTVM-GUEST-READY', text)      # no reboot
        base.assert_acks_continue_chain(self, text, sec['disk_layers'])
        with open(os.path.join(gdir, 'primary-host.log')) as f:
            paced = [line for line in f if 'guest writes to' in line]
        print(f'async-replication asked 64 MiB/s: pause p50 '
              f'{stats.get("pause_ms_p50")} ms, p99 '
              f'{stats.get("pause_ms_p99")} ms, '
              f'{written(text) / 2**20:.0f} MiB written in all, '
              f'{len(paced)} changes of pace, the last: '
              f'{paced[-1].split(": ", 1)[-1].strip() if paced else None}')
