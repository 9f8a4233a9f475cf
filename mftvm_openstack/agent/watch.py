"""What changed in the protection of this host's guests, poll to poll.

The agent reads its instance processes' statuses every ``[agent]
monitor_interval`` (:meth:`AgentManager.periodic
<mftvm_openstack.agent.manager.AgentManager.periodic>`). A
:class:`ProtectionWatch` is shown each such list and answers what it
means since the last one, as notifications to send; it also keeps the
latest list for the metrics endpoint::

    watch = ProtectionWatch('hv1')
    watch.observe(statuses)       # the first list: what is, no events
    for event, payload in watch.observe(statuses):
        ...                       # (Event.SECONDARY_LOST, InstanceFTPayload)
    watch.snapshot().statuses     # the latest list, for a scrape

The first list it sees is taken as it is (an agent that restarts does
not announce again what happened before). A state that lasted less than
a poll is inferred where the next one proves it: a standby found active
took over (failover.start and .end at once). Nothing is kept of a guest
once it is gone from the list: what it holds is bounded by the guests of
this host, plus one counter per event type.
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
from collections.abc import Callable, Iterable
from typing import Optional

from mftvm_openstack.contract.notifications import Event, InstanceFTPayload
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import (
    UNPROTECTED_BY_REQUEST,
    InstanceStatus,
)

Notice = tuple[Event, InstanceFTPayload]

#: a secondary side's states before it runs the guest
_WAITING = frozenset({State.STARTING, State.WAITING_FOR_PRIMARY,
                      State.STANDBY})


@dataclasses.dataclass
class _Seen:
    """What the watch remembers of one guest."""

    state: Optional[State]
    #: the role it reported (a secondary that took over reports itself
    #: the primary from then on)
    role: Optional[Role] = None
    #: protected since it was last protected on request: a protection
    #: now is a re-protection
    protected_before: bool = False
    #: wall-clock time since which the guest runs here unprotected
    unprotected_since: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """The latest list, for the metrics endpoint."""

    statuses: tuple[InstanceStatus, ...] = ()
    #: instance -> wall-clock time since which it runs here unprotected
    unprotected_since: dict[str, float] = dataclasses.field(
        default_factory=dict)
    #: how many of each event this agent has seen since it started
    counts: dict[Event, int] = dataclasses.field(default_factory=dict)


def _took_over(st: InstanceStatus) -> bool:
    return st.takeover is not None and st.takeover.resumed is not None


class ProtectionWatch:
    """See the module docstring."""

    def __init__(self, host: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.host = host
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, _Seen] = {}
        self._started = False
        self._snapshot = Snapshot()
        self._counts: collections.Counter[Event] = collections.Counter()

    def observe(self, statuses: Iterable[InstanceStatus]) -> list[Notice]:
        """The notices for what changed since the last list."""
        statuses = tuple(st for st in statuses if st.alive is not False)
        notices: list[Notice] = []
        with self._lock:
            first = not self._started
            self._started = True
            now = self._clock()
            seen: dict[str, _Seen] = {}
            for st in statuses:
                was = self._seen.get(st.instance)
                if was is None:
                    was = self._baseline(st) if first else _Seen(None)
                if not first:
                    notices.extend(self._changes(st, was))
                seen[st.instance] = self._remember(st, was, now)
            self._seen = seen       # a guest gone is forgotten
            self._counts.update(event for event, _ in notices)
            self._snapshot = Snapshot(
                statuses=statuses,
                unprotected_since={name: s.unprotected_since
                                   for name, s in seen.items()
                                   if s.unprotected_since is not None},
                counts=dict(self._counts))
        return notices

    def snapshot(self) -> Snapshot:
        with self._lock:
            return self._snapshot

    # -- inside the lock --

    def _baseline(self, st: InstanceStatus) -> _Seen:
        state = st.counted_state
        return _Seen(state, st.role, protected_before=state is
                     State.PROTECTED or _took_over(st) or bool(st.reason))

    def _remember(self, st: InstanceStatus, was: _Seen, now: float) -> _Seen:
        state = st.counted_state
        protected_before = was.protected_before or state is State.PROTECTED
        if state is State.UNPROTECTED and \
                st.reason == UNPROTECTED_BY_REQUEST:
            protected_before = False
        since = None
        if state.runs_guest and state is not State.PROTECTED:
            since = was.unprotected_since or now
        return _Seen(state, st.role, protected_before, since)

    def _changes(self, st: InstanceStatus, was: _Seen) -> list[Notice]:
        prev, state = was.state, st.counted_state
        if prev is state:
            return []
        out: list[Event] = []
        was_secondary = (was.role if prev is not None
                         else st.role) is Role.SECONDARY
        if was_secondary and (prev is None or prev in _WAITING
                              or prev is State.FAILING_OVER):
            if state is State.FAILING_OVER or state.runs_guest or \
                    state is State.LOST:
                if prev is not State.FAILING_OVER:
                    out.append(Event.FAILOVER_START)
            if state.runs_guest:
                out.append(Event.FAILOVER_END)
            elif state is State.LOST:
                out.append(Event.FAILOVER_ERROR)
        if state is State.PROTECTED:
            out.append(Event.REPROTECT_END
                       if was.protected_before or _took_over(st)
                       else Event.PROTECT_END)
        elif prev is State.PROTECTED and state in (State.UNPROTECTED,
                                                   State.SYNCING):
            out.append(Event.UNPROTECT_END
                       if st.reason == UNPROTECTED_BY_REQUEST
                       else Event.SECONDARY_LOST)
        elif prev is State.SYNCING and state is State.UNPROTECTED:
            out.append(Event.PROTECT_ERROR)
        return [(event, self._payload(event, st)) for event in out]

    def _payload(self, event: Event, st: InstanceStatus) -> InstanceFTPayload:
        if st.state.runs_guest and event is not Event.FAILOVER_START:
            primary: Optional[str] = self.host
            # the secondary it is protected onto (or was: the one lost);
            # a guest that just took over has none
            secondary = None if st.state is State.ACTIVE else st.peer
        else:
            primary, secondary = st.peer, self.host
        reason = st.reason
        if event in (Event.PROTECT_ERROR, Event.FAILOVER_ERROR):
            reason = st.error or st.reason
        return InstanceFTPayload(
            instance=st.instance, state=st.state, role=st.role,
            host=self.host, primary_host=primary, secondary_host=secondary,
            pair_id=st.pair_id, last_committed_epoch=st.last_committed_epoch,
            reason=reason,
            failover_ms=st.failover_ms if event is Event.FAILOVER_END
            else None)
