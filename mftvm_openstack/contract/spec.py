"""The agent's RPC payloads: the guest spec, the protection options, and
what a failover answers.

The agent's ``protect`` and ``prepare_secondary`` RPCs carry a
:class:`GuestSpec` and a :class:`ProtectionOptions`; the CLI builds the
same spec, and the instance process reads it back from ``guest.json``.
``prepare_secondary`` answers a :class:`PreparedSecondary`,
``failover`` a :class:`FailoverResult`.
Every field is typed and checked, because spec values end up on a QEMU
command line run as root: a path is absolute and holds no comma or
control character, a port forward is an IPv4 literal and two port
numbers, never a string QEMU would parse further::

    spec = GuestSpec.from_dict({'name': 'vm0', 'kernel': '/boot/vmlinuz',
                                'initrd': '/boot/initrd', 'disk': '/d.raw',
                                'forwards': [{'host_addr': '127.0.0.1',
                                              'host_port': 8080,
                                              'guest_port': 80}]})
    GuestSpec.from_dict({'name': 'vm0', 'forwards': [
        {'host_addr': '127.0.0.1', 'host_port': '1-:2,guestfwd=...',
         'guest_port': 80}]})
    # ContractError: forwards[0].host_port: must be an integer (got ...)
    ProtectionOptions.from_dict({'epoch_ms': 100}).to_dict()
    # {'epoch_ms': 100}: options left out are the host's defaults
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Any, Optional

from mftvm_openstack.contract import plugins
from mftvm_openstack.contract.limits import (
    EPOCH_MS_RANGE,
    IDLE_EPOCH_MS_RANGE,
    MAX_DISKS,
    MAX_NICS,
    MEMORY_MIB_RANGE,
    PORT_RANGE,
    SMP_RANGE,
)
from mftvm_openstack.contract.record import ContractError, Record, field

#: guest (and instance) names: a libvirt/QEMU-safe, path-safe token
NAME_PATTERN = r'[A-Za-z0-9][A-Za-z0-9_.-]{0,62}'
#: host names: the same characters, up to the length of an FQDN
HOST_PATTERN = r'[A-Za-z0-9][A-Za-z0-9_.-]{0,254}'
#: a file the guest's QEMU opens: empty (none) or an absolute path. No
#: comma (QEMU's option separator), no control character, no ``..``.
PATH_PATTERN = r'(?!.*/\.\.(/|$))(/[^,\x00-\x1f\x7f]{0,4095})?'
#: the kernel command line: printable, one argument of QEMU's
APPEND_PATTERN = r'[^\x00-\x1f\x7f]{0,4096}'
_OCTET = r'(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])'
#: a dotted-quad IPv4 address, nothing else
IPV4_PATTERN = rf'{_OCTET}(\.{_OCTET}){{3}}'
#: a libvirt domain the engine adopts: empty (none) or a name
DOMAIN_PATTERN = rf'({NAME_PATTERN})?'
DISK_FORMATS = ('raw', 'qcow2')
ACCELERATORS = ('tcg', 'kvm')
#: the most port forwards one guest may have
MAX_FORWARDS = 64


@dataclasses.dataclass(frozen=True)
class HostForward(Record):
    """A user-mode network port forward: host ``addr:port`` → guest port."""

    host_addr: str = field(pattern=IPV4_PATTERN)
    host_port: int = field(range=PORT_RANGE)
    guest_port: int = field(range=PORT_RANGE)

    def qemu(self) -> str:
        """As QEMU's ``hostfwd=`` takes it; every part was checked."""
        return f'tcp:{self.host_addr}:{self.host_port}-:{self.guest_port}'


#: a disk's name: its node in the guest's QEMU and its replica's export
DISK_NAME_PATTERN = r'disk[0-9]{1,2}'


def disk_name(index: int) -> str:
    """The name of the guest's disk ``index`` (0: the first, its root),
    on both sides: ``disk0``, ``disk1``, ..."""
    return f'disk{index}'


#: a disk file that must be given: an absolute path (PATH_PATTERN's rules)
DISK_PATH_PATTERN = r'(?!.*/\.\.(/|$))/[^,\x00-\x1f\x7f]{1,4095}'


@dataclasses.dataclass(frozen=True)
class GuestDisk(Record):
    """A disk of the guest's beyond the first (``GuestSpec.more_disks``):
    replicated in epochs like the first, named ``disk1``, ``disk2``, ...
    in its order (:func:`disk_name`)."""

    path: str = field(pattern=DISK_PATH_PATTERN)
    format: str = field(default='raw', choices=DISK_FORMATS)
    #: virtual size in bytes, filled by probe_disk()
    size: int = field(default=0, range=(0, 1 << 50))


@dataclasses.dataclass(frozen=True)
class GuestNic(Record):
    """A user-mode NIC of the guest's beyond the first
    (``GuestSpec.more_nics``): its own network, its output held until its
    epoch commits, as the first's."""

    forwards: tuple[HostForward, ...] = field(default=(),
                                              max_len=MAX_FORWARDS)


@dataclasses.dataclass(frozen=True)
class GuestSpec(Record):
    """Everything that defines the guest's virtual hardware.

    Either the engine starts the guest itself (``kernel``, ``initrd`` and
    ``disk`` say what to run), or ``domain`` names the libvirt domain that
    runs it (Nova's ``instance-0000000N``): the libvirt domain's own XML
    is then the hardware, and the engine adopts the running domain.
    :meth:`from_json` checks that one of the two is given.
    """

    name: str = field(pattern=NAME_PATTERN)
    kernel: str = field(default='', pattern=PATH_PATTERN)
    initrd: str = field(default='', pattern=PATH_PATTERN)
    disk: str = field(default='', pattern=PATH_PATTERN)
    append: str = field(default='console=ttyS0 quiet',
                        pattern=APPEND_PATTERN)
    disk_format: str = field(default='raw', choices=DISK_FORMATS)
    #: virtual size in bytes, filled by probe_disk()
    disk_size: int = field(default=0, range=(0, 1 << 50))
    memory_mib: int = field(default=128, range=MEMORY_MIB_RANGE)
    smp: int = field(default=1, range=SMP_RANGE)
    forwards: tuple[HostForward, ...] = field(default=(),
                                              max_len=MAX_FORWARDS)
    accel: str = field(default='tcg', choices=ACCELERATORS)
    domain: str = field(default='', pattern=DOMAIN_PATTERN)
    #: the disks after ``disk`` (a guest the engine starts itself; a
    #: libvirt domain's disks are its XML's)
    #: (None, left out of the dict, is none: a one-disk spec's dict is as
    #: it always was)
    more_disks: Optional[tuple[GuestDisk, ...]] = field(
        default=None, max_len=MAX_DISKS - 1, nullable=False)
    #: the NICs after the first (whose port forwards are ``forwards``)
    more_nics: Optional[tuple[GuestNic, ...]] = field(
        default=None, max_len=MAX_NICS - 1, nullable=False)

    @property
    def disks(self) -> tuple[GuestDisk, ...]:
        """The disks after the first."""
        return self.more_disks or ()

    @property
    def nics(self) -> tuple[GuestNic, ...]:
        """The NICs after the first."""
        return self.more_nics or ()

    @property
    def mac(self) -> str:
        """A stable locally administered MAC: the same on every host."""
        return self.nic_mac(0)

    def nic_mac(self, index: int) -> str:
        """NIC ``index``'s MAC, stable on every host (the first NIC's
        is :attr:`mac`, as it always was)."""
        key = self.name if index == 0 else f'{self.name}/nic{index}'
        digest = hashlib.sha256(key.encode()).digest()
        return '52:54:00:' + ':'.join(f'{b:02x}' for b in digest[:3])

    @property
    def nic_forwards(self) -> list[tuple[HostForward, ...]]:
        """Every NIC's port forwards, the first NIC's first."""
        return [self.forwards] + [nic.forwards for nic in self.nics]

    @property
    def all_disks(self) -> list[tuple[str, str, int]]:
        """(path, format, size) of every disk, the first first."""
        return [(self.disk, self.disk_format, self.disk_size)] + [
            (d.path, d.format, d.size) for d in self.disks]

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib << 20

    def check_runnable(self) -> None:
        """ContractError unless the spec says what to run."""
        if not self.domain and not (self.kernel and self.initrd
                                    and self.disk):
            raise ContractError('spec: a guest needs kernel, initrd and '
                                'disk, or the libvirt domain that runs it')
        if self.domain and (self.disks or self.nics):
            raise ContractError('spec.more_disks: a libvirt domain\'s disks '
                                'and NICs are those of its XML')
        paths = [self.disk] + [d.path for d in self.disks]
        for i, path in enumerate(paths[1:], 1):
            if path in paths[:i]:
                # QEMU would open one file twice, as two disks
                raise ContractError(f'spec.more_disks[{i - 1}].path: {path} '
                                    f'is already a disk of the guest')

    def to_json(self) -> dict[str, Any]:
        return self.to_dict()

    @classmethod
    def from_json(cls, data: Any) -> GuestSpec:
        """A spec checked field by field, that says what to run."""
        spec = cls.from_dict(data, 'spec')
        spec.check_runnable()
        return spec


@dataclasses.dataclass(frozen=True)
class ProtectionOptions(Record):
    """How a guest is protected; an option left out (None) is the host's
    ``[ft]`` default."""

    epoch_ms: Optional[int] = field(default=None, range=EPOCH_MS_RANGE,
                                    nullable=False)
    idle_epoch_ms: Optional[int] = field(
        default=None, range=IDLE_EPOCH_MS_RANGE, nullable=False)
    disk_sync: Optional[str] = field(
        default=None, choices=plugins.disk_sync_choices, nullable=False)
    tracker: Optional[str] = field(default=None,
                                   choices=plugins.tracker_choices,
                                   nullable=False)
    #: seconds the guest runs unprotected before protection starts
    start_delay: Optional[float] = field(default=None, range=(0, math.inf),
                                         nullable=False)


#: a pair's id in its certificates' names (hex)
PAIR_KEY_PATTERN = r'[0-9a-f]{16,64}'
#: one PEM certificate or key
PEM_PATTERN = (r'-----BEGIN [A-Z ]+-----\n[A-Za-z0-9+/=\n]{1,16000}'
               r'-----END [A-Z ]+-----\n')


@dataclasses.dataclass(frozen=True)
class ClientCredentials(Record):
    """The primary's half of a pair's credentials
    (:mod:`mftvm_openstack.ft.pair_tls`): the pair CA's certificate, and
    the primary's own certificate and key, PEM."""

    pair_key: str = field(pattern=PAIR_KEY_PATTERN)
    ca_cert: str = field(pattern=PEM_PATTERN)
    cert: str = field(pattern=PEM_PATTERN)
    key: str = field(pattern=PEM_PATTERN)


@dataclasses.dataclass(frozen=True)
class PreparedSecondary(Record):
    """What ``prepare_secondary`` answers: the secondary listens, and
    (unless its host turned TLS off) admits only the holder of
    ``credentials``, which reach the primary in this reply alone."""

    host: str = field(pattern=HOST_PATTERN)
    #: where the primary sends its data stream: ``tcp:HOST:PORT``
    data_address: str = field(
        pattern=r'tcp:[A-Za-z0-9_.:\[\]-]{1,255}:[0-9]{1,5}')
    credentials: Optional[ClientCredentials] = None


@dataclasses.dataclass(frozen=True)
class FailoverResult(Record):
    """What the agent's ``failover`` answers."""

    instance: str = field(pattern=NAME_PATTERN)
    #: the agent that was asked
    host: str = field(pattern=HOST_PATTERN)
    #: where the guest runs now, if known: the asked host after a
    #: takeover, the peer after a planned handover by the primary
    runs_on: Optional[str] = field(default=None, pattern=HOST_PATTERN)
    #: a takeover's duration, primary lost to guest running (ms)
    failover_ms: Optional[float] = None
