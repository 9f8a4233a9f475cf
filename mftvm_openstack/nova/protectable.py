"""Which servers FT can protect today, and how the rest are refused.

The agents replicate every local disk of a server (its root disk, its
ephemeral and swap disks, its config drive: up to
:data:`~mftvm_openstack.contract.limits.MAX_DISKS` in all) and hold the
output of each of its NICs (up to
:data:`~mftvm_openstack.contract.limits.MAX_NICS`). A Cinder volume
(booted from or attached) is protected only on Ceph RBD, and only where
``[ft] rbd_volumes`` says the agents do (doc/volumes.rst: both hosts
open the same image, only committed epochs reach it); any other volume
would be left behind on the dead host. A server with one would be
called protected while a failover loses it, so the driver looks at the
server's devices first (:class:`Devices`) and :func:`cannot_protect`
says what of them cannot be protected::

    >>> cannot_protect(Devices(root_volume=True, ports=2))
    'boot from volume'
    >>> cannot_protect(Devices(ephemerals=1, swap=True, config_drive=True,
    ...                        ports=2)) is None
    True
    >>> cannot_protect(Devices(root_volume=True, data_volumes=1,
    ...                        volume_backends=('rbd', 'iscsi')),
    ...                rbd_volumes=True)
    'a volume on iscsi (not Ceph RBD)'

What the driver does with it (see ``doc/nova-driver.rst``):

* at spawn, an FT *flavor* (FT is required) refuses the build before
  the guest starts (:func:`build_refused`); FT asked by server metadata
  (``ft=true``) runs the server unprotected and says so in ``ft_status``
  (:func:`status`), as it does when no secondary host is free;
* at every later protection (start, reboot, after a hand-off) the same
  look, from Nova's records, ends in :func:`status`;
* while a server asks for FT, adding a volume or a port and swapping a
  volume are refused before anything changes (:func:`change_refused`).

Nothing here imports Nova: :func:`devices` reads the driver's
``block_device_info`` and ``network_info`` as the mappings they are.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any, Optional

from mftvm_openstack.contract.limits import MAX_DISKS, MAX_NICS
from mftvm_openstack.nova import ft_request

#: the Cinder backend (``driver_volume_type``) whose volumes can be
#: protected (doc/volumes.rst)
RBD = 'rbd'


def supported(rbd_volumes: bool = False) -> str:
    """What a protected server may have (``rbd_volumes``: ``[ft]
    rbd_volumes``)."""
    if rbd_volumes:
        return (f'only local disks and Ceph RBD volumes (up to '
                f'{MAX_DISKS}) and the ports a server is built with (up '
                f'to {MAX_NICS}) are protected')
    return (f'only local disks (up to {MAX_DISKS}) and the ports a '
            f'server is built with (up to {MAX_NICS}) are replicated')


#: what a protected server may have: local disks, the ports it was built
#: with
SUPPORTED = supported()


@dataclasses.dataclass(frozen=True)
class Devices:
    """The devices of a server that matter to protection."""

    #: its root disk is a Cinder volume (boot from volume)
    root_volume: bool = False
    #: Cinder volumes other than the root
    data_volumes: int = 0
    #: local ephemeral disks (the flavor's or block device mappings')
    ephemerals: int = 0
    #: a local swap disk
    swap: bool = False
    #: a config drive
    config_drive: bool = False
    #: Neutron ports
    ports: int = 0
    #: each volume's Cinder backend (its connection_info's
    #: ``driver_volume_type``; 'unknown' without one), the root's first
    volume_backends: tuple[str, ...] = ()


def _count(n: int, one: str, many: str) -> str:
    return one if n == 1 else f'{n} {many}'


def local_disks(found: Devices) -> int:
    """How many disks of ``found`` the agents replicate: the local root
    disk (unless booted from a volume), ephemeral, swap, config drive."""
    return ((not found.root_volume) + found.ephemerals + found.swap
            + found.config_drive)


def cannot_protect(found: Devices,
                   rbd_volumes: bool = False) -> Optional[str]:
    """What of ``found`` cannot be protected, for people; None if all can.
    ``rbd_volumes``: Ceph RBD volumes can (``[ft] rbd_volumes``).

    ::

        >>> cannot_protect(Devices(data_volumes=2, ephemerals=1,
        ...                        swap=True, config_drive=True))
        '2 attached volumes'
        >>> cannot_protect(Devices(ephemerals=8, ports=9))
        '9 local disks (at most 8), 9 ports (at most 8)'
    """
    what = []
    volumes = found.root_volume + found.data_volumes
    if rbd_volumes:
        others = [b for b in found.volume_backends if b != RBD]
        others += ['unknown'] * (volumes - len(found.volume_backends))
        if others:
            what.append(f'{_count(len(others), "a volume", "volumes")} on '
                        f'{", ".join(sorted(set(others)))} (not Ceph RBD)')
    else:
        if found.root_volume:
            what.append('boot from volume')
        if found.data_volumes:
            what.append(_count(found.data_volumes, 'an attached volume',
                               'attached volumes'))
    disks = local_disks(found) + (volumes if rbd_volumes else 0)
    if disks > MAX_DISKS:
        what.append(f'{disks} {"disks" if rbd_volumes else "local disks"}'
                    f' (at most {MAX_DISKS})')
    if found.ports > MAX_NICS:
        what.append(f'{found.ports} ports (at most {MAX_NICS})')
    return ', '.join(what) or None


def _get(item: Any, key: str, default: Any = None) -> Any:
    getter = getattr(item, 'get', None)
    return getter(key, default) if getter is not None else default


def devices(flavor: Any, block_device_info: Optional[Mapping[str, Any]],
            network_info: Optional[Iterable[Any]],
            config_drive: bool) -> Devices:
    """The :class:`Devices` of a server, from what Nova's driver gets.

    ``block_device_info`` is the driver's (``block_device_mapping``: the
    volumes, ``ephemerals``, ``swap``); ``flavor`` adds the ephemeral and
    swap disks libvirt makes from ``ephemeral_gb`` and ``swap`` when no
    mapping names them; ``network_info`` is one entry per port;
    ``config_drive`` is ``nova.virt.configdrive.required_by(instance)``::

        >>> class Flavor:
        ...     ephemeral_gb, swap = 0, 512
        >>> devices(Flavor(), {'block_device_mapping': [
        ...     {'boot_index': 0}, {'boot_index': None}]},
        ...     [{'id': 'p1'}], config_drive=False)
        ... # doctest: +NORMALIZE_WHITESPACE
        Devices(root_volume=True, data_volumes=1, ephemerals=0, swap=True,
                config_drive=False, ports=1,
                volume_backends=('unknown', 'unknown'))
    """
    info = block_device_info or {}
    volumes = list(_get(info, 'block_device_mapping') or [])
    root = [v for v in volumes if _get(v, 'boot_index') == 0]
    ephemerals = len(_get(info, 'ephemerals') or [])
    if not ephemerals and (getattr(flavor, 'ephemeral_gb', 0) or 0) > 0:
        ephemerals = 1      # libvirt's default disk.local
    swap = _get(info, 'swap') or {}
    has_swap = (int(_get(swap, 'swap_size', 0) or 0) > 0 or
                (getattr(flavor, 'swap', 0) or 0) > 0)
    return Devices(root_volume=bool(root),
                   data_volumes=len(volumes) - len(root),
                   ephemerals=ephemerals, swap=has_swap,
                   config_drive=bool(config_drive),
                   ports=len(list(network_info or [])),
                   volume_backends=tuple(
                       backend(v) for v in root + [
                           v for v in volumes if v not in root]))


def backend(volume: Any) -> str:
    """The Cinder backend of one of the driver's volume mappings (its
    ``connection_info``'s ``driver_volume_type``; 'unknown' if none)::

        >>> backend({'connection_info': {'driver_volume_type': 'rbd'}})
        'rbd'
        >>> backend({'connection_info': '{"driver_volume_type": "iscsi"}'})
        'iscsi'
    """
    info = _get(volume, 'connection_info')
    if isinstance(info, str):
        try:
            info = json.loads(info)
        except ValueError:
            info = None
    kind = _get(info, 'driver_volume_type') if info is not None else None
    if not isinstance(kind, str) or not kind.isidentifier():
        return 'unknown'
    return kind[:32]


def required_by_flavor(instance: Any) -> bool:
    """``instance``'s flavor asks for FT (``ft:enabled``; a bad value
    counts as yes): FT is required, not only wished for.

    ::

        >>> class Flavor:
        ...     extra_specs = {'ft:enabled': 'true'}
        >>> class Server:
        ...     flavor = Flavor()
        >>> required_by_flavor(Server())
        True
    """
    specs = getattr(getattr(instance, 'flavor', None), 'extra_specs',
                    None) or {}
    try:
        return ft_request.parse_bool(ft_request.FLAVOR, ft_request.ENABLED,
                                     specs.get(ft_request.ENABLED, 'false'))
    except ft_request.InvalidFTRequest:
        return True


def status(what: str) -> str:
    """``ft_status`` of an FT server that runs unprotected for ``what``."""
    return f'unprotected: cannot protect {what}'


def build_refused(what: str, rbd_volumes: bool = False) -> str:
    """Why the build of an FT-flavor server is refused (a fault: short).

    ::

        >>> build_refused('an attached volume')
        'fault tolerance cannot protect an attached volume (only local \
disks (up to 8) and the ports a server is built with (up to 8) are \
replicated)'
    """
    return f'fault tolerance cannot protect {what} ' \
           f'({supported(rbd_volumes)})'


#: what the refused change is, as :func:`change_refused` names it
ATTACH_VOLUME = 'Attaching a volume to'
ATTACH_INTERFACE = 'Attaching an interface to'
SWAP_VOLUME = 'Swapping a volume of'
DETACH_VOLUME = 'Detaching a volume from'


def change_refused(what: str, remedy: str) -> str:
    """Why ``what`` (:data:`ATTACH_VOLUME`, ...) is refused on a server
    that asks for FT; ``remedy`` says how to unprotect it.

    ::

        >>> change_refused(ATTACH_VOLUME, 'unset the ft server property')
        'Attaching a volume to a fault-tolerant server is refused (only \
local disks (up to 8) and the ports a server is built with (up to 8) \
are replicated): unset the ft server property'
    """
    return f'{what} a fault-tolerant server is refused ({SUPPORTED}): ' \
           f'{remedy}'
