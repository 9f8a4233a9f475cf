"""The secondary side: keep the replica; on loss of the primary, run the
guest.

It listens on its data address (``guest.json``'s ``listen``, by default
``secondary/data.sock``) for one primary, whose HELLO its machine
(:class:`~mftvm_openstack.ft.pair.SecondaryPair`) checks; this side then
prepares the replica (RAM file, epoch overlay store served over NBD).
When the primary is lost it fences, checks the replica is not stale,
restores the guest, and from then on runs it as a primary does: its
machine hands over to a :class:`~mftvm_openstack.ft.pair.PrimaryPair`
that starts in ACTIVE (and can be protected again)::

    python -m mftvm_openstack.instance secondary /var/lib/mftvm/vm0
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from typing import Optional

from mftvm_openstack import fencing
from mftvm_openstack.contract.hello import Hello, NbdTargetInfo
from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import Takeover
from mftvm_openstack.ft import (
    capacity,
    epoch,
    libvirt_domain,
    pair,
    pair_tls,
    transport,
)
from mftvm_openstack.ft import disk as ft_disk
from mftvm_openstack.ft import disks as ft_disks
from mftvm_openstack.instance.client import pid_exited
from mftvm_openstack.instance.config import boot_id, free_port, tls_dir
from mftvm_openstack.instance.guest import RunningGuest, own_guest
from mftvm_openstack.instance.side import Side
from mftvm_openstack.waiting import async_wait_until

LOG = logging.getLogger(__name__)

#: how long a restore on the primary's machine waits for the dead
#: primary's QEMU to be gone (and to have released its ports)
PRIMARY_GONE_TIMEOUT = 5.0
#: how long an old primary's QEMU may take to die with its host before it
#: counts as running on (its host frozen, not dead)
OLD_PRIMARY_GRACE = 1.0


def pid_exists(pid: int) -> bool:
    """Whether ``pid`` names a process, a zombie included."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def runs_guest(pid: int, name: str) -> bool:
    """Whether ``pid`` is a QEMU running guest ``name`` (not a process
    that reused the pid)."""
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            argv = f.read().split(b'\0')
    except OSError:
        return False
    token = name.encode()
    return any(b'qemu' in a for a in argv[:1]) and any(
        a == token or a.startswith(b'guest=' + token + b',')
        or a == b'guest=' + token for a in argv)


async def stop_old_primary(pid: int, name: str, timeout: float,
                           reaped: bool = False) -> None:
    """On one machine, once we own the guest: the old primary's QEMU
    (``pid``, guest ``name``) must not run on, nor hold its ports.

    When its host died, it dies with it (``PR_SET_PDEATHSIG``) within
    moments; a host that is only frozen (SIGSTOP) leaves it running, and
    then it is killed here. Waits, within ``timeout``, until it has
    exited (a zombie holds no port) and, if ``reaped``, been reaped too
    (libvirtd must be done with a domain's QEMU before the name is
    free)."""
    if not await async_wait_until(lambda: pid_exited(pid),
                                  OLD_PRIMARY_GRACE, interval=0.01) \
            and runs_guest(pid, name):
        LOG.warning('the old primary QEMU (pid %d) still runs while we '
                    'own the guest: killing it', pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    await async_wait_until(lambda: pid_exited(pid), timeout, interval=0.01)
    if reaped:
        await wait_pid_gone(pid, timeout)


async def wait_pid_gone(pid: int, timeout: float) -> bool:
    """Whether process ``pid`` (not our child) is gone within ``timeout``.

    Gone means reaped, not just exited: its parent (libvirtd, for a
    domain) is done with it then. Its pidfd would say when it exits;
    nothing says when it is reaped, so this polls."""
    return await async_wait_until(lambda: not pid_exists(pid), timeout,
                                  interval=0.01)


class SecondarySide(Side):

    role = Role.SECONDARY

    def __init__(self, guest_dir: str) -> None:
        self.replica: Optional[epoch.ReplicaImage] = None
        self.store: Optional[ft_disk.EpochOverlayStore
                             | ft_disks.ReplicaDisks] = None
        super().__init__(guest_dir)

    def new_machine(self) -> pair.SecondaryPair:
        return pair.SecondaryPair(
            prepare=self.prepare, activate=self.activate, clock=self.clock,
            detect_timeout=self.options.detect_timeout,
            vouches=not fencing.dies_with_holder(self.options.fence_url),
            boot_dir=os.path.join(self.paths.root, 'boot'))

    @property
    def secondary(self) -> pair.SecondaryPair:
        assert isinstance(self.machine, pair.SecondaryPair)
        return self.machine

    def listen_address(self) -> transport.DataAddress:
        listen = self.options.listen
        if not listen:
            return transport.DataAddress(path=os.path.join(
                self.paths.root, 'data.sock'))
        addr = transport.DataAddress.parse(listen)
        if addr.path is None and addr.port == 0:
            assert addr.host is not None
            addr = transport.DataAddress(host=addr.host,
                                         port=free_port(addr.host))
        return addr

    async def run(self) -> int:
        machine = self.secondary
        self.start(machine)
        await self.start_serving()
        addr = self.listen_address()
        if addr.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(addr.path)

        async def on_connect(channel: transport.Channel) -> None:
            machine.post(pair.Connected(channel))
        # A frame from a primary frozen mid-way is a lost primary: no
        # byte of it for the detection time breaks the stream.
        server = await transport.serve(
            addr, on_connect, tls=self.data_tls(),
            stall_timeout=self.options.detect_timeout)
        self.listen = str(addr)
        machine.post(pair.Listening())
        try:
            await machine.finished.wait()
        finally:
            server.close()
        if machine.state == State.ACTIVE and self.guest is not None:
            # We are the primary now, unprotected until a protect op.
            primary = pair.PrimaryPair.took_over(
                machine, self.guest.process, self.guest.monitor,
                protector=self.protector, clock=self.clock,
                epoch_ms=self.options.epoch_ms,
                idle_epoch_ms=self.options.idle_epoch_ms,
                heartbeat_interval=self.options.heartbeat_interval,
                **self.bounds())
            self.start(primary)
            keeping = self.keep_lease()     # (running since the fence)
            if self.lease_lost:
                primary.interrupt(pair.LeaseLost(self.lease_lost))
            try:
                await self.run_guest(primary)
            finally:
                keeping.cancel()
                await self.release_fence()
        else:
            if self.store is not None:
                await self.store.stop()      # removes the disk replica
            if self.replica is not None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.replica.devstate_path)
            self.stop_keeping_lease()
            if self.fence is not None:
                self.fence.close()
        if self.replica is not None:
            self.replica.close()
        # The replica (or, after a takeover, the guest's RAM; its QEMU
        # dies with this process) would otherwise hold host memory in
        # /dev/shm after the guest is gone.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.ram)
        return 0

    @property
    def tls_dir(self) -> Optional[str]:
        """This side's pair credentials; None: TLS is switched off."""
        if not self.options.tls:
            return None
        return tls_dir(self.guest_dir, self.role.value)

    def data_tls(self) -> Optional[transport.ServerTls]:
        """Mutual TLS for the data stream: only the pair's primary (its
        certificate, of the pair's CA, in the primary's name) gets
        through to the machine; anyone else is dropped and logged."""
        directory = self.tls_dir
        if directory is None:
            return None
        key = pair_tls.read_pair_key(directory)

        def check(cert: dict[str, object]) -> Optional[str]:
            if pair_tls.peer_is_client(cert, key):
                return None
            return (f'certificate {pair_tls.peer_common_name(cert)!r} '
                    f'is not this pair\'s primary')
        return transport.ServerTls(pair_tls.server_context(directory),
                                   check)

    async def prepare(self, hello: Hello) -> pair.Prepared:
        """The replica and the disk store for the primary that said
        ``hello``."""
        if self.replica is not None:
            # from a primary refused after all (its READY was not sent)
            self.replica.close()
            self.replica = None
        disk_dir = ft_disks.replica_dir(self.paths.root, 0)
        sizes = hello.disk_sizes()      # (ContractError: refused)
        disk_size = sizes[0] = hello.disk_size or self.spec.disk_size
        if not self.spec.domain and len(sizes) != len(self.spec.all_disks):
            # The restore runs this host's spec: one replica per disk.
            raise ContractError(
                f'HELLO.disks: the primary names {len(sizes)} disks, the '
                f'guest has {len(self.spec.all_disks)}')
        name = self.spec.name
        # The RAM file is allocated in full as it is made (so a full
        # tmpfs is this refusal, never a SIGBUS later); the disk replica
        # grows as the guest writes, so its room is checked here (all
        # the disks' replicas are on one filesystem).
        capacity.check([capacity.Need(
            disk_dir, sum(capacity.replica_disk_bytes(size)
                          for size in sizes),
            f'guest {name} disk replica' + ('s' if len(sizes) > 1
                                            else ''))])
        replica = epoch.ReplicaImage(
            self.ram, self.spec.memory_bytes, self.paths.root,
            f'guest {name} RAM (secondary replica)')
        nbd_host = self.options.nbd_host
        directory = self.tls_dir
        tls = None if directory is None else ft_disk.NbdServerTls(
            directory, pair_tls.client_dn(pair_tls.read_pair_key(directory)))
        listen = (nbd_host, free_port(nbd_host)) if nbd_host else None
        store: ft_disk.EpochOverlayStore | ft_disks.ReplicaDisks
        if len(sizes) == 1:
            store = ft_disk.EpochOverlayStore(disk_dir, disk_size,
                                              listen=listen, tls=tls)
            target = await store.start()
            exports: tuple[str, ...] = ()
        else:
            # One qsd and NBD server, an export per disk.
            store = ft_disks.ReplicaDisks(self.paths.root, sizes,
                                          listen=listen, tls=tls)
            targets = await store.start()
            target = targets[0]
            exports = tuple(t.export for t in targets[1:])
        self.replica, self.store = replica, store
        return pair.Prepared(replica, store, NbdTargetInfo(
            socket=target.socket, host=target.host, port=target.port,
            export=target.export), exports)

    async def activate(self, committed: int) -> None:
        """Fence, then restore the guest from epoch ``committed``."""
        hello = self.secondary.hello
        assert hello is not None and self.store is not None \
            and self.replica is not None
        detected = time.monotonic()
        self.takeover = Takeover(detected=detected)
        if isinstance(self.store, ft_disks.ReplicaDisks):
            chains = await self.store.failover_layers(committed)
            layers, self.more_disk_layers = chains[0], chains[1:]
        else:
            layers = await self.store.failover_layers(committed)
        self.disk_layers = layers
        fence = self.load_fence()
        try:
            await self._win_fence(fence, hello.pair_id)
        except BaseException:
            fence.close()
            raise
        self.fence = fence
        # Renew from now on: a restore may take longer than a lease.
        self.keep_lease()
        fenced = time.monotonic()
        self.takeover = Takeover(detected=detected, fenced=fenced)
        if hello.boot_id == boot_id():
            # Same machine: let the dead primary's QEMU release its ports
            # (and stop one whose host is frozen, not dead). A QEMU of
            # ours released them when it exited (whoever inherits the
            # zombie may reap it late); a domain's, once libvirtd is done
            # with it.
            await stop_old_primary(hello.qemu_pid,
                                   self.spec.domain or self.spec.name,
                                   PRIMARY_GONE_TIMEOUT,
                                   reaped=bool(self.spec.domain))
        if self.lease_lost:
            raise RuntimeError(f'the fence was lost before the guest was '
                               f'restored ({self.lease_lost}); not starting '
                               f'it')
        self.guest = await self._restore(layers, hello)
        self.takeover = Takeover(detected=detected, fenced=fenced,
                                 resumed=time.monotonic())

    async def _win_fence(self, fence: fencing.Fence, pair_id: str) -> None:
        """Own the guest, and know the replica current, or raise.

        Retried for as long as it is undecided: a backend that does not
        answer is no held lock (the primary may be dead), and the replica
        (its store and RAM image) stays until the fence decides. Only a
        backend that says "held" for longer than a lease (its holder
        renews it: the primary lives), a stale mark, or a stop asked by
        an operator ends it; meanwhile the status says what it waits
        for."""
        machine = self.secondary
        loop = asyncio.get_running_loop()

        said = ['']

        def waiting(why: str) -> None:
            if why != said[0]:      # (tried every 50 ms: say news only)
                said[0] = why
                loop.call_soon_threadsafe(setattr, machine, 'error',
                                          f'waiting for the fence: {why}')
        held_for = self.options.fence_acquire_timeout
        if fence.lease != float('inf'):
            held_for = max(held_for, 2 * fence.lease)
        while True:
            won = await asyncio.to_thread(fence.contend, held_for,
                                          self.stopping, waiting)
            if not won:
                if self.stopping.is_set():
                    raise RuntimeError('stopped while waiting for the '
                                       'fence; the replica is discarded')
                raise RuntimeError('fencing failed: the primary still '
                                   'holds the guest; not starting a '
                                   'second copy')
            try:
                valid, why = await asyncio.to_thread(fence.replica_valid,
                                                     pair_id)
            except fencing.FenceError as exc:
                # Unknown is not stale: give the lease back (it lapses
                # anyway) and ask again.
                waiting(f'reading the replica mark: {exc}')
                await asyncio.to_thread(fence.release)
                continue
            break
        machine.error = ''
        if not valid:
            # The primary ran on after dropping us: resuming this replica
            # would take back what its clients have seen since.
            await asyncio.to_thread(fence.release)
            raise RuntimeError(f'the replica is stale ({why}); not '
                               f'resuming it')

    async def _restore(self, layers: list[tuple[str, str]],
                       hello: Hello) -> RunningGuest:
        assert self.replica is not None
        if self.spec.domain:
            name = self.options.domain_name or self.spec.domain
            # hello.domain_xml came off the wire: restore() starts only
            # what ft.domain_policy rebuilds from it
            dom, monitor = await libvirt_domain.restore(
                await self.libvirt.connection(), self.spec,
                self.paths.serial, self.ram, self.replica.devstate_path,
                layers, name=name, xml=hello.domain_xml,
                readonly_dirs=(self.guest_dir,),
                bridges=self.options.allowed_bridges,
                boot_files=self.secondary.boot_files,
                disk_chains=[layers, *self.more_disk_layers])
            return await self.libvirt.attach(dom, monitor)
        qemu, qmp = await epoch.restore(
            self.spec, self.paths, self.ram, self.replica.devstate_path,
            layers, disk_chains=[layers, *self.more_disk_layers])
        return own_guest(self.spec, qemu, qmp, self.ram)
