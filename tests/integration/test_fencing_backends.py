"""Fences on real backends: a 3-member etcd cluster, and one Redis.

Both must give the same answers: one owner at a time, a lease that lapses
``lease`` seconds after the last renewal (and the lapsed holder learns it
lost), stale marks that outlive their writer. Only etcd also survives the
loss or partition of one of its members. On both a stale mark is written
only under the lease at that moment (an etcd transaction, a Redis script
comparing the lock's token). Without quorum every fence call
answers within about a second: no call hangs, nobody wins.

The etcd members run each in a lab host's namespace (``e1``..``e3``), so a
member can be frozen (SIGSTOP), killed or cut off (``link_down``); the
fences run here, in the test process, and reach them over the lab bridge.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import testtools

from mftvm_openstack import fencing
from tests.integration import lab as ftlab

LEASE = 3
MEMBERS = ('e1', 'e2', 'e3')
#: a call that does not return within this is a hang, not slowness
HANG = 10.0
#: "fails fast": a fence call on a backend that cannot decide
FAST = 3.0


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    """(what ``fn()`` returned or raised, seconds it took); fails the
    test rather than wait on a call that hangs."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out['value'] = fn()
        except Exception as exc:
            out['value'] = exc

    start = time.monotonic()
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(HANG)
    if worker.is_alive():
        raise AssertionError(f'a fence call hung for over {HANG}s')
    return out['value'], time.monotonic() - start


class FenceSemantics:
    """What every networked fence must do; subclasses make the backend."""

    url: str

    def make(self, member: str) -> fencing.Fence:
        fence = fencing.load_fence(self.url, 'vm0', member=member,
                                   lease=LEASE, state_dir='/nonexistent')
        self.addCleanup(fence.close)
        self.addCleanup(fence.release)
        return fence

    def test_one_owner_at_a_time(self):
        fences = [self.make(f'h{i}') for i in range(4)]
        won: list[fencing.Fence] = []
        start = threading.Barrier(len(fences))

        def contend(fence: fencing.Fence) -> None:
            start.wait()
            if fence.acquire(1.0):
                won.append(fence)

        threads = [threading.Thread(target=contend, args=(f,))
                   for f in fences]
        for t in threads:
            t.start()
        for t in threads:
            t.join(HANG)
        self.assertEqual(1, len(won))
        won[0].renew()
        won[0].release()
        others = [f for f in fences if f is not won[0]]
        self.assertTrue(others[0].acquire(2))
        self.assertFalse(others[1].acquire(0.3))

    def test_lease_lapses_after_the_last_renewal(self):
        a, b = self.make('a'), self.make('b')
        self.assertTrue(a.acquire(2))
        a.renew()
        renewed = time.monotonic()
        # Within the lease nobody else wins it...
        self.assertFalse(b.acquire(LEASE / 2))
        # ...after it, with no renewal, somebody does.
        self.assertTrue(b.acquire(3 * LEASE))
        self.assertGreater(time.monotonic() - renewed, LEASE * 0.9)
        # The old holder learns it lost: no renewal, no reclaim.
        self.assertRaises(fencing.FenceError, a.renew)
        self.assertIs(False, a.reclaim())
        b.renew()

    def test_renewals_keep_the_lease(self):
        a, b = self.make('a'), self.make('b')
        self.assertTrue(a.acquire(2))
        until = time.monotonic() + 2 * LEASE
        while time.monotonic() < until:
            a.renew()
            self.assertFalse(b.acquire(LEASE / 4))
        self.assertTrue(a.reclaim())

    def test_a_lapsed_holder_cannot_mark_stale(self):
        # The backend compares: a holder whose lease lapsed (and was
        # taken over) learns it lost, and no mark lands.
        a, b = self.make('a'), self.make('b')
        self.assertTrue(a.acquire(2))
        self.assertTrue(b.acquire(3 * LEASE))
        self.assertRaises(fencing.FenceLost, a.mark_stale, 'p1', 'late')
        self.assertEqual((True, ''), b.replica_valid('p1'))
        # while the holder's own mark does land
        b.mark_stale('p2', 'the primary went on unprotected')
        self.assertEqual((False, 'the primary went on unprotected'),
                         a.replica_valid('p2'))

    def test_stale_mark_outlives_its_writer(self):
        a, b = self.make('a'), self.make('b')
        self.assertEqual((True, ''), b.replica_valid('p1'))
        self.assertTrue(a.acquire(2))
        a.mark_stale('p1', 'the primary went on unprotected')
        a.close()           # the writer dies without releasing
        self.assertTrue(b.acquire(3 * LEASE))
        valid, why = b.replica_valid('p1')
        self.assertFalse(valid)
        self.assertTrue(why)
        self.assertEqual((True, ''), b.replica_valid('p2'))


class RedisFenceTest(FenceSemantics, testtools.TestCase):
    """The single-node backend, for comparison."""

    def setUp(self):
        super().setUp()
        self.url = self.useFixture(ftlab.Redis(None)).url


class EtcdFenceTest(FenceSemantics, testtools.TestCase):
    """The production backend: a 3-member etcd cluster in the lab."""

    def setUp(self):
        super().setUp()
        self.lab = self.useFixture(ftlab.Lab(hosts=MEMBERS))
        self.etcd = self.useFixture(ftlab.EtcdCluster(self.lab, MEMBERS))
        self.url = self.etcd.url

    def _still_decides(self) -> None:
        a, b = self.make('a'), self.make('b')
        self.assertIs(True, timed(lambda: a.acquire(5))[0])
        for _ in range(3):
            a.renew()
        self.assertFalse(b.acquire(0.5))
        a.mark_stale('p1', 'x')
        a.release()
        self.assertTrue(b.acquire(5))
        self.assertFalse(b.replica_valid('p1')[0])

    def test_works_with_a_member_frozen(self):
        # e1 is the first endpoint every fence tries.
        self.etcd.process('e1').send_signal(signal.SIGSTOP)
        self._still_decides()

    def test_works_with_the_leader_killed(self):
        a, b = self.make('a'), self.make('b')
        self.assertTrue(a.acquire(2))
        leader = self.etcd.leader()
        self.assertIsNotNone(leader)
        self.lab.kill_all(leader)
        # A new leader is elected; the lease stays a's while it renews.
        ftlab.wait_for(lambda: self.etcd.leader() not in (None, leader),
                       10, what='a new etcd leader')
        a.renew()
        self.assertFalse(b.acquire(0.5))
        a.release()
        self.assertTrue(b.acquire(5))

    def test_works_with_a_member_partitioned_away(self):
        self.lab.link_down('e1')
        self._still_decides()

    def _without_quorum(self, stop: Callable[[str], None]) -> None:
        a, b = self.make('a'), self.make('b')
        self.assertTrue(a.acquire(2))
        a.renew()
        stop('e2')
        stop('e3')
        # e1 alone is a minority: it answers nothing, and no call waits
        # for it longer than the fence's budget.
        for _ in range(2):
            got, took = timed(a.renew)
            self.assertIsInstance(got, fencing.FenceError)
            self.assertLess(took, FAST)
        got, took = timed(lambda: b.acquire(0.5))
        self.assertIs(False, got)
        self.assertLess(took, 0.5 + FAST)
        got, took = timed(a.reclaim)
        self.assertIsNone(got)
        self.assertLess(took, FAST)
        got, took = timed(lambda: b.replica_valid('p1'))
        self.assertIsInstance(got, fencing.FenceError)
        self.assertLess(took, FAST)

    def test_no_quorum_frozen_members_fail_fast(self):
        self._without_quorum(
            lambda m: self.etcd.process(m).send_signal(signal.SIGSTOP))

    def test_no_quorum_killed_members_fail_fast(self):
        self._without_quorum(self.lab.kill_all)

    def test_nobody_wins_without_quorum(self):
        a, b = self.make('a'), self.make('b')
        self.assertTrue(a.acquire(2))
        for m in ('e2', 'e3'):
            self.etcd.process(m).send_signal(signal.SIGSTOP)
        # Long past a's lease: the minority cannot expire it for b.
        got, _ = timed(lambda: b.acquire(2 * LEASE))
        self.assertIs(False, got)
        for m in ('e2', 'e3'):
            self.etcd.process(m).send_signal(signal.SIGCONT)
        # Quorum back: a's unrenewed lease lapses, and b wins.
        self.assertTrue(b.acquire(6 * LEASE))
        self.assertRaises(fencing.FenceError, a.renew)
