"""Engine plugins of "another package", for the tests.

:class:`PluginPackage` installs a package that registers them the way any
third-party package would, through entry points: it writes a
``*.dist-info`` directory with an ``entry_points.txt`` into a temporary
directory and puts that on ``sys.path`` and ``PYTHONPATH``, so
importlib.metadata, stevedore and the processes the test spawns
(``python -m mftvm_openstack.instance``) all find it::

    pkg = self.useFixture(PluginPackage())
    trackers.tracker_class(TRACKER)        # CountingScanTracker

Each plugin notes what it did in the file ``$MFTVM_TEST_PLUGIN_LOG``
(when set), one line per call, so a test sees that the engine used it.
"""

from __future__ import annotations

import os
import sys

import fixtures
from stevedore import extension

from mftvm_openstack.contract import plugins
from mftvm_openstack.ft.disk import AsyncReplication
from mftvm_openstack.ft.trackers import ScanTracker

TRACKER = 'test-counting-scan'
DISK_SYNC = 'test-counting-async'
BROKEN = 'test-broken'
NOT_A_PLUGIN = 'test-not-a-plugin'
LOG_ENV = 'MFTVM_TEST_PLUGIN_LOG'
#: a module that fails to import, as one with a missing dependency does
BROKEN_MODULE = 'mftvm_test_broken_plugin'


def _note(what: str) -> None:
    path = os.environ.get(LOG_ENV)
    if path:
        with open(path, 'a') as f:
            f.write(f'{os.getpid()} {what}\n')


class CountingScanTracker(ScanTracker):
    """The scan tracker, noting each collect."""

    def collect(self):
        delta = super().collect()
        _note(f'{TRACKER} collect {len(delta.indices)}')
        return delta


class CountingAsyncReplication(AsyncReplication):
    """Async replication, noting each checkpoint."""

    async def checkpoint(self, epoch):
        await super().checkpoint(epoch)
        _note(f'{DISK_SYNC} checkpoint {epoch}')


class NotAPlugin:
    """Registered under both namespaces, but neither kind of plugin."""


ENTRY_POINTS = f"""\
[mftvm.ft.trackers]
{TRACKER} = tests.plugins:CountingScanTracker
{BROKEN} = {BROKEN_MODULE}:Tracker
{NOT_A_PLUGIN} = tests.plugins:NotAPlugin

[mftvm.ft.disk_sync]
{DISK_SYNC} = tests.plugins:CountingAsyncReplication
{BROKEN} = {BROKEN_MODULE}:DiskSync
{NOT_A_PLUGIN} = tests.plugins:NotAPlugin
"""

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PluginPackage(fixtures.Fixture):
    """The package ``mftvm-test-plugins``, installed for one test.

    ``path`` is the directory on ``sys.path``; ``environ`` the variables
    a child process needs to see it (``PYTHONPATH``, and the notes file
    ``log``).
    """

    def _setUp(self):
        self.path = self.useFixture(fixtures.TempDir()).path
        info = os.path.join(self.path, 'mftvm_test_plugins-1.0.dist-info')
        os.mkdir(info)
        with open(os.path.join(info, 'METADATA'), 'w') as f:
            f.write('Metadata-Version: 2.1\nName: mftvm-test-plugins\n'
                    'Version: 1.0\n')
        with open(os.path.join(info, 'entry_points.txt'), 'w') as f:
            f.write(ENTRY_POINTS)
        with open(os.path.join(self.path, BROKEN_MODULE + '.py'), 'w') as f:
            f.write("raise ImportError('libmftvm-test is not installed')\n")
        self.log = os.path.join(self.path, 'notes.log')
        # stevedore reads a namespace's entry points once per process (as
        # an agent would, whose plugins are installed before it starts):
        # forget them while the package comes and goes.
        for namespace in (plugins.TRACKER_NAMESPACE,
                          plugins.DISK_SYNC_NAMESPACE):
            self.addCleanup(extension.ExtensionManager.ENTRY_POINT_CACHE.pop,
                            namespace, None)
            extension.ExtensionManager.ENTRY_POINT_CACHE.pop(namespace, None)
        # Its on-disk cache is keyed by sys.path: a new entry is seen.
        self.useFixture(fixtures.MonkeyPatch(
            'sys.path', [self.path, *sys.path]))
        pythonpath = os.pathsep.join(
            p for p in (self.path, _ROOT, os.environ.get('PYTHONPATH'))
            if p)
        self.environ = {'PYTHONPATH': pythonpath, LOG_ENV: self.log}
        for name, value in self.environ.items():
            self.useFixture(fixtures.EnvironmentVariable(name, value))
        self.addCleanup(sys.modules.pop, BROKEN_MODULE, None)

    def notes(self) -> list[str]:
        """The lines the plugins wrote, without the pid."""
        try:
            with open(self.log) as f:
                return [line.split(' ', 1)[1].strip() for line in f]
        except FileNotFoundError:
            return []
