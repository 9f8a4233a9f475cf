"""The instance process's control socket: one request, one reply.

A client connects to ``<role>/control.sock``, writes one JSON line (a
:class:`ControlRequest`) and reads one JSON line back (a
:class:`ControlReply`)::

    ControlRequest(op=ControlOp.PROTECT, secondary='tcp:10.0.0.2:4711',
                   pair_id='pair-2').to_dict()
    # {'op': 'protect', 'secondary': 'tcp:10.0.0.2:4711', 'pair_id': ...}
    ControlReply.from_dict({'ok': False, 'error': 'the guest is not ...'})
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Optional

from mftvm_openstack.contract.record import Record, field
from mftvm_openstack.contract.status import InstanceStatus

#: pair ids name a protection (fencing records are keyed by them)
PAIR_ID_PATTERN = r'[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}'


class ControlOp(enum.StrEnum):
    STATUS = 'status'
    #: planned failover (primary), or take over now (standby secondary)
    FAILOVER = 'failover'
    STOP = 'stop'
    #: protect a guest that runs unprotected onto ``secondary``
    PROTECT = 'protect'
    #: drop the secondary, run on unprotected
    UNPROTECT = 'unprotect'


@dataclasses.dataclass(frozen=True)
class ControlRequest(Record):
    op: ControlOp
    #: PROTECT only: the new secondary's data address
    #: (``tcp:HOST:PORT`` or ``unix:PATH``)
    secondary: Optional[str] = field(default=None, max_len=4096)
    pair_id: Optional[str] = field(default=None, pattern=PAIR_ID_PATTERN)


@dataclasses.dataclass(frozen=True)
class ControlReply(Record):
    ok: bool
    error: str = ''
    status: Optional[InstanceStatus] = None
