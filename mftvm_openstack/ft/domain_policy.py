"""Which libvirt domain XML a secondary will start: a strict allow-list.

A secondary restores a libvirt guest from the domain XML its primary
sent in the HELLO. That text came off the network, and libvirt starts
what it says as root: a host block device as a disk, a
``<qemu:commandline>``, a ``<hostdev>``, a ``<filesystem>`` passthrough,
an ``ethernet`` NIC with a ``<script>``, a serial port writing to
``/etc/cron.d/x``. So the secondary never starts the received text.
:func:`rebuild` parses it (a DOCTYPE or an entity is refused before
parsing), walks it against :data:`DOMAIN`, the allow-list, and builds a
*new* document out of the allowed parts only: every element, every
attribute and every text must be listed here, and every value must
match its pattern. One element or attribute outside the list refuses
the whole document with :class:`DomainRefused`, which names its path;
the secondary then starts nothing.

The parts only the secondary may decide are not taken from the wire at
all (:func:`rebuild` checks them and leaves them out, or the caller,
:func:`~mftvm_openstack.ft.libvirt_domain.restore_xml`, replaces them):
the disk's source (the secondary's own replica layers), the serial and
console paths (its own serial log), ``<emulator>`` (the host's QEMU),
``<seclabel>`` (the engine's own), ``<qemu:commandline>`` (its own
``-incoming defer``; the one the primary may carry is the same and is
dropped), a guest-agent channel's socket path (libvirt picks one). The
paths left in the document must be the secondary's own: ``<kernel>``
and ``<initrd>`` only as its own spec names them (or as the copies the
primary sent it of its own, which replace the primary's paths),
firmware only under the system's firmware directories, a read-only
CD-ROM only under an allowed directory (the instance's own)::

    doc = rebuild(xml, emulator='/usr/bin/qemu-system-x86_64',
                  host_files={'/boot/vmlinuz', '/boot/initrd'})
    rebuild('<domain type="kvm"><name>vm0</name><devices>'
            '<hostdev mode="subsystem" type="pci"/></devices></domain>',
            emulator='/usr/bin/qemu-system-x86_64')
    # DomainRefused: domain/devices/hostdev: is not allowed in a
    #   restored domain (allowed here: emulator, disk, controller, ...)
    rebuild('<domain type="kvm"><devices><disk type="block" '
            'device="disk">...', emulator=...)
    # DomainRefused: domain/devices/disk@type: must be one of file
    #   (got 'block')

What is allowed is what Nova's libvirt driver and the engine's own
:func:`~mftvm_openstack.ft.libvirt_domain.domain_xml` produce for a
guest the engine can protect: one file-backed disk, user/bridge/network
NICs (and ``ethernet`` onto an existing tap, without a script), pty or
file consoles, the usual controllers, inputs, video, balloon, RNG from
``/dev/urandom``, VNC/SPICE graphics on an address, Nova's metadata and
SMBIOS entries. Anything else (a new device kind a guest needs) is added
here on purpose, with a test.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import os
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable, Collection, Mapping
from types import MappingProxyType
from typing import Any, Optional, Union

from mftvm_openstack.contract.limits import MAX_DISKS
from mftvm_openstack.contract.options import (
    DEFAULT_ALLOWED_BRIDGES,
    IFNAME_PATTERN,
)
from mftvm_openstack.contract.record import ContractError, shown

QEMU_NS = 'http://libvirt.org/schemas/domain/qemu/1.0'
#: Nova's metadata namespaces (``.../nova/1.0``, ``1.1``, ...)
NOVA_NS_PREFIX = 'http://openstack.org/xmlns/libvirt/nova/'
#: where the firmware a domain may load lives (read-only, the system's)
FIRMWARE_DIRS = ('/usr/share/OVMF', '/usr/share/qemu', '/usr/share/seabios',
                 '/usr/share/edk2', '/usr/share/AAVMF')
#: the most elements one document may have (Nova's have about 100)
MAX_ELEMENTS = 2000
#: how deep Nova's opaque metadata may nest
MAX_METADATA_DEPTH = 8


class DomainRefused(ContractError):
    """The domain XML has something outside the allow-list; the message
    is ``'<element path>[@attribute]: <reason>'``."""


# -- value checks ------------------------------------------------------------

Check = Union[str, tuple[str, ...], Callable[[str], bool]]


def _re(pattern: str) -> Callable[[str], bool]:
    compiled = re.compile(pattern)

    def check(value: str) -> bool:
        return compiled.fullmatch(value) is not None
    check.__doc__ = pattern
    return check


NUM = _re(r'[0-9]{1,20}')
SNUM = _re(r'-?[0-9]{1,20}')
HEX = _re(r'(0x[0-9a-fA-F]{1,16}|[0-9]{1,10})')
TOKEN = _re(r'[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}')
UUID = _re(r'[0-9a-fA-F]{8}-?([0-9a-fA-F]{4}-?){3}[0-9a-fA-F]{12}')
MAC = _re(r'[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}')
CPUSET = _re(r'[0-9][0-9,^-]{0,255}')
IP = _re(r'[0-9a-fA-F.:]{1,45}')
#: a Linux network interface name
IFNAME = _re(IFNAME_PATTERN)
#: printable text without control characters (a kernel command line,
#: an SMBIOS string, Nova's metadata)
TEXT = _re(r'[^\x00-\x1f\x7f]{0,4096}')


def PATH(value: str) -> bool:  # noqa: N802 (a check, like the others)
    """an absolute path without control characters or a ``..``"""
    return (TEXT(value) and value.startswith('/') and len(value) < 4096
            and '..' not in value.split('/'))
ONOFF = ('on', 'off')
YESNO = ('yes', 'no')
UNIT = ('b', 'bytes', 'KB', 'k', 'KiB', 'MB', 'M', 'MiB', 'GB', 'G', 'GiB',
        'TB', 'T', 'TiB')


@dataclasses.dataclass(frozen=True)
class Allowed:
    """One element of the allow-list.

    ``attrs`` maps each allowed attribute to its check (a regular
    expression via :func:`_re`, or a tuple of choices); ``children``
    each allowed child element (a Clark name ``{ns}tag`` for another
    namespace); ``text`` the check of its text (None: none allowed).
    ``keep=False``: checked, then left out of the rebuilt document (the
    secondary supplies its own). ``opaque_ns``: a metadata subtree in
    that namespace, copied as it is after a check of its shape.
    """

    attrs: Mapping[str, Check] = dataclasses.field(default_factory=dict)
    children: Mapping[str, Allowed] = dataclasses.field(
        default_factory=dict)
    text: Optional[Check] = None
    keep: bool = True
    opaque_ns: Optional[str] = None


def E(attrs: Optional[Mapping[str, Check]] = None, /,  # noqa: N802
      text: Any = None, keep: Any = True,
      **children: Allowed) -> Allowed:
    # text and keep are Any so that children may come as **{...} too
    """An :class:`Allowed` element, its children as keywords."""
    return Allowed(attrs=dict(attrs or {}), text=text, keep=keep,
                   children=children)


ADDRESS = E({'type': ('pci', 'drive', 'usb', 'virtio-serial', 'isa',
                      'ccid', 'virtio-mmio', 'unassigned'),
             'domain': HEX, 'bus': HEX, 'slot': HEX, 'function': HEX,
             'multifunction': ONOFF, 'controller': NUM, 'target': NUM,
             'unit': NUM, 'port': _re(r'[0-9.]{1,32}'), 'iobase': HEX,
             'irq': HEX})
ALIAS = E({'name': TOKEN})
BOOT = E({'order': NUM})
#: elements most devices may have
COMMON = {'address': ADDRESS, 'alias': ALIAS}

_char_target = E({'type': ('isa-serial', 'usb-serial', 'pci-serial',
                           'serial', 'virtio', 'system-serial'),
                  'port': NUM}, model=E({'name': TOKEN}))
#: a serial port or console: on a pty or a file; the file (and a log)
#: is the secondary's own serial log, set by restore_xml
_CHAR = E({'type': ('pty', 'file')},
          source=E({'path': PATH, 'append': ONOFF}),
          log=E({'file': PATH, 'append': ONOFF}),
          target=_char_target, **COMMON)

#: the primary's backing chain: checked, then replaced by the replica's
_BACKING_CHILDREN: dict[str, Allowed] = {
    'format': E({'type': ('raw', 'qcow2')}),
    'source': E({'file': PATH, 'index': NUM})}
_BACKING = Allowed(attrs={'type': ('file',), 'index': NUM},
                   children=_BACKING_CHILDREN, keep=False)
_BACKING_CHILDREN['backingStore'] = _BACKING

_DISK = E(
    {'type': ('file',), 'device': ('disk', 'cdrom', 'floppy')},
    driver=E({'name': ('qemu',), 'type': ('raw', 'qcow2'),
              'cache': ('none', 'writeback', 'writethrough', 'directsync',
                        'unsafe', 'default'),
              'io': ('native', 'threads', 'io_uring', 'default'),
              'discard': ('unmap', 'ignore'),
              'detect_zeroes': ('off', 'on', 'unmap'),
              'error_policy': ('stop', 'report', 'ignore', 'enospace'),
              'rerror_policy': ('stop', 'report', 'ignore'),
              'iothread': NUM, 'queues': NUM, 'copy_on_read': ONOFF}),
    # checked here; the disk's is replaced, a CD-ROM's must be allowed
    source=E({'file': PATH, 'index': NUM}),
    backingStore=_BACKING,
    target=E({'dev': _re(r'(vd|sd|hd|fd|xvd)[a-z]{1,3}'),
              'bus': ('virtio', 'ide', 'scsi', 'sata', 'usb', 'fdc'),
              'tray': ('open', 'closed'), 'removable': ONOFF}),
    readonly=E(), shareable=E(), serial=E(text=TOKEN), boot=BOOT,
    blockio=E({'logical_block_size': NUM, 'physical_block_size': NUM}),
    iotune=E(**{k: E(text=NUM) for k in (
        'total_bytes_sec', 'read_bytes_sec', 'write_bytes_sec',
        'total_iops_sec', 'read_iops_sec', 'write_iops_sec',
        'total_bytes_sec_max', 'read_bytes_sec_max', 'write_bytes_sec_max',
        'total_iops_sec_max', 'read_iops_sec_max', 'write_iops_sec_max',
        'size_iops_sec', 'group_name')}),
    **COMMON)

_INTERFACE = E(
    # no vhostuser/server/client/udp/mcast (sockets), no direct/hostdev
    # (host NICs), no vdpa; ethernet only onto a tap, never a script
    {'type': ('user', 'bridge', 'network', 'ethernet'),
     'trustGuestRxFilters': YESNO},
    mac=E({'address': MAC}),
    # a bridge: also one of the host's allowed bridges (see rebuild)
    source=E({'bridge': IFNAME, 'network': TOKEN, 'portgroup': TOKEN,
              'portid': UUID}),
    target=E({'dev': _re(r'[A-Za-z0-9_.-]{1,15}'), 'managed': YESNO}),
    model=E({'type': ('virtio', 'e1000', 'e1000e', 'rtl8139', 'ne2k_pci',
                      'pcnet', 'virtio-transitional',
                      'virtio-non-transitional')}),
    # offloads on or off (Nova's [ft] nic_checksum_offload = false
    # writes <host csum='off'/>): switches, no paths
    driver=E({'name': ('vhost', 'qemu'), 'queues': NUM,
              'rx_queue_size': NUM, 'tx_queue_size': NUM,
              'txmode': ('iothread', 'timer'), 'iommu': ONOFF,
              'ats': ONOFF, 'packed': ONOFF},
             host=E({'csum': ONOFF, 'gso': ONOFF, 'tso4': ONOFF,
                     'tso6': ONOFF, 'ecn': ONOFF, 'ufo': ONOFF,
                     'mrg_rxbuf': ONOFF}),
             guest=E({'csum': ONOFF, 'tso4': ONOFF, 'tso6': ONOFF,
                      'ecn': ONOFF, 'ufo': ONOFF})),
    mtu=E({'size': NUM}),
    # no rom file=: a host file loaded into the guest
    rom=E({'enabled': YESNO, 'bar': ONOFF}),
    virtualport=E({'type': ('openvswitch', '802.1Qbh', '802.1Qbg',
                            'midonet')},
                  parameters=E({'interfaceid': UUID, 'profileid': TOKEN,
                                'managerid': NUM, 'typeid': NUM,
                                'typeidversion': NUM, 'instanceid': UUID})),
    bandwidth=E(inbound=E({'average': NUM, 'peak': NUM, 'burst': NUM,
                           'floor': NUM}),
                outbound=E({'average': NUM, 'peak': NUM, 'burst': NUM})),
    vlan=E({'trunk': YESNO}, tag=E({'id': NUM,
                                    'nativeMode': ('tagged', 'untagged')})),
    link=E({'state': ('up', 'down')}),
    coalesce=E(rx=E(frames=E({'max': NUM}))),
    boot=BOOT, **COMMON)

_DEVICES = E(
    emulator=E(text=PATH, keep=False),      # the host's own is set
    disk=_DISK,
    controller=E({'type': ('usb', 'pci', 'ide', 'scsi', 'sata',
                           'virtio-serial', 'fdc', 'ccid', 'xenbus'),
                  'index': NUM, 'model': TOKEN, 'ports': NUM,
                  'vectors': NUM},
                 driver=E({'queues': NUM, 'iothread': NUM, 'iommu': ONOFF,
                           'cmd_per_lun': NUM, 'max_sectors': NUM}),
                 master=E({'startport': NUM}),
                 model=E({'name': TOKEN}),
                 target=E({'chassisNr': NUM, 'chassis': NUM, 'port': HEX,
                           'busNr': NUM, 'index': NUM, 'hotplug': ONOFF}),
                 **COMMON),
    interface=_INTERFACE,
    serial=_CHAR,
    console=_CHAR,
    # the guest agent's channel: libvirt picks the socket's path
    channel=E({'type': ('unix', 'spicevmc')},
              source=E({'mode': ('bind',), 'path': PATH}),
              target=E({'type': ('virtio',), 'name': TOKEN,
                        'state': ('connected', 'disconnected')}),
              **COMMON),
    input=E({'type': ('mouse', 'tablet', 'keyboard'),
             'bus': ('ps2', 'usb', 'virtio', 'xen')}, **COMMON),
    graphics=E({'type': ('vnc', 'spice'), 'port': SNUM, 'autoport': YESNO,
                'tlsPort': SNUM, 'listen': IP, 'keymap': TOKEN,
                'defaultMode': ('any', 'secure', 'insecure')},
               listen=E({'type': ('address', 'none'), 'address': IP}),
               image=E({'compression': TOKEN}),
               streaming=E({'mode': TOKEN}),
               mouse=E({'mode': ('server', 'client')}),
               clipboard=E({'copypaste': YESNO}),
               filetransfer=E({'enable': YESNO})),
    video=E(model=E({'type': ('none', 'virtio', 'vga', 'cirrus', 'qxl',
                              'bochs', 'ramfb'),
                     'vram': NUM, 'heads': NUM, 'primary': YESNO,
                     'ram': NUM, 'vgamem': NUM, 'vram64': NUM},
                    acceleration=E({'accel3d': YESNO, 'accel2d': YESNO})),
            **COMMON),
    audio=E({'id': NUM, 'type': ('none', 'spice')}),
    sound=E({'model': ('ich6', 'ich9', 'ac97', 'es1370', 'sb16',
                       'usb')}, codec=E({'type': TOKEN}), **COMMON),
    memballoon=E({'model': ('virtio', 'none', 'virtio-transitional',
                            'virtio-non-transitional'),
                  'autodeflate': ONOFF, 'freePageReporting': ONOFF},
                 stats=E({'period': NUM}), driver=E({'iommu': ONOFF}),
                 **COMMON),
    # entropy from the host's random devices only (no egd socket)
    rng=E({'model': ('virtio', 'virtio-transitional',
                     'virtio-non-transitional')},
          backend=E({'model': ('random',)},
                    text=('/dev/urandom', '/dev/random', '/dev/hwrng')),
          rate=E({'bytes': NUM, 'period': NUM}), **COMMON),
    # no action='dump': a file of libvirt's choosing, of guest memory
    watchdog=E({'model': ('i6300esb', 'ib700', 'itco', 'diag288'),
                'action': ('reset', 'shutdown', 'poweroff', 'pause',
                           'none', 'inject-nmi')}, **COMMON),
    panic=E({'model': ('isa', 'hyperv', 'pvpanic', 's390', 'pseries')},
            **COMMON),
    vsock=E({'model': ('virtio',)}, cid=E({'auto': YESNO,
                                           'address': NUM}), **COMMON),
    redirdev=E({'bus': ('usb',), 'type': ('spicevmc',)}, **COMMON),
    hub=E({'type': ('usb',)}, **COMMON),
)

_FEATURE_STATE = E({'state': ONOFF})
_HYPERV = E({'mode': ('custom', 'passthrough')},
            spinlocks=E({'state': ONOFF, 'retries': NUM}),
            vendor_id=E({'state': ONOFF, 'value': TOKEN}),
            stimer=E({'state': ONOFF}, direct=_FEATURE_STATE),
            **{k: _FEATURE_STATE for k in (
                'relaxed', 'vapic', 'vpindex', 'runtime', 'synic', 'reset',
                'frequencies', 'reenlightenment', 'tlbflush', 'ipi',
                'evmcs', 'avic')})

DOMAIN = E(
    {'type': ('qemu', 'kvm'), 'id': NUM},
    name=E(text=_re(r'[A-Za-z0-9][A-Za-z0-9_.+-]{0,254}')),
    uuid=E(text=UUID),
    title=E(text=TEXT), description=E(text=TEXT),
    metadata=Allowed(children={}, opaque_ns=NOVA_NS_PREFIX),
    memory=E({'unit': UNIT}, text=NUM),
    currentMemory=E({'unit': UNIT}, text=NUM),
    maxMemory=E({'unit': UNIT, 'slots': NUM}, text=NUM),
    # the engine needs guest RAM in a shared file: only these
    memoryBacking=E(source=E({'type': ('file', 'memfd')}),
                    access=E({'mode': ('shared',)}),
                    hugepages=E(page=E({'size': NUM, 'unit': UNIT,
                                        'nodeset': CPUSET})),
                    nosharepages=E(), locked=E(), discard=E(),
                    allocation=E({'mode': ('immediate', 'ondemand'),
                                  'threads': NUM})),
    vcpu=E({'placement': ('static', 'auto'), 'cpuset': CPUSET,
            'current': NUM}, text=NUM),
    iothreads=E(text=NUM),
    cputune=E(shares=E(text=NUM), period=E(text=NUM), quota=E(text=SNUM),
              global_period=E(text=NUM), global_quota=E(text=SNUM),
              emulator_period=E(text=NUM), emulator_quota=E(text=SNUM),
              vcpupin=E({'vcpu': NUM, 'cpuset': CPUSET}),
              emulatorpin=E({'cpuset': CPUSET}),
              iothreadpin=E({'iothread': NUM, 'cpuset': CPUSET}),
              vcpusched=E({'vcpus': CPUSET, 'scheduler': ('fifo', 'rr',
                                                          'batch', 'idle',
                                                          'other'),
                           'priority': NUM})),
    # Nova's quota:* flavor keys; no blkiotune <device>: a host path
    memtune=E(**{k: E({'unit': UNIT}, text=NUM) for k in (
        'hard_limit', 'soft_limit', 'swap_hard_limit', 'min_guarantee')}),
    blkiotune=E(weight=E(text=NUM)),
    numatune=E(memory=E({'mode': ('strict', 'preferred', 'interleave',
                                  'restrictive'), 'nodeset': CPUSET}),
               memnode=E({'cellid': NUM, 'mode': ('strict', 'preferred',
                                                  'interleave',
                                                  'restrictive'),
                          'nodeset': CPUSET})),
    resource=E(partition=E(text=_re(r'/machine(/[A-Za-z0-9_.-]{1,64}){0,8}'
                                    ))),
    sysinfo=E({'type': ('smbios',)},
              **{part: E(entry=E({'name': TOKEN}, text=TEXT))
                 for part in ('bios', 'system', 'baseBoard', 'chassis')}),
    os=E(type=E({'arch': ('x86_64', 'i686'),
                 'machine': _re(r'(pc|q35)(-(i440fx|q35))?(-[0-9.]+)?')},
                text=('hvm',)),
         # checked against the secondary's own files by rebuild()
         kernel=E(text=PATH), initrd=E(text=PATH), cmdline=E(text=TEXT),
         loader=E({'readonly': YESNO, 'type': ('rom', 'pflash'),
                   'secure': YESNO}, text=PATH),
         boot=E({'dev': ('hd', 'cdrom', 'network', 'fd')}),
         bootmenu=E({'enable': YESNO, 'timeout': NUM}),
         smbios=E({'mode': ('sysinfo', 'host', 'emulate')}),
         bios=E({'useserial': YESNO, 'rebootTimeout': SNUM})),
    features=E(acpi=E(), apic=E({'eoi': ONOFF}), pae=E(), hap=E(),
               vmport=_FEATURE_STATE, vmcoreinfo=_FEATURE_STATE,
               pmu=_FEATURE_STATE, smm=_FEATURE_STATE,
               ioapic=E({'driver': ('qemu', 'kvm')}),
               kvm=E(hidden=_FEATURE_STATE),
               hyperv=_HYPERV),
    cpu=E({'mode': ('custom', 'host-model', 'host-passthrough',
                    'maximum'),
           'match': ('exact', 'minimum', 'strict'),
           'check': ('none', 'partial', 'full'), 'migratable': ONOFF},
          model=E({'fallback': ('allow', 'forbid')}, text=TOKEN),
          vendor=E(text=TOKEN),
          topology=E({'sockets': NUM, 'dies': NUM, 'clusters': NUM,
                      'cores': NUM, 'threads': NUM}),
          feature=E({'policy': ('force', 'require', 'optional', 'disable',
                                'forbid'), 'name': TOKEN}),
          cache=E({'mode': ('emulate', 'passthrough', 'disable'),
                   'level': NUM}),
          numa=E(cell=E({'id': NUM, 'cpus': CPUSET, 'memory': NUM,
                         'unit': UNIT, 'memAccess': ('shared',
                                                     'private')}))),
    clock=E({'offset': ('utc', 'localtime', 'variable'),
             'adjustment': SNUM, 'basis': ('utc', 'localtime')},
            timer=E({'name': ('platform', 'hpet', 'kvmclock', 'pit', 'rtc',
                              'tsc', 'hypervclock', 'armvtimer'),
                     'tickpolicy': ('delay', 'catchup', 'merge',
                                    'discard'),
                     'present': YESNO, 'track': ('boot', 'guest',
                                                 'wall', 'realtime')})),
    on_poweroff=E(text=('destroy', 'restart', 'preserve')),
    on_reboot=E(text=('destroy', 'restart', 'preserve')),
    on_crash=E(text=('destroy', 'restart', 'preserve')),
    pm=E(**{'suspend-to-mem': E({'enabled': YESNO}),
            'suspend-to-disk': E({'enabled': YESNO})}),
    devices=_DEVICES,
    # the engine's own is set by restore_xml; what the wire says is
    # checked for its shape, never used
    seclabel=E({'type': ('dynamic', 'static', 'none'),
                'model': ('dac', 'selinux', 'apparmor', 'none'),
                'relabel': YESNO},
               label=E(text=TEXT), imagelabel=E(text=TEXT),
               baselabel=E(text=TEXT), keep=False),
    # only the engine's own -incoming defer (a domain that was restored
    # once carries it): dropped here, restore_xml adds it again
    **{f'{{{QEMU_NS}}}commandline': E(keep=False, **{
        f'{{{QEMU_NS}}}arg': E({'value': ('-incoming', 'defer')})})},
)


# -- the walk ----------------------------------------------------------------

def _tag(tag: str) -> str:
    """``qemu:commandline`` for ``{QEMU_NS}commandline`` in messages."""
    return tag.replace(f'{{{QEMU_NS}}}', 'qemu:')


def _ok(check: Check, value: str) -> bool:
    if isinstance(check, tuple):
        return value in check
    if isinstance(check, str):
        return value == check
    return check(value)


def _expected(check: Check) -> str:
    if isinstance(check, tuple):
        return f'must be one of {", ".join(check)}'
    if isinstance(check, str):
        return f'must be {check}'
    return f'must match {check.__doc__}'


class _Walk:
    def __init__(self) -> None:
        self.count = 0

    def element(self, src: ET.Element, allowed: Allowed,
                path: str) -> Optional[ET.Element]:
        self.count += 1
        if self.count > MAX_ELEMENTS:
            raise DomainRefused(f'{path}: more than {MAX_ELEMENTS} '
                                f'elements')
        for name, value in src.attrib.items():
            check = allowed.attrs.get(name)
            if check is None:
                raise DomainRefused(
                    f'{path}@{_tag(name)}: is not allowed in a restored '
                    f'domain (allowed here: '
                    f'{", ".join(allowed.attrs) or "none"})')
            if not _ok(check, value):
                raise DomainRefused(f'{path}@{name}: {_expected(check)} '
                                    f'(got {shown(value)})')
        text = (src.text or '').strip()
        if text:
            if allowed.text is None:
                raise DomainRefused(f'{path}: has text, none is allowed '
                                    f'(got {shown(text)})')
            if not _ok(allowed.text, text):
                raise DomainRefused(f'{path}: {_expected(allowed.text)} '
                                    f'(got {shown(text)})')
        out = ET.Element(src.tag, dict(src.attrib))
        if text:
            out.text = text
        for child in src:
            if not isinstance(child.tag, str):
                continue        # a comment or processing instruction
            where = f'{path}/{_tag(child.tag)}'
            if allowed.opaque_ns is not None:
                out.append(self.opaque(child, allowed.opaque_ns, where, 1))
                continue
            sub = allowed.children.get(child.tag)
            if sub is None:
                raise DomainRefused(
                    f'{where}: is not allowed in a restored domain '
                    f'(allowed here: '
                    f'{", ".join(map(_tag, allowed.children)) or "none"})')
            built = self.element(child, sub, where)
            if built is not None:
                out.append(built)
        return out if allowed.keep else None

    def opaque(self, src: ET.Element, ns: str, path: str,
               depth: int) -> ET.Element:
        """Nova's metadata: libvirt stores it and acts on none of it;
        copied if it is only elements of Nova's namespace with short,
        printable attributes and text."""
        self.count += 1
        if self.count > MAX_ELEMENTS or depth > MAX_METADATA_DEPTH:
            raise DomainRefused(f'{path}: too large or too deep')
        if not src.tag.startswith('{' + ns):
            raise DomainRefused(f'{path}: only Nova\'s metadata is kept '
                                f'(namespace {ns}...)')
        out = ET.Element(src.tag)
        for name, value in src.attrib.items():
            if not TOKEN(name) or not TEXT(value) or len(value) > 255:
                raise DomainRefused(f'{path}@{name}: must be printable '
                                    f'and short (got {shown(value)})')
            out.set(name, value)
        text = (src.text or '').strip()
        if text:
            if not TEXT(text) or len(text) > 255:
                raise DomainRefused(f'{path}: must be printable and short '
                                    f'(got {shown(text)})')
            out.text = text
        for child in src:
            if isinstance(child.tag, str):
                out.append(self.opaque(child, ns, f'{path}/{child.tag}',
                                       depth + 1))
        return out


def parse(xml: str) -> ET.Element:
    """``xml`` parsed, refusing a DOCTYPE (and with it any entity: the
    expat parser expands internal entities, which the billion-laughs
    attack feeds on)."""
    if not isinstance(xml, str):
        raise DomainRefused(f'domain: must be XML text (got '
                            f'{type(xml).__name__})')
    if re.search(r'<!\s*(DOCTYPE|ENTITY)', xml, re.IGNORECASE):
        raise DomainRefused('domain: a DOCTYPE or entity declaration is '
                            'not allowed')
    try:
        root = ET.fromstring(xml)
    except ET.ParseError as exc:
        raise DomainRefused(f'domain: not well-formed XML ({exc})') \
            from None
    if root.tag != 'domain':
        raise DomainRefused(f'{_tag(root.tag)}: the document must be a '
                            f'<domain>')
    return root


def _inside(path: str, dirs: Collection[str]) -> bool:
    """Whether ``path`` (and what it resolves to on this host) is in one
    of ``dirs``."""
    for d in dirs:
        d = os.path.normpath(d)
        for p in (os.path.normpath(path), os.path.realpath(path)):
            if os.path.commonpath([p, d]) != d:
                break
        else:
            return True
    return False


def replicated_disks(root: ET.Element) -> list[ET.Element]:
    """The ``<disk>`` elements of a ``<domain>`` that are replicated: each
    one with a file, in order (as the guest's QEMU lists them; a CD-ROM
    with no medium has none)."""
    return [d for d in root.findall('devices/disk')
            if (src := d.find('source')) is not None
            and src.get('file') is not None]


def rebuild(xml: str, emulator: str,
            host_files: Collection[str] = (),
            readonly_dirs: Collection[str] = (),
            uuid: Optional[str] = None,
            bridges: Collection[str] = DEFAULT_ALLOWED_BRIDGES,
            boot_files: Mapping[str, str] = MappingProxyType({}),
            replicated: Optional[int] = None) -> ET.Element:
    """A new ``<domain>`` from the allowed parts of ``xml``.

    ``emulator`` is this host's QEMU (whatever ``xml`` says is dropped);
    ``host_files`` the only files ``<kernel>``/``<initrd>`` may name (the
    secondary's own spec); ``boot_files`` (``{'kernel': path, ...}``) the
    copies this host received of the primary's own (:mod:`.boot_files`):
    they replace whatever the element names; ``readonly_dirs`` where a
    read-only CD-ROM's image may be (the instance's own directories);
    ``uuid``, if given, the only ``<uuid>`` the document may carry (the
    instance's);
    ``bridges`` the host bridges a NIC may name (``*`` and ``?`` as
    wildcards: the operator's ``[agent] allowed_bridges``).
    ``replicated``: the number of replicas the disks will run on, one
    per ``<disk>`` with a file, in order (every such disk, a read-only
    CD-ROM included, is put on its replica, so its path here is never
    opened); None: one, the first ``device="disk"``, and any other disk
    a read-only image in ``readonly_dirs``.
    DomainRefused names the first element or attribute out of bounds.
    """
    src = parse(xml)
    root = _Walk().element(src, DOMAIN, 'domain')
    assert root is not None
    for tag in ('kernel', 'initrd'):
        el = root.find(f'os/{tag}')
        if el is None:
            continue
        if tag in boot_files:
            # The primary's path names its own copy: ours is the one it
            # sent, kept under a name of our choosing.
            el.text = boot_files[tag]
        path = el.text or ''
        if path not in host_files and path != boot_files.get(tag):
            raise DomainRefused(f'domain/os/{tag}: {shown(path)} is not '
                                f'a file this host was given for the '
                                f'guest')
    loader = root.findtext('os/loader')
    if loader is not None and not _inside(loader, FIRMWARE_DIRS):
        raise DomainRefused(f'domain/os/loader: must be under '
                            f'{", ".join(FIRMWARE_DIRS)} (got '
                            f'{shown(loader)})')
    found = root.findtext('uuid')
    if uuid and found and found.replace('-', '').lower() != \
            uuid.replace('-', '').lower():
        raise DomainRefused(f'domain/uuid: {found} is not the uuid of '
                            f'this instance ({uuid})')
    for nic in root.findall('devices/interface/source[@bridge]'):
        bridge = nic.get('bridge', '')
        if not any(fnmatch.fnmatchcase(bridge, b) for b in bridges):
            raise DomainRefused(
                f'domain/devices/interface/source@bridge: {shown(bridge)} '
                f'is not a bridge guests may join on this host (allowed: '
                f'{", ".join(bridges) or "none"}; [agent] allowed_bridges)')
    disks = root.findall('devices/disk')
    if replicated is not None:
        sourced = replicated_disks(root)
        if len(sourced) > MAX_DISKS:
            raise DomainRefused(f'domain/devices/disk: at most {MAX_DISKS} '
                                f'disks are replicated (got '
                                f'{len(sourced)})')
        if len(sourced) != replicated:
            raise DomainRefused(f'domain/devices/disk: {len(sourced)} '
                                f'disks, but {replicated} replicas')
        disks = [d for d in disks if d not in sourced]
    elif len([d for d in disks if d.get('device', 'disk') == 'disk']) > 1:
        raise DomainRefused('domain/devices/disk: one disk is replicated; '
                            'a guest with more cannot be restored')
    for disk in disks:
        if disk.get('device', 'disk') == 'disk':
            continue
        source = disk.find('source')
        if source is None or source.get('file') is None:
            continue        # an empty drive
        path = source.get('file', '')
        if disk.find('readonly') is None and disk.get('device') != 'cdrom':
            raise DomainRefused('domain/devices/disk: a second disk must '
                                'be a read-only CD-ROM or floppy')
        if not _inside(path, readonly_dirs):
            raise DomainRefused(f'domain/devices/disk/source@file: '
                                f'{shown(path)} is outside the instance\'s '
                                f'own directory')
    for channel in root.findall('devices/channel'):
        source = channel.find('source')
        if source is not None:
            channel.remove(source)     # libvirt picks the socket path
    devices = root.find('devices')
    if devices is None:
        devices = ET.SubElement(root, 'devices')
    emu = ET.Element('emulator')
    emu.text = emulator
    devices.insert(0, emu)
    return root
