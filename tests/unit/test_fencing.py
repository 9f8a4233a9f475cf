"""Fences: one owner at a time, and stale-replica marks that outlive it."""

from __future__ import annotations

import json
import math
import tempfile
import time
import unittest
import warnings

from mftvm_openstack import fencing
from mftvm_openstack.fencing import ceph, etcd


class FenceContract:
    """What every fence must do; subclasses say how to make two of one."""

    def make(self, member: str) -> fencing.Fence:
        raise NotImplementedError

    def test_one_owner_at_a_time(self):
        a, b = self.make('a'), self.make('b')
        self.assertTrue(a.acquire(1))
        self.assertFalse(b.acquire(0.1))
        a.release()
        self.assertTrue(b.acquire(1))

    def test_stale_mark_is_seen_by_the_next_owner(self):
        a, b = self.make('a'), self.make('b')
        self.assertEqual((True, ''), b.replica_valid('p1'))
        self.assertTrue(a.acquire(1))
        a.mark_stale('p1', 'the primary went on unprotected')
        a.mark_stale('p1', 'again')        # idempotent
        a.release()
        self.assertTrue(b.acquire(1))
        valid, why = b.replica_valid('p1')
        self.assertFalse(valid)
        self.assertTrue(why)
        self.assertEqual((True, ''), b.replica_valid('p2'))

    def test_only_the_owner_marks(self):
        a = self.make('a')
        self.assertRaises(fencing.FenceError, a.mark_stale, 'p1', 'x')

    def test_reclaim_only_what_is_free(self):
        a, b = self.make('a'), self.make('b')
        self.assertTrue(a.acquire(1))
        self.assertTrue(a.reclaim())        # still ours
        self.assertFalse(b.reclaim())       # another holds it
        a.release()
        self.assertTrue(b.reclaim())

    def test_renew_needs_ownership(self):
        a = self.make('a')
        self.assertRaises(fencing.FenceError, a.renew)
        self.assertTrue(a.acquire(1))
        a.renew()


class FileFenceTest(FenceContract, unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp()

    def make(self, member):
        return fencing.FileFence(self.dir)

    def test_never_lapses(self):
        a = self.make('a')
        self.assertTrue(a.acquire(1))
        a.renew()
        self.assertTrue(math.isinf(a.deadline(0.5)))


class ToozFileBackendTest(FenceContract, unittest.TestCase):
    """ToozFence on tooz's file driver (the lease test needs Redis: see
    tests/integration/test_fencing.py)."""

    def setUp(self):
        warnings.simplefilter('ignore', DeprecationWarning)
        self.url = 'file://' + tempfile.mkdtemp()
        self.fences: list[fencing.Fence] = []

    def tearDown(self):
        for f in self.fences:
            f.release()
            f.close()

    def make(self, member):
        fence = fencing.ToozFence(self.url, 'vm0', member, lease=3)
        self.fences.append(fence)
        return fence

    def test_deadline_counts_from_the_renewal(self):
        a = self.make('a')
        self.assertTrue(a.acquire(1))
        a.renew()
        left = a.deadline(0.5) - time.monotonic()
        self.assertGreater(left, 2.0)
        self.assertLessEqual(left, 2.5)


class MaskUrlTest(unittest.TestCase):

    def test_password_is_masked(self):
        self.assertEqual('rabbit://u:***@h:5672/',
                         fencing.mask_url('rabbit://u:secret@h:5672/'))
        self.assertEqual('redis://h:6379', fencing.mask_url('redis://h:6379'))

    def test_load_fence_picks_by_url(self):
        d = tempfile.mkdtemp()
        self.assertIsInstance(
            fencing.load_fence(None, 'vm0', member='a', lease=3,
                               state_dir=d), fencing.FileFence)

    def test_unreachable_backend_is_a_clear_error(self):
        fence = fencing.ToozFence('redis://127.0.0.1:1', 'vm0', 'a', 3)
        self.addCleanup(fence.close)
        self.assertFalse(fence.acquire(0.3))
        self.assertRaises(fencing.FenceError, fence.renew)


class EtcdUrlTest(unittest.TestCase):
    """The etcd fence's URL and its failure without a cluster (the
    semantics on a real cluster: tests/integration/test_fencing_backends)."""

    def test_every_member_is_an_endpoint(self):
        protocol, endpoints, options = etcd.parse_url(
            'etcd3+https://10.0.0.5:2379?endpoints=10.0.0.6:2380,'
            'etcd-c&timeout=0.5&ca_cert=/etc/ca.pem')
        self.assertEqual('https', protocol)
        self.assertEqual([('10.0.0.5', 2379), ('10.0.0.6', 2380),
                          ('etcd-c', 2379)], endpoints)
        self.assertEqual({'timeout': '0.5', 'ca_cert': '/etc/ca.pem'},
                         options)

    def test_malformed_urls_are_refused(self):
        for url in ('redis://h:6379', 'etcd3+http://h:99999',
                    'etcd3+http://h?endpoints=a/b',
                    'etcd3+http://h?endpoints=a:x',
                    'etcd3+http://h?endpoints=a?b'):
            self.assertRaises(ValueError, etcd.parse_url, url)
        for timeout in ('0', '-1', '31', 'nan', 'x'):
            self.assertRaises(ValueError, fencing.EtcdFence,
                              f'etcd3+http://h?timeout={timeout}', 'vm0',
                              'a', 3)

    def test_load_fence_picks_etcd(self):
        fence = fencing.load_fence('etcd3+http://127.0.0.1:1', 'vm0',
                                   member='a', lease=3, state_dir='/x')
        self.addCleanup(fence.close)
        self.assertIsInstance(fence, fencing.EtcdFence)
        self.assertEqual(3.0, fence.lease)

    def test_tooz_fence_refuses_etcd(self):
        # tooz's etcd lock heartbeats a lapsed lease as if it held.
        self.assertRaises(ValueError, fencing.ToozFence,
                          'etcd3+http://127.0.0.1:1', 'vm0', 'a', 3)

    def test_no_member_answering_is_a_quick_error(self):
        fence = fencing.EtcdFence(
            'etcd3+http://127.0.0.1:1?endpoints=127.0.0.1:2', 'vm0', 'a', 3)
        self.addCleanup(fence.close)
        start = time.monotonic()
        self.assertFalse(fence.acquire(0.3))
        self.assertIsNone(fence.reclaim())
        self.assertRaises(fencing.FenceError, fence.replica_valid, 'p1')
        self.assertLess(time.monotonic() - start, 5)
        self.assertRaises(fencing.FenceError, fence.renew)
        self.assertRaises(fencing.FenceError, fence.mark_stale, 'p1', 'x')
        fence.release()     # nothing held: no call, no error


class ScriptedFence(fencing.Fence):
    """A fence whose backend answers from a script, on a virtual clock:
    each answer is True (won), False (another holds it) or a FenceError
    (no answer); the last one repeats."""

    lease = 3.0

    def __init__(self, *answers):
        super().__init__()
        self.answers = list(answers)
        self.now = 1000.0
        self.tries = 0
        self.stale = None
        self.released = 0

    def _now(self):
        return self.now

    def _pause(self, seconds):
        self.now += seconds

    def _try_once(self):
        self.tries += 1
        answer = self.answers.pop(0) if len(self.answers) > 1 \
            else self.answers[0]
        if callable(answer):
            answer = answer()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _renew(self):
        return True

    def release(self):
        self.released += 1

    def reclaim(self):
        return True

    def mark_stale(self, pair_id, reason):
        self.stale = reason

    def replica_valid(self, pair_id):
        return (self.stale is None, self.stale or '')


def unreachable_for(fence, seconds, then):
    """An answer: no answer until ``seconds`` of the fence's time passed,
    then ``then``."""
    until = fence.now + seconds

    def answer():
        return fencing.FenceError('connection refused') \
            if fence.now < until else then
    return answer


class ContendTest(unittest.TestCase):
    """Failover retries the fence for as long as the primary may be
    alive: no answer is not a held lock."""

    def test_an_unreachable_backend_decides_nothing(self):
        fence = ScriptedFence()
        fence.answers = [unreachable_for(fence, 600, True)]
        why = []
        self.assertTrue(fence.contend(10, on_unreachable=why.append))
        self.assertGreaterEqual(fence.now, 1600)
        self.assertIn('connection refused', why[0])
        # The lease counts from the winning try.
        self.assertEqual(fence.now + 3 - 0.5, fence.deadline(0.5))

    def test_a_lock_held_for_longer_than_held_for_is_the_primary_alive(
            self):
        fence = ScriptedFence(False)
        self.assertFalse(fence.contend(10))
        self.assertGreaterEqual(fence.now, 1010)
        self.assertLess(fence.now, 1010.2)

    def test_held_counts_only_in_a_row(self):
        # held 8 s, then no answer, then held 8 s, then free: the lapse
        # of a dead primary's lease is not mistaken for a live holder
        fence = ScriptedFence()
        start = fence.now
        fence.answers = [lambda: False if fence.now < start + 8 else (
            fencing.FenceError('down') if fence.now < start + 20 else (
                False if fence.now < start + 28 else True))]
        self.assertTrue(fence.contend(10))

    def test_an_operator_ends_the_wait(self):
        import threading
        fence = ScriptedFence(fencing.FenceError('down'))
        stop = threading.Event()
        fence._pause = lambda s: stop.set() if fence.tries > 5 else None
        self.assertFalse(fence.contend(10, cancelled=stop))
        self.assertEqual(6, fence.tries)

    def test_acquire_keeps_its_timeout(self):
        fence = ScriptedFence(fencing.FenceError('down'))
        self.assertFalse(fence.acquire(1))
        self.assertLess(fence.now, 1001.2)


class CephBlocklistTest(unittest.TestCase):
    """The storage fence of a shared RBD image (fencing/ceph.py), its
    ``rbd`` and ``ceph`` commands faked."""

    PRIMARY = '10.78.1.11:0/3062212283'
    OURS = '10.78.1.12:0/1234567'

    def fence(self, watchers):
        self.ran = []

        def runner(argv):
            self.ran.append(list(argv))
            if argv[0] == 'rbd':
                return json.dumps({'watchers': watchers})
            return ''
        return ceph.CephBlocklist('volumes', 'volume-1', user='cinder',
                                  keyfile='/etc/mftvm/ceph.key',
                                  monitors=['10.78.1.1:6789'],
                                  runner=runner)

    def test_every_other_client_is_blocklisted(self):
        fence = self.fence([{'address': self.PRIMARY, 'client': 4146},
                            {'address': self.OURS, 'client': 4150}])
        self.assertEqual([self.PRIMARY], fence.fence_others({self.OURS}))
        # (the ceph CLI needs a file to read even when given the rest)
        common = ['--conf', '/dev/null', '--mon-host', '10.78.1.1:6789',
                  '--id', 'cinder',
                  '--keyfile', '/etc/mftvm/ceph.key']
        self.assertEqual([
            ['rbd', *common, 'status', '--format', 'json',
             'volumes/volume-1'],
            ['ceph', *common, 'osd', 'blocklist', 'add', self.PRIMARY]],
            self.ran)

    def test_nothing_to_fence_runs_no_blocklist(self):
        fence = self.fence([{'address': self.OURS}])
        self.assertEqual([], fence.fence_others({self.OURS}))
        self.assertEqual(['rbd'], [argv[0] for argv in self.ran])

    def test_a_hostile_address_is_refused_before_any_blocklist(self):
        for bad in ('--yes-i-really-mean-it', '10.0.0.1:0/1 x', 7,
                    '0.0.0.0/0'):
            fence = self.fence([{'address': self.PRIMARY},
                                {'address': bad}])
            self.assertRaises(ceph.StorageFenceError, fence.fence_others,
                              ())
            self.assertEqual(['rbd'], [argv[0] for argv in self.ran])

    def test_a_failing_command_raises(self):

        def failing(argv):
            raise ceph.StorageFenceError('rbd status: EPERM')
        fence = ceph.CephBlocklist('volumes', 'volume-1', runner=failing)
        self.assertRaises(ceph.StorageFenceError, fence.fence_others, ())
        self.assertRaises(ceph.StorageFenceError, ceph.run,
                          ['false'])
