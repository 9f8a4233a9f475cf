"""The events of a pair's state machines: everything that happens to a
side arrives as one of these, posted to its machine's queue::

    machine.post(Protect('tcp:10.0.0.2:4711', 'pair-1'))
    machine.post(LeaseLost('lease lapsed'))
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Union

from mftvm_openstack.ft.pair.interfaces import (
    Channel,
    GuestProcess,
    Link,
    Prepared,
)
from mftvm_openstack.ft.transport import Message

if TYPE_CHECKING:
    from mftvm_openstack.ft.monitor import Monitor


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
class OutputFull:
    """The held output reached its byte bound: pause the guest."""


@dataclasses.dataclass
class SecondaryLost:
    reason: str


@dataclasses.dataclass
class GuestExited:
    """The guest's QEMU is gone. ``by_guest``: the guest powered itself
    off (QEMU's SHUTDOWN event said so before it exited): a shutdown, not
    a failure; its secondary stands down instead of taking over."""
    reason: str
    by_guest: bool = False


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
class Committed:
    """A checkpoint was received whole and staged where a failover will
    use it (applied or not yet): ACK it."""
    epoch: int
    nbytes: int


@dataclasses.dataclass
class PrimaryLost:
    reason: str


@dataclasses.dataclass
class Takeover:
    """Operator: fail over now."""
    reason: str = 'operator request'


PrimaryEvent = Union[GuestUp, GuestFailed, Protect, Synced, SyncFailed,
                     Tick, Acked, OutputFull, SecondaryLost, GuestExited,
                     GuestHung, LeaseLost, Stop]
SecondaryEvent = Union[Listening, Connected, Standby, Refused,
                       FrameReceived, Committed, PrimaryLost, Takeover, Stop]
