"""The primary's machine: runs the guest's side from process start,
protects the guest while a secondary is linked (see the package
docstring for its states)::

    machine = PrimaryPair(protector=protector, clock=RealClock(),
                          epoch_ms=200)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Optional

from mftvm_openstack.contract.hello import Ready
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus
from mftvm_openstack.ft import boot_files, transport
from mftvm_openstack.ft.pair.activity import QemuActivity
from mftvm_openstack.ft.pair.cadence import (
    Cadence,
    EpochPolicy,
    process_cpu_seconds,
)
from mftvm_openstack.ft.pair.events import (
    Acked,
    GuestExited,
    GuestFailed,
    GuestHung,
    GuestUp,
    LeaseLost,
    OutputFull,
    PrimaryEvent,
    Protect,
    SecondaryLost,
    Stop,
    Synced,
    SyncFailed,
    Tick,
)
from mftvm_openstack.ft.pair.interfaces import (
    Channel,
    Clock,
    GuestProcess,
    Link,
    OutputBuffer,
    OwnershipLost,
    Protector,
)
from mftvm_openstack.ft.pair.machine import Machine, Stats, error_text
from mftvm_openstack.ft.transport import Kind

if TYPE_CHECKING:
    from mftvm_openstack.ft.epoch import Checkpoint
    from mftvm_openstack.ft.monitor import Monitor
    from mftvm_openstack.ft.pair.secondary import SecondaryPair

LOG = logging.getLogger(__name__)

#: how long a last word to the secondary (BYE, PRIMARY_LOST) may take
GOODBYE_TIMEOUT = 0.5


def _echo_detect_s(payload: bytes) -> float:
    try:
        return max(0.0, int(payload or b'0') / 1000)
    except ValueError:
        return 0.0


class PrimaryPair(Machine['PrimaryEvent']):
    """Runs the guest's side: protects it while a secondary is linked,
    checkpointing it every epoch and shipping the checkpoint.

    An epoch lasts ``epoch_ms`` when the guest sent packets in it (they
    wait for its commit), else up to ``idle_epoch_ms`` (never less than
    ``epoch_ms``; 0: every epoch lasts ``epoch_ms``).

    ``protector.invalidate_replica()`` runs when the secondary is dropped,
    *before* any uncommitted output leaves: from then on the replica must
    not take over, or a later failover would take back what clients have
    seen.

    Bounds: the output held for commit may span at most
    ``max_held_epochs`` unacked epochs and ``max_held_bytes`` bytes; at
    either bound the guest is paused (its output neither dropped nor let
    out early) until acks free room, and its status says so
    (``held_output_full``). An epoch shipped but not acked within
    ``ack_timeout`` seconds loses the secondary, as a broken stream does.

    With a ``policy`` (:mod:`.cadence`), an epoch that holds output ends
    soon after its first packet instead, once the guest's QEMU is quiet
    (``guest_busy``), within the policy's bounds.
    """

    def __init__(self, *, protector: Protector, clock: Clock,
                 epoch_ms: int, idle_epoch_ms: int = 0,
                 mark_timeout: float = 2.0,
                 ship_timeout: float = 10.0,
                 heartbeat_interval: float = 0.2,
                 ready_timeout: float = 60.0,
                 ack_timeout: float = 10.0,
                 max_held_epochs: int = 50,
                 max_held_bytes: int = 32 << 20,
                 max_unacked_bytes: int = 16 << 20,
                 policy: Optional[EpochPolicy] = None,
                 guest_cpu: Optional[Callable[[], Optional[float]]] = None,
                 guest_busy: Optional[Callable[[], Optional[bool]]] = None,
                 state: State = State.STARTING,
                 stats: Optional[Stats] = None) -> None:
        super().__init__(clock, state, stats)
        self.protector = protector
        self.epoch_s = epoch_ms / 1000.0
        self.idle_epoch_s = max(idle_epoch_ms, epoch_ms) / 1000.0
        self.mark_timeout = mark_timeout
        self.ship_timeout = ship_timeout
        self.heartbeat_interval = heartbeat_interval
        self.ready_timeout = ready_timeout
        self.ack_timeout = ack_timeout
        self.max_held_epochs = max(1, max_held_epochs)
        self.max_held_bytes = max_held_bytes
        self.max_unacked_bytes = max_unacked_bytes
        self.policy = policy
        #: the guest's CPU time so far (s; the policy weighs pauses by it)
        self.guest_cpu = guest_cpu or self._qemu_cpu
        #: whether the guest's QEMU is busy now (the policy waits for it
        #: to go quiet before ending an epoch that holds output)
        self.guest_busy = guest_busy or self._qemu_busy
        self._cadence: Optional[Cadence] = None
        # set once the Tick the ticker posted was handled
        self._tick_handled = asyncio.Event()
        self.guest: Optional[GuestProcess] = None
        self.monitor: Optional[Monitor] = None
        #: the protection under way or in place (SYNCING, PROTECTED)
        self.pair_id = ''
        # a Protect that came before the guest was up
        self._protect_first: Optional[Protect] = None
        self.channel: Optional[Channel] = None
        self.link: Optional[Link] = None
        # heartbeat seq -> when it was sent; the newest echoed send time
        self._beats: dict[int, float] = {}
        self._beat_seq = 0
        self._echoed_at: Optional[float] = None
        self._peer_detect_s = 0.0
        self._ship_started = 0.0
        self.next_epoch = 1
        self._sending: Optional[asyncio.Task[Any]] = None
        self._marked: dict[int, asyncio.Future[None]] = {}
        self._acked: dict[int, asyncio.Future[None]] = {}
        # the newest epoch the secondary acked, and set at each ACK
        self._acked_upto = 0
        self._ack_came = asyncio.Event()
        # epoch -> when its checkpoint was shipped, until it is acked
        self._shipped_at: dict[int, float] = {}
        # epoch -> its checkpoint's bytes, until it is acked
        self._unacked_bytes: dict[int, int] = {}
        #: the guest is paused because its held output is at a bound
        self.held_output_full = False
        # an OutputFull is queued (one is enough)
        self._full_posted = False
        # a Tick is queued (one is enough)
        self._tick_posted = False

    @classmethod
    def took_over(cls, secondary: SecondaryPair, guest: GuestProcess,
                  monitor: Monitor, **kwargs: Any) -> PrimaryPair:
        """The machine of a side whose secondary took over: it runs the
        guest, ACTIVE, and keeps the takeover's counters."""
        machine = cls(state=State.ACTIVE, stats=secondary.stats, **kwargs)
        machine.guest, machine.monitor = guest, monitor
        machine.pair_id = secondary.pair_id
        return machine

    def _qemu_cpu(self) -> Optional[float]:
        return (None if self.guest is None
                else process_cpu_seconds(self.guest.pid))

    def _qemu_busy(self) -> Optional[bool]:
        return (None if self.guest is None
                else QemuActivity(self.guest.pid).busy())

    def _on_task_failure(self, exc: BaseException) -> PrimaryEvent:
        return SecondaryLost(f'internal error: {exc!r}')

    @property
    def running_unprotected(self) -> bool:
        return self.state in (State.UNPROTECTED, State.ACTIVE)

    def peer_holds_until(self) -> float:
        """Until when, on our clock, the secondary surely still counts us
        alive (so it cannot be taking over): the send time of the newest
        heartbeat it echoed, plus its detection time. -inf if unknown.

        The secondary restarts its silence timer whenever it hears from
        us, and it echoed heartbeat n only after hearing it; so it cannot
        declare us lost before send_time(n) + its detection time.
        """
        if self.state != State.PROTECTED or self._echoed_at is None:
            return float('-inf')
        return self._echoed_at + self._peer_detect_s

    def status(self) -> InstanceStatus:
        st = self.stats.status(Role.PRIMARY, self.state)
        extra: dict[str, Any] = {'error': self.error,
                                 'pair_id': self.pair_id}
        if self.link is not None and self.channel is not None:
            extra.update(
                held_frames=self.link.output.held,
                held_bytes=self.link.output.held_bytes,
                held_output_full=self.held_output_full,
                released_frames=self.link.output.frames_released,
                shipped_mib=round(self.channel.bytes_sent / 2**20, 2))
        if self.stats.last_ack_at is not None:
            extra['ms_since_last_ack'] = round(
                (self.clock.monotonic() - self.stats.last_ack_at) * 1000, 1)
        return dataclasses.replace(st, **extra)

    # -- events --

    async def handle(self, event: PrimaryEvent) -> None:
        if isinstance(event, GuestUp):
            await self._guest_up(event)
        elif isinstance(event, GuestFailed):
            if self.state == State.STARTING:
                self.error = event.error
                LOG.error(event.error)
                self._finish(State.FAILED)
        elif isinstance(event, Protect):
            if self.state == State.STARTING:
                self._protect_first = event     # once the guest is up
            elif self.running_unprotected:
                self._start_sync(event.address, event.pair_id)
        elif isinstance(event, Synced):
            await self._synced(event.link)
        elif isinstance(event, SyncFailed):
            if self.state == State.SYNCING:
                await self._sync_failed(event.error)
        elif isinstance(event, Tick):
            self._tick_posted = False
            try:
                await self._tick()
            finally:
                self._tick_handled.set()
        elif isinstance(event, Acked):
            if self.state.final:
                return
            if event.epoch > self.stats.committed:
                self.stats.committed = event.epoch
                self.stats.last_ack_at = self.clock.monotonic()
            for epoch in [e for e in self._shipped_at if e <= event.epoch]:
                del self._shipped_at[epoch]
            # (its output was released as it came, and its bytes no
            # longer count as unacked: see _reader)
            if self.link is not None:
                await self._resume_if_room()
        elif isinstance(event, OutputFull):
            self._full_posted = False
            await self._pause_for_output()
        elif isinstance(event, SecondaryLost):
            if self.state == State.PROTECTED:
                await self._unprotect(event.reason)
            elif self.state == State.SYNCING:
                await self._sync_failed(event.reason)
        elif isinstance(event, GuestHung):
            if not self.state.final:
                self.error = event.reason
                if self.guest is not None:
                    await self.guest.kill()   # GuestExited follows
        elif isinstance(event, GuestExited):
            if self.state.final:
                pass
            elif event.by_guest:
                await self._guest_shut_down(event.reason)
            else:
                await self._guest_exited(event.reason)
        elif isinstance(event, LeaseLost):
            if not self.state.final:
                await self._fence(event.reason)
        elif isinstance(event, Stop):
            if not self.state.final:
                await self._stop(event.handover)

    async def _guest_up(self, event: GuestUp) -> None:
        self.guest, self.monitor = event.guest, event.monitor
        if self.state != State.STARTING:
            return
        protect, self._protect_first = self._protect_first, None
        if protect is None:
            self.state = State.UNPROTECTED
        else:
            self._start_sync(protect.address, protect.pair_id)

    def _start_sync(self, address: str, pair_id: str) -> None:
        self.state = State.SYNCING
        self.pair_id = pair_id
        # A new secondary starts from nothing: new epochs, new counters.
        self.stats = Stats()
        self.next_epoch = 1
        self._acked_upto = 0
        self._echoed_at = None
        self._shipped_at.clear()
        self._unacked_bytes.clear()
        self._spawn(self._sync(address, pair_id))

    async def _sync(self, address: str, pair_id: str) -> None:
        try:
            channel = await self.protector.connect(address)
            self.channel = channel
            hello = await self.protector.hello(pair_id)
            await channel.send_json(Kind.HELLO, hello.to_dict())
            await boot_files.send(channel, await self.protector.boot_files())
            await self.clock.wait_for(channel.wait_frame(),
                                      self.ready_timeout)
            reply = await channel.recv()
            if reply.kind != Kind.READY:
                raise RuntimeError(f'secondary refused: {error_text(reply)}')
            ready = Ready.from_dict(reply.json(), 'READY')
            # The secondary counts silence as our death from now on, and
            # the initial disk sync takes a while: beat meanwhile.
            self._spawn(self._heartbeat(channel))
            self._spawn(self._reader(channel))
            link = await self.protector.link(
                ready, lambda why: self.post(SecondaryLost(why)))
        except Exception as exc:
            LOG.debug('protection failure', exc_info=True)
            self.post(SyncFailed(str(exc) or type(exc).__name__))
        else:
            self.post(Synced(link))

    async def _synced(self, link: Link) -> None:
        if self.state != State.SYNCING:
            await link.close()      # stopped meanwhile
            return
        self.link = link
        self.error = ''
        self.state = State.PROTECTED
        link.output.on_held = self._on_held
        if self.policy is None:
            self._spawn(self._ticker(link.output))
        else:
            self._cadence = Cadence(self.policy, self.clock,
                                   epoch_s=self.epoch_s,
                                   idle_s=self.idle_epoch_s,
                                   guest_busy=self.guest_busy)
            self._spawn(self._adaptive_ticker(link.output, self._cadence))

    async def _sync_failed(self, error: str) -> None:
        LOG.error('protecting the guest onto its secondary failed: %s',
                  error)
        self.error = f'protection failed: {error}'
        await self._cancel_tasks()
        self._close_channel()
        self.state = State.UNPROTECTED

    def _close_channel(self) -> None:
        if self.channel is not None:
            self.channel.close()
            self.channel = None

    async def _heartbeat(self, channel: Channel) -> None:
        # The secondary counts silence as our death: say something even
        # when epochs are longer than its detection time.
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                self._beat_seq += 1
                self._beats[self._beat_seq] = self.clock.monotonic()
                for old in [n for n in self._beats
                            if n < self._beat_seq - 100]:
                    del self._beats[old]
                await channel.send(Kind.HEARTBEAT, self._beat_seq)
                await self.clock.sleep(self.heartbeat_interval)

    async def _ticker(self, output: OutputBuffer) -> None:
        # An epoch ends epoch_s after the last one if the guest sent
        # something in it (its packets wait for the commit). One in which
        # it sent nothing keeps no client waiting: it runs on, up to
        # idle_epoch_s, and ends as soon as the guest sends. Fewer pauses,
        # the same output latency.
        while True:
            await self.clock.sleep(self.epoch_s)
            rest = self.idle_epoch_s - self.epoch_s
            if rest > 0:
                with contextlib.suppress(TimeoutError):
                    await self.clock.wait_for(output.waiting.wait(), rest)
            # One Tick at a time: while a checkpoint takes longer than an
            # epoch, more would pile up in the queue without end (and
            # hold up the acks queued behind them).
            if not self._tick_posted:
                self._tick_posted = True
                self.post(Tick())

    async def _adaptive_ticker(self, output: OutputBuffer,
                               cadence: Cadence) -> None:
        while True:
            await cadence.wait_due(
                output.waiting, lambda: output.held + output.frames_released)
            sending = self._sending
            if sending is not None and not sending.done():
                # A checkpoint waits for the last to be on its way (a
                # Tick meanwhile would be dropped); bounded, so that the
                # Tick still finds a stuck one.
                with contextlib.suppress(TimeoutError):
                    await self.clock.wait_for(asyncio.wait({sending}),
                                              self.idle_epoch_s)
            await self._unacked_below_bound()
            await self._ack_before_pause(output, cadence)
            # The next epoch's wait starts once this one's checkpoint was
            # taken (its seal clears output.waiting).
            self._tick_handled.clear()
            if not self._tick_posted:
                self._tick_posted = True
                self.post(Tick())
            await self._tick_handled.wait()

    async def _unacked_below_bound(self) -> None:
        """Wait (at most an idle epoch: the Tick still finds a secondary
        that never acks) until the checkpoints awaiting their ACK are
        below max_unacked_bytes; _tick takes none before."""
        await self._acks_until(
            lambda: self.unacked_bytes <= self.max_unacked_bytes,
            self.idle_epoch_s)

    async def _ack_before_pause(self, output: OutputBuffer,
                                cadence: Cadence) -> None:
        """Wait a little for the ACK that frees held output, if it is due
        within the coming pause (see Cadence.ack_wait)."""
        oldest = output.oldest_epoch
        if oldest is None:
            return
        # ACKs come in order: the newest such epoch's frees the others'
        due = [(e, cadence.ack_wait(at)) for e, at in self._shipped_at.items()
               if e >= oldest and e > self._acked_upto]
        due = [(e, wait) for e, wait in due if wait > 0]
        if not due:
            return
        epoch, wait = max(due)
        await self._acks_until(lambda: self._acked_upto >= epoch, wait)

    async def _acks_until(self, done: Callable[[], bool],
                          timeout: float) -> None:
        """Wait, ACK by ACK, until ``done()`` or ``timeout`` seconds
        have passed."""
        end = self.clock.monotonic() + timeout
        while not done():
            rest = end - self.clock.monotonic()
            if rest <= 0:
                return
            self._ack_came.clear()
            with contextlib.suppress(TimeoutError):
                await self.clock.wait_for(self._ack_came.wait(), rest)

    async def _reader(self, channel: Channel) -> None:
        # MARKED and ACK resolve their waiters here, not through the
        # queue: a checkpoint waits for its MARKED, and a handover for
        # its last ACK, inside the handler. An ACK releases its output
        # here too; the rest of it (counters, bounds) is the machine's.
        try:
            while True:
                msg = await channel.recv()
                if msg.kind == Kind.MARKED:
                    fut = self._marked.pop(msg.epoch, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                elif msg.kind == Kind.ACK:
                    shipped = self._shipped_at.get(msg.epoch)
                    if shipped is not None:
                        took = self.clock.monotonic() - shipped
                        self.stats.ack_ms.append(took * 1000)
                        if self._cadence is not None:
                            self._cadence.ack_took(took)
                    self._acked_upto = max(self._acked_upto, msg.epoch)
                    for epoch in [e for e in self._unacked_bytes
                                  if e <= msg.epoch]:
                        del self._unacked_bytes[epoch]
                    self._ack_came.set()
                    for epoch in [e for e in self._acked if e <= msg.epoch]:
                        fut = self._acked.pop(epoch)
                        if not fut.done():
                            fut.set_result(None)
                    # The epoch's output leaves now: queued, it waited for
                    # the checkpoint under way (a whole pause, often).
                    if self.link is not None and not self.state.final:
                        await self.link.output.release(msg.epoch)
                    self.post(Acked(msg.epoch))
                elif msg.kind == Kind.ECHO:
                    sent = self._beats.pop(msg.epoch, None)
                    if sent is not None and (self._echoed_at is None
                                             or sent > self._echoed_at):
                        self._echoed_at = sent
                        self._peer_detect_s = _echo_detect_s(msg.payload)
                elif msg.kind == Kind.ERROR:
                    self.post(SecondaryLost(
                        f'secondary error: {error_text(msg)}'))
                    return
        except (ConnectionError, transport.ProtocolError, OSError) as exc:
            self.post(SecondaryLost(f'data stream: {exc}'))

    async def _mark(self, epoch: int) -> None:
        assert self.channel is not None
        # (after the disk sync's checkpoint, the capturer's settle: the
        # epoch's every write is on the replica when its overlay changes)
        fut = asyncio.get_running_loop().create_future()
        self._marked[epoch] = fut
        LOG.debug('sending MARK %d', epoch)
        await self.channel.send(Kind.MARK, epoch)
        await self.clock.wait_for(fut, self.mark_timeout)

    async def _ship(self, channel: Channel, ckpt: Checkpoint) -> None:
        started = self.clock.monotonic()
        frame = transport.encode_checkpoint(ckpt.devstate, ckpt.delta)
        try:
            await channel.send(Kind.CHECKPOINT, ckpt.epoch, *frame)
        except (ConnectionError, OSError) as exc:
            self.post(SecondaryLost(f'shipping checkpoint {ckpt.epoch}: '
                                    f'{exc}'))
        else:
            shipped = self.clock.monotonic()
            self.stats.ship_ms.append((shipped - started) * 1000)
            if ckpt.epoch > self.stats.committed:
                self._shipped_at[ckpt.epoch] = shipped
            if ckpt.epoch > self._acked_upto:
                self._unacked_bytes[ckpt.epoch] = sum(
                    memoryview(part).nbytes for part in frame)

    # -- bounds --

    @property
    def unacked_bytes(self) -> int:
        """The bytes of checkpoints shipped and not acked yet."""
        return sum(self._unacked_bytes.values())

    def _on_held(self, held_bytes: int) -> None:
        # Called for every frame held: post once, and only at the bound.
        if held_bytes >= self.max_held_bytes and not self._full_posted \
                and not self.held_output_full:
            self._full_posted = True
            self.post(OutputFull())

    def _at_bound(self, epochs: int) -> bool:
        """Whether output held over ``epochs`` unacked epochs (or its
        bytes) is at a bound."""
        assert self.link is not None
        return (epochs >= self.max_held_epochs
                or self.link.output.held_bytes >= self.max_held_bytes)

    async def _pause_for_output(self) -> None:
        if self.state != State.PROTECTED or self.held_output_full \
                or self.link is None or self.monitor is None:
            return
        if not self._at_bound(self.stats.epochs - self.stats.committed):
            return      # acks freed room meanwhile
        await self.monitor.execute('stop')
        self._held_full()

    def _held_full(self) -> None:
        assert self.link is not None
        self.held_output_full = True
        LOG.warning('held output at its bound (%d epochs unacked, %d '
                    'bytes held): the guest is paused until acks free room',
                    self.stats.epochs - self.stats.committed,
                    self.link.output.held_bytes)

    async def _resume_if_room(self) -> None:
        if not self.held_output_full or self.state != State.PROTECTED:
            return
        if self._at_bound(self.stats.epochs - self.stats.committed):
            return
        assert self.monitor is not None
        await self.monitor.execute('cont')
        self.held_output_full = False
        LOG.info('held output below its bounds again: the guest runs')

    async def _resume_after_bound(self) -> None:
        """Protection ended with the guest paused at a bound: run it."""
        if self.held_output_full and self.monitor is not None:
            self.held_output_full = False
            with contextlib.suppress(Exception):
                await self.monitor.execute('cont')

    def _ack_overdue(self) -> Optional[int]:
        """The oldest epoch shipped longer than ack_timeout ago and not
        acked, if any."""
        if not self._shipped_at:
            return None
        oldest = min(self._shipped_at)
        late = self.clock.monotonic() - self._shipped_at[oldest]
        return oldest if late > self.ack_timeout else None

    async def checkpoint(self, resume: bool = True) -> None:
        assert self.link is not None and self.channel is not None
        epoch = self.next_epoch
        # At a bound once this epoch is taken: it stays paused.
        pause = self.held_output_full or self._at_bound(
            epoch - self.stats.committed)
        started = self.clock.monotonic()
        # (the guest's CPU time before and after: the cadence weighs
        # pauses by the guest's use while it ran, not the pause's own)
        cpu_before = self.guest_cpu() if self._cadence is not None else None
        ckpt = await self.link.capturer.capture(
            epoch, self._mark, self.link.output.seal, resume and not pause,
            settle=self.link.disk.checkpoint)
        if self._cadence is not None:
            self._cadence.checkpoint_taken(
                started, ckpt.pause_s, (cpu_before, self.guest_cpu()))
        if pause and resume and not self.held_output_full:
            self._held_full()
        self.next_epoch += 1
        self.stats.epochs = epoch
        self.stats.pauses_ms.append(ckpt.pause_s * 1000)
        self.stats.parts_ms.append((ckpt.devstate_s * 1000,
                                    ckpt.ram_s * 1000, ckpt.mark_s * 1000))
        self.stats.dirty_bytes += ckpt.delta.nbytes
        self._ship_started = self.clock.monotonic()
        self._sending = self._spawn(self._ship(self.channel, ckpt))

    async def _tick(self) -> None:
        if self.state != State.PROTECTED:
            return
        late = self._ack_overdue()
        if late is not None:
            # A secondary that reads but never acks would hold the
            # guest's output (and soon the guest) for ever.
            await self._unprotect(f'checkpoint {late} not acked by the '
                                  f'secondary within {self.ack_timeout:g}s')
            return
        if self._sending is not None and not self._sending.done():
            # Still shipping the last one: the epoch runs longer. But a
            # secondary that stopped reading would stretch it for ever,
            # with the guest's output held all the while.
            stuck = self.clock.monotonic() - self._ship_started
            if stuck > self.ship_timeout:
                self.post(SecondaryLost(
                    f'checkpoint {self.stats.epochs} not taken by the '
                    f'secondary within {self.ship_timeout:.0f}s'))
            return
        if self.unacked_bytes > self.max_unacked_bytes:
            # The secondary has a large checkpoint still to read and
            # apply (the first after the sync, or a burst of dirtying): a
            # MARK now would queue behind it, and its answer miss
            # mark_timeout with the guest paused all the while. The epoch
            # runs longer; ack_timeout still bounds one that never acks.
            return
        assert self.link is not None
        if self.held_output_full and not self.link.output.waiting.is_set():
            return      # paused, nothing new to commit: wait for acks
        try:
            await self.checkpoint()
        except Exception as exc:
            LOG.debug('checkpoint failed', exc_info=True)
            await self._checkpoint_failed(exc)

    async def _checkpoint_failed(self, exc: Exception) -> None:
        # Whose fault? A QEMU that died mid-checkpoint is a failover, not
        # a lost secondary: dropping the replica then would lose the guest.
        # Its exit is noticed within moments; the monitor is no witness (a
        # QEMU draining I/O to a dead peer answers late).
        await self.clock.sleep(0.3)
        if self.guest is not None and not self.guest.running:
            LOG.warning('checkpoint failed as QEMU exited: %s', exc)
            return  # GuestExited is on its way
        # Unprotect now, not behind the ticks queued meanwhile: each would
        # pause the guest once more.
        await self._unprotect(f'checkpoint failed: {exc}')

    async def _end_link(self) -> None:
        """Stop the protection's tasks and close its stream and parts
        that need no goodbye."""
        await self._cancel_tasks()
        self._sending = None
        self._shipped_at.clear()
        self._unacked_bytes.clear()
        self._close_channel()
        link, self.link = self.link, None
        if link is not None:
            await link.close()

    async def _unprotect(self, reason: str) -> None:
        """The secondary is gone: carry on alone, release held output."""
        LOG.warning('secondary lost (%s): guest continues unprotected',
                    reason)
        self.state = State.UNPROTECTED
        self.stats.reason = reason
        await self._cancel_tasks()
        if self.channel is not None:
            with contextlib.suppress(Exception):
                # Tell a secondary that still listens not to take over.
                await self.clock.wait_for(self.channel.send_json(
                    Kind.BYE, {'reason': reason}), GOODBYE_TIMEOUT)
        self._close_channel()
        link = self.link
        if link is not None:
            with contextlib.suppress(Exception):
                await link.disk.stop()
        try:
            # The fence's word that the guest is still ours at this
            # moment: a primary whose lease is gone may already have
            # been taken over, and its held output must never leave.
            await self.protector.invalidate_replica(self.pair_id)
        except OwnershipLost as exc:
            await self._fence(f'unprotecting: {exc}')
            return
        if link is not None:
            assert self.monitor is not None    # linked: the guest is up
            await link.output.detach(self.monitor)
        # Paused at a bound? Its output is out now: it runs on.
        await self._resume_after_bound()
        await self._end_link()

    async def _tell_secondary_to_take_over(self, reason: str) -> None:
        if self.channel is not None:
            with contextlib.suppress(Exception):
                # Bounded: a secondary that stopped reading detects our
                # silence anyway.
                await self.clock.wait_for(self.channel.send_json(
                    Kind.PRIMARY_LOST, {'reason': reason}), GOODBYE_TIMEOUT)

    async def _guest_exited(self, reason: str) -> None:
        LOG.error('guest exited on the primary: %s', reason)
        self.stats.reason = reason
        if not self.error:
            self.error = reason
        if self.link is not None:
            # What is held was never committed: nobody may see it.
            self.link.output.discard()
        if self.state == State.PROTECTED:
            await self._tell_secondary_to_take_over(reason)
        await self._end_link()
        self._finish(State.FAILED)

    async def _guest_shut_down(self, reason: str) -> None:
        """The guest powered itself off: it stops, no failover.

        Its disk here has every write; the replica lags and must never
        be resumed (that would start the guest again, from the past):
        the secondary is told BYE and the replica is marked stale before
        this side lets the fence go. What it sent and was not committed
        goes nowhere (its QEMU, which would pass it on, is gone)."""
        LOG.info('the guest shut itself down (%s): stopped, no failover',
                 reason)
        self.stats.reason = reason
        if self.link is not None:
            self.link.output.discard()
        was_protected = self.state == State.PROTECTED
        await self._cancel_tasks()
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.clock.wait_for(self.channel.send_json(
                    Kind.BYE, {'reason': reason}), GOODBYE_TIMEOUT)
        self._close_channel()
        if self.link is not None:
            with contextlib.suppress(Exception):
                await self.link.disk.stop()
        if was_protected:
            try:
                await self.protector.invalidate_replica(self.pair_id)
            except OwnershipLost as exc:
                # Taken over already: the guest may run on elsewhere.
                self.error = f'fenced: {exc}'
                await self._end_link()
                self._finish(State.FENCED)
                return
        await self._end_link()
        self._finish(State.STOPPED)

    async def _fence(self, reason: str) -> None:
        LOG.error('fencing myself: %s; killing the guest', reason)
        self.error = f'fenced: {reason}'
        was_protected = self.state == State.PROTECTED
        # No other state from here on: whatever comes later is too late.
        self.state = State.FENCED
        if self.link is not None:
            # Uncommitted, and never to be: nobody may see it.
            self.link.output.discard()
        if self.guest is not None:
            await self.guest.kill()
        if was_protected:
            await self._tell_secondary_to_take_over(self.error)
        await self._end_link()
        self._finish(State.FENCED)

    async def _stop(self, handover: bool) -> None:
        if handover and self.state == State.PROTECTED:
            # Planned failover: the guest stops, its last epoch commits,
            # then the secondary takes over with nothing lost.
            try:
                await self._last_checkpoint()
            except Exception as exc:
                LOG.error('handover failed (%s): the guest stays here',
                          exc)
                if self.monitor is not None:
                    with contextlib.suppress(Exception):
                        await self.monitor.execute('cont')
                await self._unprotect(f'handover failed: {exc}')
                return
            assert self.link is not None
            self.link.output.discard()
            await self._tell_secondary_to_take_over('planned failover')
        elif self.state == State.PROTECTED and self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.send(Kind.BYE)
        await self._end_link()
        self._finish(State.STOPPED)

    async def _last_checkpoint(self) -> None:
        if self._sending is not None:
            await self._sending
        await self.checkpoint(resume=False)
        fut = asyncio.get_running_loop().create_future()
        self._acked[self.stats.epochs] = fut
        if self._sending is not None:
            await self._sending
        await self.clock.wait_for(fut, 10)
