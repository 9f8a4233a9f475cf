"""A guest protected with a tracker and a disk sync of another package.

The plugins (:mod:`tests.plugins`) are registered through entry points
of a package installed for the test only; the instance processes, which
``protect`` spawns as ``python -m mftvm_openstack.instance``, find them
on the ``PYTHONPATH`` they inherit, load them by name and use them for
every checkpoint.
"""

import os

from tests import plugins
from tests.functional import base


class ThirdPartyPluginTest(base.GuestTestCase):

    def test_guest_protected_with_plugins_of_another_package(self):
        pkg = self.useFixture(plugins.PluginPackage())
        _, gdir = self.protect(tracker=plugins.TRACKER,
                               disk_sync=plugins.DISK_SYNC)
        base.wait_for(
            lambda: self.side('g', 'primary').get(
                'last_committed_epoch', 0) >= 5, 60, what='5 epochs')
        prim = self.side('g', 'primary')
        with open(os.path.join(gdir, 'primary-host.log')) as f:
            log = f.read()
        # The engine names what it loaded...
        self.assertIn(f'dirty tracker {plugins.TRACKER}: '
                      f'tests.plugins.CountingScanTracker', log)
        self.assertIn(f'disk sync {plugins.DISK_SYNC}: '
                      f'tests.plugins.CountingAsyncReplication', log)
        # ...and the plugins ran in the primary's instance process, for
        # each committed checkpoint.
        with open(pkg.log) as f:
            pids = {int(line.split()[0]) for line in f}
        self.assertEqual({prim['host_pid']}, pids)
        notes = pkg.notes()
        collects = [n for n in notes if n.startswith(
            f'{plugins.TRACKER} collect ')]
        checkpoints = [int(n.rsplit(' ', 1)[1]) for n in notes
                       if n.startswith(f'{plugins.DISK_SYNC} checkpoint ')]
        self.assertGreaterEqual(len(collects), 5)
        self.assertEqual(list(range(1, len(checkpoints) + 1)), checkpoints)
        self.assertGreaterEqual(len(checkpoints),
                                prim['last_committed_epoch'])
