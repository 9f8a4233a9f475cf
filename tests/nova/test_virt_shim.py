"""``python -m mftvm_openstack.nova.virt_shim install|remove``.

An editable install (DevStack's ``setup_develop``) cannot give Nova its
``nova.virt.mftvm``; the tool writes the shim where a wheel puts it.
These tests point ``nova.virt`` at a temporary directory, so Nova's own
is never touched; the e2e tier does it for real in the cloud lab.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import fixtures
import nova.virt
import testtools

from mftvm_openstack.nova import virt_shim


class TestShimInstall(testtools.TestCase):

    def setUp(self) -> None:
        super().setUp()
        self.virt = self.useFixture(fixtures.TempDir()).path
        self.useFixture(fixtures.MonkeyPatch(
            'nova.virt.__path__', [self.virt]))
        # an earlier test may have imported the source tree's shim
        module = sys.modules.pop(virt_shim.SHIM_MODULE, None)
        if module is not None:
            self.addCleanup(sys.modules.__setitem__, virt_shim.SHIM_MODULE,
                            module)
        self.addCleanup(sys.modules.pop, virt_shim.SHIM_MODULE, None)
        self.shim = os.path.join(self.virt, 'mftvm', '__init__.py')

    def test_install_puts_the_shim_where_a_wheel_does(self) -> None:
        # what an editable install leaves: nothing for Nova to import
        self.assertIsNone(importlib.util.find_spec(virt_shim.SHIM_MODULE))
        self.assertEqual(self.shim, virt_shim.install())
        spec = importlib.util.find_spec(virt_shim.SHIM_MODULE)
        self.assertIsNotNone(spec)
        self.assertEqual(self.shim, spec.origin)
        with open(os.path.join(virt_shim.SOURCE_DIR, 'mftvm',
                               '__init__.py')) as f:
            source = f.read()
        with open(self.shim) as f:
            self.assertEqual(virt_shim.INSTALLED_MARK + source, f.read())
        self.assertEqual([self.virt], list(nova.virt.__path__))
        # already importable: left alone
        self.assertEqual('installed', virt_shim.install())

    def test_remove_takes_back_only_its_own_file(self) -> None:
        self.assertFalse(virt_shim.remove())
        virt_shim.install()
        self.assertTrue(virt_shim.remove())
        self.assertFalse(os.path.exists(os.path.dirname(self.shim)))
        # a shim that pip installed (from a wheel) is not ours to remove
        os.makedirs(os.path.dirname(self.shim))
        with open(self.shim, 'w') as f:
            f.write('from mftvm_openstack.nova.driver import *\n')
        self.assertFalse(virt_shim.remove())
        self.assertTrue(os.path.exists(self.shim))

    def test_command_line(self) -> None:
        stdout = self.useFixture(fixtures.StringStream('stdout')).stream
        self.useFixture(fixtures.MonkeyPatch('sys.stdout', stdout))
        self.assertEqual(0, virt_shim.main(['install']))
        self.assertEqual(0, virt_shim.main(['remove']))
        self.assertEqual(2, virt_shim.main(['uninstall']))
        stdout.seek(0)
        self.assertEqual([self.shim, 'removed'], stdout.read().split())
