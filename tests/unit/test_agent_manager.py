"""The manager's choice of peers and its guest files (no agents, no
QEMU)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import unittest

from oslo_config import cfg

from mftvm_openstack import conf
from mftvm_openstack.agent import exception, manager
from mftvm_openstack.contract.spec import ProtectionOptions
from mftvm_openstack.ft import vm


class CandidatesTest(unittest.TestCase):

    def make(self, host: str, peers: list[str]) -> manager.AgentManager:
        c = cfg.ConfigOpts()
        conf.register_opts(c)
        c([], project='mftvm-test')
        c.set_override('host', host, group='agent')
        c.set_override('peers', peers, group='agent')
        c.set_override('state_path', '/nonexistent', group='agent')
        return manager.AgentManager(c, agents=object())

    def test_self_is_never_a_candidate_and_order_is_kept(self):
        m = self.make('h2', ['h1', 'h2', 'h3'])
        self.assertEqual(['h1', 'h3'], m._candidates(None, ()))

    def test_preferred_first(self):
        m = self.make('h1', ['h2', 'h3'])
        self.assertEqual(['h3', 'h2'], m._candidates('h3', ()))

    def test_the_lost_peer_is_asked_last_not_never(self):
        # It may be the only peer left once another one failed too.
        m = self.make('h1', ['h2', 'h3'])
        self.assertEqual(['h3', 'h2'], m._candidates(None, ('h2',)))
        self.assertEqual(['h3'], self.make('h1', ['h3'])._candidates(
            None, ('h3',)))


class GuestDirTest(unittest.TestCase):
    """What the agent writes for an instance process, from an RPC spec."""

    def setUp(self):
        self.tmp = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.tmp, True)
        c = cfg.ConfigOpts()
        conf.register_opts(c)
        c([], project='mftvm-test')
        c.set_override('host', 'hv1', group='agent')
        c.set_override('state_path', self.tmp, group='agent')
        c.set_override('libvirt_uri', 'qemu+unix:///system', group='agent')
        self.m = manager.AgentManager(c, agents=object())

    def test_nova_domain_spec_is_accepted_with_libvirt_uri(self):
        # The shape FTLibvirtDriver sends (nova.driver.domain_spec).
        spec = {'name': 'c0ffee00-0000-4000-8000-000000000001',
                'domain': 'instance-00000001', 'memory_mib': 512,
                'smp': 1}
        inst = self.m._new_dir('c0ffee00', vm.GuestSpec.from_json(spec),
                               self.m._host_options(ProtectionOptions()))
        with open(os.path.join(inst.dir, 'guest.json')) as f:
            guest = json.load(f)
        self.assertEqual(spec, {k: guest['spec'][k] for k in spec})
        self.assertEqual(vm.GuestSpec.from_json(spec),
                         vm.GuestSpec.from_json(guest['spec']))
        self.assertEqual('qemu+unix:///system',
                         guest['options']['libvirt_uri'])
        loaded = vm.GuestSpec.from_json(guest['spec'])
        self.assertEqual('instance-00000001', loaded.domain)
        self.assertEqual(512 << 20, loaded.memory_bytes)

    def test_idle_epochs_from_the_request_or_the_ft_group(self):
        none = ProtectionOptions()
        self.assertEqual(1000, self.m._host_options(none)['idle_epoch_ms'])
        self.m.conf.set_override('idle_epoch_ms', 0, group='ft')
        self.assertEqual(0, self.m._host_options(none)['idle_epoch_ms'])
        self.assertEqual(2500, self.m._host_options(
            ProtectionOptions(idle_epoch_ms=2500))['idle_epoch_ms'])

    def test_spec_without_guest_or_domain_is_refused(self):
        with self.assertRaises(exception.InvalidRequest) as ctx:
            self.m._new_dir('x', vm.GuestSpec(name='x', memory_mib=128),
                            self.m._host_options(ProtectionOptions()))
        self.assertIn('libvirt domain', str(ctx.exception))
        self.assertFalse(os.path.exists(os.path.join(self.tmp, 'instances',
                                                     'x')))
