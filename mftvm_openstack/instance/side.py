"""What both sides of a guest share: the composition of one instance
process around its state machine.

A :class:`Side` reads ``guest.json``, owns its machine
(:mod:`mftvm_openstack.ft.pair`: the only holder of the side's state),
serves the control socket, publishes the status, and, while the guest
runs here, watches it (exit, hang) and keeps its lease. The roles
(:mod:`.primary`, :mod:`.secondary`) add how the guest comes to run
here::

    side = PrimarySide('/var/lib/mftvm/vm0')
    code = await side.run()          # until the side's machine ends
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import socket
import threading
import time
from typing import Any, Optional, Union

from mftvm_openstack import fencing
from mftvm_openstack.contract.control import (
    ControlOp,
    ControlReply,
    ControlRequest,
)
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import (
    UNPROTECTED_BY_REQUEST,
    InstanceStatus,
    Takeover,
)
from mftvm_openstack.files import private_dir
from mftvm_openstack.ft import pair, transport, vm
from mftvm_openstack.ft.monitor import EventStream
from mftvm_openstack.instance.config import load_guest
from mftvm_openstack.instance.control import ControlServer
from mftvm_openstack.instance.guest import Libvirt, RunningGuest, powered_off
from mftvm_openstack.instance.lease import LeaseKeeper
from mftvm_openstack.instance.protection import GuestProtector
from mftvm_openstack.instance.status import StatusPublisher
from mftvm_openstack.instance.watchdog import watch_hang

LOG = logging.getLogger(__name__)

Machine = Union[pair.PrimaryPair, pair.SecondaryPair]


class Side:
    """One side of a protected guest: see the module docstring."""

    role: Role

    def __init__(self, guest_dir: str) -> None:
        # absolute: its socket paths go to the peer (a READY's NBD socket
        # must be absolute), and to libvirt
        guest_dir = os.path.abspath(guest_dir)
        self.guest_dir = guest_dir
        self.spec, self.options = load_guest(guest_dir)
        self.paths = vm.Paths(os.path.join(guest_dir, self.role.value))
        private_dir(self.paths.root)
        self.ram = vm.ram_path(self.spec.name,
                               self.options.ram_tag or self.role.value)
        self.clock = pair.RealClock()
        self.libvirt = Libvirt(self.options.libvirt_uri)
        #: the guest, while it runs on this side
        self.guest: Optional[RunningGuest] = None
        #: the guest's fence, while this side holds (or held) it
        self.fence: Optional[fencing.Fence] = None
        #: renews the fence from the moment it is won (keep_lease)
        self._keeping: Optional[asyncio.Task[None]] = None
        #: why the lease was lost before a primary machine ran here
        self.lease_lost = ''
        self.protector = GuestProtector(self.spec, self.options,
                                        self.paths, lambda: self.guest,
                                        lambda: self.fence)
        #: the disk files the guest runs on here, (path, format)
        self.disk_layers: list[tuple[str, str]] = []
        #: and those of its other disks (disk1, ...)
        self.more_disk_layers: list[list[tuple[str, str]]] = []
        #: secondary: where it listens for its primary
        self.listen = ''
        #: CLOCK_MONOTONIC stamps of a takeover
        self.takeover: Optional[Takeover] = None
        #: a stop was asked for: a machine that comes later stops too
        self.stop_requested = False
        #: the same, for what waits in a thread (a fence being contended)
        self.stopping = threading.Event()
        #: this side's state machine: the secondary's hands over to a
        #: primary's once it took over (see :mod:`.secondary`)
        self.machine: Machine = self.new_machine()
        self.control = ControlServer(
            os.path.join(self.paths.root, 'control.sock'), self.command)
        self.publisher = StatusPublisher(
            self.paths.root, self.status, lambda: self.machine.stats.pauses_ms)
        self._publishing: Optional[asyncio.Task[None]] = None
        self._running: Optional[asyncio.Task[None]] = None
        #: the state the last status showed, and since when (time.time())
        self._state_seen: Optional[tuple[State, float]] = None

    def new_machine(self) -> Machine:
        raise NotImplementedError

    def primary_machine(self, **kwargs: Any) -> pair.PrimaryPair:
        """A machine for the guest running here, as the options say."""
        opts = self.options
        return pair.PrimaryPair(
            protector=self.protector, clock=self.clock,
            epoch_ms=opts.epoch_ms,
            idle_epoch_ms=opts.idle_epoch_ms,
            heartbeat_interval=opts.heartbeat_interval,
            **self.bounds(), **kwargs)

    def bounds(self) -> dict[str, Any]:
        """The primary machine's bounds and epoch policy, as the options
        say."""
        opts = self.options
        policy = None
        if opts.adaptive_epochs:
            policy = pair.EpochPolicy(
                output_batch_ms=opts.output_batch_ms,
                min_epoch_ms=opts.min_epoch_ms,
                max_pause_percent=opts.max_pause_percent)
        return {'ack_timeout': opts.ack_timeout,
                'max_held_epochs': opts.max_held_epochs,
                'max_held_bytes': opts.max_held_bytes,
                'policy': policy}

    def load_fence(self) -> fencing.Fence:
        opts = self.options
        return fencing.load_fence(
            opts.fence_url, self.spec.name,
            member=f'{opts.member or socket.gethostname()}-{os.getpid()}',
            lease=opts.fence_lease,
            state_dir=opts.fence_dir or self.guest_dir)

    # -- what it says and what it is told --

    def status(self) -> InstanceStatus:
        fence = self.fence
        guest = self.guest
        machine_status = self.machine.status()
        now = time.time()
        # The machines keep no wall clock (theirs is injected, and fake
        # in their tests): the change is noticed here, where every status
        # is taken, at least once per publication.
        if self._state_seen is None or \
                self._state_seen[0] is not machine_status.state:
            self._state_seen = (machine_status.state, now)
        return dataclasses.replace(
            machine_status, state_since=self._state_seen[1],
            host_pid=os.getpid(),
            qemu_pid=guest.process.pid if guest is not None
            and guest.process.running else None,
            disk_layers=tuple(self.disk_layers),
            more_disk_layers=tuple(tuple(chain)
                                   for chain in self.more_disk_layers),
            sync_window=self.protector.sync_window,
            listen=self.listen, takeover=self.takeover,
            lease_held=None if fence is None or fence.lease == float('inf')
            else time.monotonic() < fence.deadline(0),
            updated=now)

    async def start_serving(self) -> None:
        await self.control.start()
        self._publishing = asyncio.ensure_future(self.publisher.run())

    def publish_status(self) -> None:
        if self._publishing is not None:
            self._publishing.cancel()
        self.publisher.publish()

    async def command(self, request: ControlRequest) -> ControlReply:
        machine = self.machine
        op = request.op
        if op is ControlOp.STATUS:
            return ControlReply(ok=True, status=self.status())
        if op is ControlOp.STOP:
            self.stop_requested = True
            self.stopping.set()
            machine.post(pair.Stop())
            return ControlReply(ok=True)
        if isinstance(machine, pair.SecondaryPair) and \
                op is ControlOp.FAILOVER:
            if machine.state != State.STANDBY:
                return ControlReply(ok=False, error='this side is not a '
                                    'standby secondary')
            machine.post(pair.Takeover())
            return ControlReply(ok=True)
        if op is ControlOp.PROTECT:
            if not (isinstance(machine, pair.PrimaryPair)
                    and machine.running_unprotected):
                return ControlReply(
                    ok=False, error=f'the guest is {machine.state.value} '
                    f'here; it can be protected only while it runs '
                    f'unprotected')
            if not request.secondary:
                return ControlReply(ok=False, error='protect needs the '
                                    "secondary's address")
            transport.DataAddress.parse(request.secondary)  # ValueError
            machine.post(pair.Protect(request.secondary,
                                      request.pair_id or 'pair-1'))
            return ControlReply(ok=True)
        if not isinstance(machine, pair.PrimaryPair) or \
                machine.state != State.PROTECTED:
            return ControlReply(
                ok=False, error='the guest is not protected' +
                ('' if op is ControlOp.UNPROTECT else
                 ': there is no secondary to fail over to'))
        if op is ControlOp.UNPROTECT:
            machine.post(pair.SecondaryLost(UNPROTECTED_BY_REQUEST))
        else:
            machine.post(pair.Stop(handover=True))
        return ControlReply(ok=True)

    # -- the guest running here --

    def start(self, machine: Machine) -> None:
        """Make ``machine`` this side's and run it."""
        self.machine = machine
        if self.stop_requested:
            machine.post(pair.Stop())
        self._running = asyncio.ensure_future(machine.run())

    def keep_lease(self) -> asyncio.Task[None]:
        """Keep the fence this side just won, while its guest runs here;
        a lease lost fences the side's machine. Called again, the same
        keeper: a secondary starts it the moment it wins the fence, so
        the lease cannot lapse while the guest is being restored, and its
        primary machine takes it over (``lease_lost`` says if it was lost
        before that machine ran)."""
        if self._keeping is not None:
            return self._keeping
        assert self.fence is not None

        def vouched() -> float:
            machine = self.machine
            if isinstance(machine, pair.PrimaryPair):
                return machine.peer_holds_until()
            return float('-inf')

        def lost(why: str) -> None:
            machine = self.machine
            if isinstance(machine, pair.PrimaryPair):
                # Now, not behind a handler that waits on the secondary
                # or the backend: the guest must stop before the lease
                # lapses for everyone.
                machine.interrupt(pair.LeaseLost(why))
            else:
                self.lease_lost = why
        keeper = LeaseKeeper(self.fence, self.spec.name, vouched, lost)
        self._keeping = asyncio.ensure_future(keeper.run())
        return self._keeping

    def stop_keeping_lease(self) -> None:
        if self._keeping is not None:
            self._keeping.cancel()

    async def run_guest(self, machine: pair.PrimaryPair) -> None:
        """Until ``machine`` (whose guest runs here) ends: report the
        guest's exit or hang to it; then stop the guest if it still
        runs."""
        guest = self.guest
        assert guest is not None
        process = guest.process

        async def exit_watch(shutdowns: EventStream) -> None:
            await process.wait()
            if await powered_off(shutdowns):
                machine.post(pair.GuestExited(
                    'the guest powered itself off', by_guest=True))
                return
            machine.post(pair.GuestExited(
                f'QEMU (pid {process.pid}) exited: '
                f'{process.last_log_line()}'))
        # opened before anything can exit: the event cannot slip by
        with guest.monitor.events('SHUTDOWN') as shutdowns:
            helpers = [
                asyncio.ensure_future(exit_watch(shutdowns)),
                asyncio.ensure_future(watch_hang(
                    process, guest.monitor,
                    self.options.hang_timeout,
                    lambda why: machine.post(pair.GuestHung(why))))]
            try:
                await machine.finished.wait()
            finally:
                for task in helpers:
                    task.cancel()
        if process.running:
            await guest.stop()

    async def release_fence(self) -> None:
        """Give the fence back, unless this side fenced itself (then it
        may no longer be ours to give)."""
        fence = self.fence
        if fence is None:
            return
        if self.machine.state != State.FENCED:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(fence.release)
        fence.close()

    async def run(self) -> int:
        raise NotImplementedError
