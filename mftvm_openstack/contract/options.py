"""What an instance process is told: ``guest.json``'s options.

The agent (or the ``mftvm`` CLI) writes a guest's directory; the
instance process started there reads ``guest.json`` back, a file another
process wrote, so its options are checked field by field like every
other value that crosses a process (an unknown, mistyped or out-of-range
option refuses the whole file, naming it)::

    opts = HostOptions.from_dict({'epoch_ms': 100, 'tls': True},
                                 'guest.json options')
    opts.detect_timeout                  # 1.0: left out, the default
    HostOptions.from_dict({'epoch_ms': 'fast'}, 'guest.json options')
    # ContractError: guest.json options.epoch_ms: must be an integer ...

An option left out means its default here. ``tls`` is the one whose
absence says something: a directory written before pair TLS existed has
no ``tls``; see :meth:`HostOptions.load`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

from mftvm_openstack.contract import plugins
from mftvm_openstack.contract.control import PAIR_ID_PATTERN
from mftvm_openstack.contract.limits import (
    EPOCH_MS_RANGE,
    IDLE_EPOCH_MS_RANGE,
    MIN_EPOCH_MS_RANGE,
    OUTPUT_BATCH_MS_RANGE,
    PAUSE_PERCENT_RANGE,
)
from mftvm_openstack.contract.record import Record, field
from mftvm_openstack.contract.spec import (
    HOST_PATTERN,
    NAME_PATTERN,
    PATH_PATTERN,
)

#: where a secondary listens: ``unix:PATH`` or ``tcp:HOST:PORT``
DATA_ADDRESS_PATTERN = (r'unix:[^\x00-\x1f\x7f]{1,107}'
                        r'|tcp:[A-Za-z0-9_.:\[\]-]{1,255}:[0-9]{1,5}')
#: a URL without control characters or spaces (libvirt's, a masked
#: fencing backend's)
URL_PATTERN = r'[A-Za-z0-9+.-]{1,32}:[^\x00-\x20\x7f]{0,4096}'
_SECONDS = (0.0, 86400.0)
#: a Linux network interface name as the kernel takes it (1 to 15
#: characters, not ``.`` or ``..``, no ``/``, ``:`` or white space), in
#: the narrower alphabet Nova and os-vif use
IFNAME_PATTERN = r'(?!\.\.?$)[A-Za-z0-9_.+-]{1,15}'
#: an entry of an allowed-bridges list: an interface name, in which
#: ``*`` and ``?`` are wildcards (:func:`fnmatch.fnmatchcase`)
BRIDGE_GLOB_PATTERN = r'(?!\.\.?$)[A-Za-z0-9_.+*?-]{1,15}'
#: the bridges a restored guest may join unless an operator says
#: otherwise: Open vSwitch's integration bridge (Neutron's OVS and OVN
#: drivers), the Linux bridge agent's per-network ``brq...`` bridges,
#: and libvirt's default network
DEFAULT_ALLOWED_BRIDGES = ('br-int', 'brq*', 'virbr0')
#: what a guest directory that predates pair TLS means (see load())
TLS_BEFORE_IT_EXISTED = True


@dataclasses.dataclass(frozen=True)
class HostOptions(Record):
    """One side's options: how the guest is protected, and what only the
    instance process needs (see ``[agent]``, ``[ft]``, ``[fencing]`` and
    ``[replication]`` in :mod:`mftvm_openstack.conf` for their
    meaning)."""

    # -- how the guest is protected (the caller's choice)
    epoch_ms: int = field(default=200, range=EPOCH_MS_RANGE)
    idle_epoch_ms: int = field(default=0, range=IDLE_EPOCH_MS_RANGE)
    disk_sync: str = field(default=plugins.DEFAULT_DISK_SYNC,
                           choices=plugins.disk_sync_choices)
    tracker: str = field(default=plugins.AUTO_TRACKER,
                         choices=plugins.tracker_choices)
    #: seconds the guest runs unprotected before protection starts
    start_delay: float = field(default=0.0, range=_SECONDS)
    #: the CLI's own wait for protection (the instance does not read it)
    protect_timeout: Optional[float] = field(default=None,
                                             range=(1.0, math.inf))
    # -- where the sides meet
    #: secondary: its data address (None: a unix socket in its dir)
    listen: Optional[str] = field(default=None,
                                  pattern=DATA_ADDRESS_PATTERN)
    #: primary: where its secondary listens
    secondary: Optional[str] = field(default=None,
                                     pattern=DATA_ADDRESS_PATTERN)
    #: secondary: serve the disk replica over TCP on this address
    nbd_host: Optional[str] = field(default=None, pattern=HOST_PATTERN)
    pair_id: str = field(default='pair-1', pattern=PAIR_ID_PATTERN)
    #: mutual TLS on the data stream and NBD, with the creds in the
    #: guest dir's ``tls/``; off only on a dedicated, trusted network
    tls: bool = TLS_BEFORE_IT_EXISTED
    # -- fencing
    #: the backend's URL, masked (the real one comes in the environment);
    #: None: a lock file in ``fence_dir``
    fence_url: Optional[str] = field(default=None, pattern=URL_PATTERN)
    #: where the lock file lives (None: the guest dir)
    fence_dir: Optional[str] = field(default=None, pattern=PATH_PATTERN)
    fence_lease: int = field(default=3, range=(1, 3600))
    fence_acquire_timeout: float = field(default=10.0, range=(0.1, 3600.0))
    #: this host's name at the coordination backend
    member: Optional[str] = field(default=None, pattern=HOST_PATTERN)
    #: tells RAM files of one guest apart per host
    ram_tag: Optional[str] = field(default=None, pattern=HOST_PATTERN)
    # -- bounds
    heartbeat_interval: float = field(default=0.2, range=(0.01, 60.0))
    detect_timeout: float = field(default=1.0, range=(0.05, 3600.0))
    ack_timeout: float = field(default=10.0, range=(0.1, 3600.0))
    max_held_epochs: int = field(default=50, range=(1, 1 << 20))
    max_held_bytes: int = field(default=32 << 20, range=(1 << 12, 1 << 40))
    # -- the adaptive epoch (ft.pair.cadence): an epoch ends
    # output_batch_ms after the guest's first packet (or once the guest
    # is quiet, if it is still busy then), no sooner than
    # min_epoch_ms after the last checkpoint began, with a busy guest
    # paused at most max_pause_percent of the time
    adaptive_epochs: bool = True
    output_batch_ms: int = field(default=2, range=OUTPUT_BATCH_MS_RANGE)
    min_epoch_ms: int = field(default=10, range=MIN_EPOCH_MS_RANGE)
    max_pause_percent: int = field(default=25, range=PAUSE_PERCENT_RANGE)
    hang_timeout: float = field(default=15.0, range=(0.1, 3600.0))
    replica_timeout: float = field(default=3.0, range=(0.1, 3600.0))
    # -- libvirt
    libvirt_uri: str = field(default='qemu:///system', pattern=URL_PATTERN)
    #: secondary: its restored domain's name (None: the spec's domain)
    domain_name: Optional[str] = field(default=None, pattern=NAME_PATTERN)
    #: the bridges a libvirt guest's NICs may name ([agent]
    #: allowed_bridges): what the wire says is refused otherwise
    allowed_bridges: tuple[str, ...] = field(
        default=DEFAULT_ALLOWED_BRIDGES, pattern=BRIDGE_GLOB_PATTERN,
        max_len=64)

    @classmethod
    def load(cls, data: Any, where: str = 'guest.json options') \
            -> tuple[HostOptions, bool]:
        """``data`` checked, and whether it predates pair TLS.

        A directory written before pair TLS has no ``tls`` option. It
        means ``tls`` on: an upgrade must never turn encryption and
        authentication off without anyone saying so, and the old plain
        stream cannot be told from an attacker's. Without pair
        credentials in its directory such a side cannot be protected
        (the secondary refuses to listen, the primary to connect, each
        saying why) until the guest is protected again, which writes
        them (the agent's re-protect gives a running primary its half).
        """
        options = cls.from_dict(data, where)
        return options, isinstance(data, dict) and 'tls' not in data
