"""The control plane, through the ``openstack`` CLI only.

One lab for the whole class (``setUpClass``; 1-3 minutes on two shared
cores), brought up with mftvm-openstack installed into ``.cloud-venv``
from a wheel built here, as an operator installs it.  Tests ask it
through the CLI only::

    props = self.cloud_json('flavor', 'show', 'm1.ft')['properties']
    # runs .cloud-venv/bin/openstack flavor show m1.ft -f json, as admin

The lab is named after this process (``mfc-p<pid>``): if the process
dies before ``tearDownClass`` (a timeout's SIGKILL), the next lab's
set-up removes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile

import testtools

from tests.e2e.ft_server import FTServerTests

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
VENV_BIN = os.path.join(ROOT, '.cloud-venv', 'bin')
PYTHON = os.path.join(VENV_BIN, 'python')
PIP = [PYTHON, '-m', 'pip', '--disable-pip-version-check', '-q']
CLOUDLAB = os.path.join(ROOT, 'tools', 'cloud', 'cloudlab.py')
#: flavor extra specs are checked by the API from this microversion on
VALIDATED = '2.86'
CLI_TIMEOUT = 300
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
#: the compute hosts, each with nova-compute (FTLibvirtDriver), its own
#: libvirtd, OVS and ovn-controller, and mftvm-agent
HOSTS = ('h1', 'h2', 'h3')
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


def _run(argv: list[str], timeout: float = CLI_TIMEOUT,
         **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


def _checked(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = _run(argv, **kwargs)
    if result.returncode:
        raise AssertionError(f'{" ".join(argv)} exited {result.returncode}'
                             f':\n{result.stdout}\n{result.stderr}')
    return result


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            digest.update(chunk)
    return digest.hexdigest()


class CloudTest(FTServerTests, testtools.TestCase):
    """Keystone, Nova's flavor validators and Glance, as a user sees them.
    """

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        if os.geteuid() != 0:
            raise RuntimeError('the e2e tier needs root (network namespaces)')
        if not os.path.exists(PYTHON):
            raise RuntimeError(f'no {PYTHON}: run tools/run.sh test, which '
                               f'makes .cloud-venv')
        cls.tmp = tempfile.mkdtemp(prefix='mftvm-e2e-')
        cls.lab_dir = os.path.join(cls.tmp, 'lab')
        try:
            cls.wheel = cls._install_wheel()
            with open(os.path.join(cls.tmp, 'up.log'), 'w') as out:
                result = subprocess.run(
                    [PYTHON, CLOUDLAB, 'up', '--dir', cls.lab_dir,
                     '--name', f'p{os.getpid()}'],
                    stdout=out, stderr=subprocess.STDOUT, timeout=900)
            if result.returncode:
                with open(os.path.join(cls.tmp, 'up.log')) as f:
                    raise RuntimeError(f'cloudlab up failed:\n'
                                       f'{f.read()[-6000:]}')
        except BaseException:
            cls._tear_down()
            raise
        cls.env = cls._openrc()
        cls.hosts: list[str] = []

    @classmethod
    def tearDownClass(cls) -> None:
        cls._tear_down()
        super().tearDownClass()

    @classmethod
    def _tear_down(cls) -> None:
        # cloudlab down ends every process in the lab's namespace.
        if os.path.exists(os.path.join(cls.lab_dir, 'lab.json')):
            _run([PYTHON, CLOUDLAB, 'down', '--dir', cls.lab_dir])
        shutil.rmtree(cls.tmp, ignore_errors=True)

    @classmethod
    def _install_wheel(cls) -> str:
        """mftvm-openstack into .cloud-venv, from a wheel built here."""
        out = os.path.join(cls.tmp, 'wheel')
        _checked([*PIP, 'wheel', '--no-deps', '--no-build-isolation',
                  '-w', out, ROOT], cwd=cls.tmp)
        (wheel,) = [os.path.join(out, name) for name in os.listdir(out)]
        _checked([*PIP, 'install', '--no-deps', '--force-reinstall', wheel])
        return wheel

    @classmethod
    def _openrc(cls) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith('OS_')}
        env['PATH'] = f'{VENV_BIN}:{env.get("PATH", os.defpath)}'
        with open(os.path.join(cls.lab_dir, 'openrc')) as f:
            for line in f:
                key, _, value = line.removeprefix('export ').strip(
                    ).partition('=')
                if key.startswith(('OS_', 'MFTVM_')):
                    env[key] = value
        return env

    def add_hosts(self, *names: str) -> None:
        """Compute hosts (``cloudlab.py add-host``), once for the class:
        tests that need them share them."""
        for host in names:
            if host not in self.hosts:
                _checked([PYTHON, CLOUDLAB, 'add-host', host, '--dir',
                          self.lab_dir], timeout=900)
                self.hosts.append(host)

    def ns(self, host: str) -> str:
        return f'mfc-p{os.getpid()}-{host}'

    def mftvm(self, *args: str, check: bool = True
              ) -> subprocess.CompletedProcess:
        """``mftvm ARGS`` as an operator runs it (the broker from the
        lab's openrc, ``MFTVM_TRANSPORT_URL``)."""
        result = _run([os.path.join(VENV_BIN, 'mftvm'), *args],
                      env=self.env, cwd=self.tmp)
        if check and result.returncode:
            self.fail(f'mftvm {" ".join(args)} exited {result.returncode}'
                      f':\n{result.stderr[-3000:]}')
        return result

    def cloud(self, *args: str, check: bool = True,
              microversion: str | None = None) -> subprocess.CompletedProcess:
        """``openstack ARGS`` as the lab's admin."""
        argv = [os.path.join(VENV_BIN, 'openstack')]
        if microversion:
            argv += ['--os-compute-api-version', microversion]
        argv += list(args)
        result = _run(argv, env=self.env, cwd=self.tmp)
        if check and result.returncode:
            self.fail(f'openstack {" ".join(args)} exited '
                      f'{result.returncode}:\n{result.stderr[-3000:]}')
        return result

    def cloud_json(self, *args: str, **kwargs):
        return json.loads(self.cloud(*args, '-f', 'json', **kwargs).stdout)

    def flavor(self, name: str, *properties: str) -> dict:
        args = ['flavor', 'create', '--ram', '128', '--disk', '1',
                '--vcpus', '1']
        for prop in properties:
            args += ['--property', prop]
        self.cloud(*args, name, microversion=VALIDATED)
        self.addCleanup(self.cloud, 'flavor', 'delete', name, check=False)
        return self.cloud_json('flavor', 'show', name)['properties']

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
        _checked([PYTHON, CLOUDLAB, 'add-host', 'n1', '--network-only',
                  '--dir', self.lab_dir])
        ns = f'mfc-p{os.getpid()}-n1'
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
        properties = self.flavor('m1.ft', 'ft:enabled=true',
                                 'ft:epoch_ms=100',
                                 'ft:disk_sync=write-replication')
        self.assertEqual({'ft:enabled': 'true', 'ft:epoch_ms': '100',
                          'ft:disk_sync': 'write-replication'}, properties)

    def test_bad_ft_values_refused_with_400(self):
        self.flavor('m1.ft-bad', 'ft:enabled=true')
        for prop, says in (
                ('ft:epoch_ms=abc', "'ft:epoch_ms': 'abc' is not an integer"),
                ('ft:epoch_ms=5', "'ft:epoch_ms': 5 is out of range"),
                ('ft:enabled=maybe', "'ft:enabled': 'maybe' is not a boolean"),
                ('ft:disk_sync=later', "'ft:disk_sync'"),
                ('ft:nosuchkey=1', 'ft:nosuchkey')):
            result = self.cloud('flavor', 'set', '--property', prop,
                                'm1.ft-bad', check=False,
                                microversion=VALIDATED)
            self.assertNotEqual(0, result.returncode, prop)
            self.assertIn('400', result.stderr, prop)
            self.assertIn(says, result.stderr, prop)
        self.assertEqual(
            {'ft:enabled': 'true'},
            self.cloud_json('flavor', 'show', 'm1.ft-bad')['properties'])

    def test_bad_ft_value_in_flavor_create_refused(self):
        # python-openstackclient creates the flavor, then sets its
        # properties; when Nova refuses them it logs the 400 and still
        # exits 0, leaving a flavor without them (not one that says ft).
        result = self.cloud('flavor', 'create', '--ram', '128', '--disk',
                            '1', '--property', 'ft:enabled=maybe',
                            'm1.ft-create-bad', check=False,
                            microversion=VALIDATED)
        self.addCleanup(self.cloud, 'flavor', 'delete', 'm1.ft-create-bad',
                        check=False)
        self.assertIn('400', result.stderr)
        self.assertIn("'ft:enabled': 'maybe' is not a boolean",
                      result.stderr)
        self.assertEqual(
            {}, self.cloud_json('flavor', 'show',
                                'm1.ft-create-bad')['properties'])

    def test_ft_values_unchecked_before_2_86(self):
        # Nova checks extra specs only from 2.86 on; older clients can
        # still store a bad value (a build re-checks it: ft_request).
        self.flavor('m1.ft-old')
        self.cloud('flavor', 'set', '--property', 'ft:epoch_ms=abc',
                   'm1.ft-old', microversion='2.85')
        self.assertEqual(
            {'ft:epoch_ms': 'abc'},
            self.cloud_json('flavor', 'show', 'm1.ft-old')['properties'])

    # -- an editable install, as DevStack's setup_develop makes ----------

    def test_editable_install_loads_validators_and_driver(self):
        self.addCleanup(_checked, [*PIP, 'install', '--no-deps',
                                   '--force-reinstall', self.wheel])
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
        _checked([PYTHON, CLOUDLAB, 'restart', 'nova-api', '--dir',
                  self.lab_dir])
        self.flavor('m1.ft-editable', 'ft:enabled=true')
        result = self.cloud('flavor', 'set', '--property', 'ft:epoch_ms=5',
                            'm1.ft-editable', check=False,
                            microversion=VALIDATED)
        self.assertIn('400', result.stderr)
        self.assertIn("'ft:epoch_ms': 5 is out of range", result.stderr)

    # -- Glance: the project's own guest image ---------------------------

    def upload_guest(self, name: str, *properties: str
                     ) -> tuple[dict, dict, dict, dict[str, str]]:
        """The project's guest as kernel, ramdisk and a 64 MiB raw disk
        that names both: (kernel, ramdisk, disk) images and the built
        files."""
        build = _checked([PYTHON, '-m', 'mftvm_openstack.images.builder',
                          os.path.join(self.tmp, 'images')], cwd=self.tmp)
        parts = dict(line.split(' ', 1) for line in
                     build.stdout.splitlines())
        disk = os.path.join(self.tmp, 'images', 'disk.raw')
        with open(disk, 'wb') as f:
            f.truncate(64 << 20)
        kernel = self.cloud_json(
            'image', 'create', '--disk-format', 'aki', '--container-format',
            'aki', '--file', parts['kernel'], f'{name}-kernel')
        self.addCleanup(self.cloud, 'image', 'delete', kernel['id'],
                        check=False)
        ramdisk = self.cloud_json(
            'image', 'create', '--disk-format', 'ari', '--container-format',
            'ari', '--file', parts['initrd'], f'{name}-ramdisk')
        self.addCleanup(self.cloud, 'image', 'delete', ramdisk['id'],
                        check=False)
        args = ['image', 'create', '--disk-format', 'raw',
                '--container-format', 'bare', '--file', disk,
                '--property', f'kernel_id={kernel["id"]}',
                '--property', f'ramdisk_id={ramdisk["id"]}']
        for prop in properties:
            args += ['--property', prop]
        guest = self.cloud_json(*args, name)
        self.addCleanup(self.cloud, 'image', 'delete', guest['id'],
                        check=False)
        return kernel, ramdisk, guest, parts

    def test_guest_image_uploaded_as_kernel_ramdisk_and_disk(self):
        kernel, ramdisk, guest, parts = self.upload_guest('mftvm-guest')
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
        self.assertEqual({h: 'up' for h in HOSTS}, hypervisors)
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
        self.assertEqual(set(HOSTS), chassis)

        # The guest has a static 10.0.2.15/24 (guest/init); its virtio-net
        # checksum offload is off (OVS's userspace Geneve needs that).
        _, _, image, _ = self.upload_guest(
            'e2e-counter', 'os_command_line=console=ttyS0 '
            'mftvm.run=counter virtio_net.csum=0')
        network = self.cloud_json('network', 'create', 'e2e-net')
        self.addCleanup(self.cloud, 'network', 'delete', network['id'],
                        check=False)
        self.assertEqual('geneve', network['provider:network_type'])
        self.cloud('subnet', 'create', '--network', network['id'],
                   '--subnet-range', '10.0.2.0/24', '--gateway',
                   '10.0.2.2', 'e2e-subnet')
        group = self.cloud_json('security', 'group', 'create', 'e2e-counter')
        self.addCleanup(self.cloud, 'security', 'group', 'delete',
                        group['id'], check=False)
        self.cloud('security', 'group', 'rule', 'create', '--protocol',
                   'tcp', '--dst-port', '7000', group['id'])
        port = self.cloud_json(
            'port', 'create', '--network', network['id'], '--fixed-ip',
            'subnet=e2e-subnet,ip-address=10.0.2.15', '--security-group',
            group['id'], 'e2e-guest')
        self.addCleanup(self.cloud, 'port', 'delete', port['id'],
                        check=False)
        probe = self.cloud_json('port', 'create', '--network',
                                network['id'], 'e2e-probe')
        self.addCleanup(self.cloud, 'port', 'delete', probe['id'],
                        check=False)
        self.cloud('flavor', 'create', '--ram', '128', '--disk', '1',
                   '--vcpus', '1', 'm1.e2e')
        self.addCleanup(self.cloud, 'flavor', 'delete', 'm1.e2e',
                        check=False)

        server = self.cloud_json(
            'server', 'create', '--image', image['id'], '--flavor',
            'm1.e2e', '--nic', f'port-id={port["id"]}',
            '--availability-zone', 'nova:h1', '--wait', 'e2e-vm')
        self.addCleanup(self.cloud, 'server', 'delete', '--wait',
                        server['id'], check=False)
        shown = self.cloud_json('server', 'show', server['id'])
        self.assertEqual('ACTIVE', shown['status'])
        self.assertEqual('h1', shown['OS-EXT-SRV-ATTR:host'])
        self.assertEqual({'e2e-net': ['10.0.2.15']}, shown['addresses'])
        # Nova's API lists servers (it asks Neutron for their groups).
        self.assertIn(server['id'], {s['ID'] for s in self.cloud_json(
            'server', 'list')})
        bound = self.cloud_json('port', 'show', port['id'])
        self.assertEqual(('ACTIVE', 'h1'),
                         (bound['status'], bound['binding_host_id']))

        # From h2, through OVN (Geneve between the hosts' userspace
        # datapaths) to the guest's counter service on h1.
        _checked([PYTHON, CLOUDLAB, 'probe', 'h2', probe['id'], '--dir',
                  self.lab_dir])
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
