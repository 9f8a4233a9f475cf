"""A protected guest's files on disk (issue 11, item 3): private while it
runs, whatever the umask; never written through a planted symlink; gone
with its protection.
"""

import contextlib
import os
import re
import stat

from mftvm_openstack.ft import vm
from mftvm_openstack.local import operations
from tests.functional import base

#: names of files that hold a tenant's data (disk, writes, the device
#: state: ``devstate.bin`` until the first checkpoint, ``devstate-N.bin``
#: for epoch N's)
DATA = re.compile(r'.*(\.raw|\.qcow2|^devstate(-[0-9]+)?\.bin)$')


def mode(path):
    return stat.S_IMODE(os.lstat(path).st_mode)


def data_files(gdir):
    return sorted(os.path.join(d, n) for d, _, names in os.walk(gdir)
                  for n in names if DATA.match(n))


class GuestFilesTest(base.GuestTestCase):

    def test_private_files_no_symlink_followed_nothing_left(self):
        old = os.umask(0o022)
        self.addCleanup(os.umask, old)
        name = 'ex'
        # A symlink planted at the primary's predictable RAM path.
        victim = os.path.join(self.tmp, 'victim')
        with open(victim, 'wb') as f:
            f.write(b'not yours')
        ram = vm.ram_path(name, 'primary')
        if os.path.lexists(ram):
            os.unlink(ram)
        os.symlink(victim, ram)
        self.addCleanup(lambda: os.path.islink(ram) and os.unlink(ram))

        spec, gdir = self.protect(name)
        self.wait_counter(gdir)
        base.wait_for(lambda: (self.side(name, 'primary').get(
            'last_committed_epoch') or 0) >= 2, 30, what='epochs committed')

        with open(victim, 'rb') as f:
            self.assertEqual(b'not yours', f.read())
        self.assertFalse(os.path.islink(ram))
        dirs = [gdir] + [os.path.join(d, n) for d, names, _ in os.walk(gdir)
                         for n in names]
        self.assertEqual({d: 0o700 for d in dirs},
                         {d: mode(d) for d in dirs})
        private = (data_files(gdir) + base.ram_files(name)
                   + [os.path.join(gdir, 'guest.json'),
                      os.path.join(gdir, 'primary', 'status.json'),
                      os.path.join(gdir, 'secondary', 'status.json')])
        self.assertIn(os.path.join(gdir, 'secondary', 'disk', 'base.raw'),
                      private)
        self.assertTrue(any(os.path.dirname(p) == os.path.join(
            gdir, 'secondary') and os.path.basename(p).startswith('devstate')
            for p in private), private)
        self.assertEqual(2, len(base.ram_files(name)))
        modes = {}
        for p in private:
            # An overlay merged down, or an epoch's device state replaced
            # by the next one's, between the listing and now: gone, so
            # not exposed either.
            with contextlib.suppress(FileNotFoundError):
                modes[p] = mode(p)
        self.assertEqual({p: 0o600 for p in modes}, modes)

        operations.stop(self.state_dir, name)
        self.assertEqual([], data_files(gdir))
        self.assertEqual([], base.ram_files(name))
