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
import shutil
import tempfile
from typing import Any
from xml.sax.saxutils import quoteattr

from mftvm_openstack.ft import vm
from mftvm_openstack.ft.libvirt_monitor import LibvirtMonitor
from mftvm_openstack.ft.monitor import Monitor, MonitorError

QEMU_NS = 'http://libvirt.org/schemas/domain/qemu/1.0'
#: Pinned: both sides of a pair must run the same machine type.
MACHINE = 'pc-i440fx-7.2'
#: Libvirt's id of the guest RAM backend (and of its file).
RAM_BACKEND = 'pc.ram'
#: Libvirt's id of the first NIC's netdev.
NETDEV = 'hostnet0'


def _a(value: object) -> str:
    return quoteattr(str(value))


def _text(value: object) -> str:
    return (str(value).replace('&', '&amp;').replace('<', '&lt;')
            .replace('>', '&gt;'))


def domain_xml(spec: vm.GuestSpec, serial_path: str,
               disk_layers: list[tuple[str, str]] | None = None,
               incoming: bool = False, name: str | None = None) -> str:
    """The domain XML of ``spec``.

    ``disk_layers`` replaces the guest's disk by the top of a chain
    (only its top file is named: a restored guest runs on a flattened or
    single-layer replica here); ``name`` overrides the domain name (two
    "hosts" on one machine need two names).
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
    return f"""<domain type={_a(domain_type)} xmlns:qemu={_a(QEMU_NS)}>
  <name>{_text(name or spec.name)}</name>
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
    <emulator>/usr/bin/{vm.QEMU_BINARY}</emulator>
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
  <seclabel type="static" model="dac" relabel="no">
    <label>+0:+0</label>
  </seclabel>{qemu_args}
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


async def restore(conn: Any, spec: vm.GuestSpec, serial_path: str,
                  ram_src: str, devstate_path: str,
                  disk_layers: list[tuple[str, str]],
                  name: str | None = None,
                  ) -> tuple[Any, LibvirtMonitor]:
    """Run the guest on, as a libvirt domain, from a replica.

    Starts the domain paused with ``-incoming defer``, copies the
    replica's RAM image into the domain's shared RAM file (libvirt picks
    its path; the copy is what the guest sees: QEMU maps it shared),
    loads the device state with ``migrate-incoming`` over a unix socket
    (libvirt runs QEMU with ``-sandbox spawn=deny``: no ``exec:``),
    resumes the guest, opens its port forwards and announces its MAC.
    Returns the ``virDomain`` and its monitor. ``conn`` must have been
    opened by :func:`~.libvirt_monitor.connect`.
    """
    import libvirt  # type: ignore[import-untyped,unused-ignore]

    xml = domain_xml(spec, serial_path, disk_layers, incoming=True,
                     name=name)
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
        monitor.clear_events()
        sock = os.path.join(workdir, 'incoming.sock')
        await monitor.execute('migrate-incoming', uri=f'unix:{sock}')
        await _send_devstate(sock, devstate_path, 30)
        await monitor.wait_event(
            'MIGRATION', lambda e: e['data'].get('status') in (
                'completed', 'failed'), timeout=60)
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
