"""The control plane, through the ``openstack`` CLI only.

On the tier's one lab (:mod:`tests.e2e.lab`: brought up by the first
test that asks, with mftvm-openstack installed into ``.cloud-venv`` from
a wheel built here, as an operator installs it). Tests ask it through
the CLI only::

    props = self.openstack_json('flavor', 'show', name)['properties']
    # runs .cloud-venv/bin/openstack flavor show NAME -f json, as admin
"""

from __future__ import annotations

import json
import os
import sys

from tests.e2e import counter_net, lab
from tests.e2e.lab import (  # noqa: F401 (the names other modules import)
    CLOUDLAB,
    HOSTS,
    PIP,
    PYTHON,
    ROOT,
    VALIDATED,
    VENV_BIN,
)
from tests.e2e.lab import checked as _checked
from tests.e2e.lab import run as _run
from tests.e2e.lab import sha256 as _sha256

#: run in a compute host's namespace: waits (bounded) for the guest's
#: counter service at 10.0.2.15, then prints three answers as JSON
COUNTER_CLIENT = """
import json, time
from mftvm_openstack.images.workload import counter_request
deadline = time.monotonic() + 240
while counter_request('10.0.2.15', 7000) is None:
    if time.monotonic() > deadline:
        raise SystemExit('no answer from the counter service')
    time.sleep(1)
print(json.dumps([counter_request('10.0.2.15', 7000) for _ in range(3)]))
"""
#: run in a compute host's namespace with the lab's etcd URL, the host's
#: name and the seconds to try: the project's etcd fence on guest
#: "e2e-fence" with a 5 s lease, tried twice; prints both answers. The
#: process exits without releasing: its lease runs out by itself.
FENCE_CLIENT = """
import json, sys
from mftvm_openstack import fencing
url, member, first, second = sys.argv[1:]
fence = fencing.load_fence(url, 'e2e-fence', member=member, lease=5,
                           state_dir='')
won = [fence.acquire(float(first))]
if not won[0]:
    won.append(fence.acquire(float(second)))
print(json.dumps(won))
"""


class CloudTest(lab.LabTestCase):
    """Keystone, Nova's flavor validators and Glance, as a user sees them.
    """

    # -- Keystone and Nova's services ------------------------------------

    def test_token_issue(self):
        token = self.cloud_json('token', 'issue')
        self.assertTrue(token['id'])
        self.assertTrue(token['expires'])
        self.assertTrue(token['project_id'])

    def test_superconductor_topology(self):
        # DevStack's default: a super-conductor (API level) and cell1's
        # own conductor, each registered, and the scheduler.
        # (nova-compute services of the hosts other tests add aside)
        services = [s for s in self.cloud_json('compute', 'service', 'list')
                    if s['Binary'] != 'nova-compute']
        binaries = sorted(s['Binary'] for s in services)
        self.assertEqual(['nova-conductor', 'nova-conductor',
                          'nova-scheduler'], binaries)
        self.assertEqual({'up'}, {s['State'] for s in services})
        catalog = {e['Type'] for e in self.cloud_json('catalog', 'list')}
        self.assertLessEqual({'identity', 'image', 'compute', 'placement'},
                             catalog)

    def test_a_host_namespace_reaches_the_control_plane(self):
        # Where compute hosts live: a namespace on the lab's bridge.
        self.lab.add_hosts('n1', network_only=True)
        ns = self.ns('n1')
        addr = _checked(['ip', '-n', ns, '-4', '-o', 'addr', 'show',
                         'eth0']).stdout
        self.assertIn(' 10.78.', addr)
        token = _checked(['ip', 'netns', 'exec', ns,
                          os.path.join(VENV_BIN, 'openstack'), 'token',
                          'issue', '-f', 'value', '-c', 'id'],
                         env=self.env, cwd=self.tmp).stdout.strip()
        self.assertTrue(token)
        status = _checked([PYTHON, CLOUDLAB, 'status', '--dir',
                           self.lab_dir]).stdout
        self.assertIn(f'namespace {ns}', status)

    # -- flavor extra specs (mftvm_openstack.nova.extra_specs) -----------

    def test_ft_flavor_accepted(self):
        properties = self.flavor(
            self.unique('m1.ft'), 'ft:enabled=true', 'ft:epoch_ms=100',
            'ft:disk_sync=write-replication')
        self.assertEqual({'ft:enabled': 'true', 'ft:epoch_ms': '100',
                          'ft:disk_sync': 'write-replication'}, properties)

    def test_bad_ft_values_refused_with_400(self):
        name = self.unique('m1.ft-bad')
        self.flavor(name, 'ft:enabled=true')
        for prop, says in (
                ('ft:epoch_ms=abc', "'ft:epoch_ms': 'abc' is not an integer"),
                ('ft:epoch_ms=5', "'ft:epoch_ms': 5 is out of range"),
                ('ft:enabled=maybe', "'ft:enabled': 'maybe' is not a boolean"),
                ('ft:disk_sync=later', "'ft:disk_sync'"),
                ('ft:nosuchkey=1', 'ft:nosuchkey')):
            result = self.cloud('flavor', 'set', '--property', prop,
                                name, check=False,
                                microversion=VALIDATED)
            self.assertNotEqual(0, result.returncode, prop)
            self.assertIn('400', result.stderr, prop)
            self.assertIn(says, result.stderr, prop)
        self.assertEqual(
            {'ft:enabled': 'true'},
            self.cloud_json('flavor', 'show', name)['properties'])

    def test_bad_ft_value_in_flavor_create_refused(self):
        # python-openstackclient creates the flavor, then sets its
        # properties; when Nova refuses them it logs the 400 and still
        # exits 0, leaving a flavor without them (not one that says ft).
        name = self.unique('m1.ft-create-bad')
        result = self.cloud('flavor', 'create', '--ram', '128', '--disk',
                            '1', '--property', 'ft:enabled=maybe',
                            name, check=False, microversion=VALIDATED)
        self.addCleanup(self.cloud, 'flavor', 'delete', name, check=False)
        self.assertIn('400', result.stderr)
        self.assertIn("'ft:enabled': 'maybe' is not a boolean",
                      result.stderr)
        self.assertEqual(
            {}, self.cloud_json('flavor', 'show', name)['properties'])

    def test_ft_values_unchecked_before_2_86(self):
        # Nova checks extra specs only from 2.86 on; older clients can
        # still store a bad value (a build re-checks it: ft_request).
        name = self.unique('m1.ft-old')
        self.flavor(name)
        self.cloud('flavor', 'set', '--property', 'ft:epoch_ms=abc',
                   name, microversion='2.85')
        self.assertEqual(
            {'ft:epoch_ms': 'abc'},
            self.cloud_json('flavor', 'show', name)['properties'])

    # -- an editable install, as DevStack's setup_develop makes ----------

    def test_editable_install_loads_validators_and_driver(self):
        # Put back afterwards: the wheel, and nova-api started on it.
        self.addCleanup(self.lab.cloudlab, 'restart', 'nova-api')
        self.addCleanup(_checked, [*PIP, 'install', '--no-deps',
                                   '--force-reinstall', self.lab.wheel])
        _checked([*PIP, 'install', '--no-deps', '-e', ROOT], cwd=self.tmp)
        driver = ('from oslo_utils import importutils; '
                  'cls = importutils.import_class('
                  '"nova.virt.mftvm.FTLibvirtDriver"); '
                  'print(cls.__module__, sys.modules[cls.__module__]'
                  '.__file__)')
        probe = [PYTHON, '-c', 'import sys; ' + driver]
        # Nova's import of its driver, from outside the source tree: the
        # editable finder alone cannot serve nova.virt.mftvm...
        result = _run(probe, cwd='/')
        self.assertNotEqual(0, result.returncode)
        self.assertIn("No module named 'nova.virt.mftvm'", result.stderr)
        # ...the shim, put where a wheel puts it, can.
        _checked([PYTHON, '-m', 'mftvm_openstack.nova.virt_shim',
                  'install'], cwd='/')
        out = _checked(probe, cwd='/').stdout.split()
        self.assertEqual(['mftvm_openstack.nova.driver',
                          os.path.join(ROOT, 'mftvm_openstack', 'nova',
                                       'driver.py')], out)
        # nova-api, restarted on the editable install, loads the
        # validators from the source tree.
        self.lab.cloudlab('restart', 'nova-api')
        name = self.unique('m1.ft-editable')
        self.flavor(name, 'ft:enabled=true')
        result = self.cloud('flavor', 'set', '--property', 'ft:epoch_ms=5',
                            name, check=False,
                            microversion=VALIDATED)
        self.assertIn('400', result.stderr)
        self.assertIn("'ft:epoch_ms': 5 is out of range", result.stderr)

    # -- Glance: the project's own guest image ---------------------------

    def test_guest_image_uploaded_as_kernel_ramdisk_and_disk(self):
        kernel, ramdisk, guest, parts = self.upload_guest(
            self.unique('mftvm-guest'))
        shown = self.cloud_json('image', 'show', guest['id'])
        self.assertEqual('active', shown['status'])
        self.assertEqual(64 << 20, shown['size'])
        self.assertEqual(kernel['id'], shown['properties']['kernel_id'])
        self.assertEqual(ramdisk['id'], shown['properties']['ramdisk_id'])
        for image, source in ((kernel, parts['kernel']),
                              (ramdisk, parts['initrd'])):
            saved = os.path.join(self.tmp, f'{image["id"]}.saved')
            self.cloud('image', 'save', '--file', saved, image['id'])
            self.assertEqual(_sha256(source), _sha256(saved), image['name'])

    # -- compute hosts: agents, fencing ----------------------------------

    def test_every_hosts_agent_answers_and_fences_on_the_labs_etcd(self):
        self.add_hosts(*HOSTS)
        hypervisors = {h['Hypervisor Hostname']: h['State']
                       for h in self.cloud_json('hypervisor', 'list')}
        # (other modules may add hosts of their own to the lab)
        self.assertEqual({h: 'up' for h in HOSTS},
                         {h: hypervisors.get(h) for h in HOSTS})
        # Each host's agent answers over RabbitMQ, on nova-compute's own
        # vhost (cell1's), as an operator asks it: no instances yet.
        for host in HOSTS:
            self.assertEqual([], json.loads(self.mftvm(
                'list', '--host', host, '--json').stdout), host)
        # (an agent that is not there does not answer)
        result = self.mftvm('--timeout', '3', 'list', '--host', 'h9',
                            check=False)
        self.assertNotEqual(0, result.returncode)
        self.assertIn('h9', result.stderr)
        # Each agent found its fencing store, the lab's etcd, answering.
        with open(os.path.join(self.lab_dir, 'lab.json')) as f:
            subnet = json.load(f)['subnet']
        etcd = f'etcd3+http://10.78.{subnet}.1:2379'
        for host in HOSTS:
            with open(os.path.join(self.lab_dir, 'log',
                                   f'{host}-mftvm-agent.log')) as f:
                self.assertIn(f'fencing store {etcd} answers', f.read(),
                              host)
        # The fence itself, from the hosts' network: h1 wins guest
        # e2e-fence and dies holding it; h2 cannot have it while h1's
        # lease lasts, and has it once the lease ran out.
        def fence(host: str, first: str, second: str) -> list[bool]:
            return json.loads(_checked(
                ['ip', 'netns', 'exec', self.ns(host), PYTHON, '-c',
                 FENCE_CLIENT, etcd, host, first, second],
                cwd=self.tmp).stdout)

        self.assertEqual([True], fence('h1', '10', '0'))
        self.assertEqual([False, True], fence('h2', '0.5', '30'))

    # -- Neutron (ML2/OVN), a server -------------------------------------

    def test_server_answers_through_ovn_from_another_host(self):
        # Compute hosts (FTLibvirtDriver: a server that does not ask for
        # FT is the libvirt driver's alone; OVS userspace + OVN each).
        self.add_hosts(*HOSTS)
        chassis = {a['Host'] for a in self.cloud_json(
            'network', 'agent', 'list', '--agent-type', 'ovn-controller')}
        self.assertLessEqual(set(HOSTS), chassis)

        # The guest has a static 10.0.2.15/24 (guest/init); its virtio-net
        # checksum offload is off (OVS's userspace Geneve needs that).
        name = self.unique('e2e')
        net = counter_net.make(self, name)
        self.assertEqual('geneve', net.network['provider:network_type'])
        flavor = f'{name}-flavor'
        self.flavor(flavor)

        server = self.server(
            f'{name}-vm', '--image', net.image['id'], '--flavor', flavor,
            '--nic', f'port-id={net.port["id"]}', '--availability-zone',
            'nova:h1')
        shown = self.cloud_json('server', 'show', server['id'])
        self.assertEqual('ACTIVE', shown['status'])
        self.assertEqual('h1', shown['OS-EXT-SRV-ATTR:host'])
        self.assertEqual({f'{name}-net': ['10.0.2.15']},
                         shown['addresses'])
        # Nova's API lists servers (it asks Neutron for their groups).
        self.assertIn(server['id'], {s['ID'] for s in self.cloud_json(
            'server', 'list')})
        bound = self.cloud_json('port', 'show', net.port['id'])
        self.assertEqual(('ACTIVE', 'h1'),
                         (bound['status'], bound['binding_host_id']))

        # From h2, through OVN (Geneve between the hosts' userspace
        # datapaths) to the guest's counter service on h1.
        self.probe('h2', net.probe['id'])
        values = json.loads(_checked(
            ['ip', 'netns', 'exec', self.ns('h2'), PYTHON, '-c',
             COUNTER_CLIENT],
            cwd=self.tmp).stdout)
        self.assertEqual(3, len(values), values)
        first = values[0]
        self.assertIsInstance(first, int)
        self.assertEqual([first, first + 1, first + 2], values)
        console = self.cloud('console', 'log', 'show', server['id']).stdout
        self.assertIn('COUNTER-READY 7000', console)
        self.assertNotIn('MFTVM-GUEST-WARNING', console)


if __name__ == '__main__':
    sys.exit('run with stestr: tests/e2e needs .cloud-venv and root')
