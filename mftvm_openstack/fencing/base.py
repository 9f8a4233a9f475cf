"""The fence's contract: ownership of one guest as a lease.

Every backend implements :class:`Fence`; :meth:`Fence.renew` and
:meth:`Fence.deadline` turn its answers into the one number a running
guest obeys::

    fence.renew()                      # FenceError: not confirmed
    stop_by = fence.deadline(margin=0.5)
    # no renewal succeeds before stop_by: stop the guest by then
"""

from __future__ import annotations

import abc
import math
import time
from collections.abc import Callable
from typing import Optional

STALE_PREFIX = 'mftvm-stale'


class FenceError(Exception):
    """The coordination backend could not answer; ownership is unknown."""


class Fence(abc.ABC):
    """The ownership of one guest."""

    #: seconds the ownership lasts without renewal (inf: until death)
    lease: float = math.inf

    def __init__(self) -> None:
        self._renewed_at: Optional[float] = None

    @abc.abstractmethod
    def acquire(self, timeout: float) -> bool:
        """Win the ownership within ``timeout`` seconds, or return False."""

    @abc.abstractmethod
    def _renew(self) -> bool:
        """Extend the lease; False if it is no longer ours."""

    @abc.abstractmethod
    def release(self) -> None:
        """Give the ownership up (the guest no longer runs here)."""

    @abc.abstractmethod
    def reclaim(self) -> Optional[bool]:
        """After the lease lapsed unrenewed: take it again if it is free.

        True: ours again; False: another holder has it (stop the guest
        now); None: the backend did not answer.
        """

    @abc.abstractmethod
    def mark_stale(self, pair_id: str, reason: str) -> None:
        """Record durably that ``pair_id``'s replica may not take over."""

    @abc.abstractmethod
    def replica_valid(self, pair_id: str) -> tuple[bool, str]:
        """Whether ``pair_id``'s replica may take over, and if not, why."""

    #: how soon a fence that another holds is tried again while acquiring
    ACQUIRE_RETRY_S = 0.05

    def _acquire_polling(self, try_once: Callable[[], bool],
                         timeout: float) -> bool:
        """Call ``try_once`` until it wins the ownership or ``timeout``
        seconds have passed. A backend that does not answer (FenceError)
        wins nothing, and is tried again. The lease counts from when the
        winning try was *sent*."""
        deadline = time.monotonic() + timeout
        while True:
            sent = time.monotonic()
            try:
                won = try_once()
            except FenceError:
                won = False
            if won:
                self._renewed_at = sent
                return True
            if time.monotonic() > deadline:
                return False
            time.sleep(self.ACQUIRE_RETRY_S)

    def renew(self) -> None:
        """Extend the lease; FenceError if that failed or it is lost.

        The lease is counted from the moment the renewal was *sent*, so
        :meth:`deadline` is never later than the backend's own expiry.
        """
        sent = time.monotonic()
        if not self._renew():
            raise FenceError('the ownership was lost to another host')
        self._renewed_at = sent

    def deadline(self, margin: float) -> float:
        """The monotonic time by which the owner must have stopped its
        guest if no renewal succeeds meanwhile (inf for a file lock)."""
        if math.isinf(self.lease) or self._renewed_at is None:
            return math.inf
        return self._renewed_at + self.lease - margin

    def close(self) -> None:
        """Release the connection to the backend (not the ownership)."""
