"""A small tmpfs of the test's own, to fill up on purpose.

Mounted on a fresh directory (root only; a test run by anyone else is
skipped) and unmounted at cleanup::

    small = self.useFixture(SmallTmpfs(8 << 20))
    small.path                       # a tmpfs of 8 MiB
    small.fill()                     # leave it with no free byte
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import unittest

import fixtures


class SmallTmpfs(fixtures.Fixture):

    def __init__(self, size: int, path: str | None = None) -> None:
        super().__init__()
        self.size = size
        self.given = path

    def _setUp(self) -> None:
        if os.geteuid() != 0:
            raise unittest.SkipTest('mounting a tmpfs needs root')
        if self.given is None:
            self.path = tempfile.mkdtemp(prefix='mftvm-tmpfs-')
            self.addCleanup(shutil.rmtree, self.path, True)
        else:
            self.path = self.given
            os.makedirs(self.path, exist_ok=True)
        subprocess.run(['mount', '-t', 'tmpfs', '-o',
                        f'size={self.size},mode=0700', 'tmpfs', self.path],
                       check=True)
        self.addCleanup(subprocess.run, ['umount', '-l', self.path],
                        check=False)

    def free(self) -> int:
        st = os.statvfs(self.path)
        return st.f_bavail * st.f_frsize

    def fill(self) -> None:
        """Take every free byte (a file of its own, written to the end)."""
        fd = os.open(os.path.join(self.path, 'filler'),
                     os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 1 << 12, 1):
                chunk = b'\xff' * size
                try:
                    while os.write(fd, chunk):
                        pass
                except OSError:
                    pass        # ENOSPC: on with smaller chunks
        finally:
            os.close(fd)
