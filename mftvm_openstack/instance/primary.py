"""The primary side: boot (or adopt) the guest and run it, protected.

It wins the guest's fence first (briefly: at boot the guest must not run
anywhere), boots a QEMU of its own or adopts the libvirt domain the spec
names, and protects the guest onto the secondary that ``guest.json``
names (by default the ``secondary/data.sock`` beside it). Its machine
(:class:`~mftvm_openstack.ft.pair.PrimaryPair`) runs from process start
(STARTING) to STOPPED, FAILED or FENCED::

    python -m mftvm_openstack.instance primary /var/lib/mftvm/vm0
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.ft import pair
from mftvm_openstack.instance import guest as guests
from mftvm_openstack.instance.side import Side

LOG = logging.getLogger(__name__)


class PrimarySide(Side):

    role = Role.PRIMARY

    def new_machine(self) -> pair.PrimaryPair:
        return self.primary_machine()

    @property
    def primary(self) -> pair.PrimaryPair:
        assert isinstance(self.machine, pair.PrimaryPair)
        return self.machine

    async def run(self) -> int:
        machine = self.primary
        self.start(machine)
        self.fence = self.load_fence()
        # Short: at boot the guest must not be running anywhere.
        if not await asyncio.to_thread(self.fence.acquire, 1.0):
            self.fence.close()
            self.fence = None
            return await self._fail(f'another process runs guest '
                                    f'{self.spec.name}; not starting a '
                                    f'second copy')
        keeping = self.keep_lease()
        try:
            await self.start_serving()
            try:
                await self._start_guest()
            except guests.StartError as exc:
                return await self._fail(str(exc))
            await self.run_guest(machine)
        finally:
            keeping.cancel()
            await self.release_fence()
            if not self.spec.domain:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.ram)
        return 0 if machine.state == State.STOPPED else 1

    async def _fail(self, error: str) -> int:
        """The guest cannot start here: the machine ends FAILED."""
        machine = self.primary
        machine.post(pair.GuestFailed(error))
        await machine.finished.wait()
        return 1

    async def _start_guest(self) -> None:
        if self.spec.domain:
            # The secondary restores a read-only image only from its own
            # guest directory: the same rule here, so what it would
            # refuse at failover is refused now.
            self.guest = await self.libvirt.adopt(
                self.spec.domain, instance=self.spec.name, spec=self.spec,
                readonly_dirs=(self.guest_dir,),
                bridges=self.options.allowed_bridges)
        else:
            self.disk_layers = [(self.spec.disk, self.spec.disk_format)]
            self.more_disk_layers = [[(d.path, d.format)]
                                     for d in self.spec.disks]
            self.guest = await guests.boot(self.spec, self.paths, self.ram)
        machine = self.primary
        secondary = self.options.secondary or 'unix:' + os.path.join(
            self.guest_dir, 'secondary', 'data.sock')
        protect = pair.Protect(secondary, self.options.pair_id)
        delay = self.options.start_delay
        if delay:
            # Unprotected meanwhile (tests use it to see that state).
            machine.post(pair.GuestUp(self.guest.process,
                                      self.guest.monitor))
            await asyncio.sleep(delay)
            machine.post(protect)
        else:
            # Straight from STARTING to SYNCING.
            machine.post(protect)
            machine.post(pair.GuestUp(self.guest.process,
                                      self.guest.monitor))
