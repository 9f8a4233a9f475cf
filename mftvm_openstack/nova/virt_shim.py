"""How Nova's ``compute_driver = mftvm.FTLibvirtDriver`` finds our driver.

Nova 34 loads its driver with
``importutils.import_object('nova.virt.%s' % CONF.compute_driver)``:
there is no fallback to a full path, so a third-party driver needs a
module under ``nova.virt``. ``nova/virt/__init__.py`` is a regular
package, whose ``__path__`` is Nova's own directory only.

The shim is the source tree's ``nova/virt/mftvm/__init__.py`` (no
``nova/__init__.py``, no ``nova/virt/__init__.py`` next to it, so it can
never shadow Nova). Two ways to make it importable:

* **Installed** (deployments, DevStack): the distribution ships it as the
  package ``nova/virt/mftvm``, as nova-powervm shipped
  ``nova/virt/powervm_ext``. ``setup.cfg``::

      [files]
      packages =
          mftvm_openstack
          nova/virt/mftvm

  pbr expands entries that are directories (the dotted
  ``nova.virt.mftvm`` would be skipped: no such directory). The wheel
  then holds ``nova/virt/mftvm/__init__.py`` and no other ``nova/``
  file, so pip puts the shim into Nova's own
  ``site-packages/nova/virt/mftvm/`` and removes it on uninstall; Nova's
  files are never touched. No ``.pth`` file, no setup hook.

* **Editable installs** (``pip install -e``, DevStack's
  ``setup_develop``): setuptools' editable finder maps top-level packages
  only (its key for ours is ``nova/virt/mftvm``, which no import asks
  for; ``editable_mode=compat`` puts the tree on ``sys.path`` after
  Nova's regular ``nova`` package, which hides it), so nova-compute
  cannot import the shim. ``python -m mftvm_openstack.nova.virt_shim
  install`` writes the same file into Nova's ``nova/virt/mftvm/``, the
  place a wheel puts it (:func:`install`); it does nothing where the
  shim is already importable, and ``remove`` takes back only a file it
  wrote. The file only re-exports, so it never goes stale when the tree
  changes.

* **From the source tree** (tests): :func:`ensure_importable` appends
  the tree's ``nova/virt`` to ``nova.virt.__path__`` in the running
  process, which is what the installed layout amounts to::

      from mftvm_openstack.nova import virt_shim
      from nova.virt import driver

      virt_shim.ensure_importable()       # 'source tree' or 'installed'
      driver.load_compute_driver(virtapi, virt_shim.COMPUTE_DRIVER)
      # -> an mftvm_openstack.nova.driver.FTLibvirtDriver

Either way ``nova.virt.mftvm.FTLibvirtDriver`` is
:class:`mftvm_openstack.nova.driver.FTLibvirtDriver` itself.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys

#: the value of nova.conf's ``[DEFAULT] compute_driver``
COMPUTE_DRIVER = 'mftvm.FTLibvirtDriver'
#: the module Nova imports for it
SHIM_MODULE = 'nova.virt.mftvm'

#: the source tree's directory holding the shim package ``mftvm``
SOURCE_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))), 'nova', 'virt')


def ensure_importable() -> str:
    """Make :data:`SHIM_MODULE` importable; tell how it is found.

    Returns ``'installed'`` if Nova's ``nova.virt`` already finds it,
    ``'source tree'`` if :data:`SOURCE_DIR` was added to
    ``nova.virt.__path__`` (idempotent).

    :raises ImportError: neither is there (an sdist-less install without
        the shim).
    """
    import nova.virt

    if SOURCE_DIR not in nova.virt.__path__ and \
            importlib.util.find_spec(SHIM_MODULE) is not None:
        return 'installed'
    if not os.path.isfile(os.path.join(SOURCE_DIR, 'mftvm', '__init__.py')):
        raise ImportError(f'{SHIM_MODULE} is not installed and there is no '
                          f'source tree shim in {SOURCE_DIR}')
    if SOURCE_DIR not in nova.virt.__path__:
        nova.virt.__path__.append(SOURCE_DIR)
    return 'source tree'


#: first line of a shim written by :func:`install`, so that
#: :func:`remove` never deletes a file that pip installed
INSTALLED_MARK = ('# Written by "python -m mftvm_openstack.nova.virt_shim '
                  'install" (an editable install of mftvm-openstack).\n')


def _nova_virt_dir() -> str:
    import nova.virt

    return os.path.join(list(nova.virt.__path__)[0], 'mftvm')


def install() -> str:
    """Make :data:`SHIM_MODULE` importable for every Nova process.

    Returns ``'installed'`` if it already is (a wheel or an earlier
    call put it there); otherwise copies the source tree's shim into
    Nova's ``nova/virt/mftvm/`` and returns its path.
    """
    if importlib.util.find_spec(SHIM_MODULE) is not None:
        return 'installed'
    with open(os.path.join(SOURCE_DIR, 'mftvm', '__init__.py')) as f:
        text = f.read()
    target = _nova_virt_dir()
    os.makedirs(target, exist_ok=True)
    path = os.path.join(target, '__init__.py')
    with open(path + '.tmp', 'w') as f:
        f.write(INSTALLED_MARK + text)
    os.replace(path + '.tmp', path)
    importlib.invalidate_caches()       # for this process's finders
    return path


def remove() -> bool:
    """Remove a shim that :func:`install` wrote; True if there was one."""
    target = _nova_virt_dir()
    path = os.path.join(target, '__init__.py')
    try:
        with open(path) as f:
            if f.readline() != INSTALLED_MARK:
                return False
    except FileNotFoundError:
        return False
    os.unlink(path)
    for leftover in ('__pycache__', ''):
        with contextlib.suppress(OSError):
            if leftover:
                shutil.rmtree(os.path.join(target, leftover))
            else:
                os.rmdir(target)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv == ['install']:
        print(install())
    elif argv == ['remove']:
        print('removed' if remove() else 'nothing to remove')
    else:
        print('usage: python -m mftvm_openstack.nova.virt_shim '
              'install|remove', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
