"""Whether a guest's QEMU is doing anything right now.

A guest that sent a packet is often not done: the rest of its answer, or
the answer a request it just acknowledged asks for, follows once it has
computed or written its disk. :class:`QemuActivity` tells the epoch's
cadence when it has gone quiet: no thread of its QEMU running or waiting
for a CPU (state ``R``, its vCPUs included) nor in an uninterruptible
wait (``D``: a worker flushing the guest's disk write to the host's)::

    activity = QemuActivity(qemu_pid)
    activity.busy()       # True, False, or None (the process is gone)

Threads come and go (QEMU's I/O workers), so each look lists them anew;
a look reads one small ``/proc`` file per thread (tens of microseconds).
"""

from __future__ import annotations

import os
from typing import Optional

#: thread states of a QEMU that is doing something for its guest
BUSY_STATES = frozenset('RD')


def thread_state(stat: str) -> str:
    """The state letter of a ``/proc/PID/task/TID/stat`` line."""
    # after the command name, which may hold spaces and ')'
    return stat.rsplit(')', 1)[1].split(None, 1)[0]


class QemuActivity:
    """Looks at the threads of the QEMU with process id ``pid``."""

    def __init__(self, pid: int, proc: str = '/proc') -> None:
        self.task_dir = os.path.join(proc, str(pid), 'task')

    def busy(self) -> Optional[bool]:
        """Whether any thread is running, waiting for a CPU or for I/O;
        None if the process cannot be read (gone, or no ``/proc``)."""
        try:
            tids = os.listdir(self.task_dir)
        except OSError:
            return None
        for tid in tids:
            try:
                with open(os.path.join(self.task_dir, tid, 'stat')) as f:
                    state = thread_state(f.read())
            except (OSError, IndexError):
                continue        # (the thread ended meanwhile)
            if state in BUSY_STATES:
                return True
        return False
