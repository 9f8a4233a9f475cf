"""A guest disk on storage both hosts reach: a Ceph RBD image.

Such a disk (a Cinder volume on RBD, doc/volumes.rst) is not copied to
the secondary: both hosts open the *same* image, each with its own
client, and the image is written only with committed epochs. What a
host opens it with crosses processes (the agent hands it to the
instance process, each side its own), so it is a record, checked field
by field before it reaches a ``blockdev-add``::

    disk = SharedDisk.from_dict({
        'driver': 'rbd', 'pool': 'volumes', 'image': 'volume-1',
        'monitors': [{'host': '10.0.0.1', 'port': 6789}],
        'user': 'cinder', 'key_file': '/etc/mftvm/ceph.key'})
    SharedDisk.from_dict({'driver': 'rbd', 'pool': 'a,b', ...})
    # ContractError: pool: must match ...

``driver='file'`` names an image file on a filesystem both hosts mount
(and the tests' stand-in for an RBD image on one machine).
"""

from __future__ import annotations

import dataclasses

from mftvm_openstack.contract.limits import PORT_RANGE
from mftvm_openstack.contract.record import ContractError, Record, field
from mftvm_openstack.contract.spec import HOST_PATTERN, PATH_PATTERN

#: Ceph pool and image names (nothing a QEMU option string would split)
RBD_NAME_PATTERN = r'[A-Za-z0-9_.-]{1,128}'
#: a cephx user, without ``client.``
RBD_USER_PATTERN = r'[A-Za-z0-9_.-]{1,64}'
#: the most monitors one image names
MAX_MONITORS = 16
#: an IPv4/IPv6 literal or a host name
MONITOR_HOST_PATTERN = rf'({HOST_PATTERN}|\[?[0-9A-Fa-f:.]{{2,45}}\]?)'


@dataclasses.dataclass(frozen=True)
class CephMonitor(Record):
    """One Ceph monitor: host and port."""

    host: str = field(pattern=MONITOR_HOST_PATTERN)
    port: int = field(default=6789, range=PORT_RANGE)


@dataclasses.dataclass(frozen=True)
class SharedDisk(Record):
    """A guest disk that both sides open where it is (see the module)."""

    driver: str = field(choices=('rbd', 'file'))
    pool: str = field(default='', pattern=f'({RBD_NAME_PATTERN})?')
    image: str = field(default='', pattern=f'({RBD_NAME_PATTERN})?')
    monitors: tuple[CephMonitor, ...] = field(default=(),
                                              max_len=MAX_MONITORS)
    #: cephx user ('' without cephx)
    user: str = field(default='', pattern=f'({RBD_USER_PATTERN})?')
    #: this host's file holding that user's key (base64, as
    #: ``ceph auth print-key`` prints it); '' without cephx
    key_file: str = field(default='', pattern=PATH_PATTERN)
    #: driver 'file': the image file
    path: str = field(default='', pattern=PATH_PATTERN)

    def __post_init__(self) -> None:
        if self.driver == 'rbd' and not (self.pool and self.image and
                                         self.monitors):
            raise ContractError('shared disk: rbd needs pool, image and '
                                'monitors')
        if self.driver == 'file' and not self.path:
            raise ContractError('shared disk: file needs a path')
        if bool(self.user) != bool(self.key_file):
            raise ContractError('shared disk: user and key_file go '
                                'together')

    @property
    def label(self) -> str:
        """What logs and errors call it: ``rbd:pool/image`` or the file."""
        if self.driver == 'rbd':
            return f'rbd:{self.pool}/{self.image}'
        return self.path
