"""Talking to the demo guest's workloads from the host.

The guest's counter service answers each TCP request with the next
value; its disk writer prints ``ACK k <hash>`` after record k is on
disk. These helpers are shared by ``mftvm demo``, the functional tests
and the benchmarks::

    value = counter_request('127.0.0.1', 17000)        # -> 42
    acks = serial_acks(open(serial).read())          # [(k, hash), ...]
    last = check_disk_chain(layers)                  # last record index
"""

from __future__ import annotations

import os
import re
import socket
import struct
import tempfile
from collections.abc import Sequence
from typing import Optional

from mftvm_openstack.ft import vm
from mftvm_openstack.images import records

ACK_RE = re.compile(r'^ACK (\d+) ([0-9a-f]{64})\s*$', re.M)
FUTURE_RE = re.compile(r'^FUTURE (\d+)', re.M)
#: the tag of the second disk's writer (the guest's writer2 job)
SECOND_WRITER = 'VDB-'

IOPS_RE = re.compile(r'^IOPS ([0-9.]+) WRITES (\d+) MAXLAT_MS ([0-9.]+)',
                     re.M)
#: printed by the guest's iobench as its timed writes begin
IOBENCH_START = 'IOBENCH-START'


#: SO_LINGER on, zero seconds: close() resets the connection at once
_ABORT = struct.pack('ii', 1, 0)


def counter_request(host: str, port: int,
                    timeout: float = 2.0) -> Optional[int]:
    """One request to the counter service; None if no answer came.

    A request given up on (no answer within ``timeout``) is aborted
    with a reset, never closed: a closed socket's kernel would go on
    sending the request on its own (an orphaned connection, retried for
    minutes), and the guest could count it seconds later, after
    requests that came after it were answered (seen in the cloud lab:
    a value skipped seconds after a failover's or a first checkpoint's
    unanswered requests). So a request counts only if it reached the
    guest before the client gave up on it.
    """
    try:
        with socket.create_connection((host, port), timeout=timeout) as s:
            try:
                s.settimeout(timeout)
                s.sendall(b'INC\n')
                data = b''
                while not data.endswith(b'\n'):
                    chunk = s.recv(64)
                    if not chunk:
                        break
                    data += chunk
            except OSError:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _ABORT)
                raise
    except OSError:
        return None
    text = data.strip()
    return int(text) if text.isdigit() else None


def read_text(path: str) -> str:
    try:
        with open(path, 'rb') as f:
            return f.read().decode(errors='replace')
    except OSError:
        return ''


def serial_acks(text: str, tag: str = '') -> list[tuple[int, str]]:
    """The writer's ACKs (``tag``: the writer tagged so, e.g.
    :data:`SECOND_WRITER`)."""
    pattern = re.compile('^' + re.escape(tag) + ACK_RE.pattern[1:], re.M) \
        if tag else ACK_RE
    return [(int(m.group(1)), m.group(2)) for m in pattern.finditer(text)]


def future_records(text: str, tag: str = '') -> list[int]:
    """Records the writer (tagged ``tag``) found already on disk before
    writing them: after a failover, proof that uncommitted writes
    survived."""
    pattern = re.compile('^' + re.escape(tag) + FUTURE_RE.pattern[1:],
                         re.M) if tag else FUTURE_RE
    return [int(m.group(1)) for m in pattern.finditer(text)]


def disk_records(layers: Sequence[tuple[str, str]]) -> list[records.Record]:
    """The writer records on a disk given as a layer chain."""
    with tempfile.TemporaryDirectory(dir='/var/tmp') as tmp:
        flat = os.path.join(tmp, 'flat.raw')
        vm.flatten(layers, flat)
        return records.read_records(flat)


def check_disk_chain(layers: Sequence[tuple[str, str]]) -> int:
    """Index of the last record; records.ChainError if the chain breaks."""
    return records.verify_chain(disk_records(layers))
