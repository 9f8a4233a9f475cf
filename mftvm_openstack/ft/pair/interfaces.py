"""What a pair's state machines work with: the clock and the
collaborators, each typed by a Protocol.

The machines (:mod:`.primary`, :mod:`.secondary`) never wait on real time
or touch QEMU themselves: a :class:`Clock` measures every wait, and the
host injects the rest (the engine's real parts, or fakes in unit
tests)::

    clock = RealClock()
    await clock.wait_for(channel.wait_frame(), timeout=1.0)
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Optional, Protocol, TypeVar

from mftvm_openstack.contract.hello import Hello, NbdTargetInfo, Ready
from mftvm_openstack.ft import transport
from mftvm_openstack.ft.transport import Kind, Message

if TYPE_CHECKING:
    # (interfaces only: importing them would pull in QEMU's libraries)
    from mftvm_openstack.ft.epoch import Checkpoint, Staged
    from mftvm_openstack.ft.monitor import Monitor
    from mftvm_openstack.ft.trackers import RamDelta


T = TypeVar('T')


class Clock(Protocol):
    """Time as the machines see it: every wait and timeout goes here."""

    def monotonic(self) -> float: ...

    async def sleep(self, seconds: float) -> None: ...

    async def wait_for(self, aw: Awaitable[T],
                       timeout: Optional[float]) -> T:
        """``aw``'s result; TimeoutError (``aw`` cancelled) after
        ``timeout`` seconds (None: no limit)."""
        ...


#: how long a timed-out wait lets what it waited for finish its cancellation
ABANDON_AFTER_S = 1.0


class RealClock:
    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def wait_for(self, aw: Awaitable[T],
                       timeout: Optional[float]) -> T:
        # Not asyncio.wait_for: in Python 3.11 it swallows a cancellation
        # that arrives just as ``aw`` completes (fixed in 3.12), and the
        # machine's tasks wait like this for the guest's next packet.
        task = asyncio.ensure_future(aw)
        try:
            done, _ = await asyncio.wait({task}, timeout=timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            # ``aw`` is over when this returns, as with asyncio.wait_for
            # (bounded: a task that ignores its cancellation is left).
            await asyncio.wait({task}, timeout=ABANDON_AFTER_S)
            raise TimeoutError
        return task.result()


class Channel(Protocol):
    """The data stream to the peer (:class:`transport.Channel`)."""

    bytes_sent: int
    #: seconds a frame that has begun may go without a byte arriving
    stall_timeout: Optional[float]

    async def send(self, kind: Kind, epoch: int = 0,
                   *buffers: Any) -> None: ...

    async def send_json(self, kind: Kind, data: Any,
                        epoch: int = 0) -> None: ...

    async def wait_frame(self) -> None: ...

    async def recv(self, *, limit: int = transport.MAX_PAYLOAD) -> Message:
        """The next frame; ProtocolError if longer than ``limit``."""
        ...

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
                      resume: bool = True,
                      settle: Optional[Callable[[int], Awaitable[None]]]
                      = None) -> Checkpoint: ...


class DiskSync(Protocol):
    """Keeps the secondary's disk in step (``ft.disk.DiskSync``)."""

    async def checkpoint(self, epoch: int) -> None: ...

    async def stop(self) -> None: ...


class OutputBuffer(Protocol):
    """Holds the guest's frames until their epoch commits
    (``ft.network.OutputBuffer``)."""

    #: set while the open epoch holds a frame
    waiting: asyncio.Event

    @property
    def frames_released(self) -> int: ...
    #: told the held byte count each time a frame is held
    on_held: Optional[Callable[[int], None]]

    @property
    def held(self) -> int: ...

    @property
    def held_bytes(self) -> int: ...

    @property
    def oldest_epoch(self) -> Optional[int]: ...

    def seal(self, epoch: int) -> None: ...

    async def release(self, epoch: int) -> None: ...

    async def detach(self, monitor: Monitor) -> None: ...

    def discard(self) -> None: ...


class Replica(Protocol):
    """The guest's RAM and device state as of the last commit
    (``epoch.ReplicaImage``): ``stage`` holds a checkpoint for good or
    fails (before its ACK), ``install`` makes it the image's (after)."""

    committed: int
    #: why the image mixes two epochs and must not be resumed (None:
    #: it is whole, at ``committed``)
    damaged: Optional[str]

    def stage(self, epoch: int, devstate: bytes,
              delta: RamDelta) -> Staged: ...

    def install(self, staged: Staged) -> None: ...


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

    async def boot_files(self) -> Sequence[bytes]:
        """The bytes of the boot files the last :meth:`hello` announced,
        in its order (sent after it, one ``BOOT_FILE`` frame each)."""
        ...

    async def link(self, ready: Ready,
                   lost: Callable[[str], None]) -> Link:
        """Start the disk sync to ``ready``'s target and set up capture
        and output commit; ``lost(why)`` reports a failure later."""
        ...

    async def invalidate_replica(self, pair_id: str) -> None:
        """Make sure the replica of ``pair_id`` can no longer take over
        (it is stale from now on); retries while that is undecided.
        OwnershipLost if the guest is no longer ours to run."""
        ...


class OwnershipLost(Exception):
    """The fence answered: the guest is another's to run now."""


@dataclasses.dataclass
class Prepared:
    """What the secondary's host made for a primary that said HELLO."""

    replica: Replica
    store: OverlayStore
    target: NbdTargetInfo
    #: the exports of the guest's other disks, on ``target``'s server
    exports: tuple[str, ...] = ()
