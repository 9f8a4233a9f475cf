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
import threading
import time
from collections.abc import Callable
from typing import Optional

STALE_PREFIX = 'mftvm-stale'


class FenceError(Exception):
    """The coordination backend could not answer; ownership is unknown."""


class FenceLost(FenceError):
    """The backend answered: the ownership is not (or no longer) ours."""


class Fence(abc.ABC):
    """The ownership of one guest."""

    #: seconds the ownership lasts without renewal (inf: until death)
    lease: float = math.inf

    def __init__(self) -> None:
        self._renewed_at: Optional[float] = None

    @abc.abstractmethod
    def _try_once(self) -> bool:
        """One try to win the ownership: True won, False another holds
        it; FenceError if the backend did not answer."""

    def acquire(self, timeout: float) -> bool:
        """Win the ownership within ``timeout`` seconds, or return False."""
        return self._acquire_polling(self._try_once, timeout)

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
        """Record durably that ``pair_id``'s replica may not take over.

        Written only if the ownership is ours *at that moment*, as the
        backend itself checks it (compare-and-set on the owner's token,
        or the kernel's lock): FenceLost if it is not, FenceError if the
        backend did not answer (then nothing is known to be written)."""

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
        deadline = self._now() + timeout
        while True:
            sent = self._now()
            try:
                won = try_once()
            except FenceError:
                won = False
            if won:
                self._renewed_at = sent
                return True
            if self._now() > deadline:
                return False
            self._pause(self.ACQUIRE_RETRY_S)

    def contend(self, held_for: float,
                cancelled: Optional[threading.Event] = None,
                on_unreachable: Optional[Callable[[str], None]] = None
                ) -> bool:
        """Win the ownership, for as long as it is undecided.

        True once won. False once the backend has answered "another
        holds it" for ``held_for`` seconds in a row (longer than a lease:
        its holder keeps renewing, so it lives), or once ``cancelled`` is
        set. A backend that does not answer decides nothing: that time
        does not count, and ``on_unreachable(why)`` is told each time.
        """
        held_since: Optional[float] = None
        while cancelled is None or not cancelled.is_set():
            sent = self._now()
            try:
                won = self._try_once()
            except FenceError as exc:
                held_since = None
                if on_unreachable is not None:
                    on_unreachable(str(exc) or type(exc).__name__)
            else:
                if won:
                    self._renewed_at = sent
                    return True
                if held_since is None:
                    held_since = sent
                elif self._now() - held_since >= held_for:
                    return False
            self._pause(self.ACQUIRE_RETRY_S)
        return False

    # The clock, apart so that tests can drive it.
    _now = staticmethod(time.monotonic)
    _pause = staticmethod(time.sleep)

    def renew(self) -> None:
        """Extend the lease; FenceError if that failed or it is lost.

        The lease is counted from the moment the renewal was *sent*, so
        :meth:`deadline` is never later than the backend's own expiry.
        """
        sent = time.monotonic()
        if not self._renew():
            raise FenceLost('the ownership was lost to another host')
        self._renewed_at = sent

    def deadline(self, margin: float) -> float:
        """The monotonic time by which the owner must have stopped its
        guest if no renewal succeeds meanwhile (inf for a file lock)."""
        if math.isinf(self.lease) or self._renewed_at is None:
            return math.inf
        return self._renewed_at + self.lease - margin

    def close(self) -> None:
        """Release the connection to the backend (not the ownership)."""
