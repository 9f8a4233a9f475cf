"""The guest as this side runs it: its QEMU, its monitor, what the engine
works on, and how it is started, found in libvirt, and stopped.

A guest runs here in one of three ways: a QEMU of our own (the primary
boots it, or the secondary restores it), or a libvirt domain (Nova's
guest, adopted by the primary or restored by the secondary)::

    guest = await boot(spec, paths, ram)               # our own QEMU
    guest = await Libvirt(uri).adopt('instance-0001',  # libvirt's
                                     instance=nova_instance_uuid)
    guest.process.pid, guest.disk_node, guest.netdev
    await guest.stop()
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
from typing import Any, Optional, Protocol

from mftvm_openstack.contract.options import DEFAULT_ALLOWED_BRIDGES
from mftvm_openstack.ft import (
    capacity,
    domain_policy,
    libvirt_domain,
    libvirt_monitor,
    pair,
    vm,
)
from mftvm_openstack.ft.libvirt_monitor import LibvirtMonitor
from mftvm_openstack.ft.monitor import (
    Event,
    EventStream,
    Monitor,
    MonitorError,
    QMPMonitor,
)


class Domain(Protocol):
    """The parts of a ``libvirt.virDomain`` the instance process uses."""

    def name(self) -> str: ...

    def isActive(self) -> int: ...  # noqa: N802 (libvirt's name)

    def destroy(self) -> int: ...

    def XMLDesc(self, flags: int = 0) -> str: ...  # noqa: N802


class Connection(Protocol):
    """The part of a ``libvirt.virConnect`` the instance process uses."""

    def lookupByName(self, name: str) -> Domain: ...  # noqa: N802


@dataclasses.dataclass
class RunningGuest:
    """A guest that runs on this side, and what the engine works on."""

    process: pair.GuestProcess
    monitor: Monitor
    #: the guest RAM file (the dirty tracker reads it)
    ram: str
    #: the disk node to mirror, and its virtual size in bytes
    disk_node: str
    disk_size: int
    #: the netdev whose output is held until its epoch commits
    netdev: str = 'n0'
    #: the libvirt domain (None: a QEMU of our own)
    domain: Optional[Domain] = None
    #: the guest's other disks (node, size), replicated as the first
    more_disks: list[tuple[str, int]] = dataclasses.field(
        default_factory=list)
    #: the netdevs of its other NICs, their output held as the first's
    more_netdevs: list[str] = dataclasses.field(default_factory=list)

    @property
    def disks(self) -> list[tuple[str, int]]:
        """(node, size) of every disk, the first first."""
        return [(self.disk_node, self.disk_size)] + self.more_disks

    @property
    def netdevs(self) -> list[str]:
        """Every NIC's netdev, the first's first."""
        return [self.netdev] + self.more_netdevs

    async def stop(self) -> None:
        """Stop the guest: destroy its domain, or quit (then kill) QEMU."""
        if self.domain is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.domain.destroy)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.monitor.execute('quit'), 2)
        await self.monitor.close()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.process.wait(), 3)
        await self.process.kill()


#: how long after its QEMU exited the guest's SHUTDOWN event may still be
#: on its way (libvirt passes it on from its own thread)
SHUTDOWN_EVENT_GRACE = 0.5


def is_guest_poweroff(event: Event) -> bool:
    """Whether QEMU's SHUTDOWN ``event`` is the guest powering itself off
    (not a quit, a signal, a reset or a panic)::

        >>> is_guest_poweroff({'event': 'SHUTDOWN', 'data': {
        ...     'guest': True, 'reason': 'guest-shutdown'}})
        True
        >>> is_guest_poweroff({'event': 'SHUTDOWN', 'data': {
        ...     'guest': False, 'reason': 'host-signal'}})
        False
    """
    data = event.get('data')
    return isinstance(data, dict) and data.get('guest') is True and \
        data.get('reason') == 'guest-shutdown'


async def powered_off(shutdowns: EventStream,
                      grace: float = SHUTDOWN_EVENT_GRACE) -> bool:
    """Once the guest's QEMU exited: whether the guest powered itself
    off, by the SHUTDOWN events of ``shutdowns`` (opened while it ran).
    A QEMU that died without one waits ``grace`` seconds here, its
    secondary still hearing from this side meanwhile."""
    try:
        await shutdowns.wait(is_guest_poweroff, timeout=grace)
    except MonitorError:
        return False
    return True


class StartError(Exception):
    """The guest could not be started here; the message says why."""


async def boot(spec: vm.GuestSpec, paths: vm.Paths,
               ram: str) -> RunningGuest:
    """Boot ``spec`` in a QEMU of our own, its RAM in file ``ram``
    (allocated in full first: StartError if it does not fit)."""
    try:
        os.close(capacity.create_ram_file(
            ram, spec.memory_bytes, f'guest {spec.name} RAM (primary)'))
    except capacity.CapacityError as exc:
        raise StartError(str(exc)) from None
    with contextlib.suppress(FileNotFoundError):
        os.unlink(paths.qmp)
    qemu = await vm.ChildProcess.start(vm.qemu_argv(spec, paths, ram),
                                       paths.log)
    try:
        monitor = await QMPMonitor.connect(paths.qmp, 'primary-qemu')
    except Exception:
        await qemu.wait()
        raise StartError(f'QEMU failed to start: {qemu.last_log_line()}') \
            from None
    return own_guest(spec, qemu, monitor, ram)


def own_guest(spec: vm.GuestSpec, qemu: pair.GuestProcess,
              monitor: Monitor, ram: str) -> RunningGuest:
    """The :class:`RunningGuest` of ``spec`` in a QEMU of our own (whose
    command line is :func:`~mftvm_openstack.ft.vm.qemu_argv`'s)."""
    return RunningGuest(
        qemu, monitor, ram, 'disk0', spec.disk_size,
        netdev=vm.netdev_id(0),
        more_disks=[(f'disk{i}', d.size)
                    for i, d in enumerate(spec.disks, 1)],
        more_netdevs=[vm.netdev_id(i)
                      for i in range(1, len(spec.nic_forwards))])


#: a domain whose metadata is in this namespace is a Nova instance's
NOVA_METADATA_NS = domain_policy.NOVA_NS_PREFIX


def _plain_uuid(value: str) -> str:
    return value.replace('-', '').lower()


def check_owner(instance: str, name: str, xml: str) -> None:
    """StartError unless domain ``name`` (``xml`` is its XML) belongs to
    guest ``instance``, so a caller can adopt (and stream to a peer)
    only the guest it names, never another one on the host:

    * a domain Nova defined (it carries Nova's metadata) belongs to the
      Nova instance whose uuid is the domain's uuid: ``instance`` must
      be that uuid (Nova's driver sends it as the spec's name);
    * any other domain: its uuid or its name is ``instance``.
    """
    try:
        root = domain_policy.parse(xml)
    except domain_policy.DomainRefused as exc:
        raise StartError(f'domain {name}: cannot read its XML: {exc}') \
            from None
    uuid = (root.findtext('uuid') or '').strip()
    by_uuid = bool(uuid) and _plain_uuid(uuid) == _plain_uuid(instance)
    nova = any(isinstance(el.tag, str) and
               el.tag.startswith('{' + NOVA_METADATA_NS)
               for el in root.findall('metadata/*'))
    if by_uuid or (not nova and root.findtext('name') == instance):
        return
    owner = f'Nova instance {uuid}' if nova else f'domain {name} ({uuid})'
    raise StartError(f'domain {name} is not instance {instance}\'s own: it '
                     f'belongs to {owner}; refusing to adopt it')


class Libvirt:
    """Libvirt's domains at ``uri``, connected to on first use."""

    def __init__(self, uri: str) -> None:
        self.uri = uri
        self._conn: Optional[Connection] = None

    async def connection(self) -> Any:
        if self._conn is None:
            self._conn = await libvirt_monitor.connect(self.uri)
        return self._conn

    async def lookup(self, name: str) -> Domain:
        """The running domain ``name``."""
        conn = await self.connection()
        try:
            dom = await asyncio.to_thread(conn.lookupByName, name)
            active = await asyncio.to_thread(dom.isActive)
        except Exception as exc:
            raise StartError(f'no domain {name} at {self.uri}: {exc}') \
                from None
        if not active:
            raise StartError(f'domain {name} is not running')
        return dom

    async def adopt(self, name: str, instance: str,
                    spec: Optional[vm.GuestSpec] = None,
                    readonly_dirs: tuple[str, ...] = (),
                    bridges: tuple[str, ...] = DEFAULT_ALLOWED_BRIDGES) \
            -> RunningGuest:
        """Take on the running domain ``name`` of guest ``instance``
        (:func:`check_owner`): its QEMU is libvirt's, the engine drives it
        through libvirt's monitor. With ``spec``, only a domain that a
        secondary would restore (:func:`.libvirt_domain.check_restorable`):
        else StartError, and the domain runs on untouched."""
        dom = await self.lookup(name)
        check_owner(instance, name, await asyncio.to_thread(dom.XMLDesc, 0))
        if spec is not None:
            xml = await asyncio.to_thread(dom.XMLDesc,
                                          libvirt_domain.MIGRATABLE_XML)
            try:
                libvirt_domain.check_restorable(xml, spec, readonly_dirs,
                                                bridges)
            except ValueError as exc:
                raise StartError(
                    f'domain {name} cannot be protected: its secondary '
                    f'would refuse to restore it: {exc}') from None
        try:
            return await self.attach(dom)
        except Exception as exc:
            raise StartError(f'cannot protect libvirt domain {name}: '
                             f'{exc}') from None

    async def attach(self, dom: Domain,
                     monitor: Optional[LibvirtMonitor] = None) \
            -> RunningGuest:
        """Run the engine on domain ``dom`` from now on."""
        if monitor is None:
            monitor = await LibvirtMonitor.for_domain(
                await self.connection(), dom)
        try:
            ram = await libvirt_domain.ram_file(monitor)
            node, size = await libvirt_domain.guest_disk(monitor)
            qemu = await libvirt_domain.DomainProcess.of(monitor, dom.name())
            # From now on, the guest dies with this process, as a QEMU of
            # our own would: nobody else fences it if we die alone.
            await qemu.start_guard()
        except BaseException:
            await monitor.close()
            raise
        return RunningGuest(qemu, monitor, ram, node, size,
                            libvirt_domain.NETDEV, dom)
