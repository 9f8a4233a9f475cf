"""``nova.virt.mftvm``: where Nova finds the mftvm-openstack driver.

Nova 34 loads ``[DEFAULT] compute_driver`` as ``nova.virt.<value>``, so::

    [DEFAULT]
    compute_driver = mftvm.FTLibvirtDriver

imports this module. It only re-exports the driver, which lives in
:mod:`mftvm_openstack.nova.driver`; see
:mod:`mftvm_openstack.nova.virt_shim` for how it is shipped (this
directory has no ``nova/__init__.py`` or ``nova/virt/__init__.py``: it
never shadows Nova's own packages).
"""

from mftvm_openstack.nova.driver import FTDriverMixin, FTLibvirtDriver

__all__ = ['FTDriverMixin', 'FTLibvirtDriver']
