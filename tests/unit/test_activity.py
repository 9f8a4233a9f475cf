"""Whether a guest's QEMU is busy (ft.pair.activity), read from a /proc
laid out in a temporary directory, and from real processes."""

import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

from mftvm_openstack.ft.pair.activity import QemuActivity, thread_state


def stat_line(tid, comm, state):
    return f'{tid} ({comm}) {state} 1 {tid} {tid} 0 -1 4194560 0 0 0 0\n'


class QemuActivityTest(unittest.TestCase):

    def setUp(self):
        self.proc = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.proc)

    def threads(self, pid, **states):
        """Process ``pid`` with threads named t<tid> in those states."""
        for name, state in states.items():
            tid = name[1:]
            os.makedirs(os.path.join(self.proc, str(pid), 'task', tid),
                        exist_ok=True)
            with open(os.path.join(self.proc, str(pid), 'task', tid,
                                   'stat'), 'w') as f:
                f.write(stat_line(tid, 'qemu-system-x86', state))

    def busy(self, pid=77):
        return QemuActivity(pid, proc=self.proc).busy()

    def test_every_thread_asleep_is_quiet(self):
        self.threads(77, t77='S', t78='S', t80='S')
        self.assertIs(False, self.busy())

    def test_a_running_or_runnable_vcpu_is_busy(self):
        self.threads(77, t77='S', t78='R')
        self.assertIs(True, self.busy())

    def test_a_worker_waiting_for_the_disk_is_busy(self):
        # The guest's vCPU sleeps while its O_DSYNC write is flushed on
        # the host: its answer is still to come.
        self.threads(77, t77='S', t78='S', t81='D')
        self.assertIs(True, self.busy())

    def test_stopped_and_zombie_threads_are_not_busy(self):
        self.threads(77, t77='S', t78='t', t79='Z', t80='I')
        self.assertIs(False, self.busy())

    def test_a_process_that_is_gone_cannot_tell(self):
        self.assertIsNone(self.busy(pid=404))

    def test_a_thread_that_ended_meanwhile_is_skipped(self):
        self.threads(77, t77='S', t78='R')
        os.unlink(os.path.join(self.proc, '77', 'task', '78', 'stat'))
        self.assertIs(False, self.busy())

    def test_a_thread_name_with_parentheses_does_not_fool_it(self):
        line = stat_line(9, 'CPU 0/TCG) R (x', 'S')
        self.assertEqual('S', thread_state(line))
        self.assertEqual('R', thread_state(stat_line(9, 'a b', 'R')))

    def test_real_processes_asleep_and_spinning(self):
        # The real /proc: a process asleep is quiet, one spinning busy
        # (running or waiting for a CPU, R either way).
        for argv, busy in ((['sleep', '30'], False),
                           ([sys.executable, '-c', 'while True: pass'],
                            True)):
            proc = subprocess.Popen(argv)
            self.addCleanup(proc.wait)
            self.addCleanup(proc.kill)
            seen = QemuActivity(proc.pid).busy()
            for _ in range(200):        # (until it runs its loop or sleeps)
                if seen is busy:
                    break
                time.sleep(0.01)
                seen = QemuActivity(proc.pid).busy()
            self.assertIs(busy, seen, argv)


if __name__ == '__main__':
    unittest.main()
