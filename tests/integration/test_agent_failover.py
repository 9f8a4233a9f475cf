"""Agents on three "hosts" (network namespaces) protect a real guest.

Each host runs a real ``mftvm-agent``; they talk over a real RabbitMQ (in
the lab's core namespace) and fence through a real Redis beside it, or,
where a test class says ``backend = 'etcd'``, through a 3-member etcd
cluster whose members are hosts of their own (``e1``..``e3``). The guest
runs in real QEMU (TCG). A host dies as a whole: every process in its
namespace — agent, instance process, QEMU — gets SIGKILL at once.
"""

from __future__ import annotations

import glob
import json
import os
import random
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time

import testtools

from mftvm_openstack.agent import rpcapi
from mftvm_openstack.images import workload
from mftvm_openstack.local import demo, operations
from tests.functional import base
from tests.integration import lab as ftlab

HOSTS = ('h1', 'h2', 'h3')
ETCD_MEMBERS = ('e1', 'e2', 'e3')
TICK_RE = re.compile(r'^TICK (\d+)\s*$')


class AgentLab(testtools.TestCase):
    """Three hosts with an agent each, a broker and a backend."""

    #: the fencing backend: 'redis' (one server) or 'etcd' (3 members)
    backend = 'redis'
    #: the hosts that run an agent (each other's peers)
    agent_hosts: tuple[str, ...] = HOSTS
    #: more namespaces on the lab's network, without an agent
    other_hosts: tuple[str, ...] = ()

    def setUp(self) -> None:
        super().setUp()
        #: requests that timed out since the last answer (see talk)
        self.unanswered = 0
        self.image = base.guest_image()
        if self.backend == 'etcd':
            self.lab = self.useFixture(ftlab.Lab(
                self.agent_hosts + self.other_hosts + ETCD_MEMBERS))
            self.etcd = self.useFixture(ftlab.EtcdCluster(self.lab,
                                                          ETCD_MEMBERS))
            self.fencing: ftlab.Redis | ftlab.EtcdCluster = self.etcd
        else:
            self.lab = self.useFixture(ftlab.Lab(self.agent_hosts
                                                 + self.other_hosts))
        self.rabbit = self.useFixture(ftlab.RabbitMQ(self.lab))
        if self.backend != 'etcd':
            self.redis = self.useFixture(ftlab.Redis(self.lab))
            self.fencing = self.redis
        self.tmp = tempfile.mkdtemp(prefix='mftvm-agents-', dir='/var/tmp')
        if not os.environ.get('MFTVM_KEEP_TEST_DIRS'):
            self.addCleanup(shutil.rmtree, self.tmp, True)
        self.name = f'ft{os.getpid()}'
        self.addCleanup(self._remove_ram_files)
        self.agents = {h: self.start_agent(h) for h in self.agent_hosts}
        transport = rpcapi.get_transport(url=self.rabbit.url)
        self.addCleanup(transport.cleanup)   # before the broker goes
        self.api = rpcapi.AgentAPI(transport, timeout=10)
        for host in self.agent_hosts:
            base.wait_for(lambda h=host: self._answers(h), 60, 0.5,
                          f'agent {host} to answer')

    def _remove_ram_files(self) -> None:
        for path in glob.glob(f'/dev/shm/mftvm-{self.name}-*.ram'):
            os.unlink(path)

    def start_agent(self, host: str) -> subprocess.Popen:
        return ftlab.start_agent(self.lab, host, self.tmp, self.rabbit,
                                 self.fencing, peers=self.agent_hosts)

    def _answers(self, host: str) -> bool:
        try:
            self.api.list({}, host)
            return True
        except Exception:
            return False

    def instance_dir(self, host: str) -> str:
        return os.path.join(self.tmp, host, 'instances', self.name)

    def status(self, host: str) -> dict:
        try:
            return self.api.status({}, host, self.name)
        except Exception:
            return {}

    def protect(self, port: int, run: str = 'writer,counter') -> int:
        """Protect the guest from h1 onto h2; once its counter service
        listens, return its first answer."""
        disk = os.path.join(self.tmp, 'disk.raw')
        with open(disk, 'wb') as f:
            f.truncate(64 << 20)
        spec = operations.make_spec(
            self.name, self.image.kernel, self.image.initrd, disk,
            append=f'console=ttyS0 quiet mftvm.run={run} '
                   'mftvm.writer_interval_ms=50',
            memory_mib=128,
            nic=f'user,hostfwd=tcp:0.0.0.0:{port}-:7000')
        self.api.protect({}, 'h1', self.name, spec.to_json(),
                         {'epoch_ms': 200}, secondary_host='h2')
        serial = os.path.join(self.instance_dir('h1'), 'primary',
                              'serial.log')
        base.wait_for(lambda: 'COUNTER-READY' in workload.read_text(serial),
                      90, 0.2, 'the guest counter service')
        first = workload.counter_request(self.lab.ip('h1'), port, 10)
        self.assertIsNotNone(first)
        return first

    def talk(self, host: str, port: int, last: int, seconds: float) -> int:
        """Count for a while against ``host``. Every answer is last + 1 —
        or, after requests that timed out (the guest may have counted
        them), at most one more per such request: never a value already
        seen. Requests left unanswered at the end count on into the
        next talk or failover: the guest may have counted them too (under
        load a request times out while its answer is still held)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            got = workload.counter_request(self.lab.ip(host), port)
            if got is None:
                self.unanswered += 1
                continue
            self.assert_next(last, got)
            last = got
        return last

    def assert_next(self, last: int, got: int) -> None:
        """Output commit: ``got`` follows the last answer seen, with no
        gap but one count per request left unanswered since."""
        self.assertTrue(last < got <= last + 1 + self.unanswered,
                        f'answer {got} after {last} '
                        f'({self.unanswered} unanswered)')
        self.unanswered = 0

    def fail_over(self, dead: str, survivor: str, port: int,
                  last: int) -> tuple[int, float]:
        """Kill host ``dead`` whole; the guest answers on ``survivor``
        with exactly last + 1. Returns (that answer, seconds it took)."""
        time.sleep(random.uniform(0, 0.2))
        self.lab.kill_all(dead)
        killed = time.monotonic()
        # A long answer timeout: a request the guest takes must not be
        # given up on (its count would look like a lost answer).
        got = base.wait_for(
            lambda: workload.counter_request(self.lab.ip(survivor), port,
                                             15),
            60, 0, f'an answer from the guest on {survivor}')
        took = time.monotonic() - killed
        # Output commit across the failover: nothing seen was taken back
        # (exactly last + 1 unless requests before the kill went
        # unanswered).
        self.assert_next(last, got)
        return got, took

    def qemu_pids(self) -> list[int]:
        return base.qemu_pids_for(self.name)


class HostLossTest(AgentLab):

    def test_host_loss_fails_over_and_reprotects_twice(self) -> None:
        port = demo.free_port()
        last = self.protect(port)
        st = self.status('h1')
        self.assertEqual(('protected', 'h2'), (st['state'], st['peer']))
        last = self.talk('h1', port, last, random.uniform(2, 4))
        self.assertEqual(1, len(self.qemu_pids()))

        # h1 dies: the guest goes on at h2, which re-protects it on h3.
        last, took1 = self.fail_over('h1', 'h2', port, last)
        self.assertEqual(1, len(self.qemu_pids()))
        st = base.wait_for(
            lambda: (s := self.status('h2')).get('state') == 'protected'
            and s.get('last_committed_epoch', 0) >= 1 and s, 120, 0.5,
            'the guest to be re-protected from h2')
        self.assertEqual('h3', st['peer'])
        restore1 = self._restore_ms('h2')
        last = self.talk('h2', port, last, random.uniform(1, 3))

        # Then h2 dies too: the guest goes on at h3.
        last, took2 = self.fail_over('h2', 'h3', port, last)
        self.assertEqual(1, len(self.qemu_pids()))
        st = base.wait_for(lambda: (s := self.status('h3')).get('state')
                           in ('active', 'syncing', 'protected') and s,
                           30, 0.5, 'h3 to run the guest')
        self.assertEqual('primary', st['role'])
        last = self.talk('h3', port, last, 1)
        print(f'kill -> next answer: {took1 * 1000:.0f} ms (h1 -> h2, '
              f'restore {restore1} ms), {took2 * 1000:.0f} ms (h2 -> h3)')

    def _restore_ms(self, host: str) -> object:
        # After re-protection the pair's own stats are the new pair's;
        # the takeover stamps stay in the status.
        take = self.status(host).get('takeover') or {}
        if take.get('resumed') is None or take.get('fenced') is None:
            return None
        return round((take['resumed'] - take['fenced']) * 1000)


class SecondaryLossTest(AgentLab):

    def test_secondary_host_loss_primary_carries_on_reprotected(self):
        port = demo.free_port()
        last = self.protect(port)
        self.lab.kill_all('h2')
        # The guest never stops answering on h1, and nothing seen is lost.
        last = self.talk('h1', port, last, 2)
        st = base.wait_for(
            lambda: (s := self.status('h1')).get('state') == 'protected'
            and s.get('peer') == 'h3'
            and s.get('last_committed_epoch', 0) >= 1 and s, 120, 0.5,
            'the guest to be re-protected onto h3')
        self.assertEqual('primary', st['role'])
        last = self.talk('h1', port, last, 1)
        self.assertEqual(1, len(self.qemu_pids()))


class PartitionTest(AgentLab):

    def test_cut_off_primary_fences_itself_one_copy_ever(self):
        port = demo.free_port()
        # No disk writer: a guest blocked on its unreachable disk replica
        # would stop by itself and hide whether the fence works. The
        # ticker prints without touching the disk.
        last = self.protect(port, run='counter,ticker')
        h1_serial = os.path.join(self.instance_dir('h1'), 'primary',
                                 'serial.log')
        h2_serial = os.path.join(self.instance_dir('h2'), 'secondary',
                                 'serial.log')
        last = self.talk('h1', port, last, 1)
        on_h1 = base.SerialWatcher(h1_serial, TICK_RE)
        self.addCleanup(on_h1.stop)
        on_h2 = base.SerialWatcher(h2_serial, TICK_RE)
        self.addCleanup(on_h2.stop)
        copies = CopyCounter(self.qemu_pids)
        self.addCleanup(copies.stop)

        lease = 3
        self.lab.link_down('h1')
        cut = time.monotonic()
        got = base.wait_for(
            lambda: workload.counter_request(self.lab.ip('h2'), port, 2),
            60, 0, 'an answer from the guest on h2')
        self.assert_next(last, got)
        last = got
        # Stay cut off well past the lease, then heal.
        time.sleep(max(0.0, cut + 2 * lease - time.monotonic()))
        self.lab.link_up('h1')
        st = base.wait_for(
            lambda: (s := self.status('h2')).get('state') == 'protected'
            and s.get('last_committed_epoch', 0) >= 1 and s, 120, 0.5,
            'the survivor to be re-protected')
        # Onto h3, or onto h1 once healed: its copy fenced itself, and a
        # first try onto h3 may time out on a loaded machine (the soak
        # saw 'checkpoint 2 failed: TimeoutError()', then h1 chosen).
        self.assertIn(st['peer'], ('h1', 'h3'))
        last = self.talk('h2', port, last, 1)
        copies.stop()

        # Never two QEMUs for the guest, and the guest's own output: h1's
        # copy printed its last tick before h2's copy printed its first.
        self.assertEqual(1, copies.most, copies.seen)
        self.assertTrue(on_h1.acks and on_h2.acks)
        self.assertLess(on_h1.acks[-1][0], on_h2.acks[0][0])
        ended = os.path.join(self.tmp, 'h1', 'ended', self.name, 'primary',
                             'status.json')
        h1_final = base.wait_for(lambda: _json(ended), 30, 0.5,
                                 'h1 to forget its fenced copy')
        self.assertEqual('fenced', h1_final['state'])
        print(f'partition: h1 fenced itself; h2 answered '
              f'{(on_h2.acks[0][0] - cut) * 1000:.0f} ms after the cut')


class AgentRestartTest(AgentLab):

    def test_agents_killed_and_restarted_protection_resumes(self):
        port = demo.free_port()
        last = self.protect(port)
        before = {h: self.status(h) for h in ('h1', 'h2')}
        for host in ('h1', 'h2'):
            self.agents[host].kill()
            self.agents[host].wait()
        # The guest is still protected without its agents...
        epochs = before['h1']['last_committed_epoch']
        last = self.talk('h1', port, last, 1)
        for host in ('h1', 'h2'):
            self.agents[host] = self.start_agent(host)
            base.wait_for(lambda h=host: self._answers(h), 60, 0.5,
                          f'agent {host} to answer again')
        # ...and the restarted agents find it as it was: same processes,
        # same roles, epochs moving on, one copy.
        after = {h: self.status(h) for h in ('h1', 'h2')}
        for host in ('h1', 'h2'):
            self.assertEqual(before[host]['host_pid'],
                             after[host]['host_pid'])
            self.assertEqual(before[host]['role'], after[host]['role'])
        self.assertEqual('protected', after['h1']['state'])
        self.assertGreater(after['h1']['last_committed_epoch'], epochs)
        self.assertEqual([before['h1']['qemu_pid']], self.qemu_pids())
        # Protection really resumed: losing h1 now still fails over.
        last, _ = self.fail_over('h1', 'h2', port, last)
        base.wait_for(
            lambda: self.status('h2').get('state') == 'protected', 120,
            0.5, 'h2 to re-protect the guest')


class BackendLossTest(AgentLab):

    def test_lost_backend_stops_no_guest_and_failover_still_works(self):
        port = demo.free_port()
        last = self.protect(port)
        # The coordination backend freezes for three leases: nobody can
        # renew or win a lease. The secondary still hears the primary, so
        # the primary runs on, protected.
        self.redis.process.send_signal(signal.SIGSTOP)
        self.addCleanup(self.redis.process.send_signal, signal.SIGCONT)
        last = self.talk('h1', port, last, 9)
        # ...and still answers at the end of it.
        got = workload.counter_request(self.lab.ip('h1'), port, 5)
        self.assertIsNotNone(got)
        self.assert_next(last, got)
        last = got
        st = self.status('h1')
        self.assertEqual(('protected', False),
                         (st['state'], st.get('lease_held')))
        self.assertEqual(1, len(self.qemu_pids()))
        # Back: the primary takes its lease again...
        self.redis.process.send_signal(signal.SIGCONT)
        base.wait_for(lambda: self.status('h1').get('lease_held'), 15, 0.2,
                      'the primary to hold its lease again')
        # ...so fencing works as before: h1 dies, h2 takes over.
        last, _ = self.fail_over('h1', 'h2', port, last)


class BackendDownAtCrashTest(AgentLab):

    def test_a_crash_during_a_backend_outage_resumes_once_it_is_back(self):
        port = demo.free_port()
        last = self.protect(port)
        last = self.talk('h1', port, last, 1)
        # The backend is down when the primary's host dies: the fence is
        # undecided, which is no held lock. The secondary waits for it,
        # its replica kept, for longer than it used to (10 s) and longer
        # than any lease...
        self.redis.process.send_signal(signal.SIGSTOP)
        self.addCleanup(self.redis.process.send_signal, signal.SIGCONT)
        self.lab.kill_all('h1')
        killed = time.monotonic()
        st = base.wait_for(
            lambda: 'waiting for the fence' in (
                (s := self.status('h2')).get('error') or '') and s,
            30, 0.2, 'h2 to say it waits for the fence')
        self.assertEqual('failing-over', st['state'])
        time.sleep(max(0.0, killed + 15 - time.monotonic()))
        st = self.status('h2')
        self.assertEqual('failing-over', st['state'])
        self.assertIn('waiting for the fence', st['error'])
        self.assertEqual([], self.qemu_pids())
        # ...and once it is back, the guest resumes with nothing lost.
        self.redis.process.send_signal(signal.SIGCONT)
        got = base.wait_for(
            lambda: workload.counter_request(self.lab.ip('h2'), port, 15),
            60, 0, 'an answer from the guest on h2')
        self.assert_next(last, got)
        self.assertEqual(1, len(self.qemu_pids()))


class EtcdPartitionTest(PartitionTest):
    """The cut-off primary, fenced by the etcd cluster."""

    backend = 'etcd'


class CopyCounter:
    """Samples how many QEMUs run the guest, keeping the most seen.

    A QEMU that was sent SIGKILL (the test's "host dies") can run no more
    guest code: the kernel marks every thread of it for the kill, and none
    returns to user mode again. Its exit may still take a while on a
    loaded machine, and its command line stays visible until its memory
    is torn down, so such a process is not counted as a copy; it is kept
    in ``seen`` with the sample, so a failure says what was running."""

    def __init__(self, pids) -> None:
        self.most = 0
        #: the most QEMUs seen at once, dying ones included
        self.most_visible = 0
        #: the sample that gave ``most``: (pid, 'running' or 'dying',
        #: its network namespace, i.e. which host) for each QEMU
        self.seen: list[tuple[int, str, str]] = []
        self._pids = pids
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            sample = [(pid, 'dying' if _being_killed(pid) else 'running',
                       _netns(pid)) for pid in self._pids()]
            running = sum(1 for _, how, _ in sample if how == 'running')
            self.most_visible = max(self.most_visible, len(sample))
            if running > self.most:
                self.most = running
                self.seen = sample
            time.sleep(0.02)

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join()
        if self.most_visible > self.most:
            print(f'copies: {self.most} running at most; {self.most_visible}'
                  f' seen with a killed one still exiting')


#: SIGKILL's bit in /proc/PID/status's pending-signal masks
_SIGKILL_BIT = 1 << (signal.SIGKILL - 1)
#: PF_EXITING in /proc/PID/stat's flags: set as the process starts to exit
_PF_EXITING = 0x4


def _netns(pid: int) -> str:
    try:
        return os.readlink(f'/proc/{pid}/ns/net')
    except OSError:
        return '(gone)'


def _being_killed(pid: int) -> bool:
    """True once ``pid`` runs no more user code: SIGKILL pending, exiting,
    a zombie, or gone."""
    try:
        with open(f'/proc/{pid}/status') as f:
            status = dict(line.split(':', 1) for line in f if ':' in line)
        with open(f'/proc/{pid}/stat') as f:
            # after the command's ')': state is field 3, flags field 9
            fields = f.read().rsplit(')', 1)[1].split()
    except (OSError, ValueError, IndexError):
        return True
    pending = (int(status.get('SigPnd', '0'), 16)
               | int(status.get('ShdPnd', '0'), 16))
    return (fields[0] in ('Z', 'X') or bool(pending & _SIGKILL_BIT)
            or bool(int(fields[6]) & _PF_EXITING))


def _json(path: str):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
