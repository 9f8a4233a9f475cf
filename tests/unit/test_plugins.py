"""A tracker and a disk sync registered by another package are listed,
accepted and loaded like the built-in ones; a broken or unknown plugin is
named as such (the plugins: :mod:`tests.plugins`)."""

import json
import os
import subprocess
import sys
import textwrap
from unittest import mock

import fixtures
import testtools

from mftvm_openstack.contract import plugins
from mftvm_openstack.ft import disk, trackers
from tests import plugins as test_plugins


class ThirdPartyPluginTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.environ_without = dict(os.environ)
        self.pkg = self.useFixture(test_plugins.PluginPackage())

    def test_contract_lists_them(self):
        self.assertIn(test_plugins.TRACKER,
                      plugins.names(plugins.TRACKER_NAMESPACE))
        self.assertIn(test_plugins.TRACKER, plugins.tracker_choices())
        self.assertEqual(plugins.AUTO_TRACKER, plugins.tracker_choices()[0])
        choices = plugins.disk_sync_choices()
        self.assertIn(test_plugins.DISK_SYNC, choices)
        self.assertEqual(plugins.DEFAULT_DISK_SYNC, choices[0])

    def test_loaders_load_them(self):
        self.assertIs(test_plugins.CountingScanTracker,
                      trackers.tracker_class(test_plugins.TRACKER))
        sync = disk.load_disk_sync(test_plugins.DISK_SYNC, mock.Mock(),
                                   'node7')
        self.assertIsInstance(sync, test_plugins.CountingAsyncReplication)
        self.assertEqual('node7', sync.node)

    def test_loader_logs_the_class_it_loaded(self):
        logs = self.useFixture(fixtures.FakeLogger(level='INFO'))
        trackers.tracker_class(test_plugins.TRACKER)
        self.assertIn(f'dirty tracker {test_plugins.TRACKER}: '
                      f'tests.plugins.CountingScanTracker', logs.output)

    def test_broken_plugin_is_named_with_its_error(self):
        err = self.assertRaises(trackers.TrackerError, trackers.tracker_class,
                                test_plugins.BROKEN)
        self.assertIn(f"dirty tracker plugin '{test_plugins.BROKEN}' "
                      f"({test_plugins.BROKEN_MODULE}:Tracker) failed to "
                      f"load: ImportError: libmftvm-test is not installed",
                      str(err))
        self.assertIsInstance(err.__cause__, ImportError)
        err = self.assertRaises(disk.DiskError, disk.load_disk_sync,
                                test_plugins.BROKEN, mock.Mock())
        self.assertIn(f"disk sync plugin '{test_plugins.BROKEN}' "
                      f"({test_plugins.BROKEN_MODULE}:DiskSync) failed to "
                      f"load: ImportError", str(err))

    def test_wrong_kind_of_class_is_refused(self):
        err = self.assertRaises(trackers.TrackerError, trackers.tracker_class,
                                test_plugins.NOT_A_PLUGIN)
        self.assertIn('is not a DirtyTracker', str(err))
        err = self.assertRaises(disk.DiskError, disk.load_disk_sync,
                                test_plugins.NOT_A_PLUGIN, mock.Mock())
        self.assertIn('is not a DiskSync', str(err))

    def test_unknown_name_offers_every_registered_one(self):
        err = self.assertRaises(trackers.TrackerError, trackers.tracker_class,
                                'bogus')
        self.assertIn("unknown dirty tracker 'bogus': use one of auto, ",
                      str(err))
        self.assertIn(test_plugins.TRACKER, str(err))
        err = self.assertRaises(disk.DiskError, disk.load_disk_sync,
                                'bogus', mock.Mock())
        self.assertIn("unknown disk sync 'bogus': use one of "
                      f"{plugins.DEFAULT_DISK_SYNC}, ", str(err))
        self.assertIn(test_plugins.DISK_SYNC, str(err))

    def test_loaders_swallow_nothing_else(self):
        # A fault of the engine or of stevedore is not a missing plugin.
        with mock.patch('stevedore.driver.DriverManager',
                        side_effect=RuntimeError('engine bug')):
            self.assertRaises(RuntimeError, trackers.tracker_class, 'scan')
            self.assertRaises(RuntimeError, disk.load_disk_sync,
                              plugins.DEFAULT_DISK_SYNC, mock.Mock())

    def test_config_accepts_them_in_a_process_that_has_them(self):
        # The options' choices are fixed when conf is imported: as in a
        # real agent, the package is installed before the process starts.
        conf_file = os.path.join(self.pkg.path, 'mftvm.conf')
        with open(conf_file, 'w') as f:
            f.write(f'[ft]\ntracker = {test_plugins.TRACKER}\n'
                    f'disk_sync = {test_plugins.DISK_SYNC}\n')
        self.assertEqual([test_plugins.TRACKER, test_plugins.DISK_SYNC],
                         read_ft_options(conf_file, os.environ))
        self.assertIn('ConfigFileValueError', read_ft_options(
            conf_file, self.environ_without, check=False))


def read_ft_options(conf_file, env, check=True):
    """[ft] tracker and disk_sync as a fresh process's conf reads them."""
    code = textwrap.dedent(f'''
        import json
        from mftvm_openstack import conf
        conf.CONF(['--config-file', {conf_file!r}], project='mftvm')
        print(json.dumps([conf.CONF.ft.tracker, conf.CONF.ft.disk_sync]))
    ''')
    proc = subprocess.run([sys.executable, '-c', code], env=env,
                          capture_output=True, text=True, check=False)
    if not check:
        return proc.stderr
    if proc.returncode:
        raise AssertionError(proc.stderr)
    return json.loads(proc.stdout)
