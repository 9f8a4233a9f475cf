"""guest.json's options: typed and checked where the instance process
reads them, and what a directory from before pair TLS means."""

import dataclasses
import json
import os
import tempfile
import unittest

from oslo_config import cfg

from mftvm_openstack import conf
from mftvm_openstack.contract.options import HostOptions
from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.spec import ProtectionOptions
from mftvm_openstack.ft import vm
from mftvm_openstack.instance.config import load_guest
from mftvm_openstack.local import operations
from tests.unit.test_agent_manager import manager_on

SPEC = vm.GuestSpec(name='vm0', kernel='/k', initrd='/i', disk='/d')

#: the options the agent wrote before pair TLS existed (commit 20ac929's
#: parent: its host_options() and the secondary's listen/nbd_host)
BEFORE_TLS = {
    'epoch_ms': 200, 'idle_epoch_ms': 1000, 'disk_sync': 'async-replication',
    'tracker': 'auto', 'start_delay': 0.0, 'detect_timeout': 0.8,
    'heartbeat_interval': 0.2, 'hang_timeout': 15.0, 'replica_timeout': 3.0,
    'fence_url': 'redis://:***@10.0.0.5:6379', 'fence_dir': None,
    'fence_lease': 3, 'fence_acquire_timeout': 10.0, 'member': 'hv1',
    'ram_tag': 'hv1', 'libvirt_uri': 'qemu:///system',
    'listen': 'tcp:10.0.0.2:0', 'nbd_host': '10.0.0.2'}


class HostOptionsTest(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(__import__('shutil').rmtree, self.dir)

    def write(self, options):
        with open(os.path.join(self.dir, 'guest.json'), 'w') as f:
            json.dump({'spec': SPEC.to_dict(), 'options': options}, f)

    def test_options_are_typed_with_their_defaults(self):
        self.write({'epoch_ms': 100, 'tls': False})
        _, options = load_guest(self.dir)
        self.assertIsInstance(options, HostOptions)
        self.assertEqual((100, 1.0, False, 'qemu:///system'),
                         (options.epoch_ms, options.detect_timeout,
                          options.tls, options.libvirt_uri))

    def test_a_bad_option_refuses_the_file_naming_it(self):
        for name, value in [('epoch_ms', 'fast'), ('epoch_ms', 1),
                            ('tls', 'yes'), ('no_such_option', 1),
                            ('listen', 'tcp:1.2.3.4:5,guestfwd=x'),
                            ('fence_dir', '/run/../etc'),
                            ('libvirt_uri', 'qemu:///system\nx'),
                            ('max_held_bytes', -1),
                            ('detect_timeout', float('nan')),
                            ('domain_name', '../x'),
                            ('allowed_bridges', ['br-int', 'br/x']),
                            ('allowed_bridges', 'br-int')]:
            self.write({'tls': True, name: value})
            with self.assertRaises(ContractError, msg=name) as ctx:
                load_guest(self.dir)
            self.assertEqual(f'guest.json options.{name}',
                             ctx.exception.field.partition('[')[0])

    def test_what_the_agent_and_the_cli_write_loads_back(self):
        m = manager_on(self)
        written = m.host_options(ProtectionOptions(epoch_ms=300), 'vm0')
        self.assertEqual(written, HostOptions.from_dict(written.to_dict()))
        self.assertEqual(300, written.epoch_ms)
        self.assertEqual(('br-int', 'brq*', 'virbr0'),
                         written.allowed_bridges)
        m.conf.set_override('allowed_bridges', ['br-guests', 'tap*'],
                            group='agent')
        self.assertEqual(('br-guests', 'tap*'), m.host_options(
            ProtectionOptions(), 'vm0').allowed_bridges)
        # every option of the CLI's is one of guest.json's
        cli = HostOptions.from_dict(
            dataclasses.asdict(operations.ProtectOptions()))
        self.assertEqual(operations.ProtectOptions().idle_epoch_ms,
                         cli.idle_epoch_ms)

    def test_a_directory_from_before_pair_tls_means_tls_on_and_says_so(self):
        self.write(BEFORE_TLS)
        with self.assertLogs('mftvm_openstack.instance.config') as logs:
            _, options = load_guest(self.dir)
        # never a silent downgrade to a plain, unauthenticated stream
        self.assertTrue(options.tls)
        self.assertEqual(1, len(logs.records), logs.output)
        self.assertIn(self.dir, logs.output[0])
        self.assertIn('before pair TLS', logs.output[0])
        self.assertIn('tls on', logs.output[0])

    def test_a_directory_that_says_tls_says_nothing_more(self):
        for tls in (True, False):
            self.write({**BEFORE_TLS, 'tls': tls})
            with self.assertNoLogs('mftvm_openstack.instance.config'):
                self.assertEqual(tls, load_guest(self.dir)[1].tls)


class AllowedBridgesOptionTest(unittest.TestCase):

    def test_the_option_takes_interface_names_and_wildcards_only(self):
        c = cfg.ConfigOpts()
        conf.register_opts(c)
        c([], project='mftvm-test')
        for good in (['br-int'], ['brq*', 'br-?x'], []):
            c.set_override('allowed_bridges', good, group='agent')
            self.assertEqual(good, c.agent.allowed_bridges)
        for bad in (['br/x'], ['a' * 16], ['..'], ['br x']):
            with self.assertRaises(ValueError, msg=bad):
                c.set_override('allowed_bridges', bad, group='agent')
