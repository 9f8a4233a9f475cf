"""Settle a taken-over guest where Nova's libvirt driver expects it.

After a failover the guest runs on the new host as a *transient* libvirt
domain whose disk is the agent's replica (a chain of epoch overlays in
the agent's state directory). Nova's stop, start and hard reboot
regenerate the domain from ``instances_path/<uuid>/disk``, which this
host does not have. :func:`into_place` moves the running guest there,
live, and makes its domain persistent::

    dom = conn.lookupByUUIDString(instance.uuid)
    into_place(dom, '/var/lib/nova/instances/<uuid>/disk')

The guest's other disks (ephemeral, swap: :func:`others_into_place`)
go where Nova expects them the same way; a read-only one (the config
drive's CD-ROM) is copied once, as its content never changes::

    others_into_place(dom, {'vdb': '/var/lib/nova/instances/<uuid>/'
                                   'disk.local',
                            'sda': '/var/lib/nova/instances/<uuid>/'
                                   'disk.config'})

Its kernel and initrd, if it boots from them, are copied to the names
LibvirtDriver gives them (:func:`boot_files_into_place`).

The order keeps one copy running at all times and loses nothing: the
guest already runs here alone (the agent won its fence before it
restored it); libvirt's block copy mirrors every write to the new file
while it copies, and the pivot switches the guest over only once both
are the same; the replica is then no longer written by anyone. The new
disk is a qcow2 image that stands alone (no backing file), so Nova's
image backend takes it as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any, Optional

#: libvirt's flags and job type, as numbers: this module imports no
#: libvirt (the caller holds the domain)
BLOCK_JOB_ABORT_PIVOT = 2           # VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT
BLOCK_COPY_TRANSIENT_JOB = 4        # VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
XML_INACTIVE = 2                    # VIR_DOMAIN_XML_INACTIVE
XML_SECURE = 1                      # VIR_DOMAIN_XML_SECURE
QEMU_NS = 'http://libvirt.org/schemas/domain/qemu/1.0'

#: how long a copy may take before it is given up (the guest runs on
#: its replica then, as before)
COPY_TIMEOUT = 600.0


class SettleError(Exception):
    """The guest could not be moved; it runs on where it ran."""


def first_disk(xml: str) -> tuple[str, Optional[str]]:
    """(target dev, source file) of the domain's first disk::

        >>> first_disk("<domain><devices><disk device='disk'>"
        ...            "<source file='/r/top.qcow2'/><target dev='vda'/>"
        ...            "</disk></devices></domain>")
        ('vda', '/r/top.qcow2')
    """
    disk = ET.fromstring(xml).find("devices/disk[@device='disk']")
    target = disk.find('target') if disk is not None else None
    if disk is None or target is None or not target.get('dev'):
        raise SettleError('the domain has no disk')
    source = disk.find('source')
    return str(target.get('dev')), (
        source.get('file') if source is not None else None)


def persistent_xml(xml: str) -> str:
    """The domain's XML to define: without the ``-incoming defer`` that
    the restore started it with (a start from this definition boots
    from its disk; Nova's start writes its own definition anyway)."""
    root = ET.fromstring(xml)
    for cmdline in root.findall(f'{{{QEMU_NS}}}commandline'):
        args = [a.get('value') for a in cmdline]
        if args == ['-incoming', 'defer']:
            root.remove(cmdline)
    ET.register_namespace('qemu', QEMU_NS)
    return ET.tostring(root, encoding='unicode')


def _mirror_ready(dom: Any, dev: str) -> bool:
    disk = ET.fromstring(dom.XMLDesc(0)).find(
        f"devices/disk/target[@dev='{dev}']/..")
    mirror = disk.find('mirror') if disk is not None else None
    return mirror is not None and mirror.get('ready') == 'yes'


def into_place(dom: Any, path: str, timeout: float = COPY_TIMEOUT,
               interval: float = 0.2) -> bool:
    """Copy the running domain ``dom``'s first disk to ``path`` (a new
    qcow2 that stands alone), switch the guest onto it, and make the
    domain persistent. False if it already runs on ``path`` and is
    persistent (nothing to do); True once done.

    :raises SettleError: the copy failed or took longer than
        ``timeout``; the job is cancelled and the guest runs on its old
        disk.
    """
    dev, source = first_disk(dom.XMLDesc(0))
    persistent = bool(dom.isPersistent())
    if source == path and persistent:
        return False
    if source != path:
        _copy_live(dom, dev, path, persistent, timeout, interval)
    if not persistent:
        dom.connect().defineXML(persistent_xml(
            dom.XMLDesc(XML_INACTIVE | XML_SECURE)))
    return True


def _copy_live(dom: Any, dev: str, path: str, persistent: bool,
               timeout: float, interval: float) -> None:
    """Block-copy disk ``dev`` of the running ``dom`` to ``path`` (a
    qcow2 that stands alone) and pivot onto it."""
    if os.path.exists(path):
        raise SettleError(f'{path} exists already; not overwriting it')
    os.makedirs(os.path.dirname(path), exist_ok=True)
    dest = (f"<disk type='file'><driver type='qcow2'/>"
            f"<source file='{_attr(path)}'/></disk>")
    flags = BLOCK_COPY_TRANSIENT_JOB if persistent else 0
    try:
        dom.blockCopy(dev, dest, None, flags)
    except Exception as exc:
        raise SettleError(f'block copy to {path} refused: {exc}') \
            from None
    deadline = time.monotonic() + timeout
    while not _mirror_ready(dom, dev):
        if time.monotonic() > deadline or not dom.blockJobInfo(dev, 0):
            _cancel(dom, dev, path)
            raise SettleError(f'block copy to {path} did not finish')
        time.sleep(interval)
    try:
        dom.blockJobAbort(dev, BLOCK_JOB_ABORT_PIVOT)
    except Exception as exc:
        _cancel(dom, dev, path)
        raise SettleError(f'pivot to {path} failed: {exc}') from None
    if _disk_of(dom.XMLDesc(0), dev)[0] != path:
        raise SettleError(f'the guest did not switch to {path}')


def _disk_of(xml: str, dev: str) -> tuple[Optional[str], bool,
                                          list[tuple[str, str]]]:
    """(source file, read-only, layer chain base first) of disk ``dev``."""
    disk = ET.fromstring(xml).find(f"devices/disk/target[@dev='{dev}']/..")
    if disk is None:
        raise SettleError(f'the domain has no disk {dev}')
    source = disk.find('source')
    top = source.get('file') if source is not None else None
    driver = disk.find('driver')
    chain = [] if top is None else [
        (top, driver.get('type', 'raw') if driver is not None else 'raw')]
    store = disk.find('backingStore')
    while store is not None and store.find('source') is not None:
        fmt = store.find('format')
        chain.append((str(store.find('source').get('file')),  # type: ignore
                      fmt.get('type', 'raw') if fmt is not None else 'raw'))
        store = store.find('backingStore')
    return top, disk.find('readonly') is not None, chain[::-1]


def others_into_place(dom: Any, targets: Mapping[str, str],
                      timeout: float = COPY_TIMEOUT,
                      interval: float = 0.2) -> dict[str, str]:
    """Move the running domain's other disks, each ``dev`` in
    ``targets`` to its path: a writable one live, as :func:`into_place`
    its first, a read-only one (a config drive) by a copy of its
    content as it is (raw), while the guest reads on from its replica
    until Nova's next start. Call it before :func:`into_place` (which
    makes the domain persistent with every disk where it is then).
    Returns ``{path: 'qcow2'}`` of the disks copied live (Nova's image
    backend records them in ``disk.info``).

    :raises SettleError: a copy failed; the disks moved so far stay moved.
    """
    moved = {}
    for dev, path in sorted(targets.items()):
        source, readonly, chain = _disk_of(dom.XMLDesc(0), dev)
        if source is None or source == path:
            continue
        if not readonly:
            _copy_live(dom, dev, path, bool(dom.isPersistent()), timeout,
                       interval)
            moved[path] = 'qcow2'
            continue
        if os.path.exists(path):
            raise SettleError(f'{path} exists already; not overwriting it')
        result = subprocess.run(
            ['qemu-img', 'convert', '-U', '-O', 'raw',
             _chain_filename(chain), path],
            capture_output=True, text=True, check=False, timeout=timeout)
        if result.returncode != 0:
            raise SettleError(f'copy of {dev} to {path} failed: '
                              f'{result.stderr.strip()[-200:]}')
    return moved


#: a domain's boot file (``<os>`` child) -> the name LibvirtDriver gives
#: its copy in the instance's directory
BOOT_FILE_NAMES = {'kernel': 'kernel', 'initrd': 'ramdisk'}


def boot_files_into_place(dom: Any, instance_dir: str) -> list[str]:
    """Copy the kernel and initrd the running domain boots from (after a
    failover: the copies its primary shipped, in the agent's directory)
    to ``<instance_dir>/kernel`` and ``ramdisk``, where LibvirtDriver's
    start and hard reboot look before they would fetch them from Glance
    again (which may refuse a kernel image: Nova's format safety check).
    A file already there is kept. Returns the paths written.

    :raises SettleError: a copy failed.
    """
    written = []
    root = ET.fromstring(dom.XMLDesc(0))
    for element, name in BOOT_FILE_NAMES.items():
        source = (root.findtext(f'os/{element}') or '').strip()
        target = os.path.join(instance_dir, name)
        if not source or source == target or os.path.exists(target):
            continue
        part = f'{target}.part'
        try:
            shutil.copyfile(source, part)
            os.chmod(part, 0o644)
            os.replace(part, target)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(part)
            raise SettleError(f'{element} {source} not copied to '
                              f'{target}: {exc}') from exc
        written.append(target)
    return written


def _chain_filename(layers: list[tuple[str, str]]) -> str:
    """A ``json:`` filename that opens a layer chain (base first) as one
    image: the replica's overlays carry no backing file of their own."""
    node: Any = None
    for filename, fmt in layers:
        node = {'driver': fmt,
                'file': {'driver': 'file', 'filename': filename},
                **({'backing': node} if fmt == 'qcow2' else {})}
    return 'json:' + json.dumps(node)


def local_disk_names(disk_info: Mapping[str, Any]) -> dict[str, str]:
    """Target dev → file name in the instance directory of each local
    disk in Nova's ``blockinfo.get_disk_info`` answer (``disk``,
    ``disk.local`` or ``disk.eph0``..., ``disk.swap``, ``disk.config``;
    volumes, named by their device, are none)::

        >>> local_disk_names({'mapping': {
        ...     'root': {'dev': 'vda'}, 'disk': {'dev': 'vda'},
        ...     'disk.eph0': {'dev': 'vdb'}, '/dev/vdc': {'dev': 'vdc'},
        ...     'disk.config': {'dev': 'sda'}}})
        {'vda': 'disk', 'vdb': 'disk.eph0', 'sda': 'disk.config'}
    """
    return {str(disk['dev']): name
            for name, disk in disk_info['mapping'].items()
            if name == 'disk' or name.startswith('disk.')}


def _cancel(dom: Any, dev: str, path: str) -> None:
    try:
        dom.blockJobAbort(dev, 0)
    except Exception:  # no job left
        pass
    try:
        os.unlink(path)
    except OSError:
        pass


def _attr(value: str) -> str:
    return (value.replace('&', '&amp;').replace("'", '&apos;')
            .replace('<', '&lt;'))
