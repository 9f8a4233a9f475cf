"""A fence for pairs whose two sides share one machine.

The owner holds ``flock`` on ``owner.lock`` in the guest's state
directory; the kernel drops it when the holder dies, so the lease never
lapses while the holder lives and ends the instant it does. Stale marks
live beside it in ``replica.json``::

    fence = FileFence('/var/lib/mftvm/vm0')
    fence.acquire(timeout=10)
    fence.mark_stale('pair-1', 'the secondary was lost')
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from typing import Any, Optional

from mftvm_openstack.fencing.base import Fence, FenceLost


class FileFence(Fence):
    """A lock file: one holder per machine; replica marks in a JSON file."""

    def __init__(self, state_dir: str) -> None:
        super().__init__()
        self.path = os.path.join(state_dir, 'owner.lock')
        self.record_path = os.path.join(state_dir, 'replica.json')
        self._fd: Optional[int] = None

    def _try_once(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def acquire(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self._try_once():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _renew(self) -> bool:
        return self._fd is not None

    def reclaim(self) -> Optional[bool]:
        return self._fd is not None or self._try_once()

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _records(self) -> dict[str, Any]:
        try:
            with open(self.record_path) as f:
                data = json.load(f)
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def mark_stale(self, pair_id: str, reason: str) -> None:
        if self._fd is None:
            # The lock is the kernel's: held while this descriptor is open.
            raise FenceLost('only the owner may mark a replica stale')
        records = self._records()
        records[pair_id] = reason
        tmp = f'{self.record_path}.{os.getpid()}.tmp'
        with open(tmp, 'w') as f:
            json.dump(records, f)
            f.flush()
            # Durable before any output that depends on it leaves.
            os.fsync(f.fileno())
        os.replace(tmp, self.record_path)

    def replica_valid(self, pair_id: str) -> tuple[bool, str]:
        reason = self._records().get(pair_id)
        return (reason is None, reason or '')
