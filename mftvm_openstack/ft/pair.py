"""The protected pair as two event-driven state machines.

:class:`PrimaryPair` runs beside the guest; :class:`SecondaryPair` keeps
the replica. Each one owns an event queue; everything that happens —
an epoch timer tick, an ack, a broken stream, the guest exiting, an
operator's command — arrives as a typed event and is handled in order,
one at a time. Collaborators (checkpoint capturer, disk sync, output
buffer, data channel, replica, clock) are injected, so unit tests drive
the machines with fakes and functional tests with real QEMU.

Primary states::

    PROTECTED --SecondaryLost--> UNPROTECTED
    PROTECTED/UNPROTECTED --GuestExited--> FAILED
    any --Stop--> STOPPED

Secondary states::

    STANDBY --PrimaryLost / Takeover--> FAILING_OVER --> ACTIVE
                                                     \\-> LOST (nothing
                                                          committed yet)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Optional, Protocol

import numpy as np

from mftvm_openstack.contract.limits import EPOCH_MS_RANGE, IDLE_EPOCH_MS_RANGE  # noqa: F401
from mftvm_openstack.ft import transport
from mftvm_openstack.ft.transport import Kind

LOG = logging.getLogger(__name__)



class Clock(Protocol):
    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...


class RealClock:
    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


# -- events -----------------------------------------------------------------

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
class Stop:
    """Operator: end protection. ``handover``: move the guest to the
    secondary first (planned failover, nothing lost)."""
    handover: bool = False


@dataclasses.dataclass
class PrimaryLost:
    reason: str


@dataclasses.dataclass
class Takeover:
    """Operator: fail over now."""
    reason: str = 'operator request'


class State(enum.StrEnum):
    PROTECTED = 'protected'
    UNPROTECTED = 'unprotected'
    FAILED = 'failed'
    STOPPED = 'stopped'
    STANDBY = 'standby'
    FAILING_OVER = 'failing-over'
    ACTIVE = 'active'
    LOST = 'lost'


class Stats:
    """Counters both sides report through ``mftvm status``."""

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

    def _parts_p50(self) -> Optional[dict[str, float]]:
        if not self.parts_ms:
            return None
        p50 = np.median(np.array(self.parts_ms), axis=0)
        return {name: round(float(ms), 2) for name, ms in
                zip(('devstate', 'ram', 'disk_mark'), p50)}

    def as_dict(self) -> dict[str, Any]:
        p50, p99 = self.percentile(50), self.percentile(99)
        return {
            'epochs': self.epochs, 'last_committed_epoch': self.committed,
            'replication_lag_epochs': self.epochs - self.committed,
            'pause_ms_p50': None if p50 is None else round(p50, 2),
            'pause_ms_p99': None if p99 is None else round(p99, 2),
            'pause_parts_ms_p50': self._parts_p50(),
            'dirty_mib_total': round(self.dirty_bytes / 2**20, 2),
            'failover_ms': self.failover_ms, 'reason': self.reason,
        }


class _Machine:
    """An event queue and the loop that handles its events in order."""

    state: State

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.events: asyncio.Queue[Any] = asyncio.Queue()
        self.stats = Stats()
        self._tasks: list[asyncio.Task[Any]] = []
        self.finished = asyncio.Event()

    def post(self, event: Any) -> None:
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

    def _on_task_failure(self, exc: BaseException) -> Any:
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

    async def handle(self, event: Any) -> None:
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


# -- primary ----------------------------------------------------------------

class PrimaryPair(_Machine):
    """Checkpoints the running guest every epoch and ships it.

    ``capturer`` is an epoch.CheckpointCapturer, ``disk`` a DiskSync,
    ``output`` an OutputBuffer, ``channel`` a transport.Channel.

    An epoch lasts ``epoch_ms`` when the guest sent packets in it (they
    wait for its commit), else up to ``idle_epoch_ms`` (never less than
    ``epoch_ms``; 0: every epoch lasts ``epoch_ms``).

    ``guest_alive()`` says whether the guest's QEMU process still runs.
    ``invalidate_replica()`` runs when the secondary is dropped, *before*
    any uncommitted output leaves: it must make sure the replica can no
    longer take over (it is stale from then on), or a later failover would
    take back what clients have seen.
    """

    def __init__(self, *, capturer: Any, disk: Any, output: Any,
                 channel: Any, monitor: Any, clock: Clock,
                 invalidate_replica: Callable[[], Awaitable[None]],
                 guest_alive: Callable[[], bool],
                 epoch_ms: int, idle_epoch_ms: int = 0,
                 mark_timeout: float = 2.0,
                 ship_timeout: float = 10.0,
                 heartbeat_interval: float = 0.2,
                 first_epoch: int = 1) -> None:
        super().__init__(clock)
        self.capturer = capturer
        self.disk = disk
        self.output = output
        self.channel = channel
        self.monitor = monitor
        self.epoch_s = epoch_ms / 1000.0
        self.idle_epoch_s = max(idle_epoch_ms, epoch_ms) / 1000.0
        self.mark_timeout = mark_timeout
        self.ship_timeout = ship_timeout
        self.heartbeat_interval = heartbeat_interval
        # heartbeat seq -> when it was sent; the newest echoed send time
        self._beats: dict[int, float] = {}
        self._beat_seq = 0
        self.echoed_at: Optional[float] = None
        self.peer_detect_s = 0.0
        self.invalidate_replica = invalidate_replica
        self.guest_alive = guest_alive
        self._ship_started = 0.0
        self.state = State.PROTECTED
        self.next_epoch = first_epoch
        self._sending: Optional[asyncio.Task[Any]] = None
        self._marked: dict[int, asyncio.Future[None]] = {}
        self._acked: dict[int, asyncio.Future[None]] = {}

    def _on_task_failure(self, exc: BaseException) -> Any:
        return SecondaryLost(f'internal error: {exc!r}')

    def start(self) -> None:
        """Start the epoch timer, the heartbeat and the reader of the
        secondary's replies."""
        self._spawn(self._ticker())
        self._spawn(self._reader())
        self._spawn(self._heartbeat())

    async def _heartbeat(self) -> None:
        # The secondary counts silence as our death: say something even
        # when epochs are longer than its detection time.
        with contextlib.suppress(ConnectionError, OSError):
            while True:
                self._beat_seq += 1
                self._beats[self._beat_seq] = self.clock.monotonic()
                for old in [n for n in self._beats
                            if n < self._beat_seq - 100]:
                    del self._beats[old]
                await self.channel.send(Kind.HEARTBEAT, self._beat_seq)
                await self.clock.sleep(self.heartbeat_interval)

    def peer_holds_until(self) -> float:
        """Until when, on our clock, the secondary surely still counts us
        alive (so it cannot be taking over): the send time of the newest
        heartbeat it echoed, plus its detection time. -inf if unknown.

        The secondary restarts its silence timer whenever it hears from
        us, and it echoed heartbeat n only after hearing it; so it cannot
        declare us lost before send_time(n) + its detection time.
        """
        if self.state != State.PROTECTED or self.echoed_at is None:
            return float('-inf')
        return self.echoed_at + self.peer_detect_s

    async def _ticker(self) -> None:
        # An epoch ends epoch_s after the last one if the guest sent
        # something in it (its packets wait for the commit). One in which
        # it sent nothing keeps no client waiting: it runs on, up to
        # idle_epoch_s, and ends as soon as the guest sends. Fewer pauses,
        # the same output latency.
        while True:
            await self.clock.sleep(self.epoch_s)
            rest = self.idle_epoch_s - self.epoch_s
            if rest > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.output.waiting.wait(), rest)
            self.post(Tick())

    async def _reader(self) -> None:
        try:
            while True:
                msg = await self.channel.recv()
                if msg.kind == Kind.MARKED:
                    fut = self._marked.pop(msg.epoch, None)
                    if fut is not None and not fut.done():
                        fut.set_result(None)
                elif msg.kind == Kind.ACK:
                    # Resolved here, not in the event handler: a handover
                    # waits for its last ack inside that handler.
                    for epoch in [e for e in self._acked if e <= msg.epoch]:
                        fut = self._acked.pop(epoch)
                        if not fut.done():
                            fut.set_result(None)
                    self.post(Acked(msg.epoch))
                elif msg.kind == Kind.ECHO:
                    sent = self._beats.pop(msg.epoch, None)
                    if sent is not None and (self.echoed_at is None
                                             or sent > self.echoed_at):
                        self.echoed_at = sent
                        self.peer_detect_s = _echo_detect_s(msg.payload)
                elif msg.kind == Kind.ERROR:
                    self.post(SecondaryLost(
                        f'secondary error: {msg.json().get("error")}'))
                    return
        except (ConnectionError, transport.ProtocolError, OSError) as exc:
            self.post(SecondaryLost(f'data stream: {exc}'))

    async def _mark(self, epoch: int) -> None:
        # Disk sync first (the block-copy baseline copies the epoch's
        # dirty blocks here), then the secondary starts a new overlay.
        await self.disk.checkpoint(epoch)
        fut = asyncio.get_running_loop().create_future()
        self._marked[epoch] = fut
        LOG.debug('sending MARK %d', epoch)
        await self.channel.send(Kind.MARK, epoch)
        await asyncio.wait_for(fut, self.mark_timeout)

    async def _ship(self, ckpt: Any) -> None:
        try:
            await self.channel.send(
                Kind.CHECKPOINT, ckpt.epoch,
                *transport.encode_checkpoint(ckpt.devstate, ckpt.delta))
        except (ConnectionError, OSError) as exc:
            self.post(SecondaryLost(f'shipping checkpoint {ckpt.epoch}: '
                                    f'{exc}'))

    async def checkpoint(self, resume: bool = True) -> None:
        epoch = self.next_epoch
        ckpt = await self.capturer.capture(epoch, self._mark,
                                           self.output.seal, resume)
        self.next_epoch += 1
        self.stats.epochs = epoch
        self.stats.pauses_ms.append(ckpt.pause_s * 1000)
        self.stats.parts_ms.append((ckpt.devstate_s * 1000,
                                    ckpt.ram_s * 1000, ckpt.mark_s * 1000))
        self.stats.dirty_bytes += ckpt.delta.nbytes
        self._ship_started = self.clock.monotonic()
        self._sending = self._spawn(self._ship(ckpt))

    async def handle(self, event: Any) -> None:
        if isinstance(event, Tick):
            busy = self._sending is not None and not self._sending.done()
            if self.state != State.PROTECTED:
                return
            if busy:
                # Still shipping the last one: the epoch runs longer. But
                # a secondary that stopped reading would stretch it for
                # ever, with the guest's output held all the while.
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
        elif isinstance(event, Acked):
            if event.epoch > self.stats.committed:
                self.stats.committed = event.epoch
                self.stats.last_ack_at = self.clock.monotonic()
            await self.output.release(event.epoch)
        elif isinstance(event, SecondaryLost):
            if self.state == State.PROTECTED:
                await self._unprotect(event.reason)
        elif isinstance(event, GuestExited):
            await self._guest_exited(event.reason)
        elif isinstance(event, Stop):
            await self._stop(event.handover)

    async def _checkpoint_failed(self, exc: Exception) -> None:
        # Whose fault? A QEMU that died mid-checkpoint is a failover, not
        # a lost secondary: dropping the replica then would lose the guest.
        # Its exit is noticed within moments; the monitor is no witness (a
        # QEMU draining I/O to a dead peer answers late).
        await self.clock.sleep(0.3)
        if not self.guest_alive():
            LOG.warning('checkpoint failed as QEMU exited: %s', exc)
            return  # GuestExited is on its way
        # Unprotect now, not behind the ticks queued meanwhile: each would
        # pause the guest once more.
        await self._unprotect(f'checkpoint failed: {exc}')

    async def _unprotect(self, reason: str) -> None:
        """The secondary is gone: carry on alone, release held output."""
        LOG.warning('secondary lost (%s): guest continues unprotected',
                    reason)
        self.state = State.UNPROTECTED
        self.stats.reason = reason
        await self._cancel_tasks()
        with contextlib.suppress(Exception):
            # Tell a secondary that still listens not to take over.
            await asyncio.wait_for(self.channel.send_json(
                Kind.BYE, {'reason': reason}), 0.5)
        self.channel.close()
        with contextlib.suppress(Exception):
            await self.disk.stop()
        await self.invalidate_replica()
        await self.output.detach(self.monitor)

    async def _guest_exited(self, reason: str) -> None:
        LOG.error('guest exited on the primary: %s', reason)
        was_protected = self.state == State.PROTECTED
        self.state = State.FAILED
        self.stats.reason = reason
        # What is held was never committed: nobody may see it.
        self.output.discard()
        if was_protected:
            with contextlib.suppress(Exception):
                await self.channel.send_json(Kind.PRIMARY_LOST,
                                             {'reason': reason})
        self.channel.close()
        self.finished.set()

    async def _stop(self, handover: bool) -> None:
        if handover and self.state == State.PROTECTED:
            # Planned failover: the guest stops, its last epoch commits,
            # then the secondary takes over with nothing lost.
            try:
                await self._last_checkpoint()
            except Exception as exc:
                LOG.error('handover failed (%s): the guest stays here',
                          exc)
                with contextlib.suppress(Exception):
                    await self.monitor.execute('cont')
                await self._unprotect(f'handover failed: {exc}')
                return
            self.output.discard()
            await self.channel.send_json(Kind.PRIMARY_LOST,
                                         {'reason': 'planned failover'})
        elif self.state == State.PROTECTED:
            with contextlib.suppress(Exception):
                await self.channel.send(Kind.BYE)
        self.state = State.STOPPED
        self.channel.close()
        self.finished.set()

    async def _last_checkpoint(self) -> None:
        if self._sending is not None:
            await self._sending
        await self.checkpoint(resume=False)
        fut = asyncio.get_running_loop().create_future()
        self._acked[self.stats.epochs] = fut
        if self._sending is not None:
            await self._sending
        await asyncio.wait_for(fut, 10)

    def status(self) -> dict[str, Any]:
        data = self.stats.as_dict()
        data.update(role='primary', state=self.state.value,
                    held_frames=self.output.held,
                    released_frames=self.output.frames_released,
                    shipped_mib=round(self.channel.bytes_sent / 2**20, 2))
        if self.stats.last_ack_at is not None:
            data['ms_since_last_ack'] = round(
                (self.clock.monotonic() - self.stats.last_ack_at) * 1000, 1)
        return data


# -- secondary --------------------------------------------------------------

class SecondaryPair(_Machine):
    """Applies checkpoints as they come; takes over when the primary dies.

    ``replica`` is an epoch.ReplicaImage, ``store`` an EpochOverlayStore;
    ``activate(committed_epoch)`` fences and restores the guest (it is
    injected: the host decides how to fence and where QEMU runs).
    """

    def __init__(self, *, channel: Any, replica: Any, store: Any,
                 activate: Callable[[int], Awaitable[None]],
                 clock: Clock, detect_timeout: float = 1.0,
                 first_commit_timeout: float = 30.0) -> None:
        super().__init__(clock)
        # Until a first checkpoint arrives there is nothing to resume, so
        # silence then is no reason to give up quickly: the initial disk
        # sync and the first, full-RAM checkpoint can starve a loaded
        # primary's heartbeat.
        self.first_commit_timeout = max(first_commit_timeout,
                                        detect_timeout)
        self.channel = channel
        self.replica = replica
        self.store = store
        self.activate = activate
        self.detect_timeout = detect_timeout
        self.state = State.STANDBY
        self._applying: Optional[asyncio.Task[Any]] = None

    def _on_task_failure(self, exc: BaseException) -> Any:
        # Not proof that the primary died: give the replica up instead.
        self.stats.reason = f'internal error: {exc!r}'
        return Stop()

    def start(self) -> None:
        self._spawn(self._reader())

    async def _reader(self) -> None:
        try:
            while True:
                timeout = self.detect_timeout if self._applying \
                    else self.first_commit_timeout
                msg = await self._recv(timeout)
                self.stats.last_ack_at = self.clock.monotonic()
                LOG.debug('got %s %d (%d bytes)', msg.kind.name, msg.epoch,
                          len(msg.payload))
                if msg.kind == Kind.MARK:
                    started = self.clock.monotonic()
                    await self.store.mark(msg.epoch)
                    await self.channel.send(Kind.MARKED, msg.epoch)
                    took = self.clock.monotonic() - started
                    if took > 0.5:
                        LOG.warning('disk mark of epoch %d took %.0f ms',
                                    msg.epoch, took * 1000)
                elif msg.kind == Kind.CHECKPOINT:
                    devstate, delta = transport.decode_checkpoint(msg.payload)
                    previous = self._applying
                    self._applying = self._spawn(
                        self._apply(previous, msg.epoch, devstate, delta))
                elif msg.kind == Kind.HEARTBEAT:
                    with contextlib.suppress(ConnectionError, OSError):
                        await self.channel.send(
                            Kind.ECHO, msg.epoch,
                            str(round(self.detect_timeout * 1000)).encode())
                elif msg.kind == Kind.PRIMARY_LOST:
                    self.post(PrimaryLost(
                        f'primary reported: {msg.json().get("reason")}'))
                    return
                elif msg.kind == Kind.BYE:
                    self.stats.reason = 'the primary ended protection'
                    self.post(Stop())
                    return
        except TimeoutError:
            self.post(PrimaryLost(f'no word from the primary for '
                                  f'{timeout}s'))
        except (ConnectionError, OSError) as exc:
            self.post(PrimaryLost(f'data stream: {exc}'))
        except transport.ProtocolError as exc:
            # A corrupt stream is no proof that the primary died: give up
            # this replica (the primary carries on unprotected) rather
            # than risk a second running copy.
            LOG.error('protocol error from the primary: %s', exc)
            self.stats.reason = f'protocol error: {exc}'
            with contextlib.suppress(Exception):
                await self.channel.send_json(Kind.ERROR, {'error': str(exc)})
            self.post(Stop())

    async def _recv(self, timeout: float) -> Any:
        try:
            return await self.channel.recv(timeout=timeout)
        except TimeoutError:
            # When this process was starved of CPU for longer than the
            # timeout, the timer fires before the frame that has arrived
            # meanwhile is read: a frame ready now is no silence.
            return await self.channel.recv(timeout=0.05)

    async def _apply(self, previous: Optional[asyncio.Task[Any]], epoch: int,
                     devstate: bytes, delta: Any) -> None:
        if previous is not None:
            await previous   # checkpoints apply strictly in order
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.replica.apply, epoch,
                                   devstate, delta)
        self.stats.epochs = epoch
        self.stats.committed = epoch
        self.stats.dirty_bytes += delta.nbytes
        await self.store.commit(epoch)
        with contextlib.suppress(ConnectionError, OSError):
            await self.channel.send(Kind.ACK, epoch)

    async def handle(self, event: Any) -> None:
        if isinstance(event, (PrimaryLost, Takeover)):
            if self.state == State.STANDBY:
                await self._failover(event.reason)
        elif isinstance(event, Stop):
            self.state = State.STOPPED
            self.channel.close()
            self.finished.set()

    async def _failover(self, reason: str) -> None:
        started = self.clock.monotonic()
        LOG.warning('primary lost (%s): failing over', reason)
        self.state = State.FAILING_OVER
        self.stats.reason = reason
        self.channel.close()
        if self._applying is not None:
            # A checkpoint received in full still commits: finish it.
            with contextlib.suppress(Exception):
                await self._applying
        committed = self.replica.committed
        if committed == 0:
            self.state = State.LOST
            self.stats.reason = (f'{reason}; no checkpoint was ever '
                                 f'committed, nothing to resume')
            LOG.error(self.stats.reason)
            self.finished.set()
            return
        try:
            await self.activate(committed)
        except Exception as exc:
            self.state = State.LOST
            self.stats.reason = f'{reason}; failover failed: {exc}'
            LOG.error(self.stats.reason)
        else:
            self.state = State.ACTIVE
            self.stats.failover_ms = round(
                (self.clock.monotonic() - started) * 1000, 1)
        self.finished.set()

    def status(self) -> dict[str, Any]:
        data = self.stats.as_dict()
        data.update(role='secondary' if self.state in (
            State.STANDBY, State.FAILING_OVER) else 'primary',
            state=self.state.value)
        return data
