"""Every user mistake: a one-line error saying what to do, a non-zero
exit, no traceback, and nothing left running."""

import os
import socket
import stat
import subprocess
import sys

from tests.functional import base


class BadInputTest(base.GuestTestCase):

    def setUp(self):
        super().setUp()
        self.disk = self.make_disk()

    def mftvm(self, *args, env=None):
        result = subprocess.run(
            [sys.executable, '-m', 'mftvm_openstack.cmd.mftvm',
             '--state-dir', self.state_dir, *args],
            capture_output=True, text=True, timeout=120,
            env=dict(os.environ, **(env or {})))
        return result

    def protect_args(self, **over):
        args = {'--kernel': self.image.kernel, '--initrd': self.image.initrd,
                '--disk': self.disk, '--disk-dir': self.tmp}
        args.update(over)
        flat = []
        for k, v in args.items():
            flat += [k, v]
        return ['protect', 'bad', *flat]

    def assertUserError(self, result, *words):
        self.assertNotEqual(0, result.returncode, result.stdout)
        self.assertNotIn('Traceback', result.stderr)
        lines = result.stderr.strip().splitlines()
        self.assertEqual(1, len(lines), result.stderr)
        for word in words:
            self.assertIn(word, lines[0])
        # Nothing left running for this state dir.
        left = subprocess.run(['pgrep', '-f', self.state_dir],
                              capture_output=True, text=True).stdout
        self.assertEqual('', left.strip())
        self.assertEqual([], base.qemu_pids_for('bad'))

    def test_missing_kernel(self):
        self.assertUserError(self.mftvm(*self.protect_args(
            **{'--kernel': '/nonexistent/vmlinuz'})), 'kernel',
            'No such file')

    def test_kernel_that_is_not_bootable(self):
        path = os.path.join(self.tmp, 'notakernel')
        with open(path, 'w') as f:
            f.write('hello\n' * 200)
        self.assertUserError(self.mftvm(*self.protect_args(
            **{'--kernel': path})), 'not a bootable')

    def test_missing_disk(self):
        self.assertUserError(self.mftvm(*self.protect_args(
            **{'--disk': '/nonexistent.raw'})), 'does not exist',
            'qemu-img create')

    def test_disk_outside_the_disk_dirs(self):
        self.assertUserError(self.mftvm(*self.protect_args(
            **{'--disk-dir': os.path.join(self.tmp, 'disks')})),
            '--disk', 'is not in an allowed directory')

    def test_disk_through_a_planted_symlink(self):
        link = os.path.join(self.tmp, 'link.raw')
        os.symlink(self.disk, link)
        self.assertUserError(self.mftvm(*self.protect_args(
            **{'--disk': link})), '--disk', 'is a symbolic link')

    def test_disk_in_use(self):
        holder = subprocess.Popen(
            ['qemu-system-x86_64', '-S', '-nodefaults', '-display', 'none',
             '-accel', 'tcg', '-drive',
             f'file={self.disk},format=raw,if=virtio'],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.addCleanup(holder.wait)
        self.addCleanup(holder.kill)
        base.wait_for(lambda: subprocess.run(
            ['qemu-io', '-f', 'raw', '-c', 'quit', self.disk],
            capture_output=True).returncode != 0, 20, what='the disk lock')
        self.assertUserError(self.mftvm(*self.protect_args()), 'in use')

    def test_port_taken(self):
        with socket.socket() as s:
            s.bind(('127.0.0.1', 0))
            s.listen()
            port = s.getsockname()[1]
            self.assertUserError(self.mftvm(*self.protect_args(
                **{'--nic': f'user,hostfwd=tcp:127.0.0.1:{port}-:7000'})),
                f'port 127.0.0.1:{port}', 'choose another')

    def test_bad_nic_and_epoch(self):
        self.assertUserError(self.mftvm(*self.protect_args(
            **{'--nic': 'tap,ifname=x'})), 'only "user"')
        self.assertUserError(self.mftvm(*self.protect_args(
            **{'--epoch-ms': '5'})), '--epoch-ms 5')
        self.assertUserError(self.mftvm(*self.protect_args(
            **{'--idle-epoch-ms': '-1'})), '--idle-epoch-ms -1', '0 to')
        self.assertUserError(self.mftvm(*self.protect_args(
            **{'--tracker': 'magic'})), 'unknown dirty tracker')

    def test_unknown_option(self):
        result = self.mftvm(*self.protect_args(), '--turbo')
        self.assertEqual(2, result.returncode)
        self.assertIn('unrecognized arguments: --turbo', result.stderr)
        self.assertNotIn('Traceback', result.stderr)

    def _fake_qemu_path(self, version_line):
        bindir = os.path.join(self.tmp, 'bin')
        os.makedirs(bindir, exist_ok=True)
        for tool in ('qemu-img', 'qemu-io', 'qemu-storage-daemon'):
            os.symlink(f'/usr/bin/{tool}', os.path.join(bindir, tool))
        if version_line:
            fake = os.path.join(bindir, 'qemu-system-x86_64')
            with open(fake, 'w') as f:
                f.write(f'#!/bin/sh\necho "{version_line}"\n')
            os.chmod(fake, stat.S_IRWXU)
        return {'PATH': bindir}

    def test_qemu_missing(self):
        self.assertUserError(self.mftvm(
            *self.protect_args(), env=self._fake_qemu_path(None)),
            'qemu-system-x86_64 not found', 'apt-get install')

    def test_qemu_too_old(self):
        self.assertUserError(self.mftvm(
            *self.protect_args(),
            env=self._fake_qemu_path('QEMU emulator version 5.2.0')),
            'QEMU 5.2', 'needs 7.2')

    def test_state_dir_not_writable(self):
        result = subprocess.run(
            [sys.executable, '-m', 'mftvm_openstack.cmd.mftvm',
             '--state-dir', '/etc/hostname/mftvm', *self.protect_args()],
            capture_output=True, text=True, timeout=60)
        self.assertUserError(result, 'state dir', 'writable --state-dir')

    def test_unknown_guest(self):
        for cmd in ('status', 'failover', 'stop'):
            self.assertUserError(self.mftvm(cmd, 'nosuch'), "no guest")
