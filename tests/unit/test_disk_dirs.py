"""The disk a caller names must be a regular file in a directory the
operator chose, reached there without a symbolic link."""

import os
import tempfile
import unittest
from unittest import mock

from mftvm_openstack.agent import exception
from mftvm_openstack.contract.spec import ProtectionOptions
from mftvm_openstack.files import NotAllowed, file_in
from mftvm_openstack.ft import vm
from mftvm_openstack.local import operations
from tests.unit.test_agent_manager import manager_on


class FileInTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(__import__('shutil').rmtree, self.tmp)
        self.dir = os.path.join(self.tmp, 'disks')
        os.makedirs(os.path.join(self.dir, 'sub'))
        self.disk = self.file(os.path.join(self.dir, 'sub', 'a.raw'))
        self.outside = self.file(os.path.join(self.tmp, 'secret'))

    def file(self, path):
        with open(path, 'wb') as f:
            f.write(b'x')
        return path

    def refused(self, path, why):
        with self.assertRaises(NotAllowed) as ctx:
            file_in(path, [self.dir])
        self.assertIn(why, str(ctx.exception))
        self.assertEqual(1, len(str(ctx.exception).splitlines()))

    def test_a_file_in_the_directory_is_allowed(self):
        self.assertEqual(self.disk, file_in(self.disk, [self.dir]))
        self.assertEqual(self.disk, file_in(self.disk, ['/nowhere',
                                                        self.dir + '/']))

    def test_a_file_elsewhere_is_not(self):
        self.refused(self.outside, 'is not in an allowed directory')
        # a name that only begins like the directory
        self.file(self.dir + '2')
        self.refused(self.dir + '2', 'is not in an allowed directory')
        self.refused(self.dir, 'is not in an allowed directory')
        self.refused(os.path.join(self.dir, '..', 'secret'), '".."')
        self.refused('disks/sub/a.raw', 'absolute')

    def test_a_planted_symlink_is_refused_not_followed(self):
        for target in (self.outside, '/dev/null', self.disk):
            link = os.path.join(self.dir, 'link.raw')
            os.symlink(target, link)
            self.refused(link, 'is a symbolic link')
            os.unlink(link)
        # a linked directory on the way, too
        os.symlink(self.tmp, os.path.join(self.dir, 'up'))
        self.refused(os.path.join(self.dir, 'up', 'secret'),
                     'is a symbolic link')

    def test_only_a_regular_file(self):
        fifo = os.path.join(self.dir, 'fifo')
        os.mkfifo(fifo)
        self.refused(fifo, 'is not a regular file')
        self.refused(os.path.join(self.dir, 'sub'), 'is not a regular file')
        self.refused(os.path.join(self.disk, 'x'), 'is not a directory')
        with self.assertRaises(FileNotFoundError):
            file_in(os.path.join(self.dir, 'none.raw'), [self.dir])


class AgentDiskDirsTest(unittest.TestCase):

    def setUp(self):
        self.m = manager_on(self)
        self.m._prepare_peer = mock.Mock(
            side_effect=AssertionError('no peer may be asked'))
        self.m.new_instance_dir = mock.Mock(
            side_effect=AssertionError('nothing may be started'))

    def protect(self, disk):
        spec = vm.GuestSpec(name='vm0', kernel='/k', initrd='/i', disk=disk)
        with self.assertRaises(exception.InvalidRequest) as ctx:
            self.m.protect('vm0', spec, ProtectionOptions(), 'hv2')
        return str(ctx.exception)

    def test_a_disk_outside_disk_dirs_is_refused(self):
        # before: any path the caller named became the guest's disk, as
        # root, streamed to a peer
        with open(os.path.join(self.tmp, 'disk.raw'), 'wb') as f:
            f.truncate(1 << 20)
        msg = self.protect(os.path.join(self.tmp, 'disk.raw'))
        self.assertIn('spec.disk', msg)
        self.assertIn('is not in an allowed directory (/var/lib/mftvm/'
                      'disks) ([agent] disk_dirs)', msg)
        self.assertIn('spec.disk /etc/passwd is not in', self.protect(
            '/etc/passwd'))

    def test_a_symlink_in_disk_dirs_is_refused(self):
        disks = os.path.join(self.tmp, 'disks')
        os.makedirs(disks)
        os.symlink('/etc/passwd', os.path.join(disks, 'd.raw'))
        self.m.conf.set_override('disk_dirs', [disks], group='agent')
        self.assertIn('is a symbolic link', self.protect(
            os.path.join(disks, 'd.raw')))
        self.assertIn('No such file', self.protect(
            os.path.join(disks, 'none.raw')))


class CliDiskDirsTest(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(__import__('shutil').rmtree, self.tmp)
        self.disk = os.path.join(self.tmp, 'd.raw')
        with open(self.disk, 'wb') as f:
            f.truncate(1 << 20)

    def spec(self, disk):
        return vm.GuestSpec(name='vm0', kernel='/k', initrd='/i', disk=disk)

    def test_the_disk_dirs_decide(self):
        operations.check_disk(self.spec(self.disk), [self.tmp])
        with self.assertRaisesRegex(operations.UserError,
                                    r'^--disk .* is not in an allowed '
                                    r'directory .*--disk-dir'):
            operations.check_disk(self.spec(self.disk), ['/var/empty'])

    def test_by_default_the_environment_or_the_current_directory(self):
        with mock.patch.dict(os.environ, {operations.DISK_DIRS_ENV:
                                          f'/a::{self.tmp}'}):
            self.assertEqual(['/a', self.tmp],
                             operations.default_disk_dirs())
        with mock.patch.dict(os.environ, clear=True):
            self.assertEqual([os.getcwd()], operations.default_disk_dirs())
