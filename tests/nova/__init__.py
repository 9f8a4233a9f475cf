"""Tests in Nova's in-process functional harness (real API, Placement).

Nova and what its harness needs are not in requirements.txt; install
them with::

    .venv/bin/pip install -c constraints.txt -r nova-requirements.txt

Without Nova the tests here are skipped (tools/run.sh counts a skip as a
failure).

Nova runs here in native threading mode, as the agent does, never with
eventlet monkey patching, which would turn the threads of every other
test sharing the process into green threads. Nova's test packages call
``nova.monkey_patch.patch()`` on import: without
``OS_NOVA_DISABLE_EVENTLET_PATCHING`` set it monkey patches, and with it
set it refuses to run once anything imported eventlet ("eventlet library
imported early"), which futurist does (unpatched, only to detect it)
when a test package discovered before this one imports oslo.messaging
or tooz. So this package replaces ``patch()``, for this process, by what
it does in threading mode minus that guard: select oslo.service's
threading backend.
"""

import sys
import unittest

try:
    from nova import monkey_patch
except ImportError:
    raise unittest.SkipTest(
        'Nova is not installed (pip install -c constraints.txt '
        '-r nova-requirements.txt)') from None

from oslo_service import backend as _backend  # noqa: E402


def _threading_mode(backend='threading'):
    """``nova.monkey_patch.patch()`` here: threading mode, always."""
    patcher = sys.modules.get('eventlet.patcher')
    if monkey_patch.is_patched() or (
            patcher is not None and patcher.is_monkey_patched('thread')):
        raise RuntimeError('eventlet monkey patching is active: Nova\'s '
                           'harness runs here in threading mode only')
    _backend.init_backend(_backend.BackendType.THREADING)


_threading_mode()
monkey_patch.patch = _threading_mode
