"""A protected guest in real QEMU loses its primary, or its secondary.

Each test protects the project's guest (disk writer + TCP counter) with
two real host processes and kills real processes with SIGKILL.
"""

import bisect
import os
import random
import re
import signal
import socket
import threading
import time

from mftvm_openstack.contract.states import State
from mftvm_openstack.images import records, workload
from mftvm_openstack.local import operations
from tests.functional import base


def dirty_passes(text):
    """The pass numbers of guestd's dirty job on a serial console."""
    return [int(n) for n in re.findall(r'^DIRTY-PASS (\d+)\r?$', text,
                                        re.MULTILINE)]


class PrimaryLossTest(base.GuestTestCase):

    def test_sigkill_primary_qemu_guest_continues_on_secondary(self):
        spec, gdir = self.protect('pk')
        last = self.wait_counter(gdir)
        # Talk to the guest for a random while, then kill the primary QEMU.
        last = self.talk(last, random.uniform(3, 6))
        prim = self.side('pk', 'primary')
        self.assertEqual(State.PROTECTED, prim['state'])
        # Output commit: the client never sees a value the failover undid.
        _, answered_in = self.kill_and_ask(prim['qemu_pid'], last)
        sec = self.wait_active('pk')
        self.assertIsNotNone(sec['failover_ms'])
        # Exactly one copy of the guest runs: the restored one.
        self.assertEqual([sec['qemu_pid']], base.qemu_pids_for('pk'))

        serial = os.path.join(gdir, 'secondary', 'serial.log')
        base.wait_for(lambda: len(workload.serial_acks(
            workload.read_text(serial))) >= 5, 30, what='ACKs after failover')
        operations.stop(self.state_dir, 'pk')
        # Both RAM files are gone: the dead primary's and the guest's.
        self.assertEqual([], base.ram_files('pk'))
        text = workload.read_text(serial)
        # The disk held no record from after the committed epoch, its
        # chain is intact, and the guest's ACKs continue it.
        base.assert_acks_continue_chain(self, text, sec['disk_layers'])
        print(f'failover: restore {sec["failover_ms"]} ms, kill -> next '
              f'answer {answered_in * 1000:.0f} ms')

    def test_failover_restores_every_page_the_guest_dirtied(self):
        # guestd's dirty job writes 48 MiB of its memory at 32 MiB/s and
        # checks each page still holds what it wrote the pass before: a
        # page the tracker missed comes back stale on the secondary and
        # prints DIRTY-BAD. The hash tracker, named (auto may change).
        spec, gdir = self.protect('pd', run='writer,counter,dirty:48:32',
                                  tracker='hash')
        last = self.wait_counter(gdir)
        last = self.talk(last, random.uniform(4, 7))
        prim = self.side('pd', 'primary')
        self.assertEqual(State.PROTECTED, prim['state'])
        self.kill_and_ask(prim['qemu_pid'], last)
        self.wait_active('pd')
        serial = os.path.join(gdir, 'secondary', 'serial.log')
        # Two whole passes over the region after the restore: every page
        # checked at least once.
        base.wait_for(lambda: len(dirty_passes(
            workload.read_text(serial))) >= 3, 60, 0.2,
            'dirty passes after failover')
        before = workload.read_text(os.path.join(gdir, 'primary',
                                                 'serial.log'))
        after = workload.read_text(serial)
        self.assertTrue(dirty_passes(before), 'the dirty job never ran')
        self.assertNotIn('DIRTY-BAD', before)
        self.assertNotIn('DIRTY-BAD', after)
        self.assertNotIn('MFTVM-GUEST-READY', after)  # no reboot
        # It ran on from where the primary left: the passes continue.
        self.assertGreaterEqual(dirty_passes(after)[0],
                                dirty_passes(before)[-1])
        self.assertEqual([], workload.future_records(after))

    def test_sigkill_primary_host_process(self):
        spec, gdir = self.protect('ph')
        last = self.wait_counter(gdir)
        prim = self.side('ph', 'primary')
        qemu_pid = prim['qemu_pid']
        os.kill(prim['host_pid'], signal.SIGKILL)
        # The primary's QEMU dies with its host (no second copy)...
        base.wait_for(lambda: not os.path.exists(f'/proc/{qemu_pid}'), 5,
                      what='primary QEMU to die with its host')
        # ...and the guest goes on from the secondary.
        after = base.wait_for(
            lambda: workload.counter_request('127.0.0.1', self.port, 5),
            60, 0, 'an answer from the failed-over guest')
        self.assertEqual(last + 1, after)
        # (status.json is published every 0.25 s)
        base.wait_for(lambda: self.side('ph', 'secondary')['state'] ==
                      State.ACTIVE, 5, what='the secondary to report active')
        # The killed host left its RAM file; stop removes it.
        operations.stop(self.state_dir, 'ph')
        self.assertEqual([], base.ram_files('ph'))


class HungPrimaryTest(base.GuestTestCase):

    def test_sigstop_primary_qemu_is_killed_and_guest_moves(self):
        spec, gdir = self.protect('hu')
        last = self.wait_counter(gdir)
        prim = self.side('hu', 'primary')
        # A hung QEMU: alive, but answers nothing, runs nothing.
        os.kill(prim['qemu_pid'], signal.SIGSTOP)
        self.addCleanup(self._kill_quietly, prim['qemu_pid'])
        after = base.wait_for(
            lambda: workload.counter_request('127.0.0.1', self.port, 5),
            60, 0, 'an answer from the failed-over guest')
        self.assertEqual(last + 1, after)
        # The hung copy was killed: it can never wake up beside the
        # restored one.
        base.wait_for(lambda: not os.path.exists(
            f'/proc/{prim["qemu_pid"]}'), 10, what='the hung QEMU to die')
        sec = self.wait_active('hu')
        self.assertEqual([sec['qemu_pid']], base.qemu_pids_for('hu'))
        self.assertIn('hung', self.side('hu', 'primary').get('error', ''))

    @staticmethod
    def _kill_quietly(pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class PlannedFailoverTest(base.GuestTestCase):

    def test_operator_failover_loses_nothing(self):
        spec, gdir = self.protect('pf')
        last = self.wait_counter(gdir)
        prim = self.side('pf', 'primary')
        sec = operations.failover(self.state_dir, 'pf')
        self.assertEqual(State.ACTIVE, sec['state'])
        # The old primary's QEMU is gone; only the moved guest runs.
        base.wait_for(lambda: base.qemu_pids_for('pf') == [sec['qemu_pid']],
                      10, what='one QEMU, the moved one')
        self.assertFalse(os.path.exists(f'/proc/{prim["qemu_pid"]}'))
        after = workload.counter_request('127.0.0.1', self.port, 10)
        self.assertEqual(last + 1, after)
        serial = workload.read_text(os.path.join(gdir, 'secondary',
                                                 'serial.log'))
        self.assertNotIn('MFTVM-GUEST-READY', serial)  # no reboot


class FrozenSecondaryTest(base.GuestTestCase):

    def test_sigstop_secondary_primary_carries_on(self):
        # A frozen peer, not a dead one: no reset, no EOF, just silence.
        spec, gdir = self.protect('fz', writer_ms=10)
        last = self.wait_counter(gdir)
        watcher = base.SerialWatcher(os.path.join(gdir, 'primary',
                                                  'serial.log'))
        self.addCleanup(watcher.stop)
        base.wait_for(lambda: len(watcher.acks) > 20, 30, what='ACKs')
        sec = self.side('fz', 'secondary')
        frozen = [sec['host_pid']] + operations._child_pids(sec['host_pid'])
        for pid in frozen:
            os.kill(pid, signal.SIGSTOP)
        self.addCleanup(self._thaw_and_kill, frozen)
        t_stop = time.monotonic()
        prim = base.wait_for(
            lambda: (s := self.side('fz', 'primary')).get(
                'state') == State.UNPROTECTED and s, 30, what='unprotected')
        self.assertIn('reason', prim)
        # The guest was not frozen along with its replica: its disk
        # writes and answers go on.
        n = len(watcher.acks)
        base.wait_for(lambda: len(watcher.acks) > n + 20, 20,
                      what='ACKs after the secondary froze')
        for _ in range(3):
            got = workload.counter_request('127.0.0.1', self.port, 5)
            self.assertEqual(last + 1, got)
            last = got
        gaps = [b - a for (a, _), (b, _) in zip(watcher.acks,
                                                watcher.acks[1:])
                if b > t_stop]
        print(f'frozen secondary: longest ACK gap {max(gaps) * 1000:.0f} '
              f'ms')

    @staticmethod
    def _thaw_and_kill(pids):
        for pid in pids:
            for sig in (signal.SIGKILL, signal.SIGCONT):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass


class SecondaryLossTest(base.GuestTestCase):

    def test_sigkill_secondary_primary_carries_on(self):
        spec, gdir = self.protect('sk', writer_ms=10)
        last = self.wait_counter(gdir)
        watcher = base.SerialWatcher(os.path.join(gdir, 'primary',
                                                  'serial.log'))
        self.addCleanup(watcher.stop)
        base.wait_for(lambda: len(watcher.acks) > 20, 30, what='ACKs')
        sec = self.side('sk', 'secondary')
        children = operations._child_pids(sec['host_pid'])
        self.assertTrue(children, 'the secondary runs a storage daemon')
        os.kill(sec['host_pid'], signal.SIGKILL)
        t_kill = time.monotonic()
        try:
            prim = base.wait_for(
                lambda: (s := self.side('sk', 'primary')).get(
                    'state') == State.UNPROTECTED and s, 15,
                what='unprotected')
        except AssertionError:
            # Say where it stuck: the primary's last status and log.
            log = workload.read_text(os.path.join(gdir, 'primary-host.log'))
            self.fail(f'not unprotected within 15s; primary status '
                      f'{self.side("sk", "primary")}; log tail:\n'
                      + '\n'.join(log.splitlines()[-15:]))
        self.assertIn('reason', prim)
        # The storage daemon died with its host.
        for pid in children:
            base.wait_for(lambda: not os.path.exists(f'/proc/{pid}'), 5,
                          what='secondary children to exit')
        # The guest carries on: answers and disk writes continue.
        for _ in range(5):
            got = workload.counter_request('127.0.0.1', self.port)
            self.assertEqual(last + 1, got)
            last = got
        base.wait_for(lambda: watcher.acks[-1][0] > t_kill + 3, 30,
                      what='ACKs after the loss')
        times = [t for t, _ in watcher.acks if t_kill - 1 < t]
        stall = max(b - a for a, b in zip(times, times[1:]))
        self.assertLess(stall, 2.0, 'disk I/O stalled after secondary loss')
        operations.stop(self.state_dir, 'sk')
        watcher.stop()
        disk = workload.disk_records([(spec.disk, 'raw')])
        last_record = records.verify_chain(disk)
        seqs = [seq for _, seq in watcher.acks]
        self.assertEqual(list(range(seqs[0], seqs[-1] + 1)), seqs)
        self.assertGreaterEqual(last_record, seqs[-1])
        print(f'secondary loss: longest ACK gap {stall * 1000:.0f} ms')


class InitialSyncTest(base.GuestTestCase):

    def test_protecting_a_running_guest_costs_no_downtime(self):
        # The guest runs unprotected first, with 192 MiB of data the
        # mirror must copy while the writer keeps writing.
        disk = self.make_disk(size_mib=256, fill_mib=192)
        # Stamp ACKs live from boot on: start watching before protect().
        watcher = base.SerialWatcher(os.path.join(
            operations.guest_dir(self.state_dir, 'is'), 'primary',
            'serial.log'))
        self.addCleanup(watcher.stop)
        spec, gdir = self.protect('is', disk=disk, writer_ms=10,
                                  start_delay=14)
        prim = self.side('is', 'primary')
        sync = prim['sync_window']
        self.assertIsNotNone(sync)
        base.wait_for(lambda: watcher.acks and watcher.acks[-1][0] >
                      time.monotonic() - 0.5 and len(watcher.acks) > 200,
                      30, what='writer progress')
        watcher.stop()
        # The sync window is in host monotonic time, as the ACK stamps.
        during = [t for t, _ in watcher.acks
                  if sync[0] - 0.5 <= t <= sync[1] + 0.5]
        self.assertGreater(len(during), 5, 'the writer ran during the sync')
        gaps = [b - a for a, b in zip(during, during[1:])]
        self.assertLess(max(gaps), 1.0, 'the guest stalled during sync')
        # Stopping a protected pair leaves no RAM file behind (the
        # standby's replica included).
        operations.stop(self.state_dir, 'is')
        self.assertEqual([], base.ram_files('is'))
        print(f'initial sync {sync[1] - sync[0]:.2f}s, longest ACK gap '
              f'{max(gaps) * 1000:.0f} ms')


class StaleReplicaTest(base.GuestTestCase):

    def test_dropped_replica_never_resumes(self):
        spec, gdir = self.protect('st')
        last = self.wait_counter(gdir)
        sec = self.side('st', 'secondary')
        # A secondary that stops answering is dropped...
        os.kill(sec['host_pid'], signal.SIGSTOP)
        try:
            base.wait_for(lambda: self.side('st', 'primary').get(
                'state') == State.UNPROTECTED, 30, what='primary unprotected')
            # ...and the guest's answers from then on are not held.
            for _ in range(3):
                got = workload.counter_request('127.0.0.1', self.port)
                self.assertEqual(last + 1, got)
                last = got
        finally:
            os.kill(sec['host_pid'], signal.SIGCONT)
        prim = self.side('st', 'primary')
        os.kill(prim['qemu_pid'], signal.SIGKILL)
        base.wait_for(lambda: not self.side('st', 'primary')['alive'], 10,
                      what='the primary host to end')
        time.sleep(3)
        # Resuming the stale replica would take back the answers above.
        sec = self.side('st', 'secondary')
        self.assertIn(sec.get('state'), (State.STOPPED, State.LOST), sec)
        self.assertEqual([], base.qemu_pids_for('st'))


class IdleEpochTest(base.GuestTestCase):

    def test_epochs_stretch_while_the_guest_sends_nothing(self):
        # The guest writes its disk throughout but talks only when asked.
        spec, gdir = self.protect('ie', epoch_ms=100, idle_epoch_ms=1500)
        last = self.wait_counter(gdir)
        # The guest's network stack still sends for a few seconds after
        # a connection (ARP probes about once a second, each ending an
        # epoch); it is silent after that.
        time.sleep(3)

        def epochs():
            return self.side('ie', 'primary')['epochs']
        before, t0 = epochs(), time.monotonic()
        time.sleep(6)
        silent = (epochs() - before) / (time.monotonic() - t0)
        # Silent: about one epoch per 1.5 s (fixed epochs: ten a second).
        self.assertLess(silent, 2, f'{silent:.1f} epochs/s while silent')
        # Asked, the guest answers without waiting out an idle epoch: its
        # answer ends the epoch it was sent in.
        before, t0 = epochs(), time.monotonic()
        answers = self.talk(last, 4) - last
        talking = (epochs() - before) / (time.monotonic() - t0)
        self.assertGreater(answers, 8, f'{answers} answers in 4 s')
        self.assertGreater(talking, 2, f'{talking:.1f} epochs/s talking')
        print(f'idle epochs: {silent:.2f} epochs/s silent, {talking:.1f} '
              f'talking ({answers} answers in 4 s)')


class ClientLoadFailoverTest(base.GuestTestCase):
    """Adaptive epochs (each ends a few ms after the guest's first packet)
    under several clients at once, and the primary QEMU killed among
    them: output commit must stay exact."""

    CLIENTS = 4

    def test_no_answer_is_repeated_or_taken_back_under_load(self):
        spec, gdir = self.protect(
            'cl', adaptive_epochs=True, output_batch_ms=1, min_epoch_ms=5,
            max_pause_percent=60)
        self.wait_counter(gdir)
        prim = self.side('cl', 'primary')
        self.assertEqual(State.PROTECTED, prim['state'])
        answers = []            # (asked at, answered at, value, client)
        lock = threading.Lock()
        stop = threading.Event()
        killed = []             # (when, answers before)
        kill_after = random.randint(20, 40)

        def client(n):
            while not stop.is_set():
                asked = time.monotonic()
                got = workload.counter_request('127.0.0.1', self.port, 5)
                if got is None:
                    continue
                with lock:
                    answers.append((asked, time.monotonic(), got, n))
                    if killed or len(answers) < kill_after:
                        continue
                    # Right after an answer, as a client saw it: had its
                    # epoch not committed, the failover would take it
                    # back (one epoch is a few ms long here).
                    time.sleep(random.uniform(0, 0.01))
                    os.kill(prim['qemu_pid'], signal.SIGKILL)
                    killed.append((time.monotonic(), len(answers)))
        threads = [threading.Thread(target=client, args=(n,), daemon=True)
                   for n in range(self.CLIENTS)]
        for t in threads:
            t.start()
        self.addCleanup(stop.set)
        try:
            base.wait_for(lambda: killed, 120, what='the kill under load')
            t_kill, before = killed[0]
            self.wait_active('cl', 30)
            base.wait_for(lambda: sum(a[1] > t_kill for a in answers)
                          >= 20, 60, what='answers after the failover')
        finally:
            stop.set()
            for t in threads:
                t.join(10)
        self.assertGreaterEqual(before, 20, f'{before} answers, then the kill')
        values = [a[2] for a in answers]
        # No answer repeated: a value a client saw is never handed out
        # again by the restored guest (it would be, had the failover
        # taken back the epoch that produced it).
        self.assertEqual(len(values), len(set(values)),
                         sorted(v for v in values if values.count(v) > 1))
        # Nor taken back in time: an answer asked for after another was
        # seen is greater than it (each client's too), across the kill.
        by_end = sorted(answers, key=lambda a: a[1])
        ends = [a[1] for a in by_end]
        seen_max, highest = [], 0
        for a in by_end:
            highest = max(highest, a[2])
            seen_max.append(highest)
        for asked, _, value, n in answers:
            i = bisect.bisect_left(ends, asked)
            if i:
                self.assertGreater(value, seen_max[i - 1], (
                    f'client {n} asked after {seen_max[i - 1]} was seen '
                    f'and got {value}'))
        print(f'client load: {before} answers before the kill, '
              f'{len(answers) - before} after, {self.CLIENTS} clients')


class MultiVcpuFailoverTest(base.GuestTestCase):
    """A guest of two or four vCPUs (TCG runs one thread each): they all
    write its RAM while it runs; the checkpoint must hold every CPU's
    state and every page any of them wrote."""

    def test_a_two_vcpu_guest_fails_over_with_its_jobs_intact(self):
        self.fail_over_with_vcpus('mv', 2)

    def test_a_four_vcpu_guest_fails_over_with_its_jobs_intact(self):
        # (four TCG threads on this 2-core machine: slower, still exact)
        self.fail_over_with_vcpus('mv4', 4)

    def fail_over_with_vcpus(self, name, vcpus):
        spec, gdir = self.protect(name, run='writer,counter,dirty:32:16',
                                  smp=vcpus, tracker='hash',
                                  append='loglevel=7')
        primary_serial = os.path.join(gdir, 'primary', 'serial.log')
        last = self.wait_counter(gdir)
        # The guest's kernel runs on them all (its boot says so).
        self.assertRegex(workload.read_text(primary_serial),
                         rf'smp: Brought up \d+ nodes?, {vcpus} CPUs')
        # The dirty job's first passes done (a pass of 32 MiB at 16 MiB/s
        # takes two seconds of the guest's time, more on a busy host).
        base.wait_for(lambda: len(dirty_passes(workload.read_text(
            primary_serial))) >= 2, 60, 0.2, 'dirty passes before the kill')
        last = self.talk(last, random.uniform(3, 6))
        prim = self.side(name, 'primary')
        self.assertEqual(State.PROTECTED, prim['state'])
        # The counter's next answer is last + 1: nothing a client saw
        # is taken back, nothing repeated.
        self.kill_and_ask(prim['qemu_pid'], last)
        sec = self.wait_active(name)
        self.assertEqual([sec['qemu_pid']], base.qemu_pids_for(name))
        with open(f'/proc/{sec["qemu_pid"]}/cmdline', 'rb') as f:
            argv = f.read().split(b'\0')
        self.assertEqual(str(vcpus).encode(),
                         argv[argv.index(b'-smp') + 1])
        serial = os.path.join(gdir, 'secondary', 'serial.log')
        base.wait_for(lambda: len(dirty_passes(
            workload.read_text(serial))) >= 3 and len(workload.serial_acks(
                workload.read_text(serial))) >= 5, 60, 0.2,
            'dirty passes and writer ACKs after failover')
        operations.stop(self.state_dir, name)
        before = workload.read_text(primary_serial)
        after = workload.read_text(serial)
        # Each job ran on from where the primary left it: no reboot, no
        # stale page, the dirty passes and the disk chain continue.
        self.assertTrue(dirty_passes(before), 'the dirty job never ran')
        self.assertNotIn('DIRTY-BAD', before)
        self.assertNotIn('DIRTY-BAD', after)
        self.assertNotIn('MFTVM-GUEST-READY', after)
        self.assertGreaterEqual(dirty_passes(after)[0],
                                dirty_passes(before)[-1])
        base.assert_acks_continue_chain(self, after, sec['disk_layers'])
        print(f'{vcpus} vCPUs: restore {sec["failover_ms"]} ms, pause p50 '
              f'{prim.get("pause_ms_p50")} ms')


class GuestPoweroffTest(base.GuestTestCase):

    def test_a_guest_that_powers_off_stops_no_failover(self):
        # guest powers itself off once the host connects to its port
        spec, gdir = self.protect('po', run='writer,poweroff-on:7000')
        serial = os.path.join(gdir, 'primary', 'serial.log')
        base.wait_for(lambda: 'MFTVM-GUEST-READY' in workload.read_text(
            serial), 90, 0.2, 'the guest up')
        self.assertEqual(State.PROTECTED, self.side('po', 'primary')['state'])
        with socket.create_connection(('127.0.0.1', self.port), 10):
            pass
        prim = base.wait_for(
            lambda: (s := self.side('po', 'primary')).get('alive') is False
            and s, 60, what='the primary side to end')
        # a stop, not a failure: the secondary stood down, its replica
        # never resumed (the guest would start again, from the past)
        self.assertEqual(State.STOPPED, prim['state'], prim)
        self.assertEqual('the guest powered itself off', prim['reason'])
        sec = base.wait_for(
            lambda: (s := self.side('po', 'secondary')).get('alive') is False
            and s, 30, what='the secondary side to end')
        self.assertEqual(State.STOPPED, sec['state'], sec)
        self.assertIsNone(sec.get('takeover'))
        self.assertEqual([], base.qemu_pids_for('po'))
        self.assertIn('MFTVM-GUEST-POWEROFF', workload.read_text(serial))
        # its disk here holds what it wrote, chained to the end
        records.verify_chain(records.read_records(spec.disk))
