"""Kill a libvirt domain's QEMU once the process that owns its guest dies.

The engine's own QEMU dies with its host process (``PR_SET_PDEATHSIG``).
A libvirt domain's QEMU is libvirtd's child: if the host process that
protects it died alone (a crash, the OOM killer), the guest would run
on, no longer fenced, while its secondary takes over — two copies. So
the host process starts this guard as its child::

    python -m mftvm_openstack.ft.domain_guard QEMU_PID PARENT_PID

The guard holds a pidfd of the QEMU (a recycled pid is never hit), gets
SIGTERM when its parent dies (``PR_SET_PDEATHSIG``, set before exec by
:meth:`~mftvm_openstack.ft.libvirt_domain.DomainProcess.start_guard`,
which also blocks SIGTERM until the handler below is in place), and
SIGKILLs the QEMU then. It exits by itself once the QEMU is gone, and
prints ``ready`` once it guards.
"""

from __future__ import annotations

import os
import select
import signal
import sys
from types import FrameType
from typing import Optional


def main(argv: Optional[list[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print('usage: domain_guard QEMU_PID PARENT_PID', file=sys.stderr)
        return 2
    qemu_pid, parent = int(args[0]), int(args[1])
    try:
        pidfd = os.pidfd_open(qemu_pid)
    except ProcessLookupError:
        return 0        # nothing left to guard

    def kill_qemu(signum: int = 0, frame: Optional[FrameType] = None) -> None:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os._exit(0)

    signal.signal(signal.SIGTERM, kill_qemu)
    # SIGTERM was blocked from before exec: one sent meanwhile (the
    # parent died while we started) is delivered now, to the handler.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    if os.getppid() != parent:
        kill_qemu()     # the parent died before its death could signal
    print('ready', flush=True)
    select.select([pidfd], [], [])
    return 0


if __name__ == '__main__':
    sys.exit(main())
