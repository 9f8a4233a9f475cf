"""The states of one side of a protected guest, and the two roles.

A side is one instance process: it starts as the primary (it boots or
adopts the guest) or as the secondary (it keeps the replica). Each side
is one state machine (:mod:`mftvm_openstack.ft.pair`); its state is the
one a status reports, and these names are the only spelling of it::

    >>> State('standby').runs_guest
    False
    >>> State.ACTIVE.runs_guest
    True

Primary (:class:`~mftvm_openstack.ft.pair.PrimaryPair`)::

    STARTING --guest up--> UNPROTECTED --protect--> SYNCING
    STARTING --guest up, a secondary named--> SYNCING
    SYNCING --HELLO/READY, disk sync started--> PROTECTED
    SYNCING --refused / failed--> UNPROTECTED
    PROTECTED --secondary lost--> UNPROTECTED --protect--> SYNCING ...
    PROTECTED --handover--> STOPPED (the secondary takes over)
    STARTING --guest failed to start--> FAILED
    any running --guest exits--> FAILED;  --lease lost--> FENCED
    any --stop--> STOPPED

Secondary (:class:`~mftvm_openstack.ft.pair.SecondaryPair`)::

    STARTING --listening--> WAITING_FOR_PRIMARY --HELLO/READY--> STANDBY
    STANDBY --primary lost / takeover--> FAILING_OVER --> ACTIVE
                                                     \\-> LOST
    WAITING_FOR_PRIMARY/STANDBY --stop, BYE--> STOPPED

ACTIVE runs the guest unprotected, as a primary's UNPROTECTED does, and
goes on as one: --protect--> SYNCING --> PROTECTED ...
"""

from __future__ import annotations

import enum


class Role(enum.StrEnum):
    PRIMARY = 'primary'
    SECONDARY = 'secondary'


class State(enum.StrEnum):
    STARTING = 'starting'
    #: secondary: listening, no primary has connected yet
    WAITING_FOR_PRIMARY = 'waiting-for-primary'
    #: primary: connecting to a secondary, initial disk sync
    SYNCING = 'syncing'
    PROTECTED = 'protected'
    UNPROTECTED = 'unprotected'
    STANDBY = 'standby'
    FAILING_OVER = 'failing-over'
    #: a secondary that took over: it runs the guest, unprotected
    ACTIVE = 'active'
    #: a secondary that could not take over
    LOST = 'lost'
    #: this side stopped its guest itself: it could no longer prove that
    #: it owns it
    FENCED = 'fenced'
    FAILED = 'failed'
    STOPPED = 'stopped'

    @property
    def runs_guest(self) -> bool:
        """Whether a side in this state runs the guest."""
        return self in _RUNS_GUEST

    @property
    def final(self) -> bool:
        """Whether a side in this state has ended for good."""
        return self in _FINAL


_RUNS_GUEST = frozenset({State.SYNCING, State.PROTECTED, State.UNPROTECTED,
                         State.ACTIVE})
_FINAL = frozenset({State.LOST, State.FENCED, State.FAILED, State.STOPPED})
