"""The pair state machines, driven with fakes on a fake clock (no QEMU,
no real waiting: virtual time moves only when a test advances it)."""

import asyncio
import gc
import json
import os
import threading
import unittest

import numpy as np

from mftvm_openstack.contract.hello import (
    PROTOCOL_VERSION,
    Hello,
    NbdTargetInfo,
    Ready,
)
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus
from mftvm_openstack.ft import pair, transport
from mftvm_openstack.ft.epoch import Checkpoint, Staged
from mftvm_openstack.ft.trackers import PAGE_SIZE, RamDelta
from mftvm_openstack.ft.transport import Kind, Message
from tests.unit.fake_clock import FakeClock, settle


async def until(condition, timeout=5.0):
    """Wait (1 ms steps) for what a worker thread does, e.g. apply a
    checkpoint in the executor; fail after ``timeout`` real seconds."""
    for _ in range(int(timeout * 1000)):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise AssertionError('condition not met in time')


class FakeChannel:
    def __init__(self, clock):
        self.clock = clock
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.sent: list[Message] = []
        self.sent_at: list[float] = []
        self.closed = False
        self.bytes_sent = 0
        self.stall_timeout = None
        self.on_send = None
        #: a peer that stopped reading: sends other than MARK never end
        self.stuck = False
        self._next = None

    async def send(self, kind, epoch=0, *buffers):
        if self.stuck and kind != Kind.MARK:
            await asyncio.get_running_loop().create_future()
        payload = b''.join(bytes(memoryview(b)) for b in buffers)
        self.sent.append(Message(kind, epoch, payload))
        self.sent_at.append(self.clock.now)
        if self.on_send:
            self.on_send(kind, epoch)

    async def send_json(self, kind, data, epoch=0):
        await self.send(kind, epoch, json.dumps(data).encode())

    async def wait_frame(self):
        if self._next is None:
            self._next = await self.inbox.get()

    async def recv(self, *, limit=transport.MAX_PAYLOAD):
        # (not self.wait_frame: a test may replace that)
        await FakeChannel.wait_frame(self)
        item, self._next = self._next, None
        if isinstance(item, Exception):
            raise item
        if len(item.payload) > limit:
            raise transport.ProtocolError(
                f'{item.kind.name} frame of {len(item.payload)} bytes is '
                f'too large')
        return item

    def close(self):
        self.closed = True

    def clear(self):
        self.sent.clear()
        self.sent_at.clear()

    def kinds(self):
        """What was sent, heartbeats left out (they go out all along)."""
        return [m.kind for m in self.sent if m.kind != Kind.HEARTBEAT]

    def frames(self, kind):
        return [m for m in self.sent if m.kind == kind]


class FakeCapturer:
    def __init__(self):
        self.captured = []
        #: the epochs whose disks settled before their device state
        self.settled = []
        #: the epochs after which the guest was left paused
        self.left_paused = []
        #: how long each checkpoint says it paused the guest
        self.pause_s = 0.01

    async def capture(self, epoch, mark, on_stopped=None, resume=True,
                      settle=None):
        if on_stopped:
            on_stopped(epoch)
        if settle:
            await settle(epoch)
            self.settled.append(epoch)
        await mark(epoch)
        self.captured.append(epoch)
        if not resume:
            self.left_paused.append(epoch)
        delta = RamDelta(np.array([epoch], np.uint32),
                         np.full((1, PAGE_SIZE), epoch % 256, np.uint8))
        return Checkpoint(epoch, b'dev%d' % epoch, delta, self.pause_s,
                          0, 0, 0)


class FakeDisk:
    def __init__(self):
        self.calls = []

    async def checkpoint(self, epoch):
        self.calls.append(('checkpoint', epoch))

    async def stop(self):
        self.calls.append(('stop',))


class FakeOutput:
    def __init__(self, order):
        self.order = order
        self.sealed, self.released = [], []
        self.detached = self.discarded = False
        self.held = self.frames_released = 0
        self.held_bytes = 0
        self.on_held = None
        self.waiting = asyncio.Event()
        # the epoch of each frame held, oldest first
        self.open_epoch = 1
        self.epochs_held = []

    def hold(self, nbytes):
        """The guest sent a frame of ``nbytes`` (held)."""
        self.held += 1
        self.held_bytes += nbytes
        self.epochs_held.append(self.open_epoch)
        self.waiting.set()
        self.on_held(self.held_bytes)

    def seal(self, epoch):
        self.sealed.append(epoch)
        self.open_epoch = epoch + 1
        self.waiting.clear()

    async def release(self, epoch):
        self.released.append(epoch)
        self.held = self.held_bytes = 0
        self.epochs_held = [e for e in self.epochs_held if e > epoch]

    @property
    def oldest_epoch(self):
        return self.epochs_held[0] if self.epochs_held else None

    async def detach(self, monitor):
        self.order.append('release-all')
        self.detached = True

    def discard(self):
        self.discarded = True


class FakeMonitor:
    def __init__(self):
        self.commands = []

    async def execute(self, command, **args):
        self.commands.append(command)
        return {'status': 'running'}


class FakeGuest:
    pid = 4242

    def __init__(self):
        self.alive = True

    @property
    def running(self):
        return self.alive

    async def wait(self):
        return 0

    async def kill(self):
        self.alive = False

    def last_log_line(self):
        return 'killed'


def hello(version=PROTOCOL_VERSION, pair_id='pair-1'):
    return Hello(version=version, qemu_pid=1, host_pid=2, boot_id='b',
                 pair_id=pair_id, disk_size=1 << 20)


class FakeProtector:
    """The primary's host: a channel to a secondary that answers HELLO
    with READY (or ``refusal``) and every MARK at once."""

    def __init__(self, clock, order):
        self.clock = clock
        self.order = order
        self.answer_marks = True
        self.refusal = None
        self.links = []
        self.channels = []

    async def connect(self, address):
        chan = FakeChannel(self.clock)
        chan.on_send = lambda kind, epoch: self._answer(chan, kind, epoch)
        self.channels.append(chan)
        return chan

    def _answer(self, chan, kind, epoch):
        if kind == Kind.HELLO:
            if self.refusal:
                reply = Message(Kind.ERROR, 0, json.dumps(
                    {'error': self.refusal}).encode())
            else:
                reply = Message(Kind.READY, 0, json.dumps(Ready(
                    target=NbdTargetInfo(socket='/nbd')).to_dict()).encode())
            chan.inbox.put_nowait(reply)
        elif kind == Kind.MARK and self.answer_marks:
            chan.inbox.put_nowait(Message(Kind.MARKED, epoch))

    async def hello(self, pair_id):
        return hello(pair_id=pair_id)

    async def boot_files(self):
        return []

    async def link(self, ready, lost):
        self.ready = ready
        self.lost = lost
        parts = (FakeCapturer(), FakeDisk(), FakeOutput(self.order))

        async def close():
            self.order.append('link-closed')
        self.links.append(parts)
        return pair.Link(*parts, close=close)

    async def invalidate_replica(self, pair_id):
        self.order.append('invalidate')


class PrimaryPairTest(unittest.IsolatedAsyncioTestCase):

    def new_machine(self, **kwargs):
        self.clock = FakeClock()
        self.order = []
        self.protector = FakeProtector(self.clock, self.order)
        self.guest, self.mon = FakeGuest(), FakeMonitor()
        self.machine = pair.PrimaryPair(
            protector=self.protector, clock=self.clock,
            **{'epoch_ms': 10_000, **kwargs})
        self.runner = asyncio.ensure_future(self.machine.run())

    async def make(self, **kwargs):
        """A machine that protects its guest: booted, synced, no epoch
        taken yet."""
        self.new_machine(**kwargs)
        self.machine.post(pair.GuestUp(self.guest, self.mon))
        self.machine.post(pair.Protect('unix:/sec', 'pair-1'))
        await settle()
        self.assertEqual(State.PROTECTED, self.machine.state)
        self.chan = self.protector.channels[-1]
        self.cap, self.disk, self.out = self.protector.links[-1]
        self.chan.clear()

    def assert_fenced(self):
        """The machine ended FENCED: its guest killed, its held output
        discarded and never released."""
        self.assertEqual(State.FENCED, self.machine.state)
        self.assertFalse(self.guest.alive)
        self.assertTrue(self.out.discarded)
        self.assertEqual([], self.out.released)
        self.assertTrue(self.machine.finished.is_set())

    def states_at_connect(self):
        """The machine's state at each connect to a secondary, as the
        list this returns records them."""
        states = []
        real_connect = self.protector.connect

        async def connect(address):
            states.append(self.machine.state)
            return await real_connect(address)
        self.protector.connect = connect
        return states

    async def asyncTearDown(self):
        self.runner.cancel()
        await asyncio.gather(self.runner, return_exceptions=True)

    async def test_a_side_is_one_machine_from_start_to_re_protection(self):
        self.new_machine()
        self.assertEqual(State.STARTING, self.machine.state)
        self.machine.post(pair.GuestUp(self.guest, self.mon))
        await settle()
        self.assertEqual(State.UNPROTECTED, self.machine.state)
        states = self.states_at_connect()
        self.machine.post(pair.Protect('unix:/sec', 'pair-1'))
        self.machine.post(pair.Protect('unix:/other', 'pair-9'))  # ignored
        await settle()
        self.assertEqual([State.SYNCING], states)
        self.assertEqual(State.PROTECTED, self.machine.state)
        chan = self.protector.channels[0]
        sent_hello = Hello.from_dict(chan.frames(Kind.HELLO)[0].json())
        self.assertEqual(PROTOCOL_VERSION, sent_hello.version)
        self.assertEqual('pair-1', sent_hello.pair_id)
        self.assertEqual('/nbd', self.protector.ready.target.socket)
        self.assertEqual(1, len(self.protector.channels))
        self.machine.post(pair.Tick())
        await settle()
        self.assertEqual(1, self.machine.stats.epochs)
        self.protector.lost('the mirror failed')
        await settle()
        self.assertEqual(State.UNPROTECTED, self.machine.state)
        self.assertEqual(['invalidate', 'release-all', 'link-closed'],
                         self.order)
        self.assertTrue(chan.closed)
        # Re-protection: a new secondary, epochs from 1 again.
        self.machine.post(pair.Protect('unix:/sec2', 'pair-2'))
        await settle()
        self.assertEqual(State.PROTECTED, self.machine.state)
        self.assertEqual('pair-2', self.machine.status().pair_id)
        self.assertEqual(0, self.machine.stats.epochs)
        self.machine.post(pair.Tick())
        await settle()
        self.assertEqual([1], self.protector.links[1][0].captured)

    async def test_a_secondary_named_at_start_is_synced_to_at_once(self):
        self.new_machine()
        self.machine.post(pair.Protect('unix:/sec', 'pair-1'))
        await settle()
        self.assertEqual(State.STARTING, self.machine.state)
        states = self.states_at_connect()
        self.machine.post(pair.GuestUp(self.guest, self.mon))
        await settle()
        # never UNPROTECTED in between
        self.assertEqual([State.SYNCING], states)
        self.assertEqual(State.PROTECTED, self.machine.state)

    async def test_a_refused_hello_leaves_the_guest_unprotected(self):
        self.new_machine()
        self.protector.refusal = 'protocol version 9'
        self.machine.post(pair.GuestUp(self.guest, self.mon))
        self.machine.post(pair.Protect('unix:/sec', 'pair-1'))
        await settle()
        self.assertEqual(State.UNPROTECTED, self.machine.state)
        self.assertIn('secondary refused: protocol version 9',
                      self.machine.error)
        self.assertTrue(self.protector.channels[0].closed)
        self.assertEqual([], self.protector.links)

    async def test_a_guest_that_fails_to_start_fails_the_side(self):
        self.new_machine()
        self.machine.post(pair.GuestFailed('QEMU failed to start: x'))
        await settle()
        self.assertEqual(State.FAILED, self.machine.state)
        self.assertTrue(self.machine.finished.is_set())
        self.assertEqual('QEMU failed to start: x',
                         self.machine.status().error)

    async def test_stop_while_syncing(self):
        self.new_machine()
        never = asyncio.get_running_loop().create_future()

        async def slow_link(ready, lost):
            await never      # the initial disk sync takes its time
        self.protector.link = slow_link
        self.machine.post(pair.GuestUp(self.guest, self.mon))
        self.machine.post(pair.Protect('unix:/sec', 'pair-1'))
        await settle()
        self.assertEqual(State.SYNCING, self.machine.state)
        self.machine.post(pair.Stop())
        await settle()
        self.assertEqual(State.STOPPED, self.machine.state)
        self.assertTrue(self.protector.channels[0].closed)

    async def test_lease_lost_fences_the_guest(self):
        await self.make()
        self.machine.interrupt(pair.LeaseLost('lease lapsed'))
        await settle()
        self.assert_fenced()
        self.assertIn(Kind.PRIMARY_LOST, self.chan.kinds())
        self.assertEqual('fenced: lease lapsed', self.machine.error)

    async def test_a_lost_lease_cuts_short_what_the_machine_waits_for(self):
        # Cut off from the secondary and from the backend: the machine
        # waits to mark the replica stale (holding the guest's output),
        # and the lease runs out meanwhile.
        await self.make()
        self.machine.post(pair.Tick())
        never = asyncio.get_running_loop().create_future()

        async def backend_unreachable(pair_id):
            await never
        self.protector.invalidate_replica = backend_unreachable
        self.machine.post(pair.SecondaryLost('link down'))
        self.machine.post(pair.Acked(1))     # queued behind: never handled
        await settle()
        self.assertEqual(State.UNPROTECTED, self.machine.state)
        self.assertFalse(self.out.detached)
        self.machine.interrupt(pair.LeaseLost('lease lapsed'))
        await settle()
        self.assert_fenced()
        # Held output never left: not passed through either.
        self.assertFalse(self.out.detached)
        # A final state is final.
        self.machine.post(pair.GuestExited('killed'))
        await settle()
        self.assertEqual(State.FENCED, self.machine.status().state)

    async def test_an_interrupt_wakes_an_idle_machine(self):
        await self.make()
        await settle()
        self.machine.interrupt(pair.LeaseLost('lease lapsed'))
        await settle()
        self.assertEqual(State.FENCED, self.machine.state)
        await asyncio.wait_for(self.runner, 1)    # the loop ended

    async def test_a_hung_guest_is_killed_and_its_exit_fails_the_side(self):
        await self.make()
        self.machine.post(pair.GuestHung('QEMU hung (no answer for 15s)'))
        await settle()
        self.assertFalse(self.guest.alive)
        self.machine.post(pair.GuestExited('QEMU exited: killed'))
        await settle()
        self.assertEqual(State.FAILED, self.machine.state)
        self.assertEqual('QEMU hung (no answer for 15s)',
                         self.machine.error)

    async def test_status_is_the_contract_record(self):
        await self.make()
        self.machine.post(pair.Tick())
        await settle()
        self.chan.inbox.put_nowait(Message(Kind.ACK, 1))
        await settle()
        st = self.machine.status()
        self.assertIsInstance(st, InstanceStatus)
        self.assertEqual((Role.PRIMARY, State.PROTECTED, 1, 1),
                         (st.role, st.state, st.epochs,
                          st.last_committed_epoch))
        self.assertEqual(10.0, st.pause_ms_p50)
        data = st.to_dict()
        self.assertEqual(st, InstanceStatus.from_dict(data))
        for key in ('pause_ms_p50', 'pause_ms_p99', 'held_frames',
                    'released_frames', 'shipped_mib', 'ms_since_last_ack',
                    'dirty_mib_total', 'replication_lag_epochs'):
            self.assertIn(key, data)

    async def test_echoed_heartbeat_vouches_for_the_primary(self):
        await self.make()
        await self.clock.advance(0.5)
        beats = self.chan.frames(Kind.HEARTBEAT)
        self.assertTrue(beats)
        # No echo yet: nobody vouches for us.
        self.assertEqual(float('-inf'), self.machine.peer_holds_until())
        sent = self.chan.sent_at[self.chan.sent.index(beats[0])]
        self.chan.inbox.put_nowait(Message(Kind.ECHO, beats[0].epoch,
                                           b'800'))
        await settle()
        self.assertAlmostEqual(sent + 0.8, self.machine.peer_holds_until())
        # An unprotected primary has no one to vouch for it.
        self.machine.post(pair.SecondaryLost('gone'))
        await settle()
        self.assertEqual(State.UNPROTECTED, self.machine.state)
        self.assertEqual(float('-inf'), self.machine.peer_holds_until())

    async def test_tick_checkpoints_ships_and_ack_releases_output(self):
        await self.make()
        self.machine.post(pair.Tick())
        await settle()
        self.assertEqual([1], self.cap.captured)
        # the disk sync's checkpoint is the capture's settle (it ends
        # before the device-state save, whose end inactivates the disks)
        self.assertEqual([1], self.cap.settled)
        self.assertEqual([('checkpoint', 1)], self.disk.calls)
        self.assertEqual([1], self.out.sealed)
        self.assertEqual([Kind.MARK, Kind.CHECKPOINT], self.chan.kinds())
        ckpt = self.chan.frames(Kind.CHECKPOINT)[0]
        dev, delta = transport.decode_checkpoint(ckpt.payload)
        self.assertEqual(b'dev1', dev)
        # Nothing is released before the ack...
        self.assertEqual([], self.out.released)
        self.chan.inbox.put_nowait(Message(Kind.ACK, 1))
        await settle()
        # ...and the acked epoch is released after it.
        self.assertEqual([1], self.out.released)
        self.assertEqual(1, self.machine.stats.committed)
        self.assertEqual(State.PROTECTED, self.machine.state)

    async def test_an_ack_releases_output_during_the_next_checkpoint(self):
        # The ack of epoch 1 comes while checkpoint 2 is being taken: its
        # output leaves now, not once that checkpoint is done (it waited
        # a whole extra checkpoint in the machine's queue).
        await self.make()
        self.machine.post(pair.Tick())
        await settle()
        gate = asyncio.Event()
        capture = self.cap.capture

        async def slow_capture(*args, **kwargs):
            await gate.wait()
            return await capture(*args, **kwargs)
        self.cap.capture = slow_capture
        self.machine.post(pair.Tick())
        await settle()
        self.chan.inbox.put_nowait(Message(Kind.ACK, 1))
        await settle()
        self.assertEqual([1], self.out.released)
        self.assertEqual([1], self.cap.captured)     # 2 still under way
        gate.set()
        await settle()
        self.assertEqual([1, 2], self.cap.captured)
        self.assertEqual(1, self.machine.stats.committed)
        # Epoch 2 is not released before its own ack.
        self.assertNotIn(2, self.out.released)

    async def test_status_says_how_long_ship_and_ack_take(self):
        await self.make()
        self.assertIsNone(self.machine.status().ack_ms_p50)
        self.machine.post(pair.Tick())
        await settle()
        await self.clock.advance(0.007)
        self.chan.inbox.put_nowait(Message(Kind.ACK, 1))
        await settle()
        st = self.machine.status()
        self.assertEqual(0.0, st.ship_ms_p50)     # (the fake sends at once)
        self.assertAlmostEqual(7.0, st.ack_ms_p50)

    async def test_many_epochs_leave_no_task_behind(self):
        # Each epoch is shipped in a task of its own; a finished one must
        # not stay referenced (it held the epoch's checkpoint, too).
        await self.make()

        def tasks_of(name):
            gc.collect()
            return [t for t in gc.get_objects()
                    if isinstance(t, asyncio.Task)
                    and t.get_coro().__name__ == name]
        for epoch in range(1, 101):
            self.machine.post(pair.Tick())
            await settle()
            self.chan.inbox.put_nowait(Message(Kind.ACK, epoch))
            await settle()
        self.assertEqual(100, self.machine.stats.committed)
        self.assertLessEqual(len(tasks_of('_ship')), 1)

    async def test_ticks_do_not_pile_up_behind_a_slow_checkpoint(self):
        # Epochs of 10 ms, a checkpoint that takes a second: the queue
        # holds one Tick, not a hundred (it grew for as long as the guest
        # ran, and the acks waited behind the ticks).
        await self.make(epoch_ms=10)
        gate = asyncio.Event()
        capture = self.cap.capture

        async def slow_capture(*args, **kwargs):
            await gate.wait()
            return await capture(*args, **kwargs)
        self.cap.capture = slow_capture
        await self.clock.advance(1)
        self.assertLessEqual(self.machine.events.qsize(), 1)
        gate.set()
        await settle()
        self.assertEqual([1, 2], self.cap.captured)

    async def test_epochs_last_epoch_ms_when_idle_epochs_are_off(self):
        await self.make(epoch_ms=30)
        await self.clock.advance(0.35)
        # one every 30 ms: at 30, 60, ... 330 ms
        self.assertEqual(list(range(1, 12)), self.cap.captured)

    async def test_an_epoch_without_output_runs_on_until_the_guest_sends(self):
        await self.make(epoch_ms=30, idle_epoch_ms=1000)
        await self.clock.advance(0.35)
        # Nothing sent: nobody waits for a commit, no pause is taken.
        self.assertEqual([], self.cap.captured)
        # The guest sends: its epoch (older than epoch_ms) ends now.
        self.out.waiting.set()
        await settle()
        self.assertEqual([1], self.cap.captured)
        # Silent again: the next epoch runs to idle_epoch_ms, no longer.
        await self.clock.advance(0.6)
        self.assertEqual([1], self.cap.captured)
        await self.clock.advance(0.6)
        self.assertEqual([1, 2], self.cap.captured)

    # -- the adaptive epoch (pair.cadence) --

    async def make_adaptive(self, guest_cpu=lambda: None,
                            guest_busy=lambda: None, **policy):
        # (guest_cpu None: how busy the guest is is unknown, so every
        # pause counts in full; guest_busy None: nobody can tell whether
        # the guest has gone quiet, so an epoch ends at its batch)
        await self.make(epoch_ms=200, idle_epoch_ms=1000,
                        policy=pair.EpochPolicy(**policy),
                        guest_cpu=guest_cpu, guest_busy=guest_busy)
        # the secondary acks every checkpoint at once
        answer = self.chan.on_send

        def on_send(kind, epoch):
            answer(kind, epoch)
            if kind == Kind.CHECKPOINT:
                self.chan.inbox.put_nowait(Message(Kind.ACK, epoch))
        self.chan.on_send = on_send

    def guest_always_talks(self):
        """From now on the guest sends again right after each seal."""
        seal = self.out.seal

        def seal_and_send(epoch):
            seal(epoch)
            self.out.waiting.set()
        self.out.seal = seal_and_send

    async def test_an_epoch_ends_a_batch_after_its_first_packet(self):
        await self.make_adaptive(output_batch_ms=5, min_epoch_ms=10)
        await self.clock.advance(0.3)
        self.assertEqual([], self.cap.captured)   # silent: runs on
        self.out.hold(100)
        await self.clock.advance(0.004)
        self.assertEqual([], self.cap.captured)   # batching
        await self.clock.advance(0.002)
        # 5 ms after the packet, not epoch_ms (200) after the last epoch
        self.assertEqual([1], self.cap.captured)
        self.assertEqual([1], self.out.released)
        # Silent again: the next runs to idle_epoch_ms, no longer.
        await self.clock.advance(0.9)
        self.assertEqual([1], self.cap.captured)
        await self.clock.advance(0.2)
        self.assertEqual([1, 2], self.cap.captured)

    async def make_quiet_aware(self, busy, pause_s=0.02):
        """An adaptive machine (batch 2 ms, no other bound: its QEMU used
        no CPU, so pauses cost it nothing) whose guest is busy while
        ``busy[0]``, after enough epochs of ``pause_s`` pauses that their
        mean is known; the guest silent from then on."""
        await self.make_adaptive(output_batch_ms=2, min_epoch_ms=1,
                                 max_pause_percent=100,
                                 guest_cpu=lambda: 3.0,
                                 guest_busy=lambda: busy[0])
        self.cap.pause_s = pause_s
        #: when each checkpoint began
        self.starts = []
        capture = self.cap.capture

        async def timed_capture(*args, **kwargs):
            self.starts.append(self.clock.now)
            return await capture(*args, **kwargs)
        self.cap.capture = timed_capture
        for n in range(1, 13):
            self.out.hold(100)
            for _ in range(100):
                await self.clock.advance(0.01)
                if len(self.cap.captured) == n:
                    break
        self.assertEqual(12, len(self.cap.captured))

    async def test_a_held_epoch_waits_for_the_busy_guest_to_go_quiet(self):
        # The guest acknowledged a request (a frame held) and works on
        # its answer: ending the epoch 2 ms after that frame would pause
        # it in mid-answer and leave the answer a pause and a commit
        # later. The epoch waits until its QEMU is quiet.
        busy = [False]
        await self.make_quiet_aware(busy)
        taken = len(self.cap.captured)
        busy[0] = True
        self.out.hold(60)
        await self.clock.advance(0.010)
        self.assertEqual(taken, len(self.cap.captured))     # not at 2 ms
        self.out.hold(200)                  # the answer
        busy[0] = False
        epoch = self.out.open_epoch
        self.assertEqual([epoch, epoch], self.out.epochs_held)
        await self.clock.advance(0.003)     # two quiet looks, 1 ms apart
        self.assertEqual(taken + 1, len(self.cap.captured))
        self.assertEqual(epoch, self.cap.captured[-1])
        # both left together, once their epoch was acked
        self.assertEqual(epoch, self.out.released[-1])
        self.assertEqual([], self.out.epochs_held)

    async def test_a_guest_that_stays_busy_holds_its_output_a_pause_at_most(
            self):
        # Output waits for a busy guest no longer than a pause (the last
        # ones' mean, 20 ms here): what ending the epoch would cost it.
        busy = [True]
        await self.make_quiet_aware([False])
        self.machine._cadence.guest_busy = lambda: busy[0]
        taken = len(self.cap.captured)
        self.out.hold(60)
        await self.clock.advance(0.018)
        self.assertEqual(taken, len(self.cap.captured))
        await self.clock.advance(0.003)
        self.assertEqual(taken + 1, len(self.cap.captured))

    async def busy_epochs(self, n, more_output):
        """``n`` epochs of a guest that never goes quiet, each with a frame
        held (and another 5 ms later if ``more_output``); returns how
        long after its first frame each epoch's checkpoint began."""
        took = []
        for _ in range(n):
            taken = len(self.cap.captured)
            held = self.clock.now
            self.out.hold(60)
            await self.clock.advance(0.005)
            if more_output:
                self.out.hold(60)
            # (silent after that: the next epoch would be an idle one)
            await self.clock.advance(0.025)
            self.assertEqual(taken + 1, len(self.cap.captured))
            took.append(self.starts[-1] - held)
        return took

    async def test_waits_that_do_not_pay_shrink_to_a_quarter_pause(self):
        # A guest busy with a job beside its service never goes quiet,
        # and its answer is all it sends: waiting for quiet only delays
        # its output. The wait shrinks to a quarter of a pause (its
        # answers may still take a few ms), and no less.
        busy = [False]
        await self.make_quiet_aware(busy)
        busy[0] = True
        took = await self.busy_epochs(6, more_output=False)
        self.assertAlmostEqual(0.020, took[0], delta=0.001)
        self.assertAlmostEqual(0.005, took[-1], delta=0.001)
        # It goes quiet again after a while: the wait pays, and grows.
        busy[0] = False
        for _ in range(6):
            self.out.hold(60)
            busy[0] = True
            await self.clock.advance(0.003)
            busy[0] = False
            await self.clock.advance(0.01)
        busy[0] = True
        took = await self.busy_epochs(1, more_output=False)
        self.assertGreater(took[0], 0.015)

    async def test_waits_that_pay_keep_their_length(self):
        # Busy with many clients: more output comes during each wait,
        # which keeps lasting a pause.
        busy = [False]
        await self.make_quiet_aware(busy)
        busy[0] = True
        took = await self.busy_epochs(6, more_output=True)
        self.assertAlmostEqual(0.020, min(took), delta=0.001)

    async def test_a_quiet_guest_s_epoch_ends_at_its_batch(self):
        busy = [False]
        await self.make_quiet_aware(busy)
        taken = len(self.cap.captured)
        self.out.hold(60)
        await self.clock.advance(0.0019)
        self.assertEqual(taken, len(self.cap.captured))     # batching
        await self.clock.advance(0.0015)    # the batch, and a second look
        self.assertEqual(taken + 1, len(self.cap.captured))

    async def test_waiting_for_quiet_never_stretches_an_epoch_past_epoch_ms(
            self):
        # Half-second pauses: a busy guest's output still waits no longer
        # than epoch_ms (200) from the epoch's start.
        busy = [False]
        await self.make_quiet_aware(busy, pause_s=0.5)
        busy[0] = True
        taken = len(self.cap.captured)
        began = self.starts[-1]
        await self.clock.advance(began + 0.150 - self.clock.now)
        self.out.hold(60)
        await self.clock.advance(0.049)
        self.assertEqual(taken, len(self.cap.captured))
        await self.clock.advance(0.002)
        self.assertEqual(taken + 1, len(self.cap.captured))
        self.assertAlmostEqual(began + 0.2, self.starts[-1], delta=0.0011)

    async def test_an_adaptive_epoch_waits_for_a_large_checkpoint_s_ack(
            self):
        # The adaptive ticker holds its Tick while a large checkpoint
        # awaits its ACK (a Tick then would take no checkpoint), and
        # the next checkpoint follows the ACK at once.
        await self.make(epoch_ms=200, idle_epoch_ms=1000,
                        policy=pair.EpochPolicy(output_batch_ms=2,
                                                min_epoch_ms=10),
                        guest_cpu=lambda: None, guest_busy=lambda: None,
                        max_unacked_bytes=1024)
        ticks = []
        post = self.machine.post

        def count_ticks(event):
            if isinstance(event, pair.Tick):
                ticks.append(self.clock.now)
            post(event)
        self.machine.post = count_ticks
        self.guest_always_talks()
        self.out.hold(100)
        await self.clock.advance(0.05)
        self.assertEqual([1], self.cap.captured)
        await self.clock.advance(0.5)
        self.assertEqual([1], self.cap.captured)
        self.assertEqual(1, len(ticks))      # none while it waits
        self.chan.inbox.put_nowait(Message(Kind.ACK, 1))
        await self.clock.advance(0.02)
        self.assertEqual([1, 2], self.cap.captured)

    async def test_epochs_are_never_shorter_than_min_epoch_ms(self):
        await self.make_adaptive(output_batch_ms=0, min_epoch_ms=30,
                                 max_pause_percent=100)
        self.guest_always_talks()
        self.out.hold(100)
        await self.clock.advance(0.305)
        # at 30, 60, ... 300 ms (the first epoch began with protection)
        self.assertEqual(list(range(1, 11)), self.cap.captured)

    async def test_pauses_take_at_most_their_share_of_the_time(self):
        # 50 ms pauses, at most 25 % of the time: a guest that talks all
        # along is checkpointed every 200 ms on average, not every 10 ms.
        await self.make_adaptive(output_batch_ms=0, min_epoch_ms=10,
                                 max_pause_percent=25)
        self.cap.pause_s = 0.05
        self.guest_always_talks()
        self.out.hold(100)
        await self.clock.advance(10)
        paused = len(self.cap.captured) * self.cap.pause_s
        # the share of 10 s, plus the budget saved up at the start
        self.assertLessEqual(paused, 0.25 * 10 + 0.25 + self.cap.pause_s)
        self.assertGreaterEqual(paused, 0.25 * 10 - 2 * self.cap.pause_s)
        # Cheaper pauses (a guest that dirties less) buy shorter epochs.
        self.cap.pause_s = 0.005
        before = len(self.cap.captured)
        await self.clock.advance(1)
        self.assertGreater(len(self.cap.captured) - before, 40)

    async def test_a_guest_that_waits_for_its_clients_loses_nothing(self):
        # The same 50 ms pauses at 25 %, but the guest's QEMU used no CPU
        # between them: it was waiting for the network, and pausing it
        # took nothing from it. Its epochs stay short.
        await self.make_adaptive(output_batch_ms=0, min_epoch_ms=10,
                                 max_pause_percent=25,
                                 guest_cpu=lambda: 3.0)
        self.cap.pause_s = 0.05
        self.guest_always_talks()
        self.out.hold(100)
        await self.clock.advance(2)
        self.assertGreater(len(self.cap.captured), 150)

    async def test_the_cpu_a_pause_takes_is_not_the_guest_being_busy(self):
        # The guest's QEMU uses CPU only inside each pause (saving the
        # device state), none while the guest runs: it waits for its
        # client. Read after the pause, that CPU made the guest look
        # busy, and a one-client guest was throttled to 25 %.
        cpu = [3.0]
        await self.make_adaptive(output_batch_ms=0, min_epoch_ms=10,
                                 max_pause_percent=25,
                                 guest_cpu=lambda: cpu[0])
        self.cap.pause_s = 0.05
        capture = self.cap.capture

        async def capture_using_cpu(*args, **kwargs):
            cpu[0] += self.cap.pause_s
            return await capture(*args, **kwargs)
        self.cap.capture = capture_using_cpu
        self.guest_always_talks()
        self.out.hold(100)
        await self.clock.advance(2)
        self.assertGreater(len(self.cap.captured), 150)

    async def test_a_busy_guest_is_paused_at_most_its_share(self):
        # Its QEMU used CPU all the time it ran: each pause counts.
        await self.make_adaptive(output_batch_ms=0, min_epoch_ms=10,
                                 max_pause_percent=25,
                                 guest_cpu=lambda: self.clock.now)
        self.cap.pause_s = 0.05
        self.guest_always_talks()
        self.out.hold(100)
        await self.clock.advance(10)
        paused = len(self.cap.captured) * self.cap.pause_s
        self.assertLessEqual(paused, 0.25 * 10 + 0.25 + 2 * self.cap.pause_s)

    async def test_the_pause_share_never_stretches_an_epoch_past_epoch_ms(
            self):
        # One pause of 2 s would wait 20 s at 10 %: output waits for
        # epoch_ms at most, as with fixed epochs.
        await self.make_adaptive(output_batch_ms=0, min_epoch_ms=10,
                                 max_pause_percent=10)
        self.cap.pause_s = 2.0
        self.guest_always_talks()
        self.out.hold(100)
        await self.clock.advance(0.011)
        self.assertEqual([1], self.cap.captured)
        await self.clock.advance(0.19)
        self.assertEqual([1], self.cap.captured)
        await self.clock.advance(0.02)
        self.assertEqual([1, 2], self.cap.captured)

    async def test_the_next_checkpoint_waits_for_the_last_to_ship(self):
        # A tick while the last checkpoint is still being sent would be
        # dropped, and the output would wait a whole epoch more.
        await self.make_adaptive(output_batch_ms=0, min_epoch_ms=10,
                                 max_pause_percent=100)
        gate = asyncio.Event()
        send = self.chan.send

        async def slow_send(kind, epoch=0, *buffers):
            if kind == Kind.CHECKPOINT:
                await gate.wait()
            await send(kind, epoch, *buffers)
        self.chan.send = slow_send
        self.out.hold(100)
        await self.clock.advance(0.011)
        self.assertEqual([1], self.cap.captured)
        self.out.hold(100)
        await self.clock.advance(0.05)
        self.assertEqual([1], self.cap.captured)
        gate.set()
        await settle()
        self.assertEqual([1, 2], self.cap.captured)

    async def talk_and_ack_after(self, ack_s, pause_s):
        """The guest sends a frame in every epoch; the secondary acks each
        checkpoint ``ack_s`` after it came; each pause takes ``pause_s``.
        Returns (checkpoint start times, ACK times) by epoch."""
        await self.make_adaptive(output_batch_ms=0, min_epoch_ms=1,
                                 max_pause_percent=100)
        self.cap.pause_s = pause_s
        starts, acks = {}, {}
        capture = self.cap.capture

        async def timed_capture(epoch, *args, **kwargs):
            starts[epoch] = self.clock.now
            ckpt = await capture(epoch, *args, **kwargs)
            await self.clock.sleep(pause_s)     # the guest stopped
            return ckpt
        self.cap.capture = timed_capture
        seal = self.out.seal

        def seal_and_send(epoch):
            seal(epoch)
            self.out.hold(100)
        self.out.seal = seal_and_send
        answer = self.protector._answer

        async def ack_later(epoch):
            await self.clock.sleep(ack_s)
            acks[epoch] = self.clock.now
            self.chan.inbox.put_nowait(Message(Kind.ACK, epoch))

        def on_send(kind, epoch):
            answer(self.chan, kind, epoch)
            if kind == Kind.CHECKPOINT:
                asyncio.ensure_future(ack_later(epoch))
        self.chan.on_send = on_send
        self.out.hold(100)
        await self.clock.advance(1)
        return starts, acks

    async def test_a_checkpoint_waits_for_an_ack_due_within_its_pause(self):
        # QEMU sends nothing while the guest is stopped: an ACK that comes
        # during the next pause frees its output only once that pause is
        # over. Due within half a pause, the ACK is worth waiting for.
        starts, acks = await self.talk_and_ack_after(0.008, 0.030)
        self.assertGreater(len(starts), 10)
        # (the first ones: no ACK seen yet, nothing to expect)
        late = [e for e in starts if e > 3 and e - 1 in acks
                and starts[e] < acks[e - 1]]
        self.assertEqual([], late, (starts, acks))

    async def test_a_checkpoint_waits_for_no_ack_due_after_its_pause(self):
        # An ACK due after the pause is not held up by it: waiting would
        # only delay the next epoch's output.
        starts, acks = await self.talk_and_ack_after(0.050, 0.030)
        self.assertGreater(len(starts), 10)
        early = [e for e in starts if e > 3 and e - 1 in acks
                 and starts[e] < acks[e - 1]]
        self.assertGreater(len(early), 5, (starts, acks))

    async def test_no_output_leaves_once_the_fence_says_the_lease_is_gone(
            self):
        # The replica could not be marked stale because the backend says
        # another owns the guest now (it may have taken over): nothing
        # held may leave, the guest stops.
        await self.make()

        async def lost(pair_id):
            self.order.append('invalidate')
            raise pair.OwnershipLost('the lock holds another token')
        self.protector.invalidate_replica = lost
        self.protector.lost('the mirror failed')
        await settle()
        self.assert_fenced()
        self.assertNotIn('release-all', self.order)
        self.assertIn('the lock holds another token', self.machine.error)

    async def test_broken_stream_leaves_guest_unprotected(self):
        await self.make()
        self.chan.inbox.put_nowait(ConnectionError('reset'))
        await settle()
        self.assertEqual(State.UNPROTECTED, self.machine.state)
        self.assertIn(('stop',), self.disk.calls)
        # The replica is made stale before held output is let go: a later
        # takeover must not undo what clients then see.
        self.assertEqual(['invalidate', 'release-all', 'link-closed'],
                         self.order)
        self.machine.post(pair.Tick())
        await settle()
        self.assertEqual([], self.cap.captured)

    async def test_no_mark_queues_behind_a_large_unacked_checkpoint(self):
        # The first checkpoint after a sync carries much of the guest's
        # RAM: a MARK sent behind it waited while the secondary read and
        # applied it, and on a loaded host missed mark_timeout ('checkpoint
        # 2 failed: TimeoutError()'), dropping the secondary it had just
        # synced. The next checkpoint waits for that one's ACK instead.
        await self.make(max_unacked_bytes=1024, ack_timeout=5.0)
        self.machine.post(pair.Tick())
        await settle()
        self.assertEqual([1], self.cap.captured)
        self.assertGreater(self.machine.unacked_bytes, 1024)
        self.chan.clear()
        self.machine.post(pair.Tick())
        await settle()
        self.assertEqual([], self.chan.kinds())      # no MARK: it waits
        self.assertEqual([1], self.cap.captured)
        self.chan.inbox.put_nowait(Message(Kind.ACK, 1))
        await settle()
        self.assertEqual(0, self.machine.unacked_bytes)
        self.machine.post(pair.Tick())
        await settle()
        self.assertEqual([1, 2], self.cap.captured)
        self.assertEqual([Kind.MARK, Kind.CHECKPOINT], self.chan.kinds())
        # A secondary that never acks is still lost at ack_timeout.
        await self.clock.advance(5.5)
        self.machine.post(pair.Tick())
        await settle()
        self.assertEqual(State.UNPROTECTED, self.machine.state)
        self.assertIn('checkpoint 2 not acked', self.machine.stats.reason)

    async def test_mark_timeout_means_secondary_lost(self):
        await self.make(mark_timeout=0.05)
        self.protector.answer_marks = False
        self.machine.post(pair.Tick())
        await self.clock.advance(0.5)
        self.assertEqual(State.UNPROTECTED, self.machine.state)
        self.assertIn('checkpoint failed', self.machine.stats.reason)

    async def test_qemu_dying_mid_checkpoint_is_not_a_lost_secondary(self):
        await self.make(mark_timeout=0.05)
        self.protector.answer_marks = False
        self.guest.alive = False  # the checkpoint fails because QEMU died
        self.machine.post(pair.Tick())
        await self.clock.advance(0.5)
        # The replica stays valid and no BYE tells the secondary to stand
        # down: it must take over when the exit is reported.
        self.assertEqual(State.PROTECTED, self.machine.state)
        self.assertEqual([], self.order)
        self.assertNotIn(Kind.BYE, self.chan.kinds())
        self.machine.post(pair.GuestExited('killed'))
        await settle()
        self.assertEqual(State.FAILED, self.machine.state)
        self.assertIn(Kind.PRIMARY_LOST, self.chan.kinds())

    async def test_guest_poweroff_stops_the_pair_without_failover(self):
        await self.make()
        self.machine.post(pair.GuestExited('the guest powered itself off',
                                           by_guest=True))
        await settle()
        self.assertEqual(State.STOPPED, self.machine.state)
        self.assertTrue(self.machine.finished.is_set())
        kinds = self.chan.kinds()
        self.assertIn(Kind.BYE, kinds)
        self.assertNotIn(Kind.PRIMARY_LOST, kinds)
        # the replica made stale before the fence is let go: it is never
        # resumed (the guest would start again, from the past)
        self.assertEqual(['invalidate', 'link-closed'], self.order)
        self.assertTrue(self.out.discarded)
        self.assertEqual([], self.out.released)
        self.assertEqual('the guest powered itself off',
                         self.machine.status().reason)

    async def test_unprotected_guest_poweroff_is_a_stop(self):
        self.new_machine()
        self.machine.post(pair.GuestUp(self.guest, self.mon))
        self.machine.post(pair.GuestExited('the guest powered itself off',
                                           by_guest=True))
        await settle()
        self.assertEqual(State.STOPPED, self.machine.state)
        self.assertEqual([], self.order)
        self.assertEqual([], self.protector.channels)

    async def test_guest_exit_tells_secondary_and_discards_output(self):
        await self.make()
        self.machine.post(pair.GuestExited('killed'))
        await settle()
        self.assertEqual(State.FAILED, self.machine.state)
        self.assertIn(Kind.PRIMARY_LOST, self.chan.kinds())
        self.assertTrue(self.out.discarded)
        self.assertEqual([], self.out.released)
        # the replica stays valid
        self.assertNotIn('invalidate', self.order)

    async def test_secondary_that_stops_reading_is_lost(self):
        await self.make(ship_timeout=0.1)
        self.chan.stuck = True      # the socket buffer is full
        self.machine.post(pair.Tick())
        await settle()
        self.assertEqual(State.PROTECTED, self.machine.state)
        await self.clock.advance(0.15)
        self.machine.post(pair.Tick())
        await settle()
        self.assertEqual(State.UNPROTECTED, self.machine.state)
        self.assertIn('not taken by the secondary', self.machine.stats.reason)

    async def test_an_epoch_not_acked_in_time_loses_the_secondary(self):
        # A secondary that reads every frame but never acks: the guest's
        # output would be held for ever while the status says protected.
        await self.make(epoch_ms=100, ack_timeout=1.0)
        await self.clock.advance(0.95)
        self.assertEqual(State.PROTECTED, self.machine.state)
        self.assertEqual([], self.out.released)
        await self.clock.advance(0.5)
        self.assertEqual(State.UNPROTECTED, self.machine.state)
        self.assertIn('checkpoint 1 not acked', self.machine.stats.reason)
        # the usual way: BYE, the replica stale before the output leaves
        self.assertIn(Kind.BYE, self.chan.kinds())
        self.assertEqual(['invalidate', 'release-all', 'link-closed'],
                         self.order)

    async def test_epochs_acked_in_time_keep_the_secondary(self):
        await self.make(epoch_ms=100, ack_timeout=1.0)
        answer_marks = self.chan.on_send

        def answer(kind, epoch):
            answer_marks(kind, epoch)
            if kind == Kind.CHECKPOINT:
                self.chan.inbox.put_nowait(Message(Kind.ACK, epoch))
        self.chan.on_send = answer
        await self.clock.advance(3)
        self.assertEqual(State.PROTECTED, self.machine.state)
        self.assertGreater(self.machine.stats.committed, 20)

    async def test_too_many_unacked_epochs_pause_the_guest(self):
        await self.make(epoch_ms=100, max_held_epochs=3)
        await self.clock.advance(0.35)
        # Epoch 3 makes three unacked: the guest stays paused after it,
        # and no epoch is taken while it waits.
        self.assertEqual([1, 2, 3], self.cap.captured)
        self.assertEqual([3], self.cap.left_paused)
        await self.clock.advance(1)
        self.assertEqual([1, 2, 3], self.cap.captured)
        st = self.machine.status()
        self.assertTrue(st.held_output_full)
        self.assertEqual(State.PROTECTED, st.state)
        # Nothing was let out early, nothing dropped.
        self.assertEqual([], self.out.released)
        self.assertFalse(self.out.discarded)
        # An ack frees room: the guest runs on.
        self.chan.inbox.put_nowait(Message(Kind.ACK, 1))
        await settle()
        self.assertEqual([1], self.out.released)
        self.assertEqual(['cont'], self.mon.commands)
        self.assertFalse(self.machine.status().held_output_full)
        await self.clock.advance(0.15)
        self.assertEqual([1, 2, 3, 4], self.cap.captured)

    async def test_held_bytes_at_their_bound_pause_the_guest(self):
        await self.make(epoch_ms=100, max_held_bytes=1000)
        self.out.hold(600)
        await settle()
        self.assertEqual([], self.mon.commands)
        self.out.hold(600)          # 1200 bytes held: over the bound
        await settle()
        self.assertEqual(['stop'], self.mon.commands)
        self.assertTrue(self.machine.status().held_output_full)
        self.assertEqual(1200, self.machine.status().held_bytes)
        # The open epoch is still taken (its frames need a commit), the
        # guest left paused.
        await self.clock.advance(0.15)
        self.assertEqual([1], self.cap.captured)
        self.assertEqual([1], self.cap.left_paused)
        self.assertEqual([], self.out.released)
        await self.clock.advance(1)
        self.assertEqual([1], self.cap.captured)
        self.chan.inbox.put_nowait(Message(Kind.ACK, 1))
        await settle()
        self.assertEqual([1], self.out.released)
        self.assertEqual(['stop', 'cont'], self.mon.commands)
        self.assertFalse(self.machine.status().held_output_full)

    async def test_a_guest_paused_at_a_bound_runs_on_unprotected(self):
        await self.make(epoch_ms=100, max_held_epochs=2, ack_timeout=1.0)
        await self.clock.advance(0.25)
        self.assertTrue(self.machine.status().held_output_full)
        await self.clock.advance(1.5)
        # The epochs were never acked: the secondary is lost, the output
        # leaves after the replica was made stale, and the guest runs.
        self.assertEqual(State.UNPROTECTED, self.machine.state)
        self.assertEqual(['invalidate', 'release-all', 'link-closed'],
                         self.order)
        self.assertEqual(['cont'], self.mon.commands)
        self.assertFalse(self.machine.held_output_full)

    async def test_handover_commits_the_last_epoch_then_stops(self):
        await self.make()
        answers = {Kind.MARK: Kind.MARKED, Kind.CHECKPOINT: Kind.ACK}
        self.chan.on_send = lambda kind, epoch: kind in answers and \
            self.chan.inbox.put_nowait(Message(answers[kind], epoch))
        self.machine.post(pair.Stop(handover=True))
        await settle()
        self.assertEqual(State.STOPPED, self.machine.state)
        self.assertEqual([Kind.MARK, Kind.CHECKPOINT, Kind.PRIMARY_LOST],
                         self.chan.kinds())
        self.assertTrue(self.out.discarded)


class EpochPolicyTest(unittest.TestCase):

    def test_the_cpu_time_of_a_process(self):
        mine = pair.cadence.process_cpu_seconds(os.getpid())
        self.assertIsInstance(mine, float)
        self.assertGreaterEqual(mine, 0)
        self.assertIsNone(pair.cadence.process_cpu_seconds(-1))

    def test_an_epoch_policy_out_of_its_ranges_is_refused(self):
        for bad in ({'output_batch_ms': -1}, {'output_batch_ms': 1001},
                    {'min_epoch_ms': 0}, {'max_pause_percent': 101},
                    {'max_pause_percent': 4}, {'min_epoch_ms': 2.5},
                    {'output_batch_ms': True}):
            with self.assertRaisesRegex(ValueError, next(iter(bad))):
                pair.EpochPolicy(**bad)
        pair.EpochPolicy(output_batch_ms=0, min_epoch_ms=1,
                         max_pause_percent=100)


class FakeReplica:
    """Stages at once; installs (the part after the ACK) the second and
    later epochs only once ``gate`` (a threading.Event) is set."""

    def __init__(self, gate=None):
        self.committed = 0
        self.damaged = None
        self.staged = []
        self.applied = []
        self.gate = gate

    def stage(self, epoch, devstate, delta):
        self.staged.append(epoch)
        return Staged(epoch, f'/devstate-{epoch}', delta)

    def install(self, staged):
        if self.gate is not None and staged.epoch > 1:
            self.gate.wait(5)
        self.applied.append(staged.epoch)
        self.committed = staged.epoch


class FailingReplica(FakeReplica):
    """Takes epoch 1; fails on ``fail_at``: ``midway`` while installing
    it, after some of its RAM pages were written (the image is damaged;
    only a bug does this after the ACK), else while staging it, before
    anything was written (its device state found no space)."""

    def __init__(self, gate=None, fail_at=2, midway=True):
        super().__init__(gate)
        self.fail_at = fail_at
        self.midway = midway

    def stage(self, epoch, devstate, delta):
        if epoch == self.fail_at and not self.midway:
            if self.gate is not None:
                self.gate.wait(5)
            raise OSError(28, 'No space left on device')
        return super().stage(epoch, devstate, delta)


    def install(self, staged):
        if self.gate is not None and staged.epoch > 1:
            self.gate.wait(5)
        if staged.epoch == self.fail_at:
            self.damaged = f'checkpoint {staged.epoch} half written'
            raise OSError(28, 'No space left on device')
        super().install(staged)


class LaggingReplica(FakeReplica):
    """Fails to install ``fail_at`` without touching the image (only a
    bug could): it stays whole, but behind the acked epoch."""

    def __init__(self, gate=None, fail_at=2):
        super().__init__(gate)
        self.fail_at = fail_at

    def install(self, staged):
        if self.gate is not None and staged.epoch > 1:
            self.gate.wait(5)
        if staged.epoch == self.fail_at:
            raise RuntimeError('a bug')
        super().install(staged)


class FakeStore:
    def __init__(self, fail_mark=False):
        self.calls = []
        self.fail_mark = fail_mark

    async def mark(self, epoch):
        if self.fail_mark:
            raise OSError(28, 'No space left on device')
        self.calls.append(('mark', epoch))

    async def commit(self, epoch):
        self.calls.append(('commit', epoch))

    async def stop(self):
        self.calls.append(('stop',))


def checkpoint_msg(epoch):
    delta = RamDelta(np.array([0], np.uint32),
                     np.zeros((1, PAGE_SIZE), np.uint8))
    payload = b''.join(bytes(memoryview(b)) for b in
                       transport.encode_checkpoint(b'dev', delta))
    return Message(Kind.CHECKPOINT, epoch, payload)


def hello_msg(version=PROTOCOL_VERSION):
    return Message(Kind.HELLO, 0,
                   json.dumps(hello(version).to_dict()).encode())


class SecondaryPairTest(unittest.IsolatedAsyncioTestCase):

    def new_machine(self, replica=None, timeout=5.0, first_timeout=30.0,
                    vouches=True):
        self.clock = FakeClock()
        self.replica = replica or FakeReplica()
        self.store = FakeStore()
        self.activated = []
        self.hellos = []

        async def prepare(hello):
            self.hellos.append(hello)
            return pair.Prepared(self.replica, self.store,
                                 NbdTargetInfo(socket='/nbd'))

        async def activate(committed):
            self.activated.append(committed)
        self.machine = pair.SecondaryPair(
            prepare=prepare, activate=activate, clock=self.clock,
            detect_timeout=timeout, first_commit_timeout=first_timeout,
            vouches=vouches)
        self.runner = asyncio.ensure_future(self.machine.run())

    async def make(self, replica=None, timeout=5.0, first_timeout=30.0,
                   vouches=True):
        """A standby secondary: listening, handshake done."""
        self.new_machine(replica, timeout, first_timeout, vouches)
        self.machine.post(pair.Listening())
        self.chan = FakeChannel(self.clock)
        self.chan.inbox.put_nowait(hello_msg())
        self.machine.post(pair.Connected(self.chan))
        await settle()
        self.assertEqual(State.STANDBY, self.machine.state)
        self.assertEqual([Kind.READY], self.chan.kinds())
        self.chan.clear()

    async def asyncTearDown(self):
        self.runner.cancel()
        await asyncio.gather(self.runner, return_exceptions=True)

    async def finished(self):
        await asyncio.wait_for(self.machine.finished.wait(), 5)

    async def test_handshake_reads_hello_and_answers_ready(self):
        self.new_machine()
        self.assertEqual(State.STARTING, self.machine.state)
        self.machine.post(pair.Listening())
        await settle()
        self.assertEqual(State.WAITING_FOR_PRIMARY, self.machine.state)
        chan = FakeChannel(self.clock)
        chan.inbox.put_nowait(hello_msg())
        self.machine.post(pair.Connected(chan))
        await settle()
        self.assertEqual(State.STANDBY, self.machine.state)
        self.assertEqual([hello()], self.hellos)
        ready = Ready.from_dict(chan.frames(Kind.READY)[0].json())
        self.assertEqual('/nbd', ready.target.socket)
        self.assertEqual('pair-1', self.machine.status().pair_id)
        # A second primary is turned away.
        other = FakeChannel(self.clock)
        self.machine.post(pair.Connected(other))
        await settle()
        self.assertEqual([Kind.ERROR], other.kinds())
        self.assertTrue(other.closed)
        self.assertEqual(State.STANDBY, self.machine.state)

    async def test_a_frame_must_keep_arriving_as_silence_must_end(self):
        # Inside a frame the same bound holds as between frames: generous
        # until the first checkpoint, the detection time after it.
        await self.make(timeout=0.5, first_timeout=20.0)
        self.assertEqual(20.0, self.chan.stall_timeout)
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        await settle()
        self.assertEqual(0.5, self.chan.stall_timeout)

    async def test_a_hello_of_another_protocol_version_is_refused(self):
        self.new_machine()
        self.machine.post(pair.Listening())
        chan = FakeChannel(self.clock)
        chan.inbox.put_nowait(hello_msg(version=PROTOCOL_VERSION + 1))
        with self.assertLogs('mftvm_openstack.ft.pair', 'ERROR') as logs:
            self.machine.post(pair.Connected(chan))
            await settle()
        self.assertIn('protocol version', logs.output[0])
        error = chan.frames(Kind.ERROR)[0].json()['error']
        self.assertIn(f'protocol version {PROTOCOL_VERSION + 1}', error)
        self.assertTrue(chan.closed)
        self.assertEqual([], self.hellos)     # nothing prepared for it
        # Still waiting for a primary that speaks our version.
        self.assertEqual(State.WAITING_FOR_PRIMARY, self.machine.state)
        self.assertIn('protocol version', self.machine.status().error)
        chan = FakeChannel(self.clock)
        chan.inbox.put_nowait(hello_msg())
        self.machine.post(pair.Connected(chan))
        await settle()
        self.assertEqual(State.STANDBY, self.machine.state)

    async def test_a_primary_silent_after_connecting_is_refused(self):
        self.new_machine()
        self.machine.post(pair.Listening())
        chan = FakeChannel(self.clock)
        self.machine.post(pair.Connected(chan))
        with self.assertLogs('mftvm_openstack.ft.pair', 'ERROR'):
            await self.clock.advance(31)
        self.assertTrue(chan.closed)
        self.assertEqual(State.WAITING_FOR_PRIMARY, self.machine.state)

    async def test_stop_while_waiting_for_a_primary(self):
        self.new_machine()
        self.machine.post(pair.Listening())
        self.machine.post(pair.Stop())
        await self.finished()
        self.assertEqual(State.STOPPED, self.machine.state)

    async def test_role_is_primary_only_when_active(self):
        # A secondary that lost its primary, or stopped, runs no guest:
        # it must not report itself as the primary.
        for how, state, role in (
                ('nothing committed', State.LOST, Role.SECONDARY),
                ('stop', State.STOPPED, Role.SECONDARY),
                ('takeover', State.ACTIVE, Role.PRIMARY)):
            with self.subTest(how):
                await self.make()
                self.assertEqual(Role.SECONDARY, self.machine.status().role)
                if how == 'stop':
                    self.machine.post(pair.Stop())
                elif how == 'takeover':
                    self.chan.inbox.put_nowait(checkpoint_msg(1))
                    await until(lambda: self.replica.committed == 1)
                    self.machine.post(pair.Takeover())
                    # (past what the primary may run on our word)
                    await self.clock.advance(5)
                else:
                    self.machine.post(pair.Takeover())
                await self.finished()
                st = self.machine.status()
                self.assertEqual((state, role), (st.state, st.role))
                self.runner.cancel()

    async def test_the_side_runs_on_as_a_primary_after_takeover(self):
        await self.make()
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        await until(lambda: self.replica.committed == 1)
        self.machine.post(pair.Takeover())
        await self.clock.advance(5)
        await self.finished()
        protector = FakeProtector(self.clock, [])
        primary = pair.PrimaryPair.took_over(
            self.machine, FakeGuest(), FakeMonitor(), protector=protector,
            clock=self.clock, epoch_ms=200)
        st = primary.status()
        self.assertEqual((Role.PRIMARY, State.ACTIVE, 'pair-1'),
                         (st.role, st.state, st.pair_id))
        self.assertIsNotNone(st.failover_ms)
        runner = asyncio.ensure_future(primary.run())
        self.addCleanup(runner.cancel)
        primary.post(pair.Protect('unix:/new', 'pair-2'))
        await settle()
        self.assertEqual(State.PROTECTED, primary.state)

    async def test_mark_and_checkpoint_are_acknowledged_in_order(self):
        await self.make()
        self.chan.inbox.put_nowait(Message(Kind.MARK, 1))
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        await until(lambda: Kind.ACK in self.chan.kinds())
        await until(lambda: ('commit', 1) in self.store.calls)
        self.assertEqual([('mark', 1), ('commit', 1)], self.store.calls)
        self.assertEqual([Kind.MARKED, Kind.ACK], self.chan.kinds())
        self.assertEqual([1], self.replica.applied)

    async def test_primary_loss_fails_over_to_last_committed(self):
        gate = threading.Event()
        await self.make(FakeReplica(gate))
        self.addCleanup(gate.set)
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        self.chan.inbox.put_nowait(checkpoint_msg(2))
        # The stream breaks while checkpoint 2 is still being applied:
        # a checkpoint received in full still commits before takeover.
        self.chan.inbox.put_nowait(ConnectionError('gone'))
        await until(lambda: self.machine.state == State.FAILING_OVER)
        self.assertEqual([], self.activated)
        gate.set()
        await until(lambda: self.replica.committed == 2)
        await self.clock.advance(5)
        await self.finished()
        self.assertEqual([2], self.activated)
        self.assertEqual(State.ACTIVE, self.machine.state)

    async def test_a_failed_apply_is_never_resumed_as_a_mixed_image(self):
        # The failover used to swallow the failed apply and resume from
        # the last committed epoch: its RAM held half of the next one.
        gate = threading.Event()
        await self.make(FailingReplica(gate, fail_at=2, midway=True))
        self.addCleanup(gate.set)
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        self.chan.inbox.put_nowait(checkpoint_msg(2))
        self.chan.inbox.put_nowait(ConnectionError('gone'))
        await until(lambda: self.machine.state == State.FAILING_OVER)
        gate.set()
        with self.assertLogs('mftvm_openstack.ft.pair', 'ERROR') as logs:
            await self.finished()
        self.assertEqual([], self.activated)
        self.assertEqual(State.LOST, self.machine.state)
        reason = self.machine.stats.reason
        self.assertIn('the replica is unusable, not resuming it', reason)
        self.assertIn('checkpoint 2 half written', reason)
        self.assertEqual(reason, self.machine.status().error)
        self.assertIn('unusable', logs.output[-1])

    async def test_an_apply_that_wrote_nothing_fails_over_to_the_last(
            self):
        # Checkpoint 2 found no room for its device state before it
        # touched the image: epoch 1 is whole, and it was never acked
        # past 1, so the guest resumes from 1; checkpoint 3, received
        # after the failed one, is not applied over the gap.
        gate = threading.Event()
        replica = FailingReplica(gate, fail_at=2, midway=False)
        await self.make(replica)
        self.addCleanup(gate.set)
        for epoch in (1, 2, 3):
            self.chan.inbox.put_nowait(checkpoint_msg(epoch))
        self.chan.inbox.put_nowait(ConnectionError('gone'))
        # (checkpoint 2 is staged, before its ACK, in the queue: the
        # stream's end is queued behind it while it waits for room)
        await until(lambda: self.chan.inbox.empty())
        await settle()
        gate.set()
        # (the failover waits out what the primary may run on: our
        # detection time after we last heard it)
        with self.assertLogs('mftvm_openstack.ft.pair', 'ERROR'):
            await self.clock.advance(5.0)
            await self.finished()
        self.assertEqual([1], self.activated)
        self.assertEqual([1], replica.applied)
        self.assertEqual(State.ACTIVE, self.machine.state)
        self.assertEqual([1], [m.epoch for m in self.chan.frames(Kind.ACK)])

    async def test_a_checkpoint_is_acked_once_staged_and_applied_after(
            self):
        # The ACK used to wait for the RAM pages to be written and the
        # disk epoch committed: that time was added to every commit the
        # primary's output waits for.
        gate = threading.Event()
        await self.make(FakeReplica(gate))
        self.addCleanup(gate.set)
        self.chan.inbox.put_nowait(Message(Kind.MARK, 1))
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        self.chan.inbox.put_nowait(Message(Kind.MARK, 2))
        self.chan.inbox.put_nowait(checkpoint_msg(2))
        await until(lambda: len(self.chan.frames(Kind.ACK)) == 2)
        # Acked, staged, not yet applied (its install waits at the gate).
        self.assertEqual([1, 2], self.replica.staged)
        self.assertEqual([1], self.replica.applied)
        self.assertEqual(1, self.replica.committed)
        self.assertEqual(2, self.machine.stats.committed)
        self.assertNotIn(('commit', 2), self.store.calls)
        gate.set()
        await until(lambda: ('commit', 2) in self.store.calls)
        self.assertEqual([1, 2], self.replica.applied)
        # The disk epoch commits (and may merge) only once installed,
        # in order.
        self.assertEqual([('commit', 1), ('commit', 2)],
                         [c for c in self.store.calls if c[0] == 'commit'])

    async def test_a_failover_installs_every_acked_epoch_first(self):
        gate = threading.Event()
        await self.make(FakeReplica(gate))
        self.addCleanup(gate.set)
        for epoch in (1, 2, 3):
            self.chan.inbox.put_nowait(checkpoint_msg(epoch))
        await until(lambda: len(self.chan.frames(Kind.ACK)) == 3)
        self.chan.inbox.put_nowait(ConnectionError('gone'))
        await until(lambda: self.machine.state == State.FAILING_OVER)
        await self.clock.advance(5.0)
        # Epochs 2 and 3 are acked, not installed: nothing resumes yet.
        self.assertEqual([], self.activated)
        self.assertEqual(State.FAILING_OVER, self.machine.state)
        gate.set()
        await self.finished()
        self.assertEqual([1, 2, 3], self.replica.applied)
        self.assertEqual([3], self.activated)
        self.assertEqual(State.ACTIVE, self.machine.state)

    async def test_an_acked_epoch_that_did_not_go_in_is_never_resumed(
            self):
        # Resuming the epoch before it would take back output the
        # primary released on the ACK: no guest, rather than a wrong one.
        gate = threading.Event()
        replica = LaggingReplica(gate, fail_at=2)
        await self.make(replica)
        self.addCleanup(gate.set)
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        self.chan.inbox.put_nowait(checkpoint_msg(2))
        await until(lambda: len(self.chan.frames(Kind.ACK)) == 2)
        self.chan.inbox.put_nowait(ConnectionError('gone'))
        await until(lambda: self.machine.state == State.FAILING_OVER)
        gate.set()
        with self.assertLogs('mftvm_openstack.ft.pair', 'ERROR'):
            await self.clock.advance(5.0)
            await self.finished()
        self.assertEqual([], self.activated)
        self.assertEqual(State.LOST, self.machine.state)
        self.assertEqual(1, replica.committed)
        self.assertIn('acked epoch 2 did not go in',
                      self.machine.stats.reason)

    async def test_installs_that_fall_behind_hold_the_next_ack(self):
        # The staged epochs' RAM pages wait in memory: at most
        # MAX_STAGED of them wait to be installed.
        gate = threading.Event()
        await self.make(FakeReplica(gate))
        self.addCleanup(gate.set)
        last = pair.secondary.MAX_STAGED + 2
        for epoch in range(1, last + 1):
            self.chan.inbox.put_nowait(checkpoint_msg(epoch))
        held = list(range(1, pair.secondary.MAX_STAGED + 2))
        await until(lambda: len(self.chan.frames(Kind.ACK)) == len(held))
        await settle()
        self.assertEqual(held, [m.epoch for m in
                                self.chan.frames(Kind.ACK)])
        self.assertEqual(held, self.replica.staged)
        gate.set()
        await until(lambda: len(self.chan.frames(Kind.ACK)) == last)
        self.assertEqual(list(range(1, last + 1)),
                         [m.epoch for m in self.chan.frames(Kind.ACK)])

    async def test_a_failed_apply_gives_the_replica_up(self):
        # In standby: the primary is told (it goes on unprotected at
        # once) and this side stops, instead of dying of the exception.
        await self.make(FailingReplica(fail_at=2, midway=False))
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        await until(lambda: Kind.ACK in self.chan.kinds())
        with self.assertLogs('mftvm_openstack.ft.pair', 'ERROR'):
            self.chan.inbox.put_nowait(checkpoint_msg(2))
            await self.finished()
        self.assertEqual(State.STOPPED, self.machine.state)
        error = self.chan.frames(Kind.ERROR)[0].json()['error']
        self.assertIn('applying checkpoint 2 failed', error)
        self.assertIn('No space left', error)
        self.assertEqual([Kind.ACK], [k for k in self.chan.kinds()
                                      if k == Kind.ACK])
        self.assertEqual([], self.activated)

    async def test_a_mark_the_disk_replica_cannot_take_gives_it_up(self):
        # (Its overlay could not be made: the filesystem is full.) The
        # machine used to die of the exception with the primary's guest
        # paused until the MARK timed out on the other side.
        await self.make()
        self.store.fail_mark = True
        with self.assertLogs('mftvm_openstack.ft.pair', 'ERROR'):
            self.chan.inbox.put_nowait(Message(Kind.MARK, 1))
            await self.finished()
        self.assertEqual(State.STOPPED, self.machine.state)
        self.assertEqual([Kind.ERROR], self.chan.kinds())
        error = self.chan.frames(Kind.ERROR)[0].json()['error']
        self.assertIn('disk replica: mark of epoch 1 failed', error)
        self.assertIn('No space left', self.machine.status().reason)

    async def test_a_stream_error_right_after_a_frame_waits_out_the_vouch(
            self):
        # The primary may run on heartbeats we echoed for our detection
        # time after we heard them (peer_holds_until): a stream that
        # breaks just after a frame must not let us resume earlier.
        await self.make(timeout=2.0)
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        await until(lambda: self.replica.committed == 1)
        await self.clock.advance(0.5)
        self.chan.inbox.put_nowait(Message(Kind.HEARTBEAT, 3))
        await settle()
        self.assertEqual([3], [m.epoch for m in self.chan.frames(Kind.ECHO)])
        heard = self.clock.now
        self.chan.inbox.put_nowait(ConnectionError('reset'))
        await self.clock.advance(1.9)
        self.assertEqual(State.FAILING_OVER, self.machine.state)
        self.assertEqual([], self.activated)
        await self.clock.advance(0.2)
        await self.finished()
        self.assertEqual([1], self.activated)
        self.assertGreaterEqual(self.clock.now, heard + 2.0)

    async def test_an_operator_takeover_waits_out_the_vouch(self):
        await self.make(timeout=2.0)
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        await until(lambda: self.replica.committed == 1)
        self.machine.post(pair.Takeover())
        await self.clock.advance(1.9)
        self.assertEqual([], self.activated)
        await self.clock.advance(0.2)
        await self.finished()
        self.assertEqual([1], self.activated)

    async def test_primary_lost_withdraws_the_vouch(self):
        # The primary sends PRIMARY_LOST only once its guest is stopped:
        # no word of ours keeps it running (the fence is still won).
        await self.make(timeout=2.0)
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        await until(lambda: self.replica.committed == 1)
        self.chan.inbox.put_nowait(Message(Kind.PRIMARY_LOST, 0, b'{}'))
        await self.finished()
        self.assertEqual([1], self.activated)

    async def test_a_lock_that_dies_with_its_holder_needs_no_vouch(self):
        # (a lock file: the primary runs only while it lives)
        await self.make(timeout=2.0, vouches=False)
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        await until(lambda: self.replica.committed == 1)
        self.chan.inbox.put_nowait(ConnectionError('reset'))
        await self.finished()
        self.assertEqual([1], self.activated)

    async def test_silence_is_detected(self):
        await self.make(timeout=0.1)
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        await self.clock.advance(0.2)
        await self.finished()
        self.assertEqual([1], self.activated)
        self.assertIn('no word', self.machine.stats.reason)

    async def test_a_frame_waiting_when_the_timer_fires_is_no_silence(self):
        # A starved loop runs the expired timer before reading the frame
        # that came meanwhile: the fake times out once with one waiting.
        await self.make(timeout=0.1)
        wait_frame = self.chan.wait_frame
        starved = []

        async def late_wait_frame():
            if not starved and not self.chan.inbox.empty():
                starved.append(True)
                raise TimeoutError
            return await wait_frame()
        self.chan.wait_frame = late_wait_frame
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        self.chan.inbox.put_nowait(Message(Kind.HEARTBEAT, 1))
        await until(lambda: self.replica.applied)
        await settle()
        self.assertEqual(State.STANDBY, self.machine.state)
        self.assertEqual([1], self.replica.applied)
        self.assertEqual(1, len(starved))

    async def test_heartbeats_are_echoed_with_the_detection_time(self):
        await self.make(timeout=0.8)
        self.chan.inbox.put_nowait(Message(Kind.HEARTBEAT, 7))
        await settle()
        echo = self.chan.frames(Kind.ECHO)
        self.assertEqual([(7, b'800')], [(m.epoch, m.payload) for m in echo])

    async def test_silence_before_any_checkpoint_is_tolerated_longer(self):
        # Nothing to resume yet: a primary starved by the initial sync
        # is not given up after the short detection time...
        await self.make(timeout=0.1, first_timeout=0.6)
        await self.clock.advance(0.3)
        self.assertEqual(State.STANDBY, self.machine.state)
        # ...but it is after the longer one.
        await self.clock.advance(0.5)
        await self.finished()
        self.assertEqual(State.LOST, self.machine.state)
        self.assertIn('0.6s', self.machine.stats.reason)

    async def test_nothing_committed_means_nothing_to_resume(self):
        await self.make()
        self.chan.inbox.put_nowait(ConnectionError('gone'))
        await self.finished()
        self.assertEqual([], self.activated)
        self.assertEqual(State.LOST, self.machine.state)

    async def test_bye_means_no_takeover(self):
        await self.make()
        self.chan.inbox.put_nowait(checkpoint_msg(1))
        self.chan.inbox.put_nowait(Message(Kind.BYE, 0))
        await self.finished()
        self.assertEqual([], self.activated)
        self.assertEqual(State.STOPPED, self.machine.state)

    async def test_corrupt_frame_is_answered_with_error(self):
        await self.make()
        self.chan.inbox.put_nowait(transport.ProtocolError('bad magic'))
        await self.finished()
        self.assertIn(Kind.ERROR, self.chan.kinds())
        # Not proof that the primary died: no takeover.
        self.assertEqual([], self.activated)
        self.assertEqual(State.STOPPED, self.machine.state)


class CancelledTasksTest(unittest.IsolatedAsyncioTestCase):
    """A machine that ends waits for its helper tasks; one that swallowed
    its cancellation must not keep it waiting for ever."""

    class Ending(pair.machine.Machine):
        """The base machine, with one helper task and one event that ends
        it."""

        def __init__(self, helper):
            super().__init__(pair.RealClock(), State.STARTING)
            self._spawn(helper)

        async def handle(self, event):
            self._finish(State.STOPPED)

    async def test_a_task_that_swallows_its_cancellation_is_cancelled_again(
            self):
        # As Python 3.11's asyncio.wait_for does when what it waits for
        # completes just as the cancellation arrives (the primary's ticker
        # waits so for the guest's next packet): the task runs on, once.
        started = asyncio.Event()
        swallowed = []

        async def ticker():
            started.set()
            while True:
                try:
                    await asyncio.sleep(3600)
                except asyncio.CancelledError:
                    if swallowed:
                        raise
                    swallowed.append(True)

        machine = self.Ending(ticker())
        runner = asyncio.ensure_future(machine.run())
        await started.wait()
        machine.post('stop')
        done, _ = await asyncio.wait({runner}, timeout=2)
        self.assertEqual({runner}, done, 'the machine never finished')
        self.assertEqual([True], swallowed)
        self.assertEqual(State.STOPPED, machine.state)
        self.assertTrue(machine.finished.is_set())

    async def test_real_clock_wait_for_keeps_a_cancel_that_meets_its_end(
            self):
        # The race above, for real: what the wait waits for completes in
        # the same loop turn as the cancellation arrives.
        clock = pair.RealClock()
        packet = asyncio.Event()
        waiting = asyncio.Event()

        async def waiter():
            waiting.set()
            await clock.wait_for(packet.wait(), 10)
            await asyncio.sleep(3600)       # ran on: the cancel was lost

        task = asyncio.ensure_future(waiter())
        await waiting.wait()
        packet.set()
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=1)
        self.assertEqual({task}, done)
        self.assertTrue(task.cancelled())
        task.cancel()
