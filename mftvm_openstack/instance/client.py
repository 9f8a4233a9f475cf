"""Talking to a running instance process from outside it.

An instance process (:mod:`mftvm_openstack.instance`) publishes its status
to ``<guest-dir>/<role>/status.json`` and answers one JSON request per
connection on ``<guest-dir>/<role>/control.sock``. The local CLI and the
agent both use these helpers::

    read_status(gdir, 'primary')          # last published status, or None
    control(gdir, 'primary', 'status')    # {'ok': True, 'status': {...}}
    pid_alive(1234)
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any, Optional


def read_status(gdir: str, role: str) -> Optional[dict[str, Any]]:
    """The last status a host published, or None. ``alive`` says whether
    its process still runs."""
    try:
        with open(os.path.join(gdir, role, 'status.json')) as f:
            data: dict[str, Any] = json.load(f)
    except (OSError, ValueError):
        return None
    data['alive'] = pid_alive(data.get('host_pid'))
    return data
def pid_alive(pid: Any) -> bool:
    """Whether process ``pid`` runs (a zombie counts as gone)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours (protect --foreground) counts as gone.
    try:
        with open(f'/proc/{pid}/stat') as f:
            return f.read().split(') ')[-1][:1] != 'Z'
    except OSError:
        return False
def control(gdir: str, role: str, op: str, timeout: float = 60.0,
            **args: Any) -> dict[str, Any]:
    """Send one control command (``op`` and its ``args``) to a host;
    ConnectionError if it is gone."""
    path = os.path.join(gdir, role, 'control.sock')
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(json.dumps({'op': op, **args}).encode() + b'\n')
        data = b''
        while not data.endswith(b'\n'):
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    reply: dict[str, Any] = json.loads(data or b'{}')
    return reply
