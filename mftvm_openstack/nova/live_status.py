"""What Nova should record of an FT server, given what its agent says.

The driver keeps ``ft_status`` (system metadata, mirrored into the
server's metadata) and the secondary it holds in Placement. Both say
what Nova did last; the primary's agent says what is true now. Every
look at the local agent (:mod:`~mftvm_openstack.nova.status`), for each
FT server that runs here with no operation under way, :func:`judge`
compares the two and answers what Nova must change::

    >>> from mftvm_openstack.contract.states import Role, State
    >>> from mftvm_openstack.contract.status import InstanceStatus
    >>> live = InstanceStatus(role=Role.PRIMARY, state=State.UNPROTECTED,
    ...                       reason='no ack for 0.8 s', peer='hv2')
    >>> judge('protected', 'hv2', live)
    Verdict(status='unprotected: secondary hv2 lost (no ack for 0.8 s)', \
release='hv2', reprotect=True)
    >>> live = InstanceStatus(role=Role.PRIMARY, state=State.PROTECTED,
    ...                       last_committed_epoch=3, peer='hv3')
    >>> judge('protecting', 'hv3', live)
    Verdict(status='protected', release=None, reprotect=False)

Nova-free: the caller loads the instance, holds its lock, writes the
status, deletes the allocation and chooses the new secondary.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import (
    UNPROTECTED_BY_REQUEST,
    InstanceStatus,
)

#: ``ft_status`` of a server protected onto the secondary Nova holds
PROTECTED = State.PROTECTED.value
#: how ``ft_status`` starts once the secondary is lost
SECONDARY_LOST = f'{State.UNPROTECTED}: secondary '

#: the primary's states that run the guest with nobody to take over
_RUNS_ALONE = frozenset({State.UNPROTECTED, State.ACTIVE})


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What Nova must change; the default: nothing."""

    #: the new ``ft_status`` (None: keep it)
    status: Optional[str] = None
    #: the secondary host whose Placement allocation is to be deleted
    #: (lost, or replaced by one the agent chose)
    release: Optional[str] = None
    #: the guest runs unprotected not by request: protect it again
    reprotect: bool = False


def lost_status(secondary: Optional[str], why: str) -> str:
    """``ft_status`` right after ``secondary`` was lost::

        >>> lost_status('hv2', 'no ack for 0.8 s')
        'unprotected: secondary hv2 lost (no ack for 0.8 s)'
        >>> lost_status(None, 'protection failed: refused')
        'unprotected: secondary lost (protection failed: refused)'
    """
    who = f'{secondary} ' if secondary else ''
    return f'{SECONDARY_LOST}{who}lost ({why})'


def judge(recorded: str, secondary: Optional[str],
          live: Optional[InstanceStatus]) -> Verdict:
    """What to change, for a server Nova runs on the agent's host.

    ``recorded`` is its ``ft_status`` (system metadata), ``secondary``
    the host Nova holds for it in Placement (None: none), ``live`` the
    local agent's status of it (None: the agent does not list it). Only
    the primary's side, alive, is judged: a server the agent does not
    list, or lists otherwise, is some other part's business (the
    hand-off's, or a protection under way).
    """
    if live is None or live.alive is False or live.role is not Role.PRIMARY:
        return Verdict()
    if live.counted_state is State.PROTECTED:
        if secondary is not None and live.peer and live.peer != secondary:
            # the agent protects onto a host of its own choosing ([agent]
            # peers): the one Nova holds serves nobody
            return Verdict(status=f'{PROTECTED} onto {live.peer}, not '
                           'held in Placement', release=secondary)
        if secondary is None and live.peer:
            status = f'{PROTECTED} onto {live.peer}, not held in Placement'
            return Verdict(status=None if recorded == status else status)
        return Verdict(status=None if recorded == PROTECTED else PROTECTED)
    if live.state not in _RUNS_ALONE:
        return Verdict()        # syncing (a protection under way), ...
    if live.reason == UNPROTECTED_BY_REQUEST:
        # the driver unprotected it (reboot, snapshot, ...): its status
        # says why, and it protects it again itself
        return Verdict()
    if secondary is None:
        # lost already and released: the re-protection's own status
        # (or the hand-off's) says where it stands
        return Verdict(reprotect=True)
    if live.peer and live.peer != secondary:
        # the agent never took up the secondary Nova chose (its protect
        # failed: the driver's status says why); its reason is about an
        # older peer
        return Verdict(release=secondary, reprotect=True)
    why = live.reason or live.error or f'the agent runs it {live.state}'
    return Verdict(status=lost_status(secondary, why), release=secondary,
                   reprotect=True)
