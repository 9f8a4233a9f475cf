"""Guest NICs that finish their own checksums: ``[ft] nic_checksum_offload``.

A virtio-net guest leaves its TCP and UDP checksums to the host by
default. Open vSwitch's userspace datapath does not finish them when it
sends the packet into a Geneve tunnel, so TCP between guests on two hosts
fails (ping works). Nova has no setting for libvirt's answer, ``<host
csum='off'/>`` in the interface's ``<driver>``; with the option false,
the driver wraps its VIF driver so that every virtio interface it makes
(at spawn, hard reboot, attach) says so::

    vif_driver = ChecksumOffVIFDriver(vif_driver, lambda: True)
    conf = vif_driver.get_config(instance, vif, image_meta, flavor, 'qemu')
    etree.tostring(conf.format_dom())
    # b'<interface type="ethernet">...<model type="virtio"/>
    #   <driver><host csum="off"/></driver>...</interface>'

The config object keeps its class (Nova finds an interface again by
``isinstance`` and ``==`` on it); only its rendering changes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lxml import etree


def host_checksum_off(conf: Any) -> Any:
    """``conf`` (a ``LibvirtConfigGuestInterface``) rendered with
    ``<driver><host csum='off'/></driver>`` if its model is virtio;
    returned as it is otherwise."""
    if getattr(conf, 'model', None) != 'virtio':
        return conf
    render = conf.format_dom

    def format_dom() -> Any:
        dev = render()
        driver = dev.find('driver')
        if driver is None:
            driver = etree.SubElement(dev, 'driver')
        host = driver.find('host')
        if host is None:
            host = etree.SubElement(driver, 'host')
        host.set('csum', 'off')
        return dev

    conf.format_dom = format_dom
    return conf


class ChecksumOffVIFDriver:
    """Nova's libvirt VIF driver, whose ``get_config`` turns the host's
    checksum offload off while ``checksum_off()`` says so; everything else
    is the wrapped driver's."""

    def __init__(self, vif_driver: Any,
                 checksum_off: Callable[[], bool]) -> None:
        self._vif_driver = vif_driver
        self._checksum_off = checksum_off

    def get_config(self, *args: Any, **kwargs: Any) -> Any:
        conf = self._vif_driver.get_config(*args, **kwargs)
        return host_checksum_off(conf) if self._checksum_off() else conf

    def __getattr__(self, name: str) -> Any:
        return getattr(self._vif_driver, name)
