"""The handshake that opens a pair's data stream.

The primary connects and sends :class:`Hello`; the secondary answers
:class:`Ready` (where to write the disk replica) or an error frame and
closes. A secondary refuses a Hello of another protocol version::

    Hello(version=PROTOCOL_VERSION, qemu_pid=..., host_pid=...,
          boot_id=..., pair_id='pair-1', disk_size=1 << 30).to_dict()

A libvirt guest booted from a kernel and initrd of its host's own (Nova's
``instances/<uuid>/kernel``) announces them in the HELLO's
``boot_files``; one ``BOOT_FILE`` frame each follows the HELLO, in that
order, and the secondary keeps them as its own copies
(:mod:`mftvm_openstack.ft.boot_files`)::

    BootFile(role='kernel', size=9_000_000, sha256='9f86d0...')

A guest with more disks names the others in ``disks`` (``disk1``, ...,
in order; :meth:`Hello.disk_sizes` checks the names), and the secondary
answers each one's export in ``Ready.exports``, on the same NBD server
as ``target``'s. A single-disk pair leaves both out, as before.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from mftvm_openstack.contract.control import PAIR_ID_PATTERN
from mftvm_openstack.contract.limits import BOOT_FILE_MAX_BYTES, MAX_DISKS
from mftvm_openstack.contract.record import ContractError, Record, field
from mftvm_openstack.contract.spec import DISK_NAME_PATTERN, disk_name

#: bumped whenever a frame's meaning changes
PROTOCOL_VERSION = 1
#: process ids (Linux's pid_max is at most 2**22)
PID_RANGE = (1, 1 << 22)


#: the files a direct-kernel boot names in ``<os>``, each at most once
BOOT_FILE_ROLES = ('kernel', 'initrd')


@dataclasses.dataclass(frozen=True)
class BootFile(Record):
    """A boot file whose bytes follow the HELLO in a ``BOOT_FILE`` frame."""

    #: which ``<os>`` element names it; also the secondary's file name
    role: str = field(choices=BOOT_FILE_ROLES)
    size: int = field(range=(0, BOOT_FILE_MAX_BYTES))
    #: of its bytes, lower-case hex
    sha256: str = field(pattern=r'[0-9a-f]{64}')


#: an NBD export's name
EXPORT_PATTERN = r'[A-Za-z0-9_.-]{1,64}'


@dataclasses.dataclass(frozen=True)
class DiskInfo(Record):
    """A disk of the guest beyond the first, as the primary names it."""

    name: str = field(pattern=DISK_NAME_PATTERN)
    #: virtual size in bytes
    size: int = field(range=(0, 1 << 50))


@dataclasses.dataclass(frozen=True)
class Hello(Record):
    version: int = field(range=(0, 1 << 31))
    #: the primary's QEMU and instance process, and the machine they run
    #: on (a secondary on the same machine waits for that QEMU to exit
    #: before it restores the guest)
    qemu_pid: int = field(range=PID_RANGE)
    host_pid: int = field(range=PID_RANGE)
    #: /proc/sys/kernel/random/boot_id (a uuid; only compared)
    boot_id: str = field(pattern=r'[A-Za-z0-9-]{1,64}')
    pair_id: str = field(pattern=PAIR_ID_PATTERN)
    #: virtual size in bytes of the disk the guest runs on
    disk_size: int = field(range=(0, 1 << 50))
    #: a libvirt guest's domain XML (None: the engine's own QEMU)
    domain_xml: Optional[str] = field(default=None, max_len=1 << 20)
    #: the boot files that follow the HELLO (a domain's kernel, initrd)
    boot_files: tuple[BootFile, ...] = field(
        default=(), max_len=len(BOOT_FILE_ROLES))
    #: the guest's disks after the first, ``disk1`` on, in order
    #: (None, left out, for a guest with one disk)
    disks: Optional[tuple[DiskInfo, ...]] = field(
        default=None, max_len=MAX_DISKS - 1, nullable=False)

    def disk_sizes(self) -> list[int]:
        """Every disk's size, the first's first; ContractError unless
        ``disks`` names ``disk1``, ``disk2``, ... in order (a replica is
        made per name: a name twice would be one replica for two
        disks)."""
        disks = self.disks or ()
        for i, disk in enumerate(disks, 1):
            if disk.name != disk_name(i):
                raise ContractError(f'HELLO.disks[{i - 1}].name: must be '
                                    f'{disk_name(i)} (got {disk.name})')
        return [self.disk_size] + [d.size for d in disks]


@dataclasses.dataclass(frozen=True)
class NbdTargetInfo(Record):
    """Where the secondary serves the disk replica over NBD."""

    #: a unix socket's path (at most 107 bytes, the kernel's limit)
    socket: Optional[str] = field(default=None,
                                  pattern=r'/[^\x00-\x1f\x7f]{0,106}')
    #: a host name or an IP address literal
    host: Optional[str] = field(default=None,
                                pattern=r'[A-Za-z0-9_.:\[\]-]{1,255}')
    port: Optional[int] = field(default=None, range=(1, 65535))
    export: str = field(default='disk0', pattern=EXPORT_PATTERN)


@dataclasses.dataclass(frozen=True)
class Ready(Record):
    target: NbdTargetInfo
    #: the exports of HELLO's ``disks``, in their order, on ``target``'s
    #: server
    #: (None, left out, for a guest with one disk)
    exports: Optional[tuple[str, ...]] = field(
        default=None, max_len=MAX_DISKS - 1, pattern=EXPORT_PATTERN,
        nullable=False)
