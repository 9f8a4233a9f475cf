"""Both commands run on oslo.service's threading backend, chosen by one
helper (``mftvm_openstack.cmd.threading_backend``) before any oslo import.

Each check runs in a fresh interpreter: the backend is process-wide and
fixed once chosen.
"""

from __future__ import annotations

import subprocess
import sys

import testtools

PROBE = """
import sys
import {module}
from oslo_service import backend
print(backend.get_backend_type().name)
"""


def _python(code: str) -> str:
    return subprocess.run([sys.executable, '-c', code], capture_output=True,
                          text=True, check=True, timeout=120).stdout.strip()


class ThreadingBackendTest(testtools.TestCase):

    def test_each_command_selects_threading(self):
        for module in ('mftvm_openstack.cmd.agent',
                       'mftvm_openstack.cmd.api'):
            self.assertEqual('THREADING',
                             _python(PROBE.format(module=module)), module)

    def test_the_helper_imports_no_oslo_until_it_selects(self):
        self.assertEqual('[]', _python(
            'import sys\n'
            'from mftvm_openstack.cmd import threading_backend\n'
            'print(sorted(m for m in sys.modules if m.startswith("oslo")))'))

    def test_a_backend_chosen_before_is_kept(self):
        self.assertEqual('EVENTLET', _python(
            'from oslo_service import backend\n'
            'backend.init_backend(backend.BackendType.EVENTLET)\n'
            'from mftvm_openstack.cmd import threading_backend\n'
            'threading_backend.select()\n'
            'print(backend.get_backend_type().name)'))
