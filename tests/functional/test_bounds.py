"""Bounds on real QEMU: a protected guest's host processes do not grow
over thousands of epochs, and a primary frozen mid-frame is failed over.

Measured as an operator would: each instance process's resident
anonymous memory (``RssAnon`` in ``/proc/PID/status``), after a warm-up
and at the end. On main before issue 11 both grew linearly, with no
plateau: at 20 ms epochs the primary by 18 MiB and the secondary by
6 MiB per 1 000 epochs (qemu.qmp's default event listener kept every QMP
event; a long-lived event stream kept a history of its events; the
primary's queue kept a Tick per epoch its checkpoint overran).
"""

import contextlib
import os
import signal
import subprocess
import time

import fixtures
from testtools import content

from mftvm_openstack.contract.states import State
from mftvm_openstack.images import workload
from mftvm_openstack.instance import client
from mftvm_openstack.instance.config import FENCE_URL_ENV
from mftvm_openstack.local import operations
from tests.functional import base
from tests.integration import lab

#: epochs before the first sample: caches, pools, the first full-RAM
#: checkpoint and the tracker's copy of guest RAM are in place by then
WARMUP_EPOCHS = 1000
#: epochs at the end. An epoch of 50 ms (the issue's measurement) and its
#: checkpoint take about 70 ms here: 6 000 epochs take about 7 min on the
#: 2-core CI machine. (20 ms epochs, under the CI's load, outran the
#: secondary's overlay pool and lost the secondary: a bound working, not
#: a leak.) ``MFTVM_MEMORY_EPOCHS=10000`` runs the issue's full count.
TOTAL_EPOCHS = int(os.environ.get('MFTVM_MEMORY_EPOCHS', '6000'))
#: allowed growth between the samples. A leak as small as 1.7 KiB per
#: epoch crosses it over the 5 000 epochs measured (the old ones did in
#: under 500); what may legitimately grow meanwhile is the pause window
#: of the status (Stats.WINDOW epochs, about 170 bytes each: 0.8 MiB)
#: and the allocator's fragmentation.
BOUND_KIB = 8 * 1024


def rss_anon_kib(pid):
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('RssAnon:'):
                return int(line.split()[1])
    raise AssertionError(f'no RssAnon for pid {pid}')


class MemoryBoundTest(base.GuestTestCase):

    def epochs(self, name):
        """(primary, secondary) status, once both have host pids."""
        return self.side(name, 'primary'), self.side(name, 'secondary')

    def sample_at(self, name, epochs, timeout):
        """RssAnon (KiB) of both host processes once the primary has
        taken ``epochs`` epochs."""
        deadline = time.monotonic() + timeout
        while True:
            primary, secondary = self.epochs(name)
            self.assertEqual(State.PROTECTED, primary.get('state'),
                             primary.get('reason'))
            self.assertEqual(State.STANDBY, secondary.get('state'),
                             secondary.get('reason'))
            if primary.get('epochs', 0) >= epochs:
                return {'epochs': primary['epochs'],
                        'committed': secondary.get('last_committed_epoch'),
                        'primary': rss_anon_kib(primary['host_pid']),
                        'secondary': rss_anon_kib(secondary['host_pid'])}
            self.assertLess(time.monotonic(), deadline,
                            f'{epochs} epochs not reached')
            time.sleep(0.5)

    def test_thousands_of_epochs_do_not_grow_the_host_processes(self):
        # An idle guest, every epoch 50 ms (no idle stretching).
        self.protect('mem', run='counter', epoch_ms=50, idle_epoch_ms=0)
        first = self.sample_at('mem', WARMUP_EPOCHS, 300)
        last = self.sample_at('mem', TOTAL_EPOCHS, 2400)
        self.addDetail('rss_anon', content.text_content(
            f'after warm-up {first}\nat the end {last}\n'))
        # The secondary kept up: it acked nearly all of them.
        self.assertGreater(last['committed'], TOTAL_EPOCHS - 100)
        for role in ('primary', 'secondary'):
            growth = last[role] - first[role]
            self.assertLessEqual(
                growth, BOUND_KIB,
                f'the {role} host process grew by {growth} KiB of '
                f'anonymous memory in {last["epochs"] - first["epochs"]} '
                f'epochs (from {first[role]} KiB)')


def queued_bytes(path):
    """Bytes waiting to be read on the accepted side of the unix stream
    socket listening at ``path`` (``ss``: Recv-Q)."""
    out = subprocess.run(['ss', '-xn'], capture_output=True, text=True,
                         check=True).stdout
    queued = 0
    for line in out.splitlines()[1:]:
        fields = line.split()
        if fields[1] == 'ESTAB' and fields[4] == path:
            queued = max(queued, int(fields[2]))
    return queued


class FrozenPrimaryTest(base.GuestTestCase):
    """A primary host process frozen (SIGSTOP) while a large checkpoint is
    on its way: the secondary must fail over within detection + lease,
    and the frozen side must never run the guest on."""

    #: seconds; the Redis lease the fence uses (the lock file of one
    #: machine would never lapse while its frozen holder lives)
    LEASE = 3

    def setUp(self):
        super().setUp()
        self.redis = self.useFixture(lab.Redis())
        self.useFixture(fixtures.EnvironmentVariable(
            FENCE_URL_ENV, self.redis.url))

    def protect_dirtying(self, name):
        spec = operations.make_spec(
            name, self.image.kernel, self.image.initrd, self.make_disk(),
            # (dirtying 128 MiB leaves the guest room only with 256)
            append='console=ttyS0 quiet mftvm.run=dirty:128,counter',
            memory_mib=256,
            nic=f'user,hostfwd=tcp:127.0.0.1:{self.port}-:7000')
        self.addCleanup(self._stop_guest, name)
        return operations.protect(
            spec, operations.ProtectOptions(epoch_ms=200),
            self.state_dir, host_options={'fence_lease': self.LEASE})

    def stop_mid_frame(self, primary_pid, data_sock, timeout=60):
        """SIGSTOP the primary's host process while a large frame is on
        its way to the secondary (over 64 KiB wait in its socket: only a
        checkpoint's RAM delta queues that much)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if queued_bytes(data_sock) > 64 << 10:
                os.kill(primary_pid, signal.SIGSTOP)
                return time.monotonic()
        self.fail(f'no large frame seen on its way; the primary says '
                  f'{self.side("frz", "primary")}')

    def test_a_primary_frozen_mid_frame_is_failed_over(self):
        gdir = self.protect_dirtying('frz')
        last = self.wait_counter(gdir)
        self.assertIsNotNone(last)
        primary = self.side('frz', 'primary')
        serial = os.path.join(gdir, 'primary', 'serial.log')
        base.wait_for(lambda: 'DIRTY-READY' in workload.read_text(serial),
                      60, 0.2, 'the guest dirtying its RAM')
        host_pid, old_qemu = primary['host_pid'], primary['qemu_pid']
        self.addCleanup(_kill_quietly, host_pid, signal.SIGKILL)
        self.addCleanup(_kill_quietly, host_pid, signal.SIGCONT)
        stopped_at = self.stop_mid_frame(
            host_pid, os.path.join(gdir, 'secondary', 'data.sock'))

        active = self.wait_active('frz', timeout=30)
        after = base.wait_for(
            lambda: workload.counter_request('127.0.0.1', self.port, 5),
            60, 0, 'an answer from the failed-over guest')
        answered = time.monotonic() - stopped_at
        # The last answer came from a committed epoch: nothing taken back.
        self.assertEqual(last + 1, after)
        # Detected inside a frame, not by the silence between frames.
        self.assertIn('stalled mid-frame', active['reason'])
        takeover = active['takeover']
        self.addDetail('timings', content.text_content(
            f'SIGSTOP -> detected {takeover["detected"] - stopped_at:.2f}s'
            f', fenced {takeover["fenced"] - stopped_at:.2f}s, resumed '
            f'{takeover["resumed"] - stopped_at:.2f}s, answered '
            f'{answered:.2f}s (detection 1s + lease {self.LEASE}s)\n'))

        # The frozen side's QEMU does not run on beside the new one...
        self.assertNotIn(old_qemu, base.qemu_pids_for('frz'))
        self.assertEqual(1, len(base.qemu_pids_for('frz')))
        # ...nor after its host process wakes up: it finds the guest gone
        # and the lease another's, and ends without a guest.
        os.kill(host_pid, signal.SIGCONT)
        base.wait_for(lambda: not client.pid_alive(host_pid), 30,
                      what='the woken primary to end')
        self.assertEqual([active['qemu_pid']], base.qemu_pids_for('frz'))
        self.assertEqual(after + 1, workload.counter_request(
            '127.0.0.1', self.port, 5))


def _kill_quietly(pid, sig):
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
