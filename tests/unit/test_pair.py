"""The pair state machines, driven with fakes (no QEMU)."""

import asyncio
import unittest

import numpy as np

from mftvm_openstack.ft import pair, transport
from mftvm_openstack.ft.epoch import Checkpoint
from mftvm_openstack.ft.trackers import PAGE_SIZE, RamDelta
from mftvm_openstack.ft.transport import Kind, Message


class FakeChannel:
    def __init__(self):
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.sent: list[Message] = []
        self.closed = False
        self.bytes_sent = 0
        self.on_send = None

    async def send(self, kind, epoch=0, *buffers):
        payload = b''.join(bytes(memoryview(b)) for b in buffers)
        self.sent.append(Message(kind, epoch, payload))
        if self.on_send:
            self.on_send(kind, epoch)

    async def send_json(self, kind, data, epoch=0):
        await self.send(kind, epoch, b'{}')

    async def recv(self, timeout=None):
        item = await asyncio.wait_for(self.inbox.get(), timeout)
        if isinstance(item, Exception):
            raise item
        return item

    def close(self):
        self.closed = True

    def kinds(self):
        return [m.kind for m in self.sent]


class FakeCapturer:
    def __init__(self):
        self.captured = []

    async def capture(self, epoch, mark, on_stopped=None, resume=True):
        if on_stopped:
            on_stopped(epoch)
        await mark(epoch)
        self.captured.append(epoch)
        delta = RamDelta(np.array([epoch], np.uint32),
                         np.full((1, PAGE_SIZE), epoch % 256, np.uint8))
        return Checkpoint(epoch, b'dev%d' % epoch, delta, 0.01, 0, 0, 0)


class FakeDisk:
    def __init__(self):
        self.calls = []

    async def checkpoint(self, epoch):
        self.calls.append(('checkpoint', epoch))

    async def stop(self):
        self.calls.append(('stop',))


class FakeOutput:
    def __init__(self):
        self.sealed, self.released = [], []
        self.detached = self.discarded = False
        self.held = self.frames_released = 0
        self.waiting = asyncio.Event()

    def seal(self, epoch):
        self.sealed.append(epoch)
        self.waiting.clear()

    async def release(self, epoch):
        self.released.append(epoch)

    async def detach(self, monitor):
        self.order.append('release-all')
        self.detached = True

    def discard(self):
        self.discarded = True


class FakeMonitor:
    def __init__(self):
        self.alive = True

    async def execute(self, command, **args):
        if not self.alive:
            raise ConnectionError('QEMU is gone')
        return {'status': 'running'}


class PrimaryPairTest(unittest.IsolatedAsyncioTestCase):

    def make(self, epoch_ms=10_000, idle_epoch_ms=0):
        self.chan = FakeChannel()
        # The secondary answers every MARK at once.
        self.chan.on_send = lambda kind, epoch: kind == Kind.MARK and \
            self.chan.inbox.put_nowait(Message(Kind.MARKED, epoch))
        self.cap, self.disk, self.out = FakeCapturer(), FakeDisk(), \
            FakeOutput()
        self.mon = FakeMonitor()
        self.order = []

        async def invalidate_replica():
            self.order.append('invalidate')
        self.machine = pair.PrimaryPair(
            capturer=self.cap, disk=self.disk, output=self.out,
            channel=self.chan, monitor=self.mon, clock=pair.RealClock(),
            epoch_ms=epoch_ms, idle_epoch_ms=idle_epoch_ms,
            invalidate_replica=invalidate_replica,
            guest_alive=lambda: self.mon.alive)
        self.out.order = self.order
        self.machine._spawn(self.machine._reader())
        self.runner = asyncio.ensure_future(self.machine.run())

    async def asyncTearDown(self):
        self.runner.cancel()

    async def settle(self):
        for _ in range(20):
            await asyncio.sleep(0)

    async def test_echoed_heartbeat_vouches_for_the_primary(self):
        self.make()
        self.machine._spawn(self.machine._heartbeat())
        await asyncio.sleep(0.05)
        beats = [m for m in self.chan.sent if m.kind == Kind.HEARTBEAT]
        self.assertTrue(beats)
        # No echo yet: nobody vouches for us.
        self.assertEqual(float('-inf'), self.machine.peer_holds_until())
        sent = self.machine._beats[beats[0].epoch]
        self.chan.inbox.put_nowait(Message(Kind.ECHO, beats[0].epoch,
                                           b'800'))
        await self.settle()
        self.assertAlmostEqual(sent + 0.8, self.machine.peer_holds_until())
        # An unprotected primary has no one to vouch for it.
        self.machine.state = pair.State.UNPROTECTED
        self.assertEqual(float('-inf'), self.machine.peer_holds_until())

    async def test_tick_checkpoints_ships_and_ack_releases_output(self):
        self.make()
        self.machine.post(pair.Tick())
        await self.settle()
        self.assertEqual([1], self.cap.captured)
        self.assertEqual([('checkpoint', 1)], self.disk.calls)
        self.assertEqual([1], self.out.sealed)
        self.assertEqual([Kind.MARK, Kind.CHECKPOINT], self.chan.kinds())
        dev, delta = transport.decode_checkpoint(self.chan.sent[1].payload)
        self.assertEqual(b'dev1', dev)
        # Nothing is released before the ack...
        self.assertEqual([], self.out.released)
        self.chan.inbox.put_nowait(Message(Kind.ACK, 1))
        await self.settle()
        # ...and the acked epoch is released after it.
        self.assertEqual([1], self.out.released)
        self.assertEqual(1, self.machine.stats.committed)
        self.assertEqual(pair.State.PROTECTED, self.machine.state)

    async def test_epochs_last_epoch_ms_when_idle_epochs_are_off(self):
        self.make(epoch_ms=30)
        self.machine._spawn(self.machine._ticker())
        await asyncio.sleep(0.35)
        self.assertGreaterEqual(len(self.cap.captured), 4)

    async def test_an_epoch_without_output_runs_on_until_the_guest_sends(self):
        self.make(epoch_ms=30, idle_epoch_ms=1000)
        self.machine._spawn(self.machine._ticker())
        await asyncio.sleep(0.35)
        # Nothing sent: nobody waits for a commit, no pause is taken.
        self.assertEqual([], self.cap.captured)
        # The guest sends: its epoch (older than epoch_ms) ends now.
        self.out.waiting.set()
        await asyncio.sleep(0.1)
        self.assertEqual([1], self.cap.captured)
        # Silent again: the next epoch runs to idle_epoch_ms, no longer.
        await asyncio.sleep(0.6)
        self.assertEqual([1], self.cap.captured)
        await asyncio.sleep(0.6)
        self.assertEqual([1, 2], self.cap.captured)

    async def test_broken_stream_leaves_guest_unprotected(self):
        self.make()
        self.chan.inbox.put_nowait(ConnectionError('reset'))
        await self.settle()
        self.assertEqual(pair.State.UNPROTECTED, self.machine.state)
        self.assertIn(('stop',), self.disk.calls)
        # The replica is made stale before held output is let go: a later
        # takeover must not undo what clients then see.
        self.assertEqual(['invalidate', 'release-all'], self.order)
        self.machine.post(pair.Tick())
        await self.settle()
        self.assertEqual([], self.cap.captured)

    async def test_mark_timeout_means_secondary_lost(self):
        self.make()
        self.chan.on_send = None  # the secondary never answers MARK
        self.machine.mark_timeout = 0.05
        self.machine.post(pair.Tick())
        await asyncio.sleep(0.5)
        self.assertEqual(pair.State.UNPROTECTED, self.machine.state)
        self.assertIn('checkpoint failed', self.machine.stats.reason)

    async def test_qemu_dying_mid_checkpoint_is_not_a_lost_secondary(self):
        self.make()
        self.chan.on_send = None
        self.machine.mark_timeout = 0.05
        self.mon.alive = False  # the checkpoint fails because QEMU died
        self.machine.post(pair.Tick())
        await asyncio.sleep(0.5)
        # The replica stays valid and no BYE tells the secondary to stand
        # down: it must take over when the exit is reported.
        self.assertEqual(pair.State.PROTECTED, self.machine.state)
        self.assertEqual([], self.order)
        self.assertNotIn(Kind.BYE, self.chan.kinds())
        self.machine.post(pair.GuestExited('killed'))
        await self.settle()
        self.assertEqual(pair.State.FAILED, self.machine.state)
        self.assertIn(Kind.PRIMARY_LOST, self.chan.kinds())

    async def test_guest_exit_tells_secondary_and_discards_output(self):
        self.make()
        self.machine.post(pair.GuestExited('killed'))
        await self.settle()
        self.assertEqual(pair.State.FAILED, self.machine.state)
        self.assertIn(Kind.PRIMARY_LOST, self.chan.kinds())
        self.assertTrue(self.out.discarded)
        self.assertEqual([], self.out.released)
        self.assertEqual([], self.order)  # the replica stays valid

    async def test_secondary_that_stops_reading_is_lost(self):
        self.make()
        self.machine.ship_timeout = 0.1
        never = asyncio.get_running_loop().create_future()

        async def stuck_send(kind, epoch=0, *buffers):
            if kind == Kind.MARK:
                self.chan.inbox.put_nowait(Message(Kind.MARKED, epoch))
            else:
                await never  # the socket buffer is full
        self.chan.send = stuck_send
        self.machine.post(pair.Tick())
        await self.settle()
        self.assertEqual(pair.State.PROTECTED, self.machine.state)
        await asyncio.sleep(0.15)
        self.machine.post(pair.Tick())
        await self.settle()
        self.assertEqual(pair.State.UNPROTECTED, self.machine.state)
        self.assertIn('not taken by the secondary', self.machine.stats.reason)


class FakeReplica:
    def __init__(self, delay=0.0):
        self.committed = 0
        self.applied = []
        self.delay = delay

    def apply(self, epoch, devstate, delta):
        import time
        time.sleep(self.delay)
        self.applied.append(epoch)
        self.committed = epoch


class FakeStore:
    def __init__(self):
        self.calls = []

    async def mark(self, epoch):
        self.calls.append(('mark', epoch))

    async def commit(self, epoch):
        self.calls.append(('commit', epoch))


def checkpoint_msg(epoch):
    delta = RamDelta(np.array([0], np.uint32),
                     np.zeros((1, PAGE_SIZE), np.uint8))
    payload = b''.join(bytes(memoryview(b)) for b in
                       transport.encode_checkpoint(b'dev', delta))
    return Message(Kind.CHECKPOINT, epoch, payload)


class SecondaryPairTest(unittest.IsolatedAsyncioTestCase):

    def make(self, replica=None, timeout=5.0, first_timeout=30.0):
        self.chan = FakeChannel()
        self.replica = replica or FakeReplica()
        self.store = FakeStore()
        self.activated = []

        async def activate(committed):
            self.activated.append(committed)
        self.machine = pair.SecondaryPair(
            channel=self.chan, replica=self.replica, store=self.store,
            activate=activate, clock=pair.RealClock(),
            detect_timeout=timeout, first_commit_timeout=first_timeout)
        self.machine.start()
        self.runner = asyncio.ensure_future(self.machine.run())

    async def asyncTearDown(self):
        self.runner.cancel()

    async def test_mark_and_checkpoint_are_acknowledged_in_order(self):
        self.make()
        self.chan.inbox.put_nowait(Message(Kind.MARK, 1))
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        await asyncio.sleep(0.1)
        self.assertEqual([('mark', 1), ('commit', 1)], self.store.calls)
        self.assertEqual([Kind.MARKED, Kind.ACK], self.chan.kinds())
        self.assertEqual([1], self.replica.applied)

    async def test_primary_loss_fails_over_to_last_committed(self):
        self.make(FakeReplica(delay=0.1))
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        self.chan.inbox.put_nowait(checkpoint_msg(2))
        # The stream breaks while checkpoint 2 is still being applied:
        # a checkpoint received in full still commits before takeover.
        self.chan.inbox.put_nowait(ConnectionError('gone'))
        await asyncio.wait_for(self.machine.finished.wait(), 5)
        self.assertEqual([2], self.activated)
        self.assertEqual(pair.State.ACTIVE, self.machine.state)

    async def test_silence_is_detected(self):
        self.make(timeout=0.1)
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        await asyncio.wait_for(self.machine.finished.wait(), 5)
        self.assertEqual([1], self.activated)
        self.assertIn('no word', self.machine.stats.reason)

    async def test_a_frame_waiting_when_the_timer_fires_is_no_silence(self):
        # A starved loop runs the expired timer before reading the frame
        # that came meanwhile: the fake times out once with one waiting.
        self.make(timeout=0.1)
        recv = self.chan.recv
        starved = []

        async def late_recv(timeout=None):
            if not starved and not self.chan.inbox.empty():
                starved.append(timeout)
                raise TimeoutError
            return await recv(timeout)
        self.chan.recv = late_recv
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        self.chan.inbox.put_nowait(Message(Kind.HEARTBEAT, 1))
        await asyncio.sleep(0.05)
        self.assertEqual(pair.State.STANDBY, self.machine.state)
        self.assertEqual([1], self.replica.applied)
        self.assertEqual(1, len(starved))

    async def test_heartbeats_are_echoed_with_the_detection_time(self):
        self.make(timeout=0.8)
        self.chan.inbox.put_nowait(Message(Kind.HEARTBEAT, 7))
        await asyncio.sleep(0.05)
        echo = [m for m in self.chan.sent if m.kind == Kind.ECHO]
        self.assertEqual([(7, b'800')], [(m.epoch, m.payload) for m in echo])

    async def test_silence_before_any_checkpoint_is_tolerated_longer(self):
        # Nothing to resume yet: a primary starved by the initial sync
        # is not given up after the short detection time...
        self.make(timeout=0.1, first_timeout=0.6)
        await asyncio.sleep(0.3)
        self.assertEqual(pair.State.STANDBY, self.machine.state)
        # ...but it is after the longer one.
        await asyncio.wait_for(self.machine.finished.wait(), 5)
        self.assertEqual(pair.State.LOST, self.machine.state)
        self.assertIn('0.6s', self.machine.stats.reason)

    async def test_nothing_committed_means_nothing_to_resume(self):
        self.make()
        self.chan.inbox.put_nowait(ConnectionError('gone'))
        await asyncio.wait_for(self.machine.finished.wait(), 5)
        self.assertEqual([], self.activated)
        self.assertEqual(pair.State.LOST, self.machine.state)

    async def test_bye_means_no_takeover(self):
        self.make()
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        self.chan.inbox.put_nowait(Message(Kind.BYE, 0))
        await asyncio.wait_for(self.machine.finished.wait(), 5)
        self.assertEqual([], self.activated)
        self.assertEqual(pair.State.STOPPED, self.machine.state)

    async def test_corrupt_frame_is_answered_with_error(self):
        self.make()
        self.chan.inbox.put_nowait(transport.ProtocolError('bad magic'))
        await asyncio.wait_for(self.machine.finished.wait(), 5)
        self.assertIn(Kind.ERROR, self.chan.kinds())
        # Not proof that the primary died: no takeover.
        self.assertEqual([], self.activated)
        self.assertEqual(pair.State.STOPPED, self.machine.state)
