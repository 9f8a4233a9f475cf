"""Talking to a running instance process from outside it.

An instance process (:mod:`mftvm_openstack.instance`) publishes its
:class:`~mftvm_openstack.contract.status.InstanceStatus` to
``<guest-dir>/<role>/status.json`` and answers one
:class:`~mftvm_openstack.contract.control.ControlRequest` per connection
on ``<guest-dir>/<role>/control.sock``. The local CLI and the agent both
use these helpers; what they read is checked against the contract::

    st = status_of(gdir, Role.PRIMARY)     # InstanceStatus, or None
    st.state is State.PROTECTED and st.alive
    read_status(gdir, Role.PRIMARY)        # the same as a dict
    control(gdir, Role.PRIMARY, ControlRequest(op=ControlOp.STATUS))
    # ControlReply(ok=True, error='', status=InstanceStatus(...))
    pid_alive(1234)                        # False once gone or a zombie
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from typing import Any, Optional

from mftvm_openstack.contract.control import ControlReply, ControlRequest
from mftvm_openstack.contract.status import InstanceStatus

#: the longest control reply read (replies are a few hundred bytes)
MAX_REPLY = 1 << 20


def status_of(gdir: str, role: str) -> Optional[InstanceStatus]:
    """The last status a side published (None: none yet), with ``alive``
    saying whether its process still runs. A status that does not fit
    the contract raises ContractError: producer and consumer disagree."""
    try:
        with open(os.path.join(gdir, role, 'status.json')) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    status = InstanceStatus.from_dict(data, 'status.json')
    return dataclasses.replace(status, alive=pid_alive(status.host_pid))


def read_status(gdir: str, role: str) -> Optional[dict[str, Any]]:
    """:func:`status_of` as a JSON object (the contract's keys)."""
    status = status_of(gdir, role)
    return None if status is None else status.to_dict()


def pid_alive(pid: Any) -> bool:
    """Whether ``pid`` names a process that runs (:func:`pid_exited`
    says when one does not)."""
    return isinstance(pid, int) and not isinstance(pid, bool) and \
        pid > 0 and not pid_exited(pid)


def pid_exited(pid: int) -> bool:
    """Whether ``pid`` runs no more: gone, or a zombie. A zombie holds
    no file, port or memory any more; only its parent has yet to reap
    it (which a dead parent's heir, or a frozen parent, may do late)."""
    try:
        with open(f'/proc/{pid}/stat', 'rb') as f:
            stat = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return True
    # the state follows the command name, which may hold ')' itself
    state = stat[stat.rfind(b')') + 2:][:1]
    return state in (b'Z', b'X', b'x')


def control(gdir: str, role: str, request: ControlRequest,
            timeout: float = 60.0) -> ControlReply:
    """Send one control request to a side and read its reply.

    ConnectionError (an OSError) if the side is gone or closes without
    a reply; ContractError (a ValueError) if the reply does not fit.
    """
    path = os.path.join(gdir, role, 'control.sock')
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps(request.to_dict()).encode() + b'\n')
        data = b''
        while not data.endswith(b'\n') and len(data) <= MAX_REPLY:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    if len(data) > MAX_REPLY:
        raise ConnectionError(f'{path}: a reply over {MAX_REPLY} bytes')
    if not data.strip():
        raise ConnectionError(f'{path}: closed without a reply')
    return ControlReply.from_dict(json.loads(data), 'control reply')
