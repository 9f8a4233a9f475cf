"""The two sides of a protected pair, each one event-driven state machine.

:class:`PrimaryPair` runs beside the guest; :class:`SecondaryPair` keeps
the replica. Each owns an event queue; everything that happens to its
side (the guest coming up, a protect request, the handshake's answer, an
epoch timer tick, a frame from the peer, a broken stream, the lease
lost, the guest exiting, an operator's command) arrives as a typed event
and is handled in order, one at a time. The state a side reports is its
machine's :class:`~mftvm_openstack.contract.states.State`, and nothing
else. Collaborators (checkpoint capturer, disk sync, output buffer, data
channel, replica, overlay store, monitor, the guest's process, clock)
are typed by the Protocols below and injected, so unit tests drive the
machines with fakes on a fake clock, and functional tests with QEMU::

    machine = PrimaryPair(protector=host, clock=RealClock(), epoch_ms=200)
    runner = asyncio.ensure_future(machine.run())
    machine.post(GuestUp(qemu, monitor))              # -> UNPROTECTED
    machine.post(Protect('tcp:10.0.0.2:4711', 'pair-1'))   # -> SYNCING
    await machine.finished.wait()     # STOPPED, FAILED or FENCED

Primary (one machine from process start to end)::

    STARTING --GuestUp--> UNPROTECTED --Protect--> SYNCING
    STARTING --Protect, GuestUp--> SYNCING (a secondary named at start)
    STARTING --GuestFailed--> FAILED
    SYNCING --Synced (HELLO/READY, disk sync started)--> PROTECTED
    SYNCING --SyncFailed / SecondaryLost--> UNPROTECTED
    PROTECTED --SecondaryLost (stream, MARK or ship timeout, BYE)-->
        UNPROTECTED --Protect--> SYNCING (re-protect) ...
    PROTECTED --Stop(handover)--> STOPPED (the secondary takes over)
    STARTING/SYNCING/PROTECTED/UNPROTECTED/ACTIVE
        --GuestExited--> FAILED;  --LeaseLost--> FENCED;  --Stop--> STOPPED

Secondary::

    STARTING --Listening--> WAITING_FOR_PRIMARY
    WAITING_FOR_PRIMARY --Connected (HELLO checked, READY sent)--> STANDBY
        (a HELLO of another protocol version: ERROR frame, still waiting)
    STANDBY --FrameReceived (MARK/CHECKPOINT/HEARTBEAT)--> STANDBY
    STANDBY --PrimaryLost / Takeover--> FAILING_OVER --> ACTIVE
                                                     \\-> LOST
    WAITING_FOR_PRIMARY/STANDBY --Stop (or BYE, a corrupt stream)--> STOPPED

A secondary that took over runs the guest as a primary does: its side
goes on as a :class:`PrimaryPair` made by :meth:`PrimaryPair.took_over`,
which starts in ACTIVE and moves on like UNPROTECTED (ACTIVE --Protect-->
SYNCING ...).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import (
    TYPE_CHECKING,
    Any,
    Generic,
    Optional,
    Protocol,
    TypeVar,
    Union,
)

import numpy as np

from mftvm_openstack.contract.hello import (
    PROTOCOL_VERSION,
    Hello,
    NbdTargetInfo,
    Ready,
)
from mftvm_openstack.contract.limits import EPOCH_MS_RANGE, IDLE_EPOCH_MS_RANGE  # noqa: F401
from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus, PauseParts
from mftvm_openstack.ft import transport
from mftvm_openstack.ft.transport import Kind, Message

if TYPE_CHECKING:
    # (interfaces only: importing them would pull in QEMU's libraries)
    from mftvm_openstack.ft.epoch import Checkpoint
    from mftvm_openstack.ft.monitor import Monitor
    from mftvm_openstack.ft.trackers import RamDelta

LOG = logging.getLogger(__name__)

T = TypeVar('T')
#: the events a machine handles
E = TypeVar('E')


# -- the clock and the collaborators ----------------------------------------

class Clock(Protocol):
    """Time as the machines see it: every wait and timeout goes here."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    async def wait_for(self, aw: Awaitable[T],
                       timeout: Optional[float]) -> T:
        """``aw``'s result; TimeoutError (``aw`` cancelled) after
        ``timeout`` seconds (None: no limit)."""
        ...


class RealClock:
    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait_for(self, aw: Awaitable[T],
                       timeout: Optional[float]) -> T:
        return await asyncio.wait_for(aw, timeout)


class Channel(Protocol):
    """The data stream to the peer (:class:`transport.Channel`)."""

    bytes_sent: int

    async def send(self, kind: Kind, epoch: int = 0,
                   *buffers: Any) -> None: ...

    async def send_json(self, kind: Kind, data: Any,
                        epoch: int = 0) -> None: ...

    async def wait_frame(self) -> None: ...

    async def recv(self) -> Message: ...

    def close(self) -> None: ...


class GuestProcess(Protocol):
    """The guest's QEMU: a child (``vm.ChildProcess``) or a libvirt
    domain's (``libvirt_domain.DomainProcess``)."""

    @property
    def pid(self) -> int: ...

    @property
    def running(self) -> bool: ...

    async def wait(self) -> int: ...

    async def kill(self) -> None: ...

    def last_log_line(self) -> str: ...


class Capturer(Protocol):
    """Takes one checkpoint (``epoch.CheckpointCapturer``)."""

    async def capture(self, epoch: int,
                      mark: Callable[[int], Awaitable[None]],
                      on_stopped: Optional[Callable[[int], None]] = None,
                      resume: bool = True) -> Checkpoint: ...


class DiskSync(Protocol):
    """Keeps the secondary's disk in step (``ft.disk.DiskSync``)."""

    async def checkpoint(self, epoch: int) -> None: ...

    async def stop(self) -> None: ...


class OutputBuffer(Protocol):
    """Holds the guest's frames until their epoch commits
    (``ft.network.OutputBuffer``)."""

    #: set while the open epoch holds a frame
    waiting: asyncio.Event
    frames_released: int

    @property
    def held(self) -> int: ...

    def seal(self, epoch: int) -> None: ...

    async def release(self, epoch: int) -> None: ...

    async def detach(self, monitor: Monitor) -> None: ...

    def discard(self) -> None: ...


class Replica(Protocol):
    """The guest's RAM and device state as of the last commit
    (``epoch.ReplicaImage``)."""

    committed: int

    def apply(self, epoch: int, devstate: bytes,
              delta: RamDelta) -> None: ...


class OverlayStore(Protocol):
    """The disk replica, one overlay per epoch
    (``ft.disk.EpochOverlayStore``)."""

    async def mark(self, epoch: int) -> None: ...

    async def commit(self, epoch: int) -> None: ...

    async def stop(self) -> None: ...


@dataclasses.dataclass
class Link:
    """What protects the guest onto one secondary, once it answered
    READY: made by the primary's :class:`Protector`."""

    capturer: Capturer
    disk: DiskSync
    output: OutputBuffer
    #: releases what the protector set up beside these (e.g. a relay)
    close: Callable[[], Awaitable[None]]


class Protector(Protocol):
    """What the primary's host provides: the parts that know QEMU, disks
    and fencing, while the machine knows the order of things."""

    async def connect(self, address: str) -> Channel:
        """A stream to the secondary at ``address`` (retrying a while)."""
        ...

    async def hello(self, pair_id: str) -> Hello: ...

    async def link(self, ready: Ready,
                   lost: Callable[[str], None]) -> Link:
        """Start the disk sync to ``ready``'s target and set up capture
        and output commit; ``lost(why)`` reports a failure later."""
        ...

    async def invalidate_replica(self, pair_id: str) -> None:
        """Make sure the replica of ``pair_id`` can no longer take over
        (it is stale from now on); retries until that is so."""
        ...


@dataclasses.dataclass
class Prepared:
    """What the secondary's host made for a primary that said HELLO."""

    replica: Replica
    store: OverlayStore
    target: NbdTargetInfo


# -- events -----------------------------------------------------------------

@dataclasses.dataclass
class GuestUp:
    """The guest runs (booted, adopted or restored) on this side."""
    guest: GuestProcess
    monitor: Monitor


@dataclasses.dataclass
class GuestFailed:
    """The guest could not be started here."""
    error: str


@dataclasses.dataclass
class Protect:
    """Operator (or start-up): protect the guest onto ``address``."""
    address: str
    pair_id: str


@dataclasses.dataclass
class Synced:
    """The secondary answered READY and the disk sync started."""
    link: Link


@dataclasses.dataclass
class SyncFailed:
    error: str


@dataclasses.dataclass
class Tick:
    """The current epoch has run its length."""


@dataclasses.dataclass
class Acked:
    epoch: int


@dataclasses.dataclass
class SecondaryLost:
    reason: str


@dataclasses.dataclass
class GuestExited:
    reason: str


@dataclasses.dataclass
class GuestHung:
    """The guest's QEMU stopped answering: kill it, as if it died."""
    reason: str


@dataclasses.dataclass
class LeaseLost:
    """This side can no longer prove it owns the guest: stop it now."""
    reason: str


@dataclasses.dataclass
class Stop:
    """Operator: end protection. ``handover``: move the guest to the
    secondary first (planned failover, nothing lost)."""
    handover: bool = False


@dataclasses.dataclass
class Listening:
    """The secondary's data address is open."""


@dataclasses.dataclass
class Connected:
    """A primary connected to the secondary's data address."""
    channel: Channel


@dataclasses.dataclass
class Standby:
    """The handshake completed: READY went out."""
    channel: Channel
    prepared: Prepared


@dataclasses.dataclass
class Refused:
    """A primary's HELLO was refused (it was told why)."""
    error: str


@dataclasses.dataclass
class FrameReceived:
    message: Message


@dataclasses.dataclass
class PrimaryLost:
    reason: str


@dataclasses.dataclass
class Takeover:
    """Operator: fail over now."""
    reason: str = 'operator request'


PrimaryEvent = Union[GuestUp, GuestFailed, Protect, Synced, SyncFailed,
                     Tick, Acked, SecondaryLost, GuestExited, GuestHung,
                     LeaseLost, Stop]
SecondaryEvent = Union[Listening, Connected, Standby, Refused,
                       FrameReceived, PrimaryLost, Takeover, Stop]


class Stats:
    """Counters both sides report through their status."""

    #: epochs kept for the pause percentiles and the timeline
    WINDOW = 10000

    def __init__(self) -> None:
        self.epochs = 0
        self.committed = 0
        # The latest epochs only: a guest protected for months must not
        # grow these (nor the pauses.json written from them) for ever.
        self.pauses_ms: collections.deque[float] = collections.deque(
            maxlen=self.WINDOW)
        # where the pause went: (device state, RAM delta, disk mark) in ms
        self.parts_ms: collections.deque[tuple[float, float, float]] = \
            collections.deque(maxlen=self.WINDOW)
        self.dirty_bytes = 0
        self.last_ack_at: Optional[float] = None
        self.failover_ms: Optional[float] = None
        self.reason = ''

    def percentile(self, q: float) -> Optional[float]:
        if not self.pauses_ms:
            return None
        return float(np.percentile(self.pauses_ms, q))

    def _parts_p50(self) -> Optional[PauseParts]:
        if not self.parts_ms:
            return None
        devstate, ram, disk_mark = (
            round(float(ms), 2)
            for ms in np.median(np.array(self.parts_ms), axis=0))
        return PauseParts(devstate=devstate, ram=ram, disk_mark=disk_mark)

    def status(self, role: Role, state: State) -> InstanceStatus:
        p50, p99 = self.percentile(50), self.percentile(99)
        return InstanceStatus(
            role=role, state=state, epochs=self.epochs,
            last_committed_epoch=self.committed,
            replication_lag_epochs=self.epochs - self.committed,
            pause_ms_p50=None if p50 is None else round(p50, 2),
            pause_ms_p99=None if p99 is None else round(p99, 2),
            pause_parts_ms_p50=self._parts_p50(),
            dirty_mib_total=round(self.dirty_bytes / 2**20, 2),
            failover_ms=self.failover_ms, reason=self.reason)


class _Machine(Generic[E]):
    """An event queue and the loop that handles its events in order."""

    def __init__(self, clock: Clock, state: State,
                 stats: Optional[Stats] = None) -> None:
        self.clock = clock
        self.state = state
        self.events: asyncio.Queue[E] = asyncio.Queue()
        self.stats = stats or Stats()
        #: what went wrong, for a side that failed or could not protect
        self.error = ''
        self._tasks: list[asyncio.Task[Any]] = []
        self.finished = asyncio.Event()

    def post(self, event: E) -> None:
        self.events.put_nowait(event)

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        # A helper task that dies of a bug must not die silently: the
        # machine would wait for it for ever.
        exc = None if task.cancelled() else task.exception()
        if exc is not None:
            LOG.error('%s task failed', type(self).__name__, exc_info=exc)
            self.post(self._on_task_failure(exc))

    def _on_task_failure(self, exc: BaseException) -> E:
        raise NotImplementedError

    async def _cancel_tasks(self) -> None:
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        for task in self._tasks:
            if task is not current:
                with contextlib.suppress(BaseException):
                    await task
        self._tasks = []

    def _finish(self, state: State) -> None:
        self.state = state
        self.finished.set()

    async def handle(self, event: E) -> None:
        raise NotImplementedError

    async def run(self) -> None:
        try:
            while not self.finished.is_set():
                event = await self.events.get()
                LOG.debug('%s: %s in %s', type(self).__name__, event,
                          self.state.value)
                await self.handle(event)
        finally:
            await self._cancel_tasks()
            self.finished.set()


def _echo_detect_s(payload: bytes) -> float:
    try:
        return max(0.0, int(payload or b'0') / 1000)
    except ValueError:
        return 0.0


def _error_of(message: Message) -> str:
    try:
        data = message.json()
    except transport.ProtocolError:
        return '(unreadable)'
    return str(data.get('error') if isinstance(data, dict) else data)


# -- primary ----------------------------------------------------------------

class PrimaryPair(_Machine['PrimaryEvent']):
    """Runs the guest's side: protects it while a secondary is linked,
    checkpointing it every epoch and shipping the checkpoint.

    An epoch lasts ``epoch_ms`` when the guest sent packets in it (they
    wait for its commit), else up to ``idle_epoch_ms`` (never less than
    ``epoch_ms``; 0: every epoch lasts ``epoch_ms``).

    ``protector.invalidate_replica()`` runs when the secondary is dropped,
    *before* any uncommitted output leaves: from then on the replica must
    not take over, or a later failover would take back what clients have
    seen.
    """

    def __init__(self, *, protector: Protector, clock: Clock,
                 epoch_ms: int, idle_epoch_ms: int = 0,
                 mark_timeout: float = 2.0,
                 ship_timeout: float = 10.0,
                 heartbeat_interval: float = 0.2,
                 ready_timeout: float = 60.0,
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

    @classmethod
    def took_over(cls, secondary: SecondaryPair, guest: GuestProcess,
                  monitor: Monitor, **kwargs: Any) -> PrimaryPair:
        """The machine of a side whose secondary took over: it runs the
        guest, ACTIVE, and keeps the takeover's counters."""
        machine = cls(state=State.ACTIVE, stats=secondary.stats, **kwargs)
        machine.guest, machine.monitor = guest, monitor
        machine.pair_id = secondary.pair_id
        return machine

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
            await self._tick()
        elif isinstance(event, Acked):
            if event.epoch > self.stats.committed:
                self.stats.committed = event.epoch
                self.stats.last_ack_at = self.clock.monotonic()
            if self.link is not None:
                await self.link.output.release(event.epoch)
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
            if not self.state.final:
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
        self._echoed_at = None
        self._spawn(self._sync(address, pair_id))

    async def _sync(self, address: str, pair_id: str) -> None:
        try:
            channel = await self.protector.connect(address)
            self.channel = channel
            hello = await self.protector.hello(pair_id)
            await channel.send_json(Kind.HELLO, hello.to_dict())
            await self.clock.wait_for(channel.wait_frame(),
                                      self.ready_timeout)
            reply = await channel.recv()
            if reply.kind != Kind.READY:
                raise RuntimeError(f'secondary refused: {_error_of(reply)}')
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
        self._spawn(self._ticker(link.output))

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
            self.post(Tick())

    async def _reader(self, channel: Channel) -> None:
        # MARKED and ACK resolve their waiters here, not through the
        # queue: a checkpoint waits for its MARKED, and a handover for
        # its last ACK, inside the handler.
        try:
            while True:
                msg = await channel.recv()
                if msg.kind == Kind.MARKED:
                    fut = self._marked.pop(msg.epoch, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                elif msg.kind == Kind.ACK:
                    for epoch in [e for e in self._acked if e <= msg.epoch]:
                        fut = self._acked.pop(epoch)
                        if not fut.done():
                            fut.set_result(None)
                    self.post(Acked(msg.epoch))
                elif msg.kind == Kind.ECHO:
                    sent = self._beats.pop(msg.epoch, None)
                    if sent is not None and (self._echoed_at is None
                                             or sent > self._echoed_at):
                        self._echoed_at = sent
                        self._peer_detect_s = _echo_detect_s(msg.payload)
                elif msg.kind == Kind.ERROR:
                    self.post(SecondaryLost(
                        f'secondary error: {_error_of(msg)}'))
                    return
        except (ConnectionError, transport.ProtocolError, OSError) as exc:
            self.post(SecondaryLost(f'data stream: {exc}'))

    async def _mark(self, epoch: int) -> None:
        assert self.link is not None and self.channel is not None
        # Disk sync first (the block-copy baseline copies the epoch's
        # dirty blocks here), then the secondary starts a new overlay.
        await self.link.disk.checkpoint(epoch)
        fut = asyncio.get_running_loop().create_future()
        self._marked[epoch] = fut
        LOG.debug('sending MARK %d', epoch)
        await self.channel.send(Kind.MARK, epoch)
        await self.clock.wait_for(fut, self.mark_timeout)

    async def _ship(self, channel: Channel, ckpt: Checkpoint) -> None:
        try:
            await channel.send(
                Kind.CHECKPOINT, ckpt.epoch,
                *transport.encode_checkpoint(ckpt.devstate, ckpt.delta))
        except (ConnectionError, OSError) as exc:
            self.post(SecondaryLost(f'shipping checkpoint {ckpt.epoch}: '
                                    f'{exc}'))

    async def checkpoint(self, resume: bool = True) -> None:
        assert self.link is not None and self.channel is not None
        epoch = self.next_epoch
        ckpt = await self.link.capturer.capture(
            epoch, self._mark, self.link.output.seal, resume)
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
                    Kind.BYE, {'reason': reason}), 0.5)
        self._close_channel()
        link = self.link
        if link is not None:
            with contextlib.suppress(Exception):
                await link.disk.stop()
        await self.protector.invalidate_replica(self.pair_id)
        if link is not None:
            assert self.monitor is not None    # linked: the guest is up
            await link.output.detach(self.monitor)
        await self._end_link()

    async def _tell_secondary_to_take_over(self, reason: str) -> None:
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.send_json(Kind.PRIMARY_LOST,
                                             {'reason': reason})

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

    async def _fence(self, reason: str) -> None:
        LOG.error('fencing myself: %s; killing the guest', reason)
        self.error = f'fenced: {reason}'
        if self.link is not None:
            self.link.output.discard()
        if self.guest is not None:
            await self.guest.kill()
        if self.state == State.PROTECTED:
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


# -- secondary --------------------------------------------------------------

class SecondaryPair(_Machine['SecondaryEvent']):
    """Keeps the replica; takes over when the primary dies.

    ``prepare(hello)`` makes the replica and the disk store for a primary
    whose HELLO was accepted; ``activate(committed_epoch)`` fences and
    restores the guest (both injected: the host decides where the
    replica lives, how to fence and where QEMU runs).
    """

    def __init__(self, *, prepare: Callable[[Hello], Awaitable[Prepared]],
                 activate: Callable[[int], Awaitable[None]],
                 clock: Clock, detect_timeout: float = 1.0,
                 first_commit_timeout: float = 30.0,
                 hello_timeout: float = 30.0) -> None:
        super().__init__(clock, State.STARTING)
        # Until a first checkpoint arrives there is nothing to resume, so
        # silence then is no reason to give up quickly: the initial disk
        # sync and the first, full-RAM checkpoint can starve a loaded
        # primary's heartbeat.
        self.first_commit_timeout = max(first_commit_timeout,
                                        detect_timeout)
        self.prepare = prepare
        self.activate = activate
        self.detect_timeout = detect_timeout
        self.hello_timeout = hello_timeout
        #: the primary's HELLO, once accepted
        self.hello: Optional[Hello] = None
        self.pair_id = ''
        self.channel: Optional[Channel] = None
        self.prepared: Optional[Prepared] = None
        self._handshaking = False
        self._applying: Optional[asyncio.Task[Any]] = None

    def _on_task_failure(self, exc: BaseException) -> SecondaryEvent:
        # Not proof that the primary died: give the replica up instead.
        self.stats.reason = f'internal error: {exc!r}'
        return Stop()

    def status(self) -> InstanceStatus:
        # Only a secondary that took over runs the guest as the primary.
        role = Role.PRIMARY if self.state == State.ACTIVE \
            else Role.SECONDARY
        st = self.stats.status(role, self.state)
        extra: dict[str, Any] = {'error': self.error,
                                 'pair_id': self.pair_id}
        if self.stats.last_ack_at is not None:
            extra['ms_since_last_ack'] = round(
                (self.clock.monotonic() - self.stats.last_ack_at) * 1000, 1)
        return dataclasses.replace(st, **extra)

    async def handle(self, event: SecondaryEvent) -> None:
        if isinstance(event, Listening):
            if self.state == State.STARTING:
                self.state = State.WAITING_FOR_PRIMARY
        elif isinstance(event, Connected):
            if self.state != State.WAITING_FOR_PRIMARY or self._handshaking:
                with contextlib.suppress(Exception):
                    await event.channel.send_json(Kind.ERROR, {
                        'error': 'this secondary already serves a primary'})
                event.channel.close()
            else:
                self._handshaking = True
                self._spawn(self._handshake(event.channel))
        elif isinstance(event, Standby):
            self._handshaking = False
            if self.state == State.WAITING_FOR_PRIMARY:
                self.channel, self.prepared = event.channel, event.prepared
                self.state = State.STANDBY
                self._spawn(self._reader(event.channel))
            else:
                event.channel.close()
        elif isinstance(event, Refused):
            self._handshaking = False
            self.error = event.error
        elif isinstance(event, FrameReceived):
            if self.state == State.STANDBY:
                await self._frame(event.message)
        elif isinstance(event, (PrimaryLost, Takeover)):
            if self.state == State.STANDBY:
                await self._failover(event.reason)
        elif isinstance(event, Stop):
            if self.state in (State.STARTING, State.WAITING_FOR_PRIMARY,
                              State.STANDBY):
                await self._cancel_tasks()
                if self.channel is not None:
                    self.channel.close()
                self._finish(State.STOPPED)

    async def _handshake(self, channel: Channel) -> None:
        """HELLO in, checked; the replica prepared; READY out."""
        prepared: Optional[Prepared] = None
        try:
            await self.clock.wait_for(channel.wait_frame(),
                                      self.hello_timeout)
            msg = await channel.recv()
            if msg.kind != Kind.HELLO:
                raise ContractError(f'expected HELLO, got {msg.kind.name}')
            hello = Hello.from_dict(msg.json(), 'HELLO')
            if hello.version != PROTOCOL_VERSION:
                raise ContractError(
                    f'the primary speaks protocol version {hello.version}, '
                    f'this secondary {PROTOCOL_VERSION}')
            self.hello, self.pair_id = hello, hello.pair_id
            prepared = await self.prepare(hello)
            await channel.send_json(
                Kind.READY, Ready(target=prepared.target).to_dict())
        except Exception as exc:   # whatever it was, this primary is refused
            error = f'refused a primary: {exc or type(exc).__name__}'
            LOG.error('%s', error, exc_info=not isinstance(
                exc, (ContractError, transport.ProtocolError, TimeoutError,
                      ConnectionError)))
            if prepared is not None:
                with contextlib.suppress(Exception):
                    await prepared.store.stop()
            with contextlib.suppress(Exception):
                await channel.send_json(Kind.ERROR, {'error': str(exc)})
            channel.close()
            self.post(Refused(error))
        else:
            self.post(Standby(channel, prepared))

    async def _reader(self, channel: Channel) -> None:
        timeout = self.first_commit_timeout
        try:
            while True:
                await self._wait_frame(channel, timeout)
                msg = await channel.recv()
                self.stats.last_ack_at = self.clock.monotonic()
                LOG.debug('got %s %d (%d bytes)', msg.kind.name, msg.epoch,
                          len(msg.payload))
                self.post(FrameReceived(msg))
                if msg.kind == Kind.CHECKPOINT:
                    # Something to resume from now on: be quick.
                    timeout = self.detect_timeout
                if msg.kind in (Kind.PRIMARY_LOST, Kind.BYE):
                    return
        except TimeoutError:
            self.post(PrimaryLost(f'no word from the primary for '
                                  f'{timeout}s'))
        except (ConnectionError, OSError) as exc:
            self.post(PrimaryLost(f'data stream: {exc}'))
        except transport.ProtocolError as exc:
            await self._protocol_error(exc)

    async def _wait_frame(self, channel: Channel, timeout: float) -> None:
        try:
            await self.clock.wait_for(channel.wait_frame(), timeout)
        except TimeoutError:
            # When this process was starved of CPU for longer than the
            # timeout, the timer fires before the frame that has arrived
            # meanwhile is read: a frame ready now is no silence.
            await self.clock.wait_for(channel.wait_frame(), 0.05)

    async def _protocol_error(self, exc: transport.ProtocolError) -> None:
        # A corrupt stream is no proof that the primary died: give up
        # this replica (the primary carries on unprotected) rather than
        # risk a second running copy.
        LOG.error('protocol error from the primary: %s', exc)
        self.stats.reason = f'protocol error: {exc}'
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.send_json(Kind.ERROR,
                                             {'error': str(exc)})
        self.post(Stop())

    async def _frame(self, msg: Message) -> None:
        assert self.channel is not None and self.prepared is not None
        if msg.kind == Kind.MARK:
            started = self.clock.monotonic()
            await self.prepared.store.mark(msg.epoch)
            with contextlib.suppress(ConnectionError, OSError):
                await self.channel.send(Kind.MARKED, msg.epoch)
            took = self.clock.monotonic() - started
            if took > 0.5:
                LOG.warning('disk mark of epoch %d took %.0f ms',
                            msg.epoch, took * 1000)
        elif msg.kind == Kind.CHECKPOINT:
            try:
                devstate, delta = transport.decode_checkpoint(msg.payload)
            except transport.ProtocolError as exc:
                await self._protocol_error(exc)
                return
            self._applying = self._spawn(
                self._apply(self._applying, msg.epoch, devstate, delta))
        elif msg.kind == Kind.HEARTBEAT:
            with contextlib.suppress(ConnectionError, OSError):
                await self.channel.send(
                    Kind.ECHO, msg.epoch,
                    str(round(self.detect_timeout * 1000)).encode())
        elif msg.kind == Kind.PRIMARY_LOST:
            try:
                reason = msg.json().get('reason')
            except (transport.ProtocolError, AttributeError):
                reason = '(unreadable)'
            await self._failover(f'primary reported: {reason}')
        elif msg.kind == Kind.BYE:
            self.stats.reason = 'the primary ended protection'
            self.post(Stop())

    async def _apply(self, previous: Optional[asyncio.Task[Any]], epoch: int,
                     devstate: bytes, delta: RamDelta) -> None:
        assert self.prepared is not None and self.channel is not None
        channel, replica = self.channel, self.prepared.replica
        if previous is not None:
            await previous   # checkpoints apply strictly in order
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, replica.apply, epoch, devstate,
                                   delta)
        self.stats.epochs = epoch
        self.stats.committed = epoch
        self.stats.dirty_bytes += delta.nbytes
        await self.prepared.store.commit(epoch)
        with contextlib.suppress(ConnectionError, OSError):
            await channel.send(Kind.ACK, epoch)

    async def _failover(self, reason: str) -> None:
        assert self.channel is not None and self.prepared is not None
        started = self.clock.monotonic()
        LOG.warning('primary lost (%s): failing over', reason)
        self.state = State.FAILING_OVER
        self.stats.reason = reason
        self.channel.close()
        if self._applying is not None:
            # A checkpoint received in full still commits: finish it.
            with contextlib.suppress(Exception):
                await self._applying
        committed = self.prepared.replica.committed
        if committed == 0:
            self.stats.reason = (f'{reason}; no checkpoint was ever '
                                 f'committed, nothing to resume')
            LOG.error(self.stats.reason)
            self._finish(State.LOST)
            return
        try:
            await self.activate(committed)
        except Exception as exc:
            self.stats.reason = f'{reason}; failover failed: {exc}'
            self.error = self.stats.reason
            LOG.error(self.stats.reason)
            self._finish(State.LOST)
        else:
            self.stats.failover_ms = round(
                (self.clock.monotonic() - started) * 1000, 1)
            self._finish(State.ACTIVE)
