"""Least exposure on disk (issue 11, item 3): tenants' data and secrets
in files only their owner reads, no symlink written through, nothing left
behind when protection ends. No QEMU here (see tests/functional for the
guest's own files)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import tempfile
import unittest
from unittest import mock

import numpy as np
from oslo_config import cfg

from mftvm_openstack import conf, files
from mftvm_openstack.agent import exception, manager
from mftvm_openstack.contract.spec import ProtectionOptions
from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus, Takeover
from mftvm_openstack.ft import epoch, vm
from mftvm_openstack.ft.trackers import PAGE_SIZE, RamDelta
from mftvm_openstack.instance.config import FENCE_URL_ENV, load_guest
from mftvm_openstack.instance.secondary import SecondarySide

PASSWORD = 's3cr3t-fence-pw'
FENCE_URL = f'redis://:{PASSWORD}@127.0.0.1:6379'


def mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


@contextlib.contextmanager
def umask(value: int):
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.Popen(['true'])
    proc.wait()
    return proc.pid


class ExposureTestCase(unittest.TestCase):

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        old = os.umask(0o022)          # the usual umask: 0644 files
        self.addCleanup(os.umask, old)

    def planted_symlink(self, path: str) -> str:
        """A symlink at ``path`` to a file of ours; the file's path."""
        victim = os.path.join(self.tmp, 'victim')
        with open(victim, 'wb') as f:
            f.write(b'not yours')
        os.symlink(victim, path)
        return victim


class PrivateFilesTest(ExposureTestCase):

    def test_private_dir_is_0700_whatever_the_umask(self):
        fresh = files.private_dir(os.path.join(self.tmp, 'a', 'b'))
        self.assertEqual(0o700, mode(fresh))
        loose = os.path.join(self.tmp, 'loose')
        os.mkdir(loose, 0o755)
        files.private_dir(loose)
        self.assertEqual(0o700, mode(loose))

    def test_private_file_is_0600_and_sized(self):
        path = os.path.join(self.tmp, 'f.ram')
        os.close(files.create_private(path, 1 << 20))
        self.assertEqual(0o600, mode(path))
        self.assertEqual(1 << 20, os.path.getsize(path))

    def test_a_planted_symlink_is_replaced_not_written_through(self):
        path = os.path.join(self.tmp, 'f.ram')
        victim = self.planted_symlink(path)
        fd = files.create_private(path, 1 << 20)
        with os.fdopen(fd, 'wb') as f:
            f.write(b'guest RAM')
        self.assertFalse(os.path.islink(path))
        self.assertEqual(0o600, mode(path))
        with open(victim, 'rb') as f:
            self.assertEqual(b'not yours', f.read())

    def test_a_leftover_file_is_replaced_by_a_fresh_one(self):
        path = os.path.join(self.tmp, 'f.ram')
        with open(path, 'wb') as f:
            f.write(b'x' * 100)
        os.chmod(path, 0o644)
        os.close(files.create_private(path))
        self.assertEqual(0, os.path.getsize(path))
        self.assertEqual(0o600, mode(path))

    def test_write_private(self):
        path = os.path.join(self.tmp, 'devstate.bin')
        files.write_private(path, b'state')
        self.assertEqual(0o600, mode(path))
        files.write_private(path, b'newer')
        with open(path, 'rb') as f:
            self.assertEqual(b'newer', f.read())


class ReplicaImageTest(ExposureTestCase):
    """The secondary's copy of guest RAM (in /dev/shm in real use)."""

    def test_ram_and_device_state_are_0600_and_no_symlink_is_followed(self):
        ram = os.path.join(self.tmp, 'mftvm-vm0-secondary.ram')
        victim = self.planted_symlink(ram)
        image = epoch.ReplicaImage(ram, 4 * PAGE_SIZE, self.tmp)
        self.addCleanup(image.close)
        image.apply(1, b'devstate', RamDelta(
            np.array([1], np.uint32), np.full((1, PAGE_SIZE), 7, np.uint8)))
        self.assertFalse(os.path.islink(ram))
        self.assertEqual(0o600, mode(ram))
        self.assertEqual(0o600, mode(image.devstate_path))
        with open(victim, 'rb') as f:
            self.assertEqual(b'not yours', f.read())


def manager_on(test: ExposureTestCase,
               backend_url: str = '') -> manager.AgentManager:
    c = cfg.ConfigOpts()
    conf.register_opts(c)
    c([], project='mftvm-test')
    c.set_override('host', 'hv1', group='agent')
    c.set_override('state_path', os.path.join(test.tmp, 'state'),
                   group='agent')
    c.set_override('lock_path', os.path.join(test.tmp, 'locks'),
                   group='fencing')
    if backend_url:
        c.set_override('backend_url', backend_url, group='fencing')
    return manager.AgentManager(c, agents=object())


SPEC = vm.GuestSpec(name='vm0', kernel='/k', initrd='/i', disk='/d',
                    disk_size=1 << 20)


class AgentStateTest(ExposureTestCase):

    def test_state_path_tree_is_0700(self):
        m = manager_on(self)
        m.start()
        inst = m.new_instance_dir('vm0', SPEC, m.host_options(
            ProtectionOptions(), 'vm0'))
        state = m.conf.agent.state_path
        for path in (state, os.path.join(state, 'instances'), inst.dir,
                     os.path.join(m.conf.fencing.lock_path, 'vm0')):
            self.assertEqual(0o700, mode(path), path)
        self.assertEqual(0o600, mode(os.path.join(inst.dir, 'guest.json')))

    def test_the_fencing_password_reaches_the_instance_only_in_its_env(self):
        m = manager_on(self, backend_url=FENCE_URL)
        ended_pid = dead_pid()
        with mock.patch.object(manager.subprocess, 'Popen') as popen:
            popen.return_value.pid = ended_pid     # it ended at once
            with self.assertRaises(exception.Conflict):
                m.prepare_secondary('vm0', SPEC, ProtectionOptions(), 'hv2')
        (argv,), kwargs = popen.call_args
        self.assertEqual(FENCE_URL, kwargs['env'][FENCE_URL_ENV])
        self.assertNotIn(PASSWORD, ' '.join(argv))
        found = []
        for dirpath, _, names in os.walk(m.conf.agent.state_path):
            for name in names:
                with open(os.path.join(dirpath, name), 'rb') as f:
                    if PASSWORD.encode() in f.read():
                        found.append(name)
        self.assertEqual([], found)
        # guest.json (kept with the logs) names the backend, masked
        with open(os.path.join(m.conf.agent.state_path, 'ended', 'vm0',
                               'guest.json')) as f:
            self.assertEqual('redis://:***@127.0.0.1:6379',
                             json.load(f)['options']['fence_url'])

    def test_the_instance_process_takes_the_url_from_its_environment(self):
        m = manager_on(self, backend_url=FENCE_URL)
        inst = m.new_instance_dir('vm0', SPEC, m.host_options(
            ProtectionOptions(), 'vm0'))
        with mock.patch.dict(os.environ, m.instance_secrets()):
            self.assertEqual(FENCE_URL, load_guest(inst.dir)[1].fence_url)
        with mock.patch.dict(os.environ, clear=True):
            self.assertNotIn(PASSWORD, load_guest(inst.dir)[1].fence_url)

    def test_discard_keeps_the_logs_and_deletes_the_data(self):
        m = manager_on(self)
        inst = m.new_instance_dir('vm0', SPEC, m.host_options(
            ProtectionOptions(), 'vm0'))
        inst.save_record(role=Role.SECONDARY, pid=dead_pid())
        made = {
            'secondary-host.log': b'log',
            'secondary/qemu.log': b'log',
            'secondary/disk/qsd.log': b'log',
            'secondary/disk/base.raw': b'tenant disk',
            'secondary/disk/ov-3.qcow2': b'tenant writes',
            'secondary/disk/pool-1.qcow2': b'',
            'secondary/devstate.bin': b'tenant device state',
        }
        for rel, data in made.items():
            files.private_dir(os.path.dirname(os.path.join(inst.dir, rel)))
            with open(os.path.join(inst.dir, rel), 'wb') as f:
                f.write(data)
        ram = vm.ram_path('vm0', 'hv1')
        os.close(files.create_private(ram, PAGE_SIZE))
        self.addCleanup(lambda: os.path.exists(ram) and os.unlink(ram))

        m.stop_instance('vm0')

        ended = os.path.join(m.conf.agent.state_path, 'ended', 'vm0')
        kept = sorted(os.path.relpath(os.path.join(d, n), ended)
                      for d, _, names in os.walk(ended) for n in names)
        self.assertEqual(sorted(['guest.json', 'record.json',
                                 'secondary-host.log', 'secondary/qemu.log',
                                 'secondary/disk/qsd.log']), kept)
        self.assertFalse(os.path.exists(inst.dir))
        self.assertFalse(os.path.exists(ram))
        self.assertEqual(0o700, mode(ended))


class EndedInstanceTest(ExposureTestCase):
    """An instance process found dead by the agent's periodic check."""

    def ended(self, takeover):
        m = manager_on(self)
        inst = m.new_instance_dir('vm0', SPEC, m.host_options(
            ProtectionOptions(), 'vm0'))
        pid = dead_pid()
        inst.save_record(role=Role.SECONDARY, pid=pid)
        files.private_dir(os.path.join(inst.dir, 'secondary', 'disk'))
        files.write_json_atomic(
            os.path.join(inst.dir, 'secondary', 'status.json'),
            InstanceStatus(role=Role.SECONDARY, state=State.ACTIVE,
                           host_pid=pid, takeover=takeover).to_dict())
        files.write_private(os.path.join(inst.dir, 'secondary', 'disk',
                                         'base.raw'), b'disk')
        m.periodic()
        self.assertFalse(os.path.exists(inst.dir))
        return os.path.exists(os.path.join(
            m.conf.agent.state_path, 'ended', 'vm0', 'secondary', 'disk',
            'base.raw'))

    def test_a_replica_never_resumed_is_deleted(self):
        self.assertFalse(self.ended(None))
        self.assertFalse(self.ended(Takeover(detected=1.0)))

    def test_the_disk_of_a_guest_that_ran_from_it_is_kept(self):
        # After a takeover the replica is the guest's disk: perhaps the
        # only current copy of it.
        self.assertTrue(self.ended(Takeover(detected=1.0, fenced=2.0,
                                            resumed=3.0)))


class InstanceDirTest(ExposureTestCase):

    def test_the_role_directory_is_0700(self):
        gdir = os.path.join(self.tmp, 'vm0')
        files.private_dir(gdir)
        files.write_json_atomic(os.path.join(gdir, 'guest.json'), {
            'spec': SPEC.to_json(), 'options': {'epoch_ms': 200}})
        side = SecondarySide(gdir)
        self.assertEqual(0o700, mode(side.paths.root))
