"""The two sides of a protected pair, each one event-driven state machine.

(:mod:`.primary`, :mod:`.secondary`; their events in :mod:`.events`, what
they work with in :mod:`.interfaces`, their common base in :mod:`.machine`.)

:class:`PrimaryPair` runs beside the guest; :class:`SecondaryPair` keeps
the replica. Each owns an event queue; everything that happens to its
side (the guest coming up, a protect request, the handshake's answer, an
epoch timer tick, a frame from the peer, a broken stream, the lease
lost, the guest exiting, an operator's command) arrives as a typed event
and is handled in order, one at a time. The state a side reports is its
machine's :class:`~mftvm_openstack.contract.states.State`, and nothing
else. Collaborators (checkpoint capturer, disk sync, output buffer, data
channel, replica, overlay store, monitor, the guest's process, clock)
are typed by Protocols (:mod:`.interfaces`) and injected, so unit tests
drive the machines with fakes on a fake clock, and functional tests with
QEMU::

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
    PROTECTED --SecondaryLost (stream, MARK, ship or ack timeout, BYE)-->
        UNPROTECTED --Protect--> SYNCING (re-protect) ...
    PROTECTED --OutputFull / too many epochs unacked--> PROTECTED, the
        guest paused until acks free room (status: held_output_full)
    PROTECTED --Stop(handover)--> STOPPED (the secondary takes over)
    STARTING/SYNCING/PROTECTED/UNPROTECTED/ACTIVE
        --GuestExited--> FAILED;  --LeaseLost--> FENCED;  --Stop--> STOPPED
        --GuestExited(by_guest: it powered itself off)--> STOPPED (BYE,
        the replica marked stale: no failover)

A lost lease is *interrupted* into the machine (:meth:`Machine.interrupt`
in :mod:`.machine`): it is handled next, cutting short a handler that
waits on a peer or backend that no longer answers. Final states (FAILED,
FENCED, STOPPED, LOST) are final.

Secondary::

    STARTING --Listening--> WAITING_FOR_PRIMARY
    WAITING_FOR_PRIMARY --Connected (HELLO checked, READY sent)--> STANDBY
        (a HELLO of another protocol version: ERROR frame, still waiting)
    STANDBY --FrameReceived (MARK/CHECKPOINT staged and ACKed, then
        installed beside the queue/HEARTBEAT)--> STANDBY
    STANDBY --PrimaryLost / Takeover--> FAILING_OVER --> ACTIVE
                                                     \\-> LOST
    WAITING_FOR_PRIMARY/STANDBY --Stop (or BYE, a corrupt stream)--> STOPPED

A secondary that took over runs the guest as a primary does: its side
goes on as a :class:`PrimaryPair` made by :meth:`PrimaryPair.took_over`,
which starts in ACTIVE and moves on like UNPROTECTED (ACTIVE --Protect-->
SYNCING ...).
"""

from mftvm_openstack.contract.limits import EPOCH_MS_RANGE, IDLE_EPOCH_MS_RANGE
from mftvm_openstack.ft.pair.cadence import Cadence, EpochPolicy
from mftvm_openstack.ft.pair.events import (
    Acked,
    Committed,
    Connected,
    FrameReceived,
    GuestExited,
    GuestFailed,
    GuestHung,
    GuestUp,
    LeaseLost,
    Listening,
    OutputFull,
    PrimaryEvent,
    PrimaryLost,
    Protect,
    Refused,
    SecondaryEvent,
    SecondaryLost,
    Standby,
    Stop,
    Synced,
    SyncFailed,
    Takeover,
    Tick,
)
from mftvm_openstack.ft.pair.interfaces import (
    Capturer,
    Channel,
    Clock,
    DiskSync,
    GuestProcess,
    Link,
    OutputBuffer,
    OverlayStore,
    OwnershipLost,
    Prepared,
    Protector,
    RealClock,
    Replica,
)
from mftvm_openstack.ft.pair.machine import Stats
from mftvm_openstack.ft.pair.primary import PrimaryPair
from mftvm_openstack.ft.pair.secondary import SecondaryPair

__all__ = [
    'EPOCH_MS_RANGE', 'IDLE_EPOCH_MS_RANGE', 'Acked', 'Committed', 'Connected',
    'FrameReceived', 'GuestExited', 'GuestFailed', 'GuestHung', 'GuestUp',
    'LeaseLost', 'Listening', 'OutputFull', 'PrimaryEvent', 'PrimaryLost',
    'Protect', 'Refused', 'SecondaryEvent', 'SecondaryLost', 'Standby',
    'Stop', 'Synced', 'SyncFailed', 'Takeover', 'Tick', 'Capturer',
    'Cadence', 'Channel', 'Clock', 'EpochPolicy',
    'DiskSync', 'GuestProcess', 'Link', 'OutputBuffer', 'OverlayStore',
    'OwnershipLost',
    'Prepared', 'Protector', 'RealClock', 'Replica', 'Stats', 'PrimaryPair',
    'SecondaryPair',
]
