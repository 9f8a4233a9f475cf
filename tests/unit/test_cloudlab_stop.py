"""``cloudlab.stop``: a daemon's whole process group is gone when it
returns (a uwsgi worker that outlived its master kept the port, and
``cloudlab.py restart nova-api`` failed to bind it)."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import time

import testtools

_PATH = os.path.join(os.path.dirname(__file__), '..', '..', 'tools',
                     'cloud', 'cloudlab.py')


def _cloudlab():
    spec = importlib.util.spec_from_file_location('cloudlab', _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class StopTest(testtools.TestCase):

    def test_waits_for_the_whole_group(self):
        cloudlab = _cloudlab()
        # the leader ends at SIGTERM; a member ignores it (as a worker
        # finishing its requests would) until SIGKILL
        proc = subprocess.Popen(
            ['bash', '-c', "(trap '' TERM; sleep 60) & exec sleep 60"],
            start_new_session=True)
        self.addCleanup(proc.wait)
        self.addCleanup(lambda: os.path.exists(f'/proc/{proc.pid}') and
                        _killpg(proc.pid))
        deadline = time.monotonic() + 30
        while _members(proc.pid) < 2:
            self.assertLess(time.monotonic(), deadline, 'bash did not fork')
            time.sleep(0.05)
        cloudlab.stop(proc.pid, grace=1.0)
        self.assertEqual(0, _members(proc.pid))


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _members(pgid: int) -> int:
    """Processes of group ``pgid`` that are not zombies."""
    count = 0
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            try:
                with open(f'/proc/{entry}/stat') as f:
                    fields = f.read().rsplit(')', 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != 'Z':
                count += 1
    return count
