"""Disk replication logic with a fake monitor: no QEMU here."""

import asyncio
import os
import shutil
import tempfile

import testtools

from mftvm_openstack.ft import disk
from mftvm_openstack.ft.monitor import Monitor, MonitorError


class FakeMonitor(Monitor):
    """Records commands; keeps a tiny model of block jobs, whose status
    changes it announces (JOB_STATUS_CHANGE) as QEMU does."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self.jobs = {}
        self.fail = {}            # command -> error message
        #: mirror jobs turn ready on their own, just after they start
        self.ready_mirrors = False

    def set_job(self, job, status, error=None):
        self.jobs[job]['status'] = status
        if error:
            self.jobs[job]['error'] = error
        self._dispatch({'event': 'JOB_STATUS_CHANGE',
                        'data': {'id': job, 'status': status}})

    async def execute(self, command, **arguments):
        self.calls.append((command, arguments))
        if command in self.fail:
            raise MonitorError(self.fail[command])
        if command == 'query-jobs':
            return [dict(job) for job in self.jobs.values()]
        if command in ('block-commit', 'blockdev-mirror', 'blockdev-backup'):
            job = arguments['job-id']
            self.jobs[job] = {'id': job, 'status': 'running'}
            if command == 'blockdev-mirror' and self.ready_mirrors:
                asyncio.get_running_loop().call_soon(
                    self.set_job, job, 'ready')
        elif command == 'block-job-cancel':
            job = self.jobs[arguments['device']]
            if job['status'] == 'concluded':
                raise MonitorError('cannot cancel a concluded job')
            self.set_job(job['id'], 'concluded', 'Operation canceled')
        elif command == 'job-dismiss':
            del self.jobs[arguments['id']]
            self._dispatch({'event': 'JOB_STATUS_CHANGE',
                            'data': {'id': arguments['id'],
                                     'status': 'null'}})
        return {}

    async def close(self):
        pass

    def names(self):
        return [c for c, _ in self.calls]

    def args(self, command):
        return [a for c, a in self.calls if c == command]


class FakeStore(disk.EpochOverlayStore):

    async def create_overlay_file(self, path):
        open(path, 'wb').close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def layer(epoch):
    return disk.Layer(f'ov{epoch}', f'/x/ov-{epoch}.qcow2', 'qcow2', epoch)


def chain_with_marks(*epochs):
    chain = disk.LayerChain(disk.Layer('base', '/x/base.raw', 'raw', 0))
    for epoch in epochs:
        chain.push(epoch, layer(epoch + 1))
    return chain


class TestLayerChain(testtools.TestCase):

    def test_failover_keeps_layers_up_to_committed(self):
        chain = chain_with_marks(1, 2, 3)      # base≤1, ov2, ov3, ov4 (top)
        keep, drop = chain.failover(2)
        self.assertEqual(['base', 'ov2'], [la.node for la in keep])
        self.assertEqual(['ov3', 'ov4'], [la.node for la in drop])
        keep, drop = chain.failover(3)
        self.assertEqual(['base', 'ov2', 'ov3'], [la.node for la in keep])
        self.assertEqual(['ov4'], [la.node for la in drop])

    def test_failover_needs_a_mark_after_the_epoch(self):
        chain = chain_with_marks(1, 2)
        self.assertRaises(disk.DiskError, chain.failover, 3)
        self.assertRaises(disk.DiskError, chain_with_marks().failover, 0)

    def test_failover_refuses_epoch_merged_past(self):
        chain = chain_with_marks(1, 2, 3, 4)
        chain.commit(3)
        chain.merged(chain.layers[2])          # ov2, ov3 into base
        self.assertRaises(disk.DiskError, chain.failover, 2)
        keep, _ = chain.failover(3)
        self.assertEqual(['base'], [la.node for la in keep])

    def test_failover_with_skipped_marks(self):
        chain = chain_with_marks(2, 5)         # base≤2, ov3 holds 3..5
        self.assertEqual(['base', 'ov3'],
                         [la.node for la in chain.failover(5)[0]])
        self.assertRaises(disk.DiskError, chain.failover, 4)

    def test_mergeable_only_committed_and_never_top(self):
        chain = chain_with_marks(1, 2, 3)
        self.assertEqual([], chain.mergeable())            # nothing committed
        chain.commit(1)
        self.assertEqual([], chain.mergeable())            # ov2 holds 2
        chain.commit(2)
        self.assertEqual(['ov2'], [la.node for la in chain.mergeable()])
        chain.commit(3)
        self.assertEqual(['ov2', 'ov3'],
                         [la.node for la in chain.mergeable()])
        chain.commit(10)                       # ov4 is the top: never
        self.assertEqual(['ov2', 'ov3'],
                         [la.node for la in chain.mergeable()])

    def test_merged_drops_layers_and_refuses_top_or_base(self):
        chain = chain_with_marks(1, 2, 3)
        self.assertRaises(disk.DiskError, chain.merged, chain.layers[0])
        self.assertRaises(disk.DiskError, chain.merged, chain.top)
        gone = chain.merged(chain.layers[2])
        self.assertEqual(['ov2', 'ov3'], [la.node for la in gone])
        self.assertEqual(['base', 'ov4'], [la.node for la in chain.layers])

    def test_epochs_must_increase(self):
        chain = chain_with_marks(3)
        self.assertRaises(disk.DiskError, chain.push, 3, layer(4))
        self.assertRaises(disk.DiskError, chain.push, 5, layer(5))


class TestStoreWithFakeMonitor(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.mon = FakeMonitor()

    async def attached(self, **kw):
        store = FakeStore(self.tmp, 1 << 20, pool_size=2, **kw)
        target = await store.attach(self.mon)
        self.assertEqual(disk.NbdTarget(socket=store.nbd_path), target)
        return store

    async def settle(self):
        for _ in range(20):
            await asyncio.sleep(0)

    def test_export_sits_on_the_filter(self):
        async def scenario():
            store = await self.attached()
            export = self.mon.args('block-export-add')[0]
            self.assertEqual(store.TOP, export['node-name'])
            self.assertTrue(export['writable'])
            self.assertEqual('disk0', export['name'])
            await store.stop()
        run(scenario())

    def test_mark_is_one_command_on_the_current_top(self):
        async def scenario():
            store = await self.attached()
            self.mon.calls.clear()
            await store.mark(1)
            self.assertEqual(['blockdev-snapshot'], self.mon.names())
            self.assertEqual('base', self.mon.calls[0][1]['node'])
            self.assertEqual(os.path.join(self.tmp, 'ov-2.qcow2'),
                             store.layers[-1][0])
            self.assertTrue(os.path.exists(store.layers[-1][0]))
            await store.mark(2)
            self.assertEqual(store.chain.layers[1].node,
                             self.mon.args('blockdev-snapshot')[1]['node'])
            await store.stop()
            self.assertFalse(os.path.exists(store.layers[-1][0]))
        run(scenario())

    def test_the_overlay_pool_fills_again_after_a_full_disk(self):
        # One failure to make an overlay (its filesystem full) used to
        # end the pool's filler for good: every later mark made its
        # overlay inside the guest's pause, however much room came back.
        async def scenario():
            store = await self.attached()
            full = [True]
            made = []

            async def create(path):
                if full[0]:
                    raise disk.DiskError(f'qemu-img create {path} failed: '
                                         f'No space left on device')
                made.append(path)
                open(path, 'wb').close()
            store.create_overlay_file = create
            with self.assertLogs('mftvm_openstack.ft.disk', 'ERROR'):
                await store.mark(1)         # takes one of the pool
                await self.settle()
            self.assertEqual(1, store.stats()['pool_ready'])
            full[0] = False                 # room again
            await store.mark(2)
            await self.settle()
            self.assertEqual(2, store.stats()['pool_ready'])
            self.assertEqual(2, len(made))
            await store.stop()
        run(scenario())

    def test_commit_merges_only_committed_non_top_layers(self):
        async def scenario():
            store = await self.attached()
            for epoch in range(1, 5):
                await store.mark(epoch)
            await store.commit(2)           # only ov2 committed: wait
            await self.settle()
            self.assertEqual([], self.mon.args('block-commit'))
            await store.commit(3)           # ov2, ov3 committed
            await self.settle()
            job = self.mon.args('block-commit')[0]
            self.assertEqual(store.TOP, job['device'])
            self.assertEqual('base', job['base-node'])
            ov3 = store.chain.layers[2]
            self.assertEqual(ov3.node, job['top-node'])
            self.assertEqual(3, ov3.first_epoch)
            # While it runs, nothing else merges and marks still work.
            await store.commit(4)
            await store.mark(5)
            self.mon.set_job(job['job-id'], 'concluded')
            await self.settle()
            self.assertEqual(1, store.stats()['merges'])
            deleted = [a['node-name'] for a in self.mon.args('blockdev-del')]
            self.assertEqual(['ov-pool2', 'ov-pool1'], deleted[:2])
            # ov2+ov3 merged; ov4 alone is committed: no second merge.
            self.assertEqual([0, 4, 5, 6],
                             [la.first_epoch for la in store.chain.layers])
            self.assertEqual(1, len(self.mon.args('block-commit')))
            self.assertFalse(os.path.exists(
                os.path.join(self.tmp, 'ov-3.qcow2')))
            await store.stop()
        run(scenario())

    def test_failed_merge_keeps_the_chain(self):
        async def scenario():
            store = await self.attached()
            for epoch in range(1, 4):
                await store.mark(epoch)
            await store.commit(3)
            await self.settle()
            job = self.mon.args('block-commit')[0]['job-id']
            self.mon.set_job(job, 'concluded', 'EIO')
            await self.settle()
            self.assertEqual(4, len(store.layers))
            self.assertEqual(0, store.stats()['merges'])
            self.assertEqual([], self.mon.args('blockdev-del'))
            await store.stop()
        run(scenario())

    def test_failover_fences_first_and_cancels_merge(self):
        async def scenario():
            store = await self.attached()
            for epoch in range(1, 5):
                await store.mark(epoch)
            await store.commit(3)
            await self.settle()
            self.assertTrue(store.stats()['merging'])
            self.mon.calls.clear()
            layers = await store.failover_layers(3)
            names = self.mon.names()
            self.assertEqual(['block-export-del', 'nbd-server-stop'],
                             names[:2])
            self.assertEqual('hard', self.mon.calls[0][1]['mode'])
            self.assertIn('block-job-cancel', names)
            self.assertLess(names.index('block-job-cancel'),
                            names.index('quit'))
            self.assertNotIn('blockdev-del', names)
            self.assertEqual(
                [os.path.join(self.tmp, n) for n in
                 ('base.raw', 'ov-2.qcow2', 'ov-3.qcow2')],
                [path for path, _ in layers])
            left = sorted(f for f in os.listdir(self.tmp)
                          if f.endswith('.qcow2'))
            self.assertEqual(['ov-2.qcow2', 'ov-3.qcow2'], left)
            await store.stop()             # leaves the kept layers alone
            self.assertTrue(all(os.path.exists(p) for p, _ in layers[1:]))
            with testtools.ExpectedException(disk.DiskError):
                await store.mark(9)
        run(scenario())

    def test_failover_refused_before_fencing_when_impossible(self):
        async def scenario():
            store = await self.attached()
            await store.mark(1)
            self.mon.calls.clear()
            with testtools.ExpectedException(disk.DiskError):
                await store.failover_layers(2)
            self.assertEqual([], self.mon.names())
            await store.stop()
        run(scenario())


class TestNbdTarget(testtools.TestCase):

    def test_unix_and_inet(self):
        unix = disk.NbdTarget(socket='/run/x.sock')
        self.assertEqual({'type': 'unix', 'path': '/run/x.sock'},
                         unix.qmp_server())
        self.assertEqual('nbd+unix:///disk0?socket=/run/x.sock', unix.uri())
        inet = disk.NbdTarget(host='10.0.0.2', port=10809, export='vm0')
        self.assertEqual({'type': 'inet', 'host': '10.0.0.2',
                          'port': '10809'}, inet.qmp_server())
        self.assertEqual('nbd://10.0.0.2:10809/vm0', inet.uri())

    def test_needs_exactly_one_address(self):
        self.assertRaises(ValueError, disk.NbdTarget)
        self.assertRaises(ValueError, disk.NbdTarget, socket='/s',
                          host='h', port=1)
        self.assertRaises(ValueError, disk.NbdTarget, host='h')


async def start_mirror(sync_class, mon):
    """A started mirror-based disk sync (its job turns ready at once)."""
    sync = sync_class(mon, 'disk0')
    mon.ready_mirrors = True
    await sync.start(disk.NbdTarget(socket='/s'))
    return sync


class TestWriteReplication(testtools.TestCase):

    def test_start_mirrors_write_blocking_to_a_fail_fast_nbd_node(self):
        async def scenario():
            mon = FakeMonitor()
            sync = await start_mirror(disk.WriteReplication, mon)
            nbd = mon.args('blockdev-add')[0]
            self.assertEqual(('nbd', 0, 'disk0'),
                             (nbd['driver'], nbd['reconnect-delay'],
                              nbd['export']))
            mirror = mon.args('blockdev-mirror')[0]
            self.assertEqual(('disk0', 'replica', 'full', 'write-blocking',
                              'report'),
                             (mirror['device'], mirror['target'],
                              mirror['sync'], mirror['copy-mode'],
                              mirror['on-target-error']))
            await sync.checkpoint(1)       # nothing to do
            self.assertNotIn('blockdev-backup', mon.names())
            await sync.stop()
            cancel = mon.args('block-job-cancel')[0]
            self.assertEqual({'device': 'repl0', 'force': True}, cancel)
            self.assertEqual('replica',
                             mon.args('blockdev-del')[0]['node-name'])
            self.assertEqual({}, mon.jobs)
        run(scenario())

    def test_job_error_sets_failed(self):
        async def scenario():
            mon = FakeMonitor()
            sync = disk.WriteReplication(mon)
            # Only the job's event can wake the watcher within the test.
            sync.recheck_interval = 60
            reasons = []
            sync.on_failure = reasons.append
            mon.jobs['repl0'] = {'id': 'repl0', 'status': 'ready'}
            orig = mon.execute

            async def execute(command, **args):
                if command == 'blockdev-mirror':
                    mon.calls.append((command, args))
                    return {}
                return await orig(command, **args)
            mon.execute = execute
            await sync.start(disk.NbdTarget(socket='/s'))
            mon.set_job('repl0', 'concluded', 'Input/output error')
            await asyncio.wait_for(sync.failed.wait(), 2)
            self.assertEqual(['Input/output error'], reasons)
            with testtools.ExpectedException(disk.DiskError):
                await sync.checkpoint(7)
            await sync.stop()
            self.assertEqual([], mon.args('block-job-cancel'))
            self.assertEqual({}, mon.jobs)
        run(scenario())

    def test_failed_initial_sync_cleans_up(self):
        async def scenario():
            mon = FakeMonitor()
            mon.fail['blockdev-mirror'] = 'size mismatch'
            sync = disk.WriteReplication(mon)
            with testtools.ExpectedException(MonitorError):
                await sync.start(disk.NbdTarget(socket='/s'))
            self.assertEqual('replica',
                             mon.args('blockdev-del')[0]['node-name'])
        run(scenario())


class BlockJobsMonitor(FakeMonitor):
    """query-block-jobs reports ``remaining`` bytes (dirty or in
    flight), 4 KiB fewer at each poll once the job was woken
    (block-job-set-speed)."""

    def __init__(self, remaining):
        super().__init__()
        self.remaining = remaining
        self.woken = False

    async def execute(self, command, **arguments):
        if command == 'block-job-set-speed':
            self.calls.append((command, arguments))
            self.woken = True
            return {}
        if command == 'query-block-jobs':
            self.calls.append((command, arguments))
            jobs = []
            for job in self.jobs.values():
                if self.woken and self.remaining:
                    self.remaining -= 4096
                jobs.append({'device': job['id'], 'status': job['status'],
                             'len': 1 << 20,
                             'offset': (1 << 20) - self.remaining})
            return jobs
        return await super().execute(command, **arguments)


class ReplicaPathMonitor(BlockJobsMonitor):
    """A replica path that takes ``step`` bytes per poll of the drain,
    each poll taking ``poll_s`` (so a rate of about step / poll_s); the
    guest's drive is ``vd0`` on node disk0, and records its write
    limits."""

    def __init__(self, step, poll_s=0.002):
        super().__init__(remaining=0)
        self.step = step
        self.poll_s = poll_s
        self.limits = []

    async def execute(self, command, **arguments):
        if command == 'query-block':
            self.calls.append((command, arguments))
            return [{'device': '', 'qdev': 'vd0',
                     'inserted': {'node-name': 'disk0'}},
                    {'device': 'cd', 'qdev': 'ide0', 'inserted': {
                        'node-name': 'cdrom0'}}]
        if command == 'block_set_io_throttle':
            self.calls.append((command, arguments))
            self.limits.append(arguments['bps_wr'])
            return {}
        if command == 'query-block-jobs' and self.woken:
            await asyncio.sleep(self.poll_s)
            remaining = self.remaining
            self.remaining = max(0, self.remaining - self.step)
            self.calls.append((command, arguments))
            return [{'device': job['id'], 'status': job['status'],
                     'len': 1 << 40, 'offset': (1 << 40) - remaining}
                    for job in self.jobs.values()]
        return await super().execute(command, **arguments)

    async def epoch(self, sync, epoch, written):
        """The guest wrote ``written`` bytes the mirror did not copy
        during the epoch; the checkpoint drains them."""
        self.remaining = written
        self.woken = False
        await sync.checkpoint(epoch)


class TestAsyncReplication(testtools.TestCase):

    async def _started(self, mon):
        return await start_mirror(disk.AsyncReplication, mon)

    def test_background_mirror_drained_at_each_checkpoint(self):
        async def scenario():
            mon = BlockJobsMonitor(remaining=3 * 4096)
            sync = await self._started(mon)
            mirror = mon.args('blockdev-mirror')[0]
            self.assertEqual(('background', 4096),
                             (mirror['copy-mode'], mirror['granularity']))
            await sync.checkpoint(1)
            # woken first, then polled until nothing is dirty or in flight
            names = mon.names()
            self.assertLess(names.index('block-job-set-speed'),
                            names.index('query-block-jobs'))
            self.assertEqual(0, mon.remaining)
            self.assertEqual(3, names.count('query-block-jobs'))
            self.assertFalse(sync.failed.is_set())
            await sync.stop()
        run(scenario())

    def test_replica_that_does_not_catch_up_fails_the_epoch(self):
        async def scenario():
            mon = BlockJobsMonitor(remaining=1 << 20)
            sync = await self._started(mon)
            sync.drain_timeout = 0.005
            reasons = []
            sync.on_failure = reasons.append
            mon.remaining = 1 << 40    # far more than 5 ms of polls
            with testtools.ExpectedException(disk.DiskError,
                                             '.*did not catch up.*'):
                await sync.checkpoint(7)
            self.assertTrue(sync.failed.is_set())
            self.assertEqual(1, len(reasons))
            # and the next epoch is refused at once
            with testtools.ExpectedException(disk.DiskError):
                await sync.checkpoint(8)
            await sync.stop()
        run(scenario())

    def test_ended_job_fails_the_epoch(self):
        async def scenario():
            mon = BlockJobsMonitor(remaining=4096)
            sync = await self._started(mon)
            mon.jobs['repl0']['status'] = 'concluded'
            with testtools.ExpectedException(disk.DiskError):
                await sync.checkpoint(3)
            self.assertTrue(sync.failed.is_set())
        run(scenario())

    def test_a_replica_behind_paces_the_guests_writes_until_it_caught_up(
            self):
        # The mirror's backlog grew from epoch to epoch at a write rate
        # the replica path could not take, until one pause could not
        # drain it and the secondary was dropped.
        async def scenario():
            mon = ReplicaPathMonitor(step=1 << 20)
            sync = await self._started(mon)
            self.assertEqual('vd0', sync.device)
            await mon.epoch(sync, 1, 64 << 20)       # far behind
            self.assertEqual(1, len(mon.limits))
            first = mon.limits[0]
            self.assertGreaterEqual(first, disk.AsyncReplication
                                    .MIN_WRITE_BPS)
            self.assertEqual({'id': 'vd0', 'bps': 0, 'bps_rd': 0,
                              'bps_wr': first, 'iops': 0, 'iops_rd': 0,
                              'iops_wr': 0},
                             mon.args('block_set_io_throttle')[0])
            await mon.epoch(sync, 2, 64 << 20)       # still behind: slower
            self.assertLess(mon.limits[-1], first)
            self.assertEqual(mon.limits[-1], sync.write_limit)
            # Caught up: the limit rises, then is lifted.
            for epoch in range(3, 20):
                await mon.epoch(sync, epoch, 0)
                if sync.write_limit is None:
                    break
            self.assertIsNone(sync.write_limit)
            self.assertEqual(0, mon.limits[-1])
            rising = mon.limits[2:-1]
            self.assertEqual(sorted(rising), rising)
            self.assertFalse(sync.failed.is_set())
            self.assertEqual(0, sync.stats()['write_limit_bps'] or 0)
            await sync.stop()
        run(scenario())

    def test_stopping_lifts_the_write_limit(self):
        async def scenario():
            mon = ReplicaPathMonitor(step=1 << 20)
            sync = await self._started(mon)
            await mon.epoch(sync, 1, 64 << 20)
            self.assertIsNotNone(sync.write_limit)
            await sync.stop()
            self.assertEqual(0, mon.limits[-1])
            names = mon.names()
            self.assertLess(names.index('block_set_io_throttle', 1),
                            names.index('blockdev-del'))
        run(scenario())

    def test_a_slow_replica_holds_the_pause_rather_than_be_dropped(self):
        # It still takes writes: the guest waits (it is stopped in the
        # pause); the replica was given up after 2 s before.
        async def scenario():
            mon = ReplicaPathMonitor(step=4096, poll_s=0.01)
            sync = await self._started(mon)
            sync.stall_timeout = 0.5
            # (300 polls of 10 ms: past the 2 s it was given before)
            await mon.epoch(sync, 1, 300 * 4096)
            self.assertFalse(sync.failed.is_set())
            self.assertEqual(0, mon.remaining)
            await sync.stop()
        run(scenario())

    def test_a_replica_that_takes_nothing_is_given_up(self):
        async def scenario():
            mon = ReplicaPathMonitor(step=0)
            sync = await self._started(mon)
            sync.stall_timeout = 0.05
            reasons = []
            sync.on_failure = reasons.append
            with testtools.ExpectedException(disk.DiskError,
                                             '.*took no write.*'):
                await mon.epoch(sync, 1, 4096)
            self.assertEqual(1, len(reasons))
            self.assertIn('did not catch up', reasons[0])
            await sync.stop()
        run(scenario())

    def test_a_drive_that_cannot_be_paced_is_replicated_all_the_same(self):
        async def scenario():
            mon = ReplicaPathMonitor(step=1 << 20)
            mon.fail['block_set_io_throttle'] = 'no throttling here'
            orig = mon.execute

            async def execute(command, **arguments):
                if command in mon.fail:
                    mon.calls.append((command, arguments))
                    raise MonitorError(mon.fail[command])
                return await orig(command, **arguments)
            mon.execute = execute
            sync = await self._started(mon)
            with self.assertLogs('mftvm_openstack.ft.disk', 'WARNING'):
                await mon.epoch(sync, 1, 64 << 20)
            self.assertIsNone(sync.device)
            await mon.epoch(sync, 2, 64 << 20)
            self.assertEqual(1, len(mon.args('block_set_io_throttle')))
            self.assertFalse(sync.failed.is_set())
            await sync.stop()
        run(scenario())


class TestBlockCopy(testtools.TestCase):

    def test_bitmap_and_full_copy_in_one_transaction(self):
        async def scenario():
            mon = FakeMonitor()
            orig = mon.execute
            loop = asyncio.get_running_loop()

            async def execute(command, **args):
                result = await orig(command, **args)
                if command == 'transaction':
                    mon.jobs['bc-full'] = {'id': 'bc-full',
                                           'status': 'running'}
                    loop.call_soon(mon.set_job, 'bc-full', 'concluded')
                if command == 'blockdev-backup':
                    loop.call_soon(mon.set_job, args['job-id'], 'concluded')
                return result
            mon.execute = execute
            sync = disk.BlockCopy(mon)
            await sync.start(disk.NbdTarget(socket='/s'))
            actions = mon.args('transaction')[0]['actions']
            self.assertEqual(['block-dirty-bitmap-add', 'blockdev-backup'],
                             [a['type'] for a in actions])
            self.assertEqual('full', actions[1]['data']['sync'])
            await sync.checkpoint(3)
            backup = mon.args('blockdev-backup')[0]
            self.assertEqual(('incremental', sync.BITMAP, 'on-success'),
                             (backup['sync'], backup['bitmap'],
                              backup['bitmap-mode']))
            self.assertEqual({}, mon.jobs)      # waited and dismissed
            self.assertEqual(1, sync.stats()['copies'])
            await sync.stop()
            self.assertIn('block-dirty-bitmap-remove', mon.names())
        run(scenario())


class TestWaitJob(testtools.TestCase):

    def test_waits_for_the_status_event_not_by_polling(self):
        async def scenario():
            mon = FakeMonitor()
            await mon.execute('blockdev-backup', **{'job-id': 'j1'})
            await mon.execute('blockdev-backup', **{'job-id': 'j2'})
            mon.calls.clear()
            waiting = asyncio.ensure_future(disk.wait_job(
                mon, 'j1', frozenset({'ready'}), timeout=60, recheck=60))
            for _ in range(50):
                await asyncio.sleep(0)
            mon.set_job('j2', 'ready')          # another job: not it
            mon.set_job('j1', 'paused')         # not a wanted state
            for _ in range(50):
                await asyncio.sleep(0)
            self.assertFalse(waiting.done())
            mon.set_job('j1', 'ready')
            info = await waiting
            self.assertEqual('ready', info['status'])
            # one look before waiting, one after the event
            self.assertEqual(['query-jobs', 'query-jobs'], mon.names())
        run(scenario())

    def test_a_final_state_or_a_vanished_job_ends_the_wait(self):
        async def scenario():
            mon = FakeMonitor()
            await mon.execute('blockdev-backup', **{'job-id': 'j1'})
            asyncio.get_running_loop().call_soon(
                mon.set_job, 'j1', 'concluded', 'EIO')
            info = await disk.wait_job(mon, 'j1', frozenset({'ready'}), 60)
            self.assertEqual('EIO', info['error'])
            await mon.execute('blockdev-backup', **{'job-id': 'j2'})
            dismiss = asyncio.ensure_future(mon.execute('job-dismiss',
                                                        id='j2'))
            self.assertIsNone(await disk.wait_job(
                mon, 'j2', frozenset({'ready'}), 60, recheck=60))
            await dismiss
        run(scenario())

    def test_rechecks_without_events_and_times_out(self):
        async def scenario():
            mon = FakeMonitor()
            await mon.execute('blockdev-backup', **{'job-id': 'j1'})
            mon.calls.clear()
            with testtools.ExpectedException(disk.DiskError,
                                             '.*still running.*'):
                await disk.wait_job(mon, 'j1', frozenset({'ready'}),
                                    timeout=0.005, recheck=0.001)
            self.assertGreater(mon.names().count('query-jobs'), 1)
            # A QEMU gone sends no event: the recheck finds out.
            mon.fail['query-jobs'] = 'connection lost'
            with testtools.ExpectedException(MonitorError):
                await disk.wait_job(mon, 'j1', frozenset({'ready'}),
                                    timeout=60, recheck=0.001)
        run(scenario())
