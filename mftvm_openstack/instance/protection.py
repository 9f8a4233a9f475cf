"""How a guest that runs here is protected onto a secondary.

The primary's state machine (:class:`~mftvm_openstack.ft.pair.PrimaryPair`)
knows the order of things; this is its
:class:`~mftvm_openstack.ft.pair.Protector`, the part that knows this
host: where the secondary is, what the HELLO says about the guest, the
relay and disk sync to the replica, the dirty tracker, the output
buffer, and the fence that marks a dropped replica stale::

    protector = GuestProtector(spec, options, paths, lambda: side.guest,
                               lambda: side.fence)
    machine = pair.PrimaryPair(protector=protector, ...)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import os
import time
from collections.abc import Callable
from typing import Optional

from mftvm_openstack import fencing
from mftvm_openstack.contract.hello import (
    PROTOCOL_VERSION,
    DiskInfo,
    Hello,
    Ready,
)
from mftvm_openstack.contract.options import HostOptions
from mftvm_openstack.contract.spec import disk_name
from mftvm_openstack.ft import (
    boot_files,
    epoch,
    libvirt_domain,
    pair,
    pair_tls,
    trackers,
    transport,
    vm,
)
from mftvm_openstack.ft import disk as ft_disk
from mftvm_openstack.ft import disks as ft_disks
from mftvm_openstack.ft.monitor import MonitorError
from mftvm_openstack.ft.network import OutputBuffer, OutputBuffers
from mftvm_openstack.ft.relay import NbdRelay
from mftvm_openstack.instance.config import boot_id, tls_dir
from mftvm_openstack.instance.guest import RunningGuest

LOG = logging.getLogger(__name__)

#: how long a secondary that does not listen yet is retried
CONNECT_TIMEOUT = 30.0
#: between two retries
CONNECT_RETRY = 0.1
#: between two tries to mark a dropped replica stale
STALE_RETRY = 0.2


class GuestProtector:
    """``pair.Protector`` for the guest this side runs (``guest()``),
    fenced by ``fence()``."""

    def __init__(self, spec: vm.GuestSpec, options: HostOptions,
                 paths: vm.Paths,
                 guest: Callable[[], Optional[RunningGuest]],
                 fence: Callable[[], Optional[fencing.Fence]]) -> None:
        self.spec = spec
        self.options = options
        self.paths = paths
        self._guest = guest
        self._fence = fence
        #: CLOCK_MONOTONIC start and end of the last initial disk sync
        #: (system-wide: tests compare it with their own stamps)
        self.sync_window: tuple[float, ...] = ()
        # names the guest QEMU's TLS creds object of each protection
        self._creds_ids = itertools.count(1)
        # the bytes of the boot files the last HELLO announced
        self._boot_data: list[bytes] = []

    @property
    def tls_dir(self) -> Optional[str]:
        """The primary's pair credentials, rewritten for each new
        secondary; None: TLS is switched off."""
        if not self.options.tls:
            return None
        return tls_dir(os.path.dirname(self.paths.root), 'primary')

    def guest(self) -> RunningGuest:
        guest = self._guest()
        if guest is None:
            raise RuntimeError('the guest does not run here')
        return guest

    async def connect(self, address: str) -> pair.Channel:
        addr = transport.DataAddress.parse(address)
        tls = None
        directory = self.tls_dir
        if directory is not None:
            tls = transport.ClientTls(
                pair_tls.client_context(directory),
                pair_tls.server_name(pair_tls.read_pair_key(directory)))
        deadline = time.monotonic() + CONNECT_TIMEOUT
        while True:
            try:
                return await transport.Channel.connect(
                    addr, tls=tls, stall_timeout=float(
                        self.options.detect_timeout))
            except ConnectionError:
                if time.monotonic() > deadline:
                    raise
                # Nothing announces that a peer starts listening: retry.
                await asyncio.sleep(CONNECT_RETRY)

    async def hello(self, pair_id: str) -> Hello:
        # The secondary sizes its replica from the disk this guest runs on
        # (libvirt's, for a domain), and restores a domain into the same
        # virtual hardware.
        guest = self.guest()
        xml = None
        if guest.domain is not None:
            # Asked anew at each protection: the disk may have moved since
            # the guest came up (after a failover, Nova's driver copies it
            # into its instance directory and pivots: a new node)
            disks = await libvirt_domain.guest_disks(guest.monitor)
            (guest.disk_node, guest.disk_size), *guest.more_disks = disks
            xml = await asyncio.to_thread(guest.domain.XMLDesc,
                                          libvirt_domain.MIGRATABLE_XML)
        # A domain's kernel and initrd are this host's files: the
        # secondary gets copies, read anew (they may have changed).
        shipped = boot_files.named_by(xml) if xml is not None else {}
        data = [await asyncio.to_thread(boot_files.read, path)
                for path in shipped.values()]
        self._boot_data = data
        return Hello(version=PROTOCOL_VERSION, qemu_pid=guest.process.pid,
                     host_pid=os.getpid(), boot_id=boot_id(),
                     pair_id=pair_id, disk_size=guest.disk_size,
                     domain_xml=xml, boot_files=tuple(
                         boot_files.announce(role, content)
                         for role, content in zip(shipped, data)),
                     disks=tuple(
                         DiskInfo(name=disk_name(i), size=size)
                         for i, (_, size) in enumerate(guest.more_disks, 1))
                     or None)

    async def boot_files(self) -> list[bytes]:
        return self._boot_data

    async def link(self, ready: Ready,
                   lost: Callable[[str], None]) -> pair.Link:
        guest = self.guest()
        opts = self.options
        # QEMU reaches the replica through our relay, which cuts it off
        # when it stops answering: QEMU itself would wait for ever.
        relay = NbdRelay(ft_disk.NbdTarget(**ready.target.to_dict()),
                         os.path.join(self.paths.root, 'nbd-relay.sock'),
                         stall_timeout=opts.replica_timeout,
                         on_cut=lost)
        creds: Optional[str] = None
        try:
            target = await relay.start()
            directory = self.tls_dir
            if directory is not None:
                # In-band NBD TLS: the relay passes it through unread.
                creds = f'mftvm-pair-tls{next(self._creds_ids)}'
                await guest.monitor.execute('object-add', **{
                    'qom-type': 'tls-creds-x509', 'id': creds,
                    'dir': directory, 'endpoint': 'client',
                    'verify-peer': True})
                target = dataclasses.replace(
                    target, tls_creds=creds,
                    tls_hostname=pair_tls.server_name(
                        pair_tls.read_pair_key(directory)))
            disks = guest.disks
            exports = ready.exports or ()
            if len(exports) != len(disks) - 1:
                raise ft_disk.DiskError(
                    f'READY: {len(exports)} exports for the '
                    f'{len(disks) - 1} disks after the first')
            sync: ft_disk.DiskSync | ft_disks.DiskSyncs
            if len(disks) == 1:
                sync = ft_disk.load_disk_sync(opts.disk_sync, guest.monitor,
                                              guest.disk_node)
                started = time.monotonic()
                await sync.start(target)
            else:
                # Every disk through the same relay, to its own export.
                sync = ft_disks.DiskSyncs([
                    ft_disk.load_disk_sync(opts.disk_sync, guest.monitor,
                                           node, i)
                    for i, (node, _) in enumerate(disks)])
                started = time.monotonic()
                await sync.start([target] + [
                    dataclasses.replace(target, export=export)
                    for export in exports])
            self.sync_window = (started, time.monotonic())
            tracker = trackers.load_tracker(
                opts.tracker, guest.ram, self.spec.memory_bytes,
                guest.process.pid)
            capturer = epoch.CheckpointCapturer(guest.monitor, tracker,
                                                self.paths.root)
            await capturer.setup()
            if guest.domain is not None:
                # (asked anew, as the disks are at HELLO)
                guest.more_netdevs = (await libvirt_domain.guest_netdevs(
                    guest.monitor, guest.netdev))[1:]
            output: OutputBuffer | OutputBuffers
            if not guest.more_netdevs:
                output = OutputBuffer(self.paths.netout, self.paths.netin,
                                      guest.netdev)
            else:
                output = OutputBuffers([
                    OutputBuffer(self.paths.net_out(i), self.paths.net_in(i),
                                 netdev, index=i)
                    for i, netdev in enumerate(guest.netdevs)])
            await output.attach(guest.monitor)
        except BaseException:
            await relay.close()
            await self._drop_creds(creds)
            raise
        sync.on_failure = lost

        async def close() -> None:
            await relay.close()
            await self._drop_creds(creds)
        return pair.Link(capturer, sync, output, close)

    async def _drop_creds(self, creds: Optional[str]) -> None:
        # Once the replica node is gone nothing uses them; a guest that
        # is gone has none to drop.
        if creds is None:
            return
        guest = self._guest()
        if guest is not None:
            with contextlib.suppress(MonitorError, ConnectionError,
                                     OSError):
                await guest.monitor.execute('object-del', id=creds)

    async def invalidate_replica(self, pair_id: str) -> None:
        # Until this lands, held output stays held: a primary cut off
        # from the backend as well runs into its lease and fences
        # itself, and the replica then is still the truth. The backend
        # writes the mark only while the lease is ours at that moment;
        # once it says the lease is another's, the guest must stop.
        fence = self._fence()
        assert fence is not None
        while True:
            try:
                await asyncio.to_thread(fence.mark_stale, pair_id,
                                        'the primary went on unprotected')
                return
            except fencing.FenceLost as exc:
                raise pair.OwnershipLost(str(exc)) from None
            except Exception as exc:
                LOG.warning('cannot mark the replica stale: %s', exc)
                await asyncio.sleep(STALE_RETRY)

