"""How QEMU opens a shared image (:class:`~mftvm_openstack.contract.volume.
SharedDisk`): its ``blockdev-add`` and secret arguments, and a ``json:``
filename for a layer chain whose base it is::

    key = secret_object(disk, 'vol-key')        # None without cephx
    await monitor.execute('object-add', **key)
    await monitor.execute('blockdev-add', **base_blockdev(disk, 'base',
                                                          'vol-key'))

Every value comes from a checked record; nothing here talks to QEMU.
"""

from __future__ import annotations

import json
from typing import Any, Optional

from mftvm_openstack.contract.volume import SharedDisk


def protocol_blockdev(shared: SharedDisk, node: str,
                      secret: Optional[str] = None) -> dict[str, Any]:
    """``blockdev-add`` arguments of the image's protocol node ``node``
    (``rbd``, or ``file``); ``secret`` the id of the QEMU secret object
    that holds the cephx key (:func:`secret_object`)::

        >>> protocol_blockdev(SharedDisk.from_dict({
        ...     'driver': 'rbd', 'pool': 'volumes', 'image': 'volume-1',
        ...     'monitors': [{'host': '10.0.0.1'}]}), 'vol-file')
        ... # doctest: +NORMALIZE_WHITESPACE
        {'driver': 'rbd', 'node-name': 'vol-file', 'pool': 'volumes',
         'image': 'volume-1', 'server': [{'host': '10.0.0.1',
         'port': '6789'}], 'cache': {'direct': True}}
    """
    if shared.driver == 'file':
        # No O_DIRECT: tmpfs and some shared filesystems refuse it;
        # flushes still reach the file. No QEMU file locks: the primary
        # keeps the image open as its buffer's backing (which takes the
        # write lock from everyone else), and it is the pair's protocol
        # that keeps one writer (as librbd's lock hand-over does for rbd).
        return {'driver': 'file', 'node-name': node,
                'filename': shared.path, 'locking': 'off'}
    args: dict[str, Any] = {
        'driver': 'rbd', 'node-name': node, 'pool': shared.pool,
        'image': shared.image,
        'server': [{'host': m.host.strip('[]'), 'port': str(m.port)}
                   for m in shared.monitors],
        # librbd's own cache off: a write is acknowledged once the OSDs
        # have it (a committed epoch merged is durable), and no stale
        # read is ever served from a cache the other host cannot see
        'cache': {'direct': True}}
    if shared.user:
        args['user'] = shared.user
        args['auth-client-required'] = ['cephx']
        if secret is not None:
            args['key-secret'] = secret
    return args


def secret_object(shared: SharedDisk, secret: str) -> Optional[dict[str,
                                                                    Any]]:
    """``object-add`` arguments of the secret holding the image's cephx
    key (read by QEMU from this host's key file), or None without cephx."""
    if not shared.user:
        return None
    return {'qom-type': 'secret', 'id': secret, 'file': shared.key_file,
            'format': 'base64'}


def base_blockdev(shared: SharedDisk, node: str,
                  secret: Optional[str] = None) -> dict[str, Any]:
    """The image as a raw format node ``node`` (the store's base)."""
    return {'driver': 'raw', 'node-name': node,
            'file': protocol_blockdev(shared, f'{node}-file', secret)}


def chain_filename(shared: SharedDisk) -> str:
    """A ``json:`` filename that opens the image, for a layer chain's
    base (``(chain_filename(d), 'raw')``; the key comes from the QEMU
    that opens it: libvirt's secret, or a secret object)."""
    return 'json:' + json.dumps(protocol_blockdev(shared, 'shared'))


def is_chain_filename(filename: str) -> bool:
    """``filename`` was made by :func:`chain_filename`."""
    return filename.startswith('json:')
