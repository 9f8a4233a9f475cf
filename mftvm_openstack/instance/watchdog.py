"""The hang watchdog: a QEMU that stops answering is as good as dead.

QEMU 7.2 can wedge (e.g. its NBD client waiting on a frozen peer) with
its process alive, so its exit never comes. The watchdog asks its
monitor every second; when an answer takes longer than ``timeout`` it
reports the hang and kills the QEMU, so that the secondary takes over
(and the wedged copy can never wake up beside the restored one)::

    await watch_hang(guest.process, guest.monitor, 15.0,
                     lambda why: machine.post(pair.GuestHung(why)))
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mftvm_openstack.ft import pair
from mftvm_openstack.ft.monitor import Monitor

LOG = logging.getLogger(__name__)

#: how often the monitor is asked
INTERVAL = 1.0


async def watch_hang(process: pair.GuestProcess, monitor: Monitor,
                     timeout: float, on_hang: Callable[[str], None]) -> None:
    """Until QEMU exits, or hangs: then ``on_hang(why)``, and kill it.

    It kills the QEMU itself rather than leave that to whoever hears of
    the hang: a checkpoint waiting on the wedged monitor may keep them
    busy until the QEMU is gone."""
    while process.running:
        try:
            await asyncio.wait_for(monitor.execute('query-status'), timeout)
        except TimeoutError:
            LOG.error('QEMU (pid %d) has not answered for %.0fs: '
                      'killing it', process.pid, timeout)
            on_hang(f'QEMU hung (no answer for {timeout:.0f}s)')
            await process.kill()
            return
        except Exception:
            return      # the monitor is gone: QEMU exited
        await asyncio.sleep(INTERVAL)
