"""What one side of a protected guest says about itself.

The instance process publishes an :class:`InstanceStatus` to
``<role>/status.json`` and answers it on its control socket; the agent
passes it on over RPC (adding ``instance``, ``host`` and ``peer``); the
CLI prints it and Nova's driver acts on it. One type, one spelling of
each key::

    st = InstanceStatus.from_dict(json.load(f))
    if st.state is State.PROTECTED and st.pause_ms_p50 is not None: ...
    json.dumps(st.to_dict())
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from mftvm_openstack.contract.record import Record
from mftvm_openstack.contract.states import Role, State

#: the ``reason`` of a primary whose protection an operator ended (any
#: other reason for leaving PROTECTED is a lost secondary)
UNPROTECTED_BY_REQUEST = 'protection ended by request'


@dataclasses.dataclass(frozen=True)
class PauseParts(Record):
    """Where a checkpoint's pause went (median over the window), in ms.
    The parts run concurrently: they do not add up to the pause."""

    devstate: float
    ram: float
    disk_mark: float


@dataclasses.dataclass(frozen=True)
class Takeover(Record):
    """CLOCK_MONOTONIC stamps (system-wide on one machine) of a
    secondary's takeover: primary lost, fence won, guest running."""

    detected: Optional[float] = None
    fenced: Optional[float] = None
    resumed: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class InstanceStatus(Record):
    role: Role
    state: State
    pair_id: str = ''
    #: the instance process and the guest's QEMU (None: not running)
    host_pid: Optional[int] = None
    qemu_pid: Optional[int] = None
    #: set by whoever read a published status: does its process still run
    alive: Optional[bool] = None
    #: epochs checkpointed (primary) or applied (secondary)
    epochs: int = 0
    last_committed_epoch: int = 0
    replication_lag_epochs: int = 0
    pause_ms_p50: Optional[float] = None
    pause_ms_p99: Optional[float] = None
    pause_parts_ms_p50: Optional[PauseParts] = None
    #: primary: after the pause, sending a checkpoint, then waiting for
    #: its ACK (ms, p50): a held packet waits the pause plus these
    ship_ms_p50: Optional[float] = None
    ack_ms_p50: Optional[float] = None
    dirty_mib_total: float = 0.0
    #: primary: output frames held now / released so far, MiB shipped
    held_frames: Optional[int] = None
    released_frames: Optional[int] = None
    shipped_mib: Optional[float] = None
    #: primary: bytes of output held now, and whether the held output is
    #: at a bound ([ft] max_held_epochs / max_held_bytes), so the guest
    #: is paused until the secondary's acks free room
    held_bytes: Optional[int] = None
    held_output_full: Optional[bool] = None
    #: time since the secondary last acked (primary) or spoke (secondary)
    ms_since_last_ack: Optional[float] = None
    #: secondary: how long its takeover took, and when each step ended
    failover_ms: Optional[float] = None
    takeover: Optional[Takeover] = None
    #: why the state is what it is (e.g. why the secondary was lost)
    reason: str = ''
    #: what went wrong, for a side that failed or could not protect
    error: str = ''
    #: the disk files the guest runs on, (path, format), base first
    disk_layers: tuple[tuple[str, str], ...] = ()
    #: the same for each of the guest's other disks, in order
    more_disk_layers: tuple[tuple[tuple[str, str], ...], ...] = ()
    #: CLOCK_MONOTONIC start and end of the initial disk sync
    sync_window: tuple[float, ...] = ()
    #: secondary: where it listens for its primary's data stream
    listen: str = ''
    #: whether this side holds the guest's lease right now (None: its
    #: fence has no lease, e.g. a lock file)
    lease_held: Optional[bool] = None
    #: wall-clock time of this status (time.time())
    updated: float = 0.0
    #: wall-clock time this side was first seen in its current state
    #: (noticed when a status is taken: at most a publication late)
    state_since: Optional[float] = None
    #: filled in by the agent
    instance: str = ''
    host: str = ''
    peer: Optional[str] = None

    @property
    def counted_state(self) -> State:
        """The state as everyone outside the pair counts it: protected
        from the first committed epoch on (the agent's protect call
        answers then too), syncing before it::

            >>> InstanceStatus(Role.PRIMARY, State.PROTECTED).counted_state
            <State.SYNCING: 'syncing'>
        """
        if self.state is State.PROTECTED and self.last_committed_epoch < 1:
            return State.SYNCING
        return self.state
