"""The lease keeper: hold the guest's fence while the guest runs here.

Whoever runs the guest holds its fence (a lock file on one machine, a
tooz lease across machines) and renews it; when it can no longer prove
that it owns the guest, it must stop the guest itself, before another
host may start it. The guest may run while either holds: our lease
(renewed every lease/4, in a thread, so a busy event loop cannot let it
lapse; tried again at once after a failed renewal), or the secondary's
word that it still hears us (``vouched``: echoed heartbeats, see
``PrimaryPair.peer_holds_until``). So a lost
coordination backend alone stops nothing, and a host cut off from both
stops its guest in time::

    keeper = LeaseKeeper(fence, 'vm0', machine.peer_holds_until,
                         lambda why: machine.post(pair.LeaseLost(why)))
    await keeper.run()        # returns once it reported the lease lost
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from mftvm_openstack import fencing
from mftvm_openstack.waiting import async_wait_until

LOG = logging.getLogger(__name__)

#: a primary that lives on the secondary's word stops this long before
#: the secondary could declare it lost
ECHO_MARGIN = 0.3

#: after a renewal that failed, the next try comes this soon (not a
#: quarter lease later): one slow answer from the backend must not use
#: up the time left before the guest has to stop
RETRY_AFTER_FAILURE = 0.05


def fence_margin(lease: float) -> float:
    """How long before its lease would lapse a holder stops its guest:
    a quarter of the lease, within 0.25-0.75 s."""
    return min(0.75, max(0.25, lease / 4))


class LeaseKeeper:
    """Renews ``fence`` and reports (``on_lost(why)``) when the guest
    named ``name`` must stop here; ``vouched()`` is until when (on
    CLOCK_MONOTONIC) the secondary vouches for us, -inf if it does not."""

    def __init__(self, fence: fencing.Fence, name: str,
                 vouched: Callable[[], float],
                 on_lost: Callable[[str], None]) -> None:
        self.fence = fence
        self.name = name
        self.vouched = vouched
        self.on_lost = on_lost
        self._lost_to_another = False

    def may_run_until(self) -> float:
        until = self.fence.deadline(fence_margin(self.fence.lease))
        return max(until, self.vouched() - ECHO_MARGIN)

    async def run(self) -> None:
        fence = self.fence
        if fence.lease == float('inf'):
            return      # a lock file: held until released
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew_forever, args=(stop,),
                                   daemon=True, name='lease-renewal')
        renewer.start()
        try:
            # No event says "the lease ran out": look every 50 ms.
            await async_wait_until(
                lambda: self._lost_to_another
                or time.monotonic() > self.may_run_until(),
                timeout=float('inf'))
        finally:
            stop.set()
        if self._lost_to_another:
            self.on_lost('another host owns the guest')
        else:
            self.on_lost('ownership could not be renewed within its lease, '
                         'and the secondary no longer vouches for us')

    def _renew_forever(self, stop: threading.Event) -> None:
        fence = self.fence
        interval = fence.lease / 4
        failing_since: float | None = None
        while not stop.is_set():
            wait = interval
            try:
                fence.renew()
                if failing_since is not None:
                    LOG.warning('ownership of %s renewed again after %.1f s',
                                self.name, time.monotonic() - failing_since)
                failing_since = None
            except Exception as exc:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    LOG.warning('cannot renew ownership of %s: %s', self.name,
                                exc or 'no answer')
                if now > fence.deadline(0):
                    # Lapsed at the backend too: take it back if free.
                    got = fence.reclaim()
                    if got is False:
                        self._lost_to_another = True
                        return
                    if got:
                        LOG.warning('ownership of %s regained', self.name)
                        failing_since = None
                else:
                    # Still ours at the backend: every try counts now.
                    wait = RETRY_AFTER_FAILURE
            stop.wait(wait)
