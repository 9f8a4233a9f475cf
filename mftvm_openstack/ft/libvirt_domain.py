"""Libvirt domain XML for a protected guest.

The libvirt tier runs the primary (and a restored guest) as a libvirt
domain instead of a QEMU of our own. The XML keeps what the engine needs:

* guest RAM in a *shared file* (``<memoryBacking><source type='file'/>
  <access mode='shared'/>``), so a dirty tracker can read it. Libvirt 9
  names the file itself: ``<memory_backing_dir>/<id>-<name>/pc.ram``
  (``memory_backing_dir`` in ``/etc/libvirt/qemu.conf``, default
  ``/var/lib/libvirt/qemu/ram``; the domain id and a name shortened to
  20 characters form the directory, as for every per-domain directory of
  libvirt). :func:`ram_file` finds it once the domain runs: it is the
  ``mem-path`` of QEMU's ``pc.ram`` memory backend, read back from QMP.
* the same virtual hardware on every host, so device state migrates: the
  same XML (machine type pinned, MAC from the spec, no option ROM) gives
  the same QEMU command line everywhere.
* direct kernel boot, a virtio disk, a user-mode NIC (netdev
  ``hostnet0``), the serial port appended to a file, ACPI (the guest
  powers off only with it). Libvirt 9.0 has ``<portForward>`` only for
  the passt backend, so the spec's port forwards are added through the
  monitor once the guest runs (:func:`add_forwards`).
* ``incoming=True`` adds ``-incoming defer`` through
  ``<qemu:commandline>``: start such a domain with
  ``VIR_DOMAIN_START_PAUSED`` and load device state with
  ``migrate-incoming`` through the monitor (see
  :mod:`mftvm_openstack.ft.libvirt_monitor`).

QEMU runs as root without relabelling (``<seclabel model='dac'>``
``+0:+0``) so it can reach the engine's unix sockets and the test files;
a deployment would give it a user and label the files instead.

Example::

    conn = await libvirt_monitor.connect('qemu:///system')
    xml = domain_xml(spec, serial_path='/var/lib/mftvm/vm0/serial.log')
    dom = conn.createXML(xml, 0)
    monitor = await LibvirtMonitor.for_domain(conn, dom)
    ram = await ram_file(monitor)              # for the dirty tracker

    # the other host: a paused domain loads the last committed epoch
    dom, monitor = await restore(conn, spec, serial, replica.ram_file,
                                 replica.devstate_path, [(disk, 'raw')],
                                 name='vm0-b')
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Collection, Mapping, Sequence
from types import MappingProxyType
from typing import Any, Optional
from xml.sax.saxutils import quoteattr

from mftvm_openstack.contract.options import DEFAULT_ALLOWED_BRIDGES
from mftvm_openstack.ft import boot_files as shipped_boot
from mftvm_openstack.ft import domain_policy, vm
from mftvm_openstack.ft.libvirt_monitor import LibvirtMonitor
from mftvm_openstack.ft.monitor import MIGRATION_ENDED, Monitor, MonitorError
from mftvm_openstack.waiting import wait_until

QEMU_NS = domain_policy.QEMU_NS
#: The host's QEMU, in every domain the engine starts or restores.
EMULATOR = f'/usr/bin/{vm.QEMU_BINARY}'
#: QEMU as root, files not relabelled: it reaches the engine's sockets
#: and files (see the module docstring). The secondary sets it itself.
SECLABEL = ('<seclabel type="static" model="dac" relabel="no">'
            '<label>+0:+0</label></seclabel>')
#: Pinned: both sides of a pair must run the same machine type.
MACHINE = 'pc-i440fx-7.2'
#: Libvirt's id of the guest RAM backend (and of its file).
RAM_BACKEND = 'pc.ram'
#: Libvirt's id of the first NIC's netdev.
NETDEV = 'hostnet0'
#: ``libvirt.VIR_DOMAIN_XML_MIGRATABLE``: the XML another host can run
#: (no runtime-only parts), as libvirt's own migration sends it.
MIGRATABLE_XML = 8


def _a(value: object) -> str:
    return quoteattr(str(value))


def _text(value: object) -> str:
    return (str(value).replace('&', '&amp;').replace('<', '&lt;')
            .replace('>', '&gt;'))


def domain_xml(spec: vm.GuestSpec, serial_path: str,
               disk_layers: list[tuple[str, str]] | None = None,
               incoming: bool = False, name: str | None = None,
               uuid: str | None = None) -> str:
    """The domain XML of ``spec``.

    ``disk_layers`` replaces the guest's disk by the top of a chain
    (only its top file is named: a restored guest runs on a flattened or
    single-layer replica here); ``name`` overrides the domain name (two
    "hosts" on one machine need two names); ``uuid`` is the domain's
    (as Nova gives its domains the instance's uuid).
    """
    disk, fmt = (disk_layers or [(spec.disk, spec.disk_format)])[-1]
    if disk_layers and len(disk_layers) > 1:
        raise ValueError('libvirt domains take one disk layer here; '
                         'flatten the chain first (vm.flatten)')
    domain_type = 'kvm' if spec.accel == 'kvm' else 'qemu'
    qemu_args = ''
    if incoming:
        qemu_args = ('\n  <qemu:commandline>'
                     '\n    <qemu:arg value="-incoming"/>'
                     '\n    <qemu:arg value="defer"/>'
                     '\n  </qemu:commandline>')
    uuid_el = f'\n  <uuid>{_text(uuid)}</uuid>' if uuid else ''
    return f"""<domain type={_a(domain_type)} xmlns:qemu={_a(QEMU_NS)}>
  <name>{_text(name or spec.name)}</name>{uuid_el}
  <memory unit="MiB">{spec.memory_mib}</memory>
  <vcpu>{spec.smp}</vcpu>
  <memoryBacking>
    <source type="file"/>
    <access mode="shared"/>
  </memoryBacking>
  <os>
    <type arch="x86_64" machine={_a(MACHINE)}>hvm</type>
    <kernel>{_text(spec.kernel)}</kernel>
    <initrd>{_text(spec.initrd)}</initrd>
    <cmdline>{_text(spec.append)}</cmdline>
  </os>
  <features><acpi/></features>
  <cpu mode="custom" match="exact"><model>qemu64</model></cpu>
  <clock offset="utc"/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>{EMULATOR}</emulator>
    <disk type="file" device="disk">
      <driver name="qemu" type={_a(fmt)} cache="none"/>
      <source file={_a(disk)}/>
      <target dev="vda" bus="virtio"/>
    </disk>
    <interface type="user">
      <mac address={_a(spec.mac)}/>
      <model type="virtio"/>
      <rom enabled="no"/>
    </interface>
    <serial type="file">
      <source path={_a(serial_path)} append="on"/>
      <target port="0"/>
    </serial>
    <controller type="usb" model="none"/>
    <memballoon model="none"/>
    <video><model type="none"/></video>
  </devices>
  {SECLABEL}{qemu_args}
</domain>
"""


async def ram_file(monitor: Monitor) -> str:
    """The path of the running domain's shared guest RAM file."""
    path = await monitor.execute('qom-get', path=f'/objects/{RAM_BACKEND}',
                                 property='mem-path')
    share = await monitor.execute('qom-get', path=f'/objects/{RAM_BACKEND}',
                                  property='share')
    if not isinstance(path, str) or not path or share is not True:
        raise MonitorError(f'guest RAM is not in a shared file '
                           f'(mem-path={path!r}, share={share!r})')
    return path


async def add_forwards(monitor: Monitor, spec: vm.GuestSpec) -> None:
    """Open the spec's port forwards on the domain's user-mode netdev."""
    for fwd in spec.forwards:
        reply = await monitor.execute(
            'human-monitor-command',
            **{'command-line': f'hostfwd_add {NETDEV} {fwd.qemu()}'})
        if reply:
            raise MonitorError(f'port forward {fwd.qemu()}: {reply}')


def _copy_ram(src: str, dst: str) -> None:
    # QEMU maps dst shared: what we write is what the guest will see.
    with open(src, 'rb') as fin, open(dst, 'r+b') as fout:
        size = os.fstat(fin.fileno()).st_size
        done = 0
        while done < size:
            # sendfile: copy_file_range refuses tmpfs -> another fs.
            sent = os.sendfile(fout.fileno(), fin.fileno(), done,
                               size - done)
            if sent <= 0:
                raise OSError(f'short copy of {src} into {dst}')
            done += sent


async def _send_devstate(sock: str, devstate_path: str,
                         timeout: float) -> None:
    with open(devstate_path, 'rb') as f:
        data = f.read()
    _, writer = await asyncio.wait_for(
        asyncio.open_unix_connection(sock), timeout)
    try:
        writer.write(data)
        await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def restore_xml(xml: str, disk_layers: Sequence[tuple[str, str]],
                serial_path: str, name: Optional[str] = None,
                host_files: Collection[str] = (),
                readonly_dirs: Collection[str] = (),
                uuid: Optional[str] = None,
                bridges: Collection[str] = DEFAULT_ALLOWED_BRIDGES,
                boot_files: Mapping[str, str] = MappingProxyType({})) \
        -> str:
    """The XML that resumes the domain described by ``xml`` from a replica.

    ``xml`` is the primary's domain XML (``XMLDesc`` with
    ``VIR_DOMAIN_XML_MIGRATABLE``, which the primary ships to its
    secondary, or :func:`domain_xml`): text from the wire. It is never
    started as received: :func:`.domain_policy.rebuild` builds a new
    document from its allowed parts only (``host_files``,
    ``readonly_dirs``, ``uuid``, ``bridges`` and ``boot_files`` are the
    secondary's own, see there)
    and refuses anything else (DomainRefused, a ValueError). The
    result:

    * runs on the replica: the disk is the top of ``disk_layers``
      (base first) with the lower layers as its ``<backingStore>`` chain,
      so a failover needs no flattening;
    * writes the serial console (file or ``<log>``) to ``serial_path``:
      the primary's path may not exist on this host;
    * runs this host's QEMU as the engine runs it (:data:`EMULATOR`,
      :data:`SECLABEL`), and waits for device state (``-incoming
      defer``);
    * is called ``name`` if given; a new name drops the ``<uuid>`` too
      (one libvirtd on one machine plays both hosts in tests), the same
      name keeps it (Nova looks its domains up by the instance uuid).
    """
    root = domain_policy.rebuild(xml, EMULATOR, host_files=host_files,
                                 readonly_dirs=readonly_dirs, uuid=uuid,
                                 bridges=bridges, boot_files=boot_files)
    if name and name != root.findtext('name'):
        # Another guest as far as libvirt knows. The same name keeps the
        # uuid: Nova finds its instances' domains by uuid.
        name_el = root.find('name')
        if name_el is None:
            name_el = ET.SubElement(root, 'name')
        name_el.text = name
        for old_uuid in root.findall('uuid'):
            root.remove(old_uuid)
    disk = root.find("devices/disk[@device='disk']")
    if disk is None:
        raise ValueError('the domain XML has no disk to restore onto')
    top, top_fmt = disk_layers[-1]
    driver = disk.find('driver')
    if driver is None:
        driver = ET.SubElement(disk, 'driver', name='qemu')
    driver.set('type', top_fmt)
    source = disk.find('source')
    if source is None:
        source = ET.SubElement(disk, 'source')
    source.attrib.clear()
    source.set('file', top)
    below = disk
    for path, fmt in reversed(disk_layers[:-1]):
        store = ET.SubElement(below, 'backingStore', type='file')
        ET.SubElement(store, 'format', type=fmt)
        ET.SubElement(store, 'source', file=path)
        below = store
    ET.SubElement(below, 'backingStore')    # the chain ends here
    for tag in ('serial', 'console'):
        for dev in root.findall(f'devices/{tag}'):
            src = dev.find('source')
            if dev.get('type') == 'file':
                if src is None:
                    src = ET.SubElement(dev, 'source')
                src.set('path', serial_path)
            elif src is not None:
                dev.remove(src)         # a pty: libvirt opens a new one
            log = dev.find('log')
            if log is not None:
                log.set('file', serial_path)
    root.append(ET.fromstring(SECLABEL))
    cmdline = ET.SubElement(root, f'{{{QEMU_NS}}}commandline')
    ET.SubElement(cmdline, f'{{{QEMU_NS}}}arg', value='-incoming')
    ET.SubElement(cmdline, f'{{{QEMU_NS}}}arg', value='defer')
    ET.register_namespace('qemu', QEMU_NS)
    return ET.tostring(root, encoding='unicode')


async def _wait_not_running(conn: Any, name: str,
                            timeout: float = 5.0) -> None:
    """Until no domain ``name`` runs here: one whose QEMU was just
    killed may take libvirt a moment to tear down. One that keeps running
    is a second copy of the guest: refuse."""
    def gone() -> bool:
        try:
            return not conn.lookupByName(name).isActive()
        except Exception:   # libvirtError: no such domain (any more)
            return True
    # Libvirt's calls block: the whole wait runs in a worker thread.
    if not await asyncio.to_thread(wait_until, gone, timeout):
        raise MonitorError(f'domain {name} already runs on this host; '
                           f'not starting a second copy of the guest')


def check_restorable(xml: str, spec: vm.GuestSpec,
                     readonly_dirs: Collection[str] = (),
                     bridges: Collection[str] = DEFAULT_ALLOWED_BRIDGES) \
        -> None:
    """DomainRefused (a ValueError) unless a secondary would restore the
    domain ``xml`` (its ``XMLDesc`` with :data:`MIGRATABLE_XML`).

    The primary asks before it protects a domain: a guest whose secondary
    would refuse its XML at failover (a config drive outside the
    instance's directory, a block device, ...) must be refused protection
    now, visibly, not reported protected and lost when its host dies.
    The rules are the secondary's own (:func:`restore`). The kernel and
    initrd the domain boots from are shipped to the secondary
    (:mod:`.boot_files`): each must be a file small enough to ship
    (BootFileError, a ValueError, if not).
    """
    shipped = shipped_boot.named_by(xml)
    for path in shipped.values():
        shipped_boot.check(path)
    root = domain_policy.rebuild(
        xml, EMULATOR, host_files={f for f in (spec.kernel, spec.initrd)
                                   if f},
        readonly_dirs=readonly_dirs,
        uuid=spec.name if domain_policy.UUID(spec.name) else None,
        bridges=bridges, boot_files=shipped)
    if root.find("devices/disk[@device='disk']") is None:
        raise domain_policy.DomainRefused('domain/devices: no disk to '
                                          'replicate')


async def restore(conn: Any, spec: vm.GuestSpec, serial_path: str,
                  ram_src: str, devstate_path: str,
                  disk_layers: Sequence[tuple[str, str]],
                  name: str | None = None, xml: str | None = None,
                  readonly_dirs: Collection[str] = (),
                  bridges: Collection[str] = DEFAULT_ALLOWED_BRIDGES,
                  boot_files: Mapping[str, str] = MappingProxyType({}),
                  ) -> tuple[Any, LibvirtMonitor]:
    """Run the guest on, as a libvirt domain, from a replica.

    ``xml`` is the primary's domain XML (default: :func:`domain_xml` of
    ``spec``); :func:`restore_xml` rebuilds it from its allowed parts
    (kernel and initrd only as ``spec`` names them or as the copies
    ``boot_files`` the primary sent (:mod:`.boot_files`), a read-only image
    only in ``readonly_dirs``, the uuid only ``spec.name`` if that is a
    uuid, NICs only on ``bridges``) and points it at the replica. The domain
    starts paused with ``-incoming defer``; the replica's RAM image is
    copied into the domain's shared RAM file (libvirt picks its path; the
    copy is what the guest sees: QEMU maps it shared); the device state
    loads with ``migrate-incoming`` over a unix socket (libvirt runs QEMU
    with ``-sandbox spawn=deny``: no ``exec:``); then the guest resumes,
    its port forwards open and its MAC is announced. Returns the
    ``virDomain`` and its monitor. ``conn`` must have been opened by
    :func:`~.libvirt_monitor.connect`.
    """
    import libvirt  # type: ignore[import-untyped,unused-ignore]

    xml = restore_xml(
        xml or domain_xml(spec, serial_path), disk_layers, serial_path,
        name=name, host_files={f for f in (spec.kernel, spec.initrd) if f},
        readonly_dirs=readonly_dirs,
        uuid=spec.name if domain_policy.UUID(spec.name) else None,
        bridges=bridges, boot_files=boot_files)
    await _wait_not_running(conn, ET.fromstring(xml).findtext('name', ''))
    dom = await asyncio.to_thread(conn.createXML, xml,
                                  libvirt.VIR_DOMAIN_START_PAUSED)
    monitor = await LibvirtMonitor.for_domain(conn, dom)
    workdir = tempfile.mkdtemp(prefix='mftvm-restore-')
    try:
        ram = await ram_file(monitor)
        await asyncio.to_thread(_copy_ram, ram_src, ram)
        await monitor.execute('migrate-set-capabilities', capabilities=[
            {'capability': 'x-ignore-shared', 'state': True},
            {'capability': 'events', 'state': True}])
        sock = os.path.join(workdir, 'incoming.sock')
        with monitor.events('MIGRATION') as events:
            await monitor.execute('migrate-incoming', uri=f'unix:{sock}')
            await _send_devstate(sock, devstate_path, 30)
            await events.wait(lambda e: e['data'].get('status') in
                              MIGRATION_ENDED, timeout=60)
        status = await monitor.execute('query-migrate')
        if status.get('status') != 'completed':
            raise MonitorError(f'device state did not load: {status}')
        await monitor.execute('cont')
        await add_forwards(monitor, spec)
        await monitor.execute('announce-self', initial=50, max=550,
                              rounds=5, step=100)
    except BaseException:
        await monitor.close()
        with contextlib.suppress(Exception):
            await asyncio.to_thread(dom.destroy)
        raise
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return dom, monitor


# -- a domain someone else started -------------------------------------------

async def guest_disk(monitor: Monitor) -> tuple[str, int]:
    """(node name, virtual size in bytes) of the guest's first writable
    disk: what write replication mirrors. Libvirt names its nodes itself
    (``libvirt-1-format``); our own QEMU calls it ``disk0``."""
    for dev in await monitor.execute('query-block'):
        inserted = dev.get('inserted')
        if not inserted or dev.get('removable') or inserted.get('ro'):
            continue
        return (str(inserted['node-name']),
                int(inserted['image']['virtual-size']))
    raise MonitorError('the guest has no writable disk to replicate')


async def qemu_pid(monitor: Monitor) -> int:
    """The pid of the QEMU behind ``monitor``: the process that owns its
    vCPU threads (works for any libvirt URI, as long as it is local)."""
    cpus = await monitor.execute('query-cpus-fast')
    tid = int(cpus[0]['thread-id'])
    with open(f'/proc/{tid}/status') as f:
        for line in f:
            if line.startswith('Tgid:'):
                return int(line.split()[1])
    raise MonitorError(f'cannot tell which process runs vCPU thread {tid}')


class DomainProcess:
    """The QEMU of a running libvirt domain, watched like a child of ours.

    It has what the engine's host uses of :class:`~.vm.ChildProcess`
    (``pid``, ``running``, ``wait()``, ``kill()``, ``last_log_line()``),
    through a pidfd: its exit is noticed at once, and a kill can never
    hit a recycled pid. ``kill()`` is SIGKILL, not ``virDomainDestroy``:
    fencing must not wait for libvirt; libvirt notices the death itself.
    """

    #: where the system libvirtd logs each domain's QEMU
    LOG_DIR = '/var/log/libvirt/qemu'

    def __init__(self, name: str, pid: int) -> None:
        self.name = name
        self.pid = pid
        self._pidfd = os.pidfd_open(pid)   # ProcessLookupError: gone
        self._exited = False
        self._guard: Optional[asyncio.subprocess.Process] = None

    async def start_guard(self) -> None:
        """Make this QEMU die with the calling process, as our own QEMU
        does: see :mod:`~mftvm_openstack.ft.domain_guard`. Call it from
        the event loop's thread (the death signal follows the forking
        thread)."""
        def before_exec() -> None:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            vm.parent_death_signal(signal.SIGTERM)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, '-m', 'mftvm_openstack.ft.domain_guard',
            str(self.pid), str(os.getpid()), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, preexec_fn=before_exec)
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), 20)
        except TimeoutError:
            line = b''
        if line.strip() != b'ready' and self.running:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            raise MonitorError(f'could not tie QEMU {self.pid} of domain '
                               f'{self.name} to this process (its guard '
                               f'did not start)')
        self._guard = proc

    @classmethod
    async def of(cls, monitor: Monitor, name: str) -> DomainProcess:
        return cls(name, await qemu_pid(monitor))

    @property
    def running(self) -> bool:
        if not self._exited and self._pidfd >= 0:
            readable, _, _ = select.select([self._pidfd], [], [], 0)
            self._exited = bool(readable)
        return not self._exited

    async def wait(self) -> int:
        """Until the QEMU is gone. Its exit code is libvirtd's to read:
        this returns -1."""
        if self.running:
            loop = asyncio.get_running_loop()
            gone: asyncio.Future[None] = loop.create_future()

            def readable() -> None:
                if not gone.done():
                    gone.set_result(None)
            loop.add_reader(self._pidfd, readable)
            try:
                await gone
            finally:
                loop.remove_reader(self._pidfd)
            self._exited = True
        return -1

    async def kill(self) -> None:
        if self.running:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
        await self.wait()

    def last_log_line(self) -> str:
        path = os.path.join(self.LOG_DIR, f'{self.name}.log')
        try:
            with open(path, 'rb') as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 4096))
                lines = f.read().decode(errors='replace').splitlines()
        except OSError:
            return ''
        return lines[-1].strip() if lines else ''

    def close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
            self._exited = True
