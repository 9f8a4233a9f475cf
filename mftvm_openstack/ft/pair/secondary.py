"""The secondary's machine: keeps the replica, takes over when the
primary dies (see the package docstring for its states)::

    machine = SecondaryPair(prepare=host.prepare, activate=host.activate,
                            clock=RealClock(), detect_timeout=1.0)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Optional

from mftvm_openstack.contract.hello import PROTOCOL_VERSION, Hello, Ready
from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus
from mftvm_openstack.ft import boot_files, transport
from mftvm_openstack.ft.capacity import CapacityError
from mftvm_openstack.ft.pair.events import (
    Committed,
    Connected,
    FrameReceived,
    Listening,
    PrimaryLost,
    Refused,
    SecondaryEvent,
    Standby,
    Stop,
    Takeover,
)
from mftvm_openstack.ft.pair.interfaces import Channel, Clock, Prepared
from mftvm_openstack.ft.pair.machine import Machine
from mftvm_openstack.ft.transport import Kind, Message

if TYPE_CHECKING:
    from mftvm_openstack.ft.epoch import Staged
    from mftvm_openstack.ft.trackers import RamDelta

#: acked checkpoints that may wait to be installed; the next ACK waits for
#: the installs (their RAM pages are held in memory until then)
MAX_STAGED = 4

LOG = logging.getLogger(__name__)


class SecondaryPair(Machine['SecondaryEvent']):
    """Keeps the replica; takes over when the primary dies.

    ``prepare(hello)`` makes the replica and the disk store for a primary
    whose HELLO was accepted (and whose boot files, if it announced any,
    were received into ``boot_dir``: :attr:`boot_files`);
    ``activate(committed_epoch)`` fences and restores the guest (both
    injected: the host decides where the replica lives, how to fence and
    where QEMU runs).
    """

    def __init__(self, *, prepare: Callable[[Hello], Awaitable[Prepared]],
                 activate: Callable[[int], Awaitable[None]],
                 clock: Clock, detect_timeout: float = 1.0,
                 first_commit_timeout: float = 30.0,
                 hello_timeout: float = 30.0,
                 vouches: bool = True,
                 boot_dir: Optional[str] = None) -> None:
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
        #: the primary may run on our word (echoed heartbeats) for
        #: ``detect_timeout`` after we last heard it: a takeover waits
        #: that out. False where its fence dies with it (a lock file):
        #: it then never runs on our word.
        self.vouches = vouches
        #: the primary's HELLO, once accepted
        self.hello: Optional[Hello] = None
        #: where the boot files a primary ships are kept (None: refused)
        self.boot_dir = boot_dir
        #: ``{role: path}`` of the boot files of the accepted HELLO's
        #: primary, kept in ``boot_dir`` (:mod:`..boot_files`)
        self.boot_files: dict[str, str] = {}
        self.pair_id = ''
        self.channel: Optional[Channel] = None
        self.prepared: Optional[Prepared] = None
        self._handshaking = False
        self._applying: Optional[asyncio.Task[Any]] = None
        #: the newest epoch acked to the primary (a failover resumes it)
        self.acked = 0
        #: why a checkpoint could not be applied (none is applied after)
        self.apply_failed: Optional[str] = None

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
        elif isinstance(event, Committed):
            await self._committed(event)
        elif isinstance(event, (PrimaryLost, Takeover)):
            if self.state == State.STANDBY:
                await self._failover(event.reason, withdrawn=False)
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
            self.boot_files = await boot_files.receive(
                channel, hello.boot_files, self.boot_dir,
                lambda: self.clock.wait_for(channel.wait_frame(),
                                            self.hello_timeout))
            prepared = await self.prepare(hello)
            await channel.send_json(
                Kind.READY, Ready(target=prepared.target,
                                  exports=prepared.exports or None).to_dict())
        except Exception as exc:   # whatever it was, this primary is refused
            error = f'refused a primary: {exc or type(exc).__name__}'
            LOG.error('%s', error, exc_info=not isinstance(
                exc, (ContractError, transport.ProtocolError, TimeoutError,
                      ConnectionError, CapacityError)))
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
        # A frame that stops arriving half-way is silence too (a primary
        # frozen mid-frame): the same bound holds inside a frame.
        channel.stall_timeout = timeout
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
                    timeout = channel.stall_timeout = self.detect_timeout
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
            try:
                await self.prepared.store.mark(msg.epoch)
            except Exception as exc:
                # A disk replica that cannot take the epoch's overlay
                # (its filesystem full, its storage daemon gone) cannot
                # follow the primary: give it up now, rather than leave
                # the guest paused until the primary stops waiting.
                await self._give_up(f'disk replica: mark of epoch '
                                    f'{msg.epoch} failed: {exc}')
                return
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
            await self._stage(msg.epoch, devstate, delta)
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
            # Sent only once its guest is stopped for good (killed,
            # exited, or paused for a handover): it runs on no word.
            await self._failover(f'primary reported: {reason}',
                                 withdrawn=True)
        elif msg.kind == Kind.BYE:
            self.stats.reason = 'the primary ended protection'
            self.post(Stop())

    async def _stage(self, epoch: int, devstate: bytes,
                     delta: RamDelta) -> None:
        """Hold checkpoint ``epoch`` where a failover will use it, ACK it,
        and apply it after (beside the queue).

        Everything that can fail is done before the ACK: the replica's
        ``stage`` checks the checkpoint against the image and writes its
        device state to a file of its own. What is left after the ACK,
        ``install``, copies pages into RAM allocated in full and renames
        nothing, so an acked epoch cannot fail to go in; a failover
        installs every acked epoch before it resumes (:meth:`_failover`),
        so output the primary released on this ACK is never taken back.
        """
        assert self.prepared is not None
        replica = self.prepared.replica
        if self.apply_failed is not None:
            return       # nothing is acked over an epoch that did not go in
        if self._applying is not None and \
                self.acked - replica.committed >= MAX_STAGED:
            # The installs fell behind: the RAM pages of this many acked
            # epochs are held in memory already; wait before holding more.
            with contextlib.suppress(Exception):
                await self._applying
        loop = asyncio.get_running_loop()
        try:
            staged = await loop.run_in_executor(None, replica.stage, epoch,
                                                devstate, delta)
        except Exception as exc:
            # (A full disk for the device state, most likely.) Not acked:
            # the replica is still whole at the last acked epoch, and
            # nothing after this one is taken.
            self.apply_failed = f'applying checkpoint {epoch} failed: {exc}'
            await self._give_up(self.apply_failed)
            return
        self.acked = epoch
        self._applying = self._spawn(self._install(self._applying, staged))
        await self._committed(Committed(epoch, delta.nbytes))

    async def _install(self, previous: Optional[asyncio.Task[Any]],
                       staged: Staged) -> None:
        # Beside the queue, so that a failover (handled in the queue) can
        # wait for every acked checkpoint to be installed.
        assert self.prepared is not None
        prepared = self.prepared
        if previous is not None:
            # Checkpoints install strictly in order; a failed one is
            # recorded in apply_failed.
            with contextlib.suppress(Exception):
                await previous
        if self.apply_failed is not None:
            return       # nothing installs over an epoch that did not
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, prepared.replica.install,
                                       staged)
            await prepared.store.commit(staged.epoch)
        except Exception as exc:
            # Only a bug gets here (install does nothing that can fail):
            # the replica says it is damaged, or stays behind the acked
            # epoch, and a failover then refuses to resume it.
            self.apply_failed = (f'applying checkpoint {staged.epoch} '
                                 f'failed: {exc}')
            if self.state == State.STANDBY:
                await self._give_up(self.apply_failed)

    async def _give_up(self, why: str) -> None:
        """This replica cannot go on: tell the primary (it goes on
        unprotected) and stop."""
        LOG.error('giving up the replica: %s', why)
        self.stats.reason = why
        self.error = why
        if self.channel is not None:
            with contextlib.suppress(Exception):
                await self.channel.send_json(Kind.ERROR, {'error': why})
        self.post(Stop())

    async def _committed(self, event: Committed) -> None:
        self.stats.epochs = event.epoch
        self.stats.committed = event.epoch
        self.stats.dirty_bytes += event.nbytes
        if self.state == State.STANDBY and self.channel is not None:
            with contextlib.suppress(ConnectionError, OSError):
                await self.channel.send(Kind.ACK, event.epoch)

    async def _wait_out_vouch(self) -> None:
        """Until the primary can no longer be running on our word.

        It runs on while the newest heartbeat we echoed is less than our
        detection time old (``PrimaryPair.peer_holds_until``); we heard
        that heartbeat no later than the last frame. A stream that broke
        (or an operator's takeover) right after a frame does not shorten
        this; silence has already waited it out. The channel is closed:
        nothing is echoed any more."""
        heard = self.stats.last_ack_at
        if heard is None:
            return
        left = heard + self.detect_timeout - self.clock.monotonic()
        if left > 0:
            LOG.warning('waiting %.2fs: the primary may run until then on '
                        'heartbeats we echoed', left)
            await self.clock.sleep(left)

    async def _failover(self, reason: str, withdrawn: bool) -> None:
        """Take over from epoch committed; ``withdrawn``: the primary
        said it stopped its guest (PRIMARY_LOST), so it runs on no word
        of ours."""
        assert self.channel is not None and self.prepared is not None
        started = self.clock.monotonic()
        LOG.warning('primary lost (%s): failing over', reason)
        self.state = State.FAILING_OVER
        self.stats.reason = reason
        self.channel.close()
        if self._applying is not None:
            # Every acked checkpoint goes in before the guest resumes.
            with contextlib.suppress(Exception):
                await self._applying
        replica = self.prepared.replica
        if replica.damaged is not None:
            # Its RAM holds pages of two epochs: a guest resumed from it
            # would run on from a state that never existed.
            self.stats.reason = (f'{reason}; the replica is unusable, not '
                                 f'resuming it: {replica.damaged}')
            self.error = self.stats.reason
            LOG.error(self.stats.reason)
            self._finish(State.LOST)
            return
        committed = replica.committed
        if committed < self.acked:
            # Resuming an older epoch would take back output the primary
            # released on our ACK: better no guest than a wrong one.
            self.stats.reason = (f'{reason}; the replica is unusable, not '
                                 f'resuming it: acked epoch {self.acked} '
                                 f'did not go in ({self.apply_failed}), it '
                                 f'holds epoch {committed}')
            self.error = self.stats.reason
            LOG.error(self.stats.reason)
            self._finish(State.LOST)
            return
        if committed == 0:
            self.stats.reason = (f'{reason}; no checkpoint was ever '
                                 f'committed, nothing to resume')
            LOG.error(self.stats.reason)
            self._finish(State.LOST)
            return
        if self.vouches and not withdrawn:
            await self._wait_out_vouch()
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
