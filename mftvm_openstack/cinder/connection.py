"""An RBD volume as Cinder describes it to a host, checked before use.

Cinder's answer to an attachment with a host's connector carries the
``connection_info`` that the host's hypervisor opens the volume with.
For Cinder's RBD driver::

    {'driver_volume_type': 'rbd',
     'data': {'name': 'volumes/volume-<id>', 'hosts': ['10.0.0.1'],
              'ports': ['6789'], 'cluster_name': 'ceph',
              'auth_enabled': True, 'auth_username': 'cinder',
              'secret_type': 'ceph', 'secret_uuid': '<uuid>',
              'volume_id': '<id>', ...}}

These fields end up in a ``blockdev-add`` (pool, image, monitors, user)
and in a libvirt domain, so :meth:`RbdVolume.from_connection_info` types
and checks each of them, and refuses anything else (another backend, a
name that is not ``pool/image``, a monitor that is not an address)::

    >>> v = RbdVolume.from_connection_info({
    ...     'driver_volume_type': 'rbd',
    ...     'data': {'name': 'volumes/volume-1', 'hosts': ['10.0.0.1'],
    ...              'ports': ['6789'], 'auth_enabled': True,
    ...              'auth_username': 'cinder', 'volume_id': '1'}})
    >>> (v.pool, v.image, v.monitors, v.user)
    ('volumes', 'volume-1', (('10.0.0.1', 6789),), 'cinder')
    >>> RbdVolume.from_connection_info({'driver_volume_type': 'iscsi'})
    Traceback (most recent call last):
    ...
    mftvm_openstack.cinder.connection.InvalidConnection: volume backend \
'iscsi' cannot be protected (only rbd)
"""

from __future__ import annotations

import dataclasses
import ipaddress
import re
import uuid
from collections.abc import Mapping
from typing import Any, Optional

#: Ceph pool and image names as Cinder's RBD driver makes them (no
#: slash, no "@" snapshot part, nothing a QEMU option string would split)
NAME_RE = re.compile(r'^[A-Za-z0-9_.-]{1,128}$')
USER_RE = re.compile(r'^[A-Za-z0-9_.-]{1,64}$')
#: a monitor's host name, if not an address
HOSTNAME_RE = re.compile(r'^[A-Za-z0-9]([A-Za-z0-9.-]{0,252})$')
MAX_MONITORS = 16


class InvalidConnection(ValueError):
    """Cinder's connection_info cannot be used; the message says why."""


@dataclasses.dataclass(frozen=True)
class RbdVolume:
    """One RBD volume as a host opens it."""

    volume_id: str
    pool: str
    image: str
    #: (host, port) of each Ceph monitor
    monitors: tuple[tuple[str, int], ...]
    #: cephx user (without "client."), or None without cephx
    user: Optional[str]
    #: the libvirt secret holding that user's key, if Cinder names one
    secret_uuid: Optional[str]
    cluster: str = 'ceph'

    @classmethod
    def from_connection_info(cls, info: Any) -> RbdVolume:
        if not isinstance(info, Mapping):
            raise InvalidConnection('connection_info is not a mapping')
        kind = info.get('driver_volume_type')
        if kind != 'rbd':
            raise InvalidConnection(f'volume backend {kind!r} cannot be '
                                    f'protected (only rbd)')
        data = info.get('data')
        if not isinstance(data, Mapping):
            raise InvalidConnection('connection_info has no data')
        name = data.get('name')
        if not isinstance(name, str) or name.count('/') != 1:
            raise InvalidConnection(f'rbd name {name!r} is not pool/image')
        pool, image = name.split('/')
        for what, value in (('pool', pool), ('image', image)):
            if not NAME_RE.match(value):
                raise InvalidConnection(f'rbd {what} {value!r} refused')
        volume_id = data.get('volume_id')
        if not isinstance(volume_id, str) or not NAME_RE.match(volume_id):
            raise InvalidConnection(f'volume_id {volume_id!r} refused')
        cluster = data.get('cluster_name') or 'ceph'
        if not isinstance(cluster, str) or not NAME_RE.match(cluster):
            raise InvalidConnection(f'cluster name {cluster!r} refused')
        return cls(volume_id=volume_id, pool=pool, image=image,
                   monitors=_monitors(data.get('hosts'), data.get('ports')),
                   user=_user(data), secret_uuid=_secret(data),
                   cluster=cluster)

    def blockdev(self, node_name: str, key_secret: Optional[str]
                 ) -> dict[str, Any]:
        """QEMU's ``blockdev-add`` arguments for this volume (the rbd
        driver), its key in QEMU secret object ``key_secret``::

            >>> RbdVolume('1', 'volumes', 'volume-1', (('10.0.0.1', 6789),),
            ...           'cinder', None).blockdev('vol0', 'sec0')
            ... # doctest: +NORMALIZE_WHITESPACE
            {'driver': 'rbd', 'node-name': 'vol0', 'pool': 'volumes',
             'image': 'volume-1', 'server': [{'host': '10.0.0.1',
             'port': '6789'}], 'user': 'cinder', 'auth-client-required':
             ['cephx'], 'key-secret': 'sec0'}
        """
        args: dict[str, Any] = {
            'driver': 'rbd', 'node-name': node_name, 'pool': self.pool,
            'image': self.image,
            'server': [{'host': host, 'port': str(port)}
                       for host, port in self.monitors]}
        if self.user is not None:
            args['user'] = self.user
            args['auth-client-required'] = ['cephx']
            if key_secret is not None:
                args['key-secret'] = key_secret
        return args


def _monitors(hosts: Any, ports: Any) -> tuple[tuple[str, int], ...]:
    if not isinstance(hosts, list) or not isinstance(ports, list) or \
            not hosts or len(hosts) != len(ports) or \
            len(hosts) > MAX_MONITORS:
        raise InvalidConnection('rbd monitors: hosts and ports must be '
                                f'two lists of 1-{MAX_MONITORS} alike')
    found = []
    for host, port in zip(hosts, ports):
        if not isinstance(host, str) or not _is_host(host):
            raise InvalidConnection(f'rbd monitor host {host!r} refused')
        try:
            number = int(port)
        except (TypeError, ValueError):
            number = 0
        if isinstance(port, bool) or not 0 < number < 65536:
            raise InvalidConnection(f'rbd monitor port {port!r} refused')
        found.append((host, number))
    return tuple(found)


def _is_host(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip('[]'))
        return True
    except ValueError:
        return bool(HOSTNAME_RE.match(host))


def _user(data: Mapping[str, Any]) -> Optional[str]:
    if not data.get('auth_enabled'):
        return None
    user = data.get('auth_username')
    if not isinstance(user, str) or not USER_RE.match(user):
        raise InvalidConnection(f'rbd user {user!r} refused')
    return user


def _secret(data: Mapping[str, Any]) -> Optional[str]:
    secret = data.get('secret_uuid')
    if secret in (None, ''):
        return None
    try:
        return str(uuid.UUID(str(secret)))
    except ValueError:
        raise InvalidConnection(f'secret_uuid {secret!r} refused') from None
