"""The status publisher: what this side says about itself, on disk.

Every quarter second, and once more as the process ends, the side's
:class:`~mftvm_openstack.contract.status.InstanceStatus` goes to
``<role>/status.json`` (and the pauses of the latest epochs to
``pauses.json``), each replaced in one step, so a reader never sees half
of one::

    publisher = StatusPublisher(paths.root, side.status, side.pauses_ms)
    task = asyncio.ensure_future(publisher.run())
    ...
    publisher.publish()          # the last word: how this side ended
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence

from mftvm_openstack.contract.status import InstanceStatus
from mftvm_openstack.files import write_json_atomic

LOG = logging.getLogger(__name__)

#: seconds between two publications
INTERVAL = 0.25


class StatusPublisher:

    def __init__(self, root: str, status: Callable[[], InstanceStatus],
                 pauses_ms: Callable[[], Sequence[float]]) -> None:
        self.status_path = os.path.join(root, 'status.json')
        self.pauses_path = os.path.join(root, 'pauses.json')
        self.status = status
        self.pauses_ms = pauses_ms

    def publish(self) -> None:
        write_json_atomic(self.status_path, self.status().to_dict())
        pauses = self.pauses_ms()
        if pauses:
            write_json_atomic(self.pauses_path, list(pauses))

    async def run(self) -> None:
        while True:
            try:
                self.publish()
            except Exception:   # a stale status.json would mislead all
                LOG.exception('cannot publish status')
            await asyncio.sleep(INTERVAL)
