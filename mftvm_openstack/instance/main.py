"""``python -m mftvm_openstack.instance ROLE GUEST_DIR``: run one side.

``GUEST_DIR`` is the guest's state directory; it holds ``guest.json``
(the spec and protection options) and one sub-directory per role with
that side's sockets, logs and ``status.json``. The process runs until
its side ends, publishing a last status on the way out::

    python -m mftvm_openstack.instance secondary /var/lib/mftvm/vm0
    python -m mftvm_openstack.instance primary /var/lib/mftvm/vm0

``MFTVM_DEBUG=1`` logs every event; SIGUSR1 logs where each task waits.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Optional

from mftvm_openstack.contract.states import Role
from mftvm_openstack.ft.monitor import quiet_lost_connections
from mftvm_openstack.instance.primary import PrimarySide
from mftvm_openstack.instance.secondary import SecondarySide
from mftvm_openstack.instance.side import Side

LOG = logging.getLogger('mftvm.instance')


def dump_tasks() -> None:
    for task in asyncio.all_tasks():
        frames = task.get_stack()
        where = ' <- '.join(f'{f.f_code.co_name}:{f.f_lineno}'
                            for f in reversed(frames))
        LOG.warning('task %s: %s', task.get_name(), where or 'starting')


async def run_side(role: Role, guest_dir: str) -> int:
    loop = asyncio.get_running_loop()
    quiet_lost_connections(loop)
    loop.add_signal_handler(signal.SIGUSR1, dump_tasks)
    side: Side = (PrimarySide if role is Role.PRIMARY
                  else SecondarySide)(guest_dir)
    try:
        return await side.run()
    finally:
        side.publish_status()   # the last word: how this side ended


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog='mftvm-instance')
    parser.add_argument('role', choices=[r.value for r in Role])
    parser.add_argument('guest_dir')
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if os.environ.get('MFTVM_DEBUG') else logging.INFO,
        stream=sys.stderr,
        format='%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s')
    return asyncio.run(run_side(Role(args.role), args.guest_dir))


if __name__ == '__main__':
    sys.exit(main())
