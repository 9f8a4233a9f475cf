"""The storage fence of a shared RBD image: Ceph's OSD blocklist.

The lease says who may *run* a guest; it cannot stop a primary that was
only cut off from still *writing* the guest's volume when its network
comes back, nor a secondary cut off mid-merge. Ceph can: a client on its
OSD blocklist can never write again, wherever it is, and the image's
exclusive lock it held is freed at once (a killed client keeps it ~30 s).
So whoever takes a shared image over (the secondary at failover; the
primary whose secondary was lost, before it merges its buffer into the
image) first blocklists every other client that has it open::

    fence = CephBlocklist('volumes', 'volume-1', user='cinder',
                          keyfile='/etc/mftvm/ceph.key',
                          monitors=['10.0.0.1:6789'])
    ours = fence.watchers()                 # before our own client opens it
    ... our qemu-storage-daemon opens the image ...
    ours = fence.watchers() - ours          # ours: the one that came
    fence.fence_others(keep=ours)           # every other watcher blocklisted

The calls block (they run ``rbd`` and ``ceph``): asyncio callers run them
in a thread. Values reach a command line as separate arguments, never
through a shell; the caller gives checked names (``contract.volume``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
from collections.abc import Callable, Collection, Sequence
from typing import Optional

LOG = logging.getLogger(__name__)

#: a librados client's address as ``rbd status`` prints it
#: (``10.0.0.1:0/3062212283``, ``v1:[::1]:0/42``)
ADDRESS_RE = re.compile(r'^(v[12]:)?(\[[0-9A-Fa-f:.]+\]|[0-9.]{7,15})'
                        r':[0-9]{1,5}/[0-9]{1,20}$')
#: how long one ceph or rbd command may take
TIMEOUT = 30.0

Runner = Callable[[Sequence[str]], str]


class StorageFenceError(Exception):
    """The image's other clients could not be fenced; the message says
    why. The caller must not write the image then."""


def run(argv: Sequence[str]) -> str:
    """Run one command; its stdout, or StorageFenceError."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True,
                              timeout=TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise StorageFenceError(f'{argv[0]}: {exc}') from None
    if done.returncode != 0:
        raise StorageFenceError(f'{" ".join(argv[:3])}: '
                                f'{done.stderr.strip()[-300:]}')
    return done.stdout


class CephBlocklist:
    """Blocklists the clients of one RBD image (see the module)."""

    def __init__(self, pool: str, image: str, *,
                 user: Optional[str] = None, keyfile: Optional[str] = None,
                 monitors: Sequence[str] = (), conf: Optional[str] = None,
                 runner: Runner = run) -> None:
        self.spec = f'{pool}/{image}'
        self.runner = runner
        # No ceph.conf on the host is fine: the monitors and the key are
        # given (the ceph CLI refuses to start without a file to read)
        common = ['--conf', conf or os.devnull]
        if monitors:
            common += ['--mon-host', ','.join(monitors)]
        if user:
            common += ['--id', user]
        if keyfile:
            common += ['--keyfile', keyfile]
        self.common = common

    def watchers(self) -> set[str]:
        """The addresses of the clients that have the image open."""
        out = self.runner(['rbd', *self.common, 'status', '--format',
                           'json', self.spec])
        try:
            found = json.loads(out).get('watchers') or []
        except (ValueError, AttributeError):
            raise StorageFenceError(f'rbd status {self.spec}: not the '
                                    f'JSON expected') from None
        addresses = set()
        for watcher in found:
            address = watcher.get('address') if isinstance(watcher, dict) \
                else None
            if not isinstance(address, str) or not ADDRESS_RE.match(address):
                raise StorageFenceError(f'rbd status {self.spec}: watcher '
                                        f'address {address!r} refused')
            addresses.add(address)
        return addresses

    def fence_others(self, keep: Collection[str]) -> list[str]:
        """Blocklist every client of the image but those in ``keep``;
        return the ones blocklisted. Safe to repeat (an address already
        on the list is added again, which Ceph accepts)."""
        fenced = sorted(self.watchers() - set(keep))
        for address in fenced:
            self.runner(['ceph', *self.common, 'osd', 'blocklist', 'add',
                         address])
            LOG.warning('%s: client %s blocklisted: it can never write '
                        'the image again', self.spec, address)
        return fenced
