"""The DevStack plugin (``devstack/settings``, ``devstack/plugin.sh``).

DevStack cannot run here (it clones from the internet), so each test runs
one phase the way stack.sh, unstack.sh and clean.sh do (settings sourced,
then plugin.sh sourced with the phase as arguments) in a bash whose
DevStack functions are stubs (``tests/unit/devstack_stubs.sh``). The stubs
log their calls; iniset writes real ini files. The tests check the calls
and the files, and that both scripts pass bashate.
"""

import configparser
import os
import pwd
import socket
import subprocess
import sys
import warnings
from importlib import metadata

import fixtures
import testtools

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
PLUGIN_DIR = os.path.join(ROOT, 'devstack')
STUBS = os.path.join(ROOT, 'tests', 'unit', 'devstack_stubs.sh')
SCRIPTS = [os.path.join(PLUGIN_DIR, name) for name in ('settings',
                                                       'plugin.sh')]

# An all-in-one node: controller and compute, as in DevStack's defaults.
HOST_IP = '10.0.0.11'
HOSTNAME = 'hv1'
AIO_SERVICES = ('key,n-api,n-cond,n-sch,n-cpu,placement-api,q-svc,'
                'g-api,rabbit,mysql,etcd3')
CONTROLLER_SERVICES = ('key,n-api,n-cond,n-sch,placement-api,g-api,rabbit,'
                       'etcd3')
#: what a cloud that fences with one Redis sets in local.conf
REDIS = {'MFTVM_FENCING_URL': f'redis://{HOST_IP}:6379',
         'MFTVM_INSTALL_REDIS': 'True'}
#: what pre-install installs: the tracker extension's build dependency,
#: and QEMU where an agent runs
XXHASH = ('libxxhash-dev',)
QEMU = ('qemu-system-x86', 'qemu-utils')
TRANSPORT_URL = f'rabbit://stackrabbit:secret@{HOST_IP}:5672/'
#: nova-compute's vhost in DevStack's default cells v2 layout
CELL_VHOST = 'nova_cell1'

HARNESS = '''
set -o errexit -o nounset -o pipefail
source "$MFTVM_TEST_STUBS"
"$@"
'''


def _known_options():
    """{group: {option}} of what the agent reads from its config file."""
    known = {}
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')     # eventlet, via oslo.messaging
        for ep in metadata.entry_points(group='oslo.config.opts'):
            if ep.name not in ('mftvm', 'oslo.log', 'oslo.messaging'):
                continue
            for group, opts in ep.load()():
                name = getattr(group, 'name', group) or 'DEFAULT'
                known.setdefault(name, set()).update(o.dest for o in opts)
    return known


def _user():
    return pwd.getpwuid(os.getuid()).pw_name


def _bashate(*args):
    # the bashate console script may not be on PATH; its module is
    # importable wherever it is installed
    cmd = [sys.executable, '-c',
           'import sys; from bashate.bashate import main; sys.exit(main())']
    return subprocess.run(cmd + list(args), capture_output=True, text=True,
                          timeout=60)


class DevStackPluginTest(testtools.TestCase):

    def setUp(self):
        super().setUp()
        self.tmp = self.useFixture(fixtures.TempDir()).path
        self.log = os.path.join(self.tmp, 'calls.log')
        self.conf_dir = os.path.join(self.tmp, 'etc', 'mftvm')
        self.conf = os.path.join(self.conf_dir, 'mftvm.conf')
        self.state = os.path.join(self.tmp, 'var', 'lib', 'mftvm')
        self.nova_conf = os.path.join(self.tmp, 'nova.conf')
        self.redis_conf = os.path.join(self.tmp, 'redis.conf')
        # DevStack's global venv
        self.exec_prefix = self.fake_python()
        with open(self.nova_conf, 'w') as f:
            f.write('[DEFAULT]\ncompute_driver = libvirt.LibvirtDriver\n'
                    'my_ip = 10.0.0.11\n\n[libvirt]\nvirt_type = qemu\n')
        with open(self.redis_conf, 'w') as f:
            f.write('port 6379\nbind 127.0.0.1 -::1\n')

    def fake_python(self):
        """A python3 and a glance-manage in the exec prefix that log their
        arguments; python3 runs the project's configuration writer
        (mftvm_openstack.deploy) for real, with the Python that runs these
        tests, and nothing else."""
        bin_dir = os.path.join(self.tmp, 'venv-bin')
        os.makedirs(bin_dir, exist_ok=True)
        for name in ('python3', 'glance-manage'):
            path = os.path.join(bin_dir, name)
            with open(path, 'w') as f:
                f.write(f'#!/bin/bash\n(IFS=$\'\\t\'; '
                        f'printf "{name}\\t%s\\n" "$*") >> '
                        f'"$MFTVM_TEST_LOG"\n')
                if name == 'python3':
                    f.write('if [[ "$2" == mftvm_openstack.deploy ]]; then\n'
                            '    exec "$MFTVM_TEST_PYTHON" "$@"\nfi\n')
            os.chmod(path, 0o755)
        return bin_dir

    def env(self, **overrides):
        env = {
            'PATH': os.environ.get('PATH', '/usr/bin:/bin'),
            'LANG': 'C.UTF-8',
            'MFTVM_TEST_STUBS': STUBS,
            'MFTVM_TEST_PLUGIN_DIR': PLUGIN_DIR,
            'MFTVM_TEST_LOG': self.log,
            'MFTVM_TEST_PYTHON': sys.executable,
            'MFTVM_TEST_HOSTNAME': HOSTNAME,
            'MFTVM_TEST_EXEC_PREFIX': self.exec_prefix,
            'MFTVM_TEST_GROUPS': 'kvm libvirt',
            # DevStack's own variables
            'DEST': '/opt/stack',
            'HOST_IP': HOST_IP,
            'SERVICE_HOST': HOST_IP,
            'STACK_USER': _user(),
            'ENABLED_SERVICES': AIO_SERVICES,
            'NOVA_CONF': self.nova_conf,
            'ENABLE_DEBUG_LOG_LEVEL': 'True',
            'VIRT_DRIVER': 'libvirt',
            'RABBIT_USERID': 'stackrabbit',
            'RABBIT_PASSWORD': 'secret',
            'RABBIT_HOST': HOST_IP,
            # where this test keeps what the plugin writes
            'MFTVM_CONF_DIR': self.conf_dir,
            'MFTVM_STATE_PATH': self.state,
            'MFTVM_REDIS_CONF': self.redis_conf,
        }
        env.update(overrides)
        return {k: v for k, v in env.items() if v is not None}

    def bash(self, *args, check=True, **overrides):
        proc = subprocess.run(['bash', '-c', HARNESS, 'bash'] + list(args),
                              env=self.env(**overrides), capture_output=True,
                              text=True, timeout=120)
        if check and proc.returncode != 0:
            self.fail(f'{" ".join(args)} exited {proc.returncode}:\n'
                      f'{proc.stderr[-4000:]}')
        return proc

    def phase(self, *phase, **overrides):
        # Off by default until the Nova driver lands; these tests check
        # what the plugin does when it is asked to set it.
        overrides.setdefault('MFTVM_SET_COMPUTE_DRIVER', 'True')
        self.bash('devstack_run_phase', *phase, **overrides)
        return self.calls()

    def settings(self, **overrides):
        out = self.bash('devstack_print_settings', **overrides).stdout
        return dict(line.split('=', 1) for line in out.splitlines())

    def calls(self, name=None):
        if not os.path.exists(self.log):
            return []
        with open(self.log) as f:
            calls = [tuple(line.rstrip('\n').split('\t')) for line in f]
        if name is None:
            return calls
        return [c[1:] for c in calls if c[0] == name]

    def ini(self, path):
        """{section: {option: value}}; [DEFAULT] is a section like any."""
        self.assertTrue(os.path.exists(path), path)
        conf = configparser.RawConfigParser(default_section='\0')
        conf.optionxform = str
        conf.read(path)
        return {section: dict(conf.items(section))
                for section in conf.sections()}

    def reset(self):
        if os.path.exists(self.log):
            os.unlink(self.log)

    # bashate

    def test_bashate(self):
        # E005 (no #! line) does not apply to settings, which is sourced
        proc = _bashate('-v', '-i', 'E005', '-e', 'E*', *SCRIPTS, STUBS)
        self.assertEqual(0, proc.returncode, proc.stdout + proc.stderr)
        self.assertNotIn('E0', proc.stdout + proc.stderr)

    # settings

    def test_settings_defaults(self):
        s = self.settings(MFTVM_CONF_DIR=None, MFTVM_STATE_PATH=None,
                          MFTVM_REDIS_CONF=None, SERVICE_HOST='10.0.0.5')
        self.assertEqual('/opt/stack/mftvm-openstack', s['MFTVM_DIR'])
        self.assertEqual(self.exec_prefix, s['MFTVM_BIN_DIR'])
        self.assertEqual('/etc/mftvm', s['MFTVM_CONF_DIR'])
        self.assertEqual('/etc/mftvm/mftvm.conf', s['MFTVM_CONF'])
        self.assertEqual('/var/lib/mftvm', s['MFTVM_STATE_PATH'])
        self.assertEqual('etcd3+http://10.0.0.5:2379',
                         s['MFTVM_FENCING_URL'])
        self.assertEqual('200', s['MFTVM_EPOCH_MS'])
        self.assertEqual('3', s['MFTVM_LEASE'])
        self.assertEqual(HOST_IP, s['MFTVM_MY_IP'])
        self.assertEqual('', s['MFTVM_PEERS'])
        self.assertEqual(CELL_VHOST, s['MFTVM_RPC_VHOST'])
        self.assertEqual('False', s['MFTVM_INSTALL_REDIS'])
        self.assertEqual('True', s['MFTVM_SET_COMPUTE_DRIVER'])
        self.assertEqual('', s['MFTVM_FILE_BACKED_MEMORY'])
        self.assertEqual('mftvm.FTLibvirtDriver', s['MFTVM_COMPUTE_DRIVER'])
        self.assertEqual('messagingv2', s['MFTVM_NOTIFICATION_DRIVER'])
        self.assertEqual('9787', s['MFTVM_METRICS_PORT'])
        self.assertEqual('127.0.0.1', s['MFTVM_METRICS_BIND_ADDRESS'])
        self.assertEqual([('mftvm-openstack',)], self.calls('define_plugin'))

    def test_settings_keep_local_conf_values(self):
        s = self.settings(MFTVM_DIR='/src/mftvm', MFTVM_CONF='/tmp/a.conf',
                          MFTVM_FENCING_URL='', MFTVM_EPOCH_MS='50',
                          MFTVM_INSTALL_REDIS='false',
                          MFTVM_SET_COMPUTE_DRIVER='False')
        self.assertEqual('/src/mftvm', s['MFTVM_DIR'])
        self.assertEqual('/tmp/a.conf', s['MFTVM_CONF'])
        self.assertEqual('', s['MFTVM_FENCING_URL'])
        self.assertEqual('50', s['MFTVM_EPOCH_MS'])
        self.assertEqual('False', s['MFTVM_INSTALL_REDIS'])
        self.assertEqual('False', s['MFTVM_SET_COMPUTE_DRIVER'])

    def test_settings_vhost_is_nova_computes(self):
        # the driver calls the agents on nova-compute's own transport
        self.assertEqual('nova_cell2', self.settings(
            NOVA_CPU_CELL='2')['MFTVM_RPC_VHOST'])
        self.assertEqual('', self.settings(
            CELLSV2_SETUP='singleconductor')['MFTVM_RPC_VHOST'])
        self.assertEqual('', self.settings(
            MFTVM_RPC_VHOST='')['MFTVM_RPC_VHOST'])

    def test_settings_enable_agent_on_compute_nodes(self):
        services = self.settings()['ENABLED_SERVICES'].split(',')
        self.assertIn('mftvm-agent', services)
        services = self.settings(
            ENABLED_SERVICES=CONTROLLER_SERVICES)['ENABLED_SERVICES']
        self.assertNotIn('mftvm-agent', services.split(','))

    def test_settings_local_conf_can_disable_agent(self):
        s = self.settings(MFTVM_TEST_LOCALRC='disable_service mftvm-agent')
        self.assertNotIn('mftvm-agent', s['ENABLED_SERVICES'].split(','))
        self.assertIn('n-cpu', s['ENABLED_SERVICES'].split(','))

    # stack pre-install

    def test_pre_install_all_in_one(self):
        # fencing on DevStack's etcd: nothing to install for it
        self.phase('stack', 'pre-install')
        self.assertEqual([XXHASH, QEMU],
                         self.calls('install_package'))
        self.assertEqual([], self.calls('die'))

    def test_pre_install_with_redis(self):
        self.phase('stack', 'pre-install', **REDIS)
        self.assertEqual([XXHASH, QEMU,
                          ('redis-server',)], self.calls('install_package'))

    def test_pre_install_compute_subnode_has_no_redis(self):
        self.phase('stack', 'pre-install', HOST_IP='10.0.0.12',
                   SERVICE_HOST='10.0.0.5',
                   ENABLED_SERVICES='n-cpu,placement-client', **REDIS)
        self.assertEqual([XXHASH, QEMU],
                         self.calls('install_package'))

    def test_pre_install_controller_without_compute(self):
        self.phase('stack', 'pre-install',
                   ENABLED_SERVICES=CONTROLLER_SERVICES, **REDIS)
        self.assertEqual([XXHASH, ('redis-server',)],
                         self.calls('install_package'))

    def test_pre_install_without_redis(self):
        for env in ({**REDIS, 'MFTVM_INSTALL_REDIS': 'False'},
                    {'MFTVM_INSTALL_REDIS': 'True'},  # but etcd's URL
                    {'MFTVM_INSTALL_REDIS': 'True',
                     'MFTVM_FENCING_URL': ''}):
            self.reset()
            self.phase('stack', 'pre-install', **env)
            self.assertEqual([XXHASH, QEMU],
                             self.calls('install_package'), env)

    def test_pre_install_stops_when_its_etcd_is_disabled(self):
        proc = self.bash('devstack_run_phase', 'stack', 'pre-install',
                         check=False, ENABLED_SERVICES=AIO_SERVICES.replace(
                             ',etcd3', ''))
        self.assertNotEqual(0, proc.returncode)
        self.assertIn('the etcd3 service is disabled', proc.stderr)
        self.assertEqual([], self.calls('install_package'))
        # a compute subnode does not run the controller's etcd
        self.reset()
        self.phase('stack', 'pre-install', HOST_IP='10.0.0.12',
                   SERVICE_HOST='10.0.0.5',
                   ENABLED_SERVICES='n-cpu,placement-client')
        self.assertEqual([], self.calls('die'))
        # nor does a store of the operator's own need it
        self.reset()
        self.phase('stack', 'pre-install',
                   ENABLED_SERVICES=AIO_SERVICES.replace(',etcd3', ''),
                   MFTVM_FENCING_URL='etcd3+https://etcd.example.org:2379')
        self.assertEqual([], self.calls('die'))

    def test_settings_follow_devstacks_etcd_port(self):
        s = self.settings(SERVICE_HOST='10.0.0.5', ETCD_PORT='12379')
        self.assertEqual('etcd3+http://10.0.0.5:12379',
                         s['MFTVM_FENCING_URL'])

    def test_pre_install_refuses_other_distributions(self):
        proc = self.bash('devstack_run_phase', 'stack', 'pre-install',
                         check=False, MFTVM_TEST_OS_PACKAGE='rpm')
        self.assertNotEqual(0, proc.returncode)
        self.assertIn('Debian or Ubuntu', proc.stderr)
        self.assertEqual([], self.calls('install_package'))

    # stack install

    def test_install(self):
        self.phase('stack', 'install')
        self.assertEqual([('/opt/stack/mftvm-openstack',)],
                         self.calls('setup_develop'))
        # the editable install cannot give Nova nova.virt.mftvm: the
        # shim goes where a wheel puts it, after the package
        self.assertEqual([('-m', 'mftvm_openstack.nova.virt_shim', 'install')],
                         self.calls('python3'))
        self.assertEqual(['setup_develop', 'python3'],
                         [c[0] for c in self.calls()
                          if c[0] in ('setup_develop', 'python3')])
        self.assertEqual([], self.calls('restart_service'))

    def test_install_with_redis(self):
        self.phase('stack', 'install', **REDIS)
        self.assertEqual([('redis-server',)], self.calls('restart_service'))
        # a second run replaces the bind line of the first
        self.phase('stack', 'install', **REDIS)
        with open(self.redis_conf) as f:
            self.assertEqual(
                ['port 6379', 'bind 127.0.0.1 -::1', '# mftvm-openstack',
                 f'bind 127.0.0.1 {HOST_IP}'], f.read().splitlines())

    def test_install_compute_subnode_leaves_redis_alone(self):
        self.phase('stack', 'install', HOST_IP='10.0.0.12',
                   SERVICE_HOST='10.0.0.5', MFTVM_DIR='/src/mftvm',
                   ENABLED_SERVICES='n-cpu,placement-client', **REDIS)
        self.assertEqual([('/src/mftvm',)], self.calls('setup_develop'))
        self.assertEqual([], self.calls('restart_service'))
        with open(self.redis_conf) as f:
            self.assertEqual('port 6379\nbind 127.0.0.1 -::1\n', f.read())

    # stack post-config

    def test_post_config_writes_agent_conf(self):
        self.phase('stack', 'post-config')
        self.assertTrue(os.path.isdir(self.state))
        self.assertEqual({
            'DEFAULT': {'transport_url': TRANSPORT_URL + CELL_VHOST,
                        'debug': 'True'},
            # Nova's own default host: socket.gethostname()
            'agent': {'host': socket.gethostname(),
                      'state_path': self.state,
                      'my_ip': HOST_IP},
            'fencing': {'backend_url': f'etcd3+http://{HOST_IP}:2379',
                        'lease': '3'},
            'ft': {'epoch_ms': '200'},
            'oslo_messaging_notifications': {
                'driver': 'messagingv2', 'topics': 'versioned_notifications'},
            'metrics': {'port': '9787', 'bind_address': '127.0.0.1'},
        }, self.ini(self.conf))
        self.assertEqual([(self.conf,)], self.calls('setup_logging'))
        self.assertEqual([(_user(), 'kvm')], self.calls('add_user_to_group'))
        # it holds the broker's password
        self.assertEqual(0o600, os.stat(self.conf).st_mode & 0o777)
        # written by the project's own code, the passwords not in argv
        [agent] = [c for c in self.calls('python3') if 'agent' in c]
        self.assertEqual(('-m', 'mftvm_openstack.deploy', 'agent'),
                         agent[:3])
        self.assertNotIn('secret', ' '.join(agent))

    def test_post_config_refuses_a_hostile_value(self):
        # a value from local.conf that would break the file (or smuggle
        # in an option) stops stack.sh with one clear line
        for name, value, says in (
                ('MFTVM_HOST', 'hv1\nreprotect = false', '--host'),
                ('MFTVM_MY_IP', '10.0.0.300', '--my-ip'),
                ('MFTVM_EPOCH_MS', '5', '--epoch-ms 5: out of range'),
                ('MFTVM_LEASE', 'abc', '--lease'),
                ('MFTVM_PEERS', 'hv2,hv 3', '--peers'),
                ('MFTVM_METRICS_PORT', '99999', '--metrics-port'),
                ('MFTVM_METRICS_BIND_ADDRESS', 'everywhere',
                 '--metrics-bind-address'),
                ('MFTVM_NOTIFICATION_DRIVER', 'carrier-pigeon',
                 '--notification-driver'),
                ('MFTVM_FENCING_URL', 'http://10.0.0.5:2379',
                 'MFTVM_FENCING_URL: scheme')):
            self.reset()
            proc = self.bash('devstack_run_phase', 'stack', 'post-config',
                             check=False, **{name: value})
            self.assertNotEqual(0, proc.returncode, name)
            errors = [line for line in proc.stderr.splitlines()
                      if line.startswith('mftvm-deploy: error:')]
            self.assertEqual(1, len(errors), proc.stderr)
            self.assertIn(says, errors[0])
            self.assertFalse(os.path.exists(self.conf), name)

    def test_post_config_kvm_group_only_for_the_agent(self):
        self.phase('stack', 'post-config', MFTVM_TEST_GROUPS='libvirt')
        self.assertEqual([], self.calls('add_user_to_group'))
        self.phase('stack', 'post-config',
                   ENABLED_SERVICES=CONTROLLER_SERVICES)
        self.assertEqual([], self.calls('add_user_to_group'))

    def test_post_config_writes_only_known_options(self):
        # every option in the section the agent reads it from
        known = _known_options()
        self.phase('stack', 'post-config', MFTVM_PEERS='hv2')
        written = self.ini(self.conf)
        self.phase('stack', 'post-config', MFTVM_FENCING_URL='')
        for section, opts in self.ini(self.conf).items():
            written.setdefault(section, {}).update(opts)
        for section, opts in written.items():
            unknown = set(opts) - known.get(section, set())
            self.assertEqual(set(), unknown, f'[{section}]')

    def test_post_config_sets_compute_driver(self):
        self.phase('stack', 'post-config')
        with open('/proc/meminfo') as f:
            total_mib = next(int(line.split()[1]) // 1024 for line in f
                             if line.startswith('MemTotal:'))
        self.assertEqual({
            'DEFAULT': {'compute_driver': 'mftvm.FTLibvirtDriver',
                        'my_ip': '10.0.0.11',
                        'ram_allocation_ratio': '1.0',
                        'reserved_host_memory_mb': '0'},
            'libvirt': {'virt_type': 'qemu',
                        'file_backed_memory': str(
                            max(1024, total_mib - 1024))},
        }, self.ini(self.nova_conf))

    def test_post_config_file_backed_memory_from_local_conf(self):
        self.phase('stack', 'post-config', MFTVM_FILE_BACKED_MEMORY='8192')
        self.assertEqual('8192', self.ini(self.nova_conf)['libvirt'][
            'file_backed_memory'])
        proc = self.bash('devstack_run_phase', 'stack', 'post-config',
                         check=False, MFTVM_FILE_BACKED_MEMORY='lots')
        self.assertNotEqual(0, proc.returncode)
        self.assertIn("mftvm-deploy: error: --file-backed-memory 'lots': "
                      "not an integer", proc.stderr)
        self.assertEqual('8192', self.ini(self.nova_conf)['libvirt'][
            'file_backed_memory'])

    def test_post_config_with_local_conf_values(self):
        self.phase('stack', 'post-config', MFTVM_HOST='compute-7',
                   MFTVM_MY_IP='192.168.1.7', MFTVM_PEERS='hv1,hv2,hv3',
                   MFTVM_RPC_VHOST='mftvm', MFTVM_EPOCH_MS='100',
                   MFTVM_LEASE='5', ENABLE_DEBUG_LOG_LEVEL='False',
                   MFTVM_FENCING_URL='etcd3+http://10.0.0.5:2379',
                   MFTVM_CONF=os.path.join(self.tmp, 'other.conf'))
        self.assertFalse(os.path.exists(self.conf))
        conf = self.ini(os.path.join(self.tmp, 'other.conf'))
        self.assertEqual(TRANSPORT_URL + 'mftvm',
                         conf['DEFAULT']['transport_url'])
        self.assertEqual('False', conf['DEFAULT']['debug'])
        self.assertEqual({'host': 'compute-7', 'state_path': self.state,
                          'my_ip': '192.168.1.7', 'peers': 'hv1,hv2,hv3'},
                         conf['agent'])
        self.assertEqual({'backend_url': 'etcd3+http://10.0.0.5:2379',
                          'lease': '5'}, conf['fencing'])
        self.assertEqual({'epoch_ms': '100'}, conf['ft'])

    def test_post_config_host_from_nova_conf(self):
        with open(self.nova_conf, 'w') as f:
            f.write('[DEFAULT]\nhost = compute-nova\n')
        self.phase('stack', 'post-config')
        self.assertEqual('compute-nova',
                         self.ini(self.conf)['agent']['host'])

    def test_post_config_rewrites_the_conf(self):
        os.makedirs(self.conf_dir)
        with open(self.conf, 'w') as f:
            f.write('[agent]\npeers = stale\nreprotect = false\n')
        self.phase('stack', 'post-config')
        self.assertNotIn('peers', self.ini(self.conf)['agent'])
        self.assertNotIn('reprotect', self.ini(self.conf)['agent'])

    def test_post_config_without_fencing_url_uses_lock_files(self):
        self.phase('stack', 'post-config', MFTVM_FENCING_URL='')
        self.assertEqual({'lock_path': os.path.join(self.state, 'fence'),
                          'lease': '3'}, self.ini(self.conf)['fencing'])

    def test_post_config_compute_driver_not_set_when_false(self):
        with open(self.nova_conf) as f:
            before = f.read()
        self.phase('stack', 'post-config', MFTVM_SET_COMPUTE_DRIVER='False')
        with open(self.nova_conf) as f:
            self.assertEqual(before, f.read())
        self.assertEqual([], [c for c in self.calls('python3')
                              if c[2:3] == ('nova',)])
        # the agent is configured all the same
        self.assertEqual(socket.gethostname(),
                         self.ini(self.conf)['agent']['host'])

    def test_post_config_compute_driver_only_on_compute_nodes(self):
        self.phase('stack', 'post-config',
                   ENABLED_SERVICES=CONTROLLER_SERVICES)
        self.assertEqual('libvirt.LibvirtDriver',
                         self.ini(self.nova_conf)['DEFAULT']['compute_driver'])

    def test_post_config_compute_driver_only_with_libvirt(self):
        self.phase('stack', 'post-config', VIRT_DRIVER='fake')
        self.assertEqual('libvirt.LibvirtDriver',
                         self.ini(self.nova_conf)['DEFAULT']['compute_driver'])
        [warning] = self.calls('warn')
        self.assertIn('VIRT_DRIVER=libvirt', ' '.join(warning))

    def test_post_config_needs_rabbit_for_the_agent(self):
        proc = self.bash('devstack_run_phase', 'stack', 'post-config',
                         check=False, ENABLED_SERVICES='n-cpu',
                         RABBIT_HOST=None, RABBIT_PASSWORD=None)
        self.assertNotEqual(0, proc.returncode)
        self.assertIn('mftvm-agent needs RabbitMQ', proc.stderr)

    # stack extra

    def test_extra_starts_the_agent(self):
        self.phase('stack', 'extra')
        self.assertEqual(
            [('mftvm-agent',
              f'{self.exec_prefix}/mftvm-agent --config-file {self.conf}')],
            self.calls('run_process'))

    def test_extra_agent_not_started_when_disabled(self):
        self.phase('stack', 'extra', ENABLED_SERVICES=CONTROLLER_SERVICES)
        self.assertEqual([], self.calls('run_process'))
        self.phase('stack', 'extra',
                   MFTVM_TEST_LOCALRC='disable_service mftvm-agent')
        self.assertEqual([], self.calls('run_process'))

    def test_extra_agent_enabled_explicitly_without_compute(self):
        self.phase('stack', 'extra',
                   ENABLED_SERVICES=CONTROLLER_SERVICES + ',mftvm-agent')
        self.assertEqual(['mftvm-agent'],
                         [c[0] for c in self.calls('run_process')])

    def test_extra_loads_the_metadefs_where_glance_runs(self):
        self.phase('stack', 'extra')
        self.assertEqual(
            [('--config-file', '/etc/glance/glance-api.conf', 'db',
              'load_metadefs', '--path',
              '/opt/stack/mftvm-openstack/etc/metadefs/mftvm-ft.json',
              '--merge', '--overwrite')],
            self.calls('glance-manage'))
        self.assertTrue(os.path.exists(os.path.join(
            ROOT, 'etc', 'metadefs', 'mftvm-ft.json')))
        # DevStack's own Glance paths when lib/glance set them
        self.reset()
        self.phase('stack', 'extra', GLANCE_BIN_DIR=self.exec_prefix,
                   GLANCE_API_CONF='/etc/g/api.conf')
        self.assertEqual(['/etc/g/api.conf'],
                         [c[1] for c in self.calls('glance-manage')])

    def test_extra_metadefs_not_loaded_without_glance_or_when_off(self):
        self.phase('stack', 'extra',
                   ENABLED_SERVICES=AIO_SERVICES.replace('g-api,', ''))
        self.phase('stack', 'extra', MFTVM_LOAD_METADEFS='False')
        self.assertEqual([], self.calls('glance-manage'))

    # unstack, clean

    def test_unstack_stops_the_agent(self):
        self.phase('unstack')
        self.assertEqual([('mftvm-agent',)], self.calls('stop_process'))

    def test_unstack_without_the_agent(self):
        self.phase('unstack', ENABLED_SERVICES=CONTROLLER_SERVICES)
        self.assertEqual([], self.calls('stop_process'))

    def test_clean_removes_state_and_conf(self):
        os.makedirs(os.path.join(self.state, 'instances', 'vm1'))
        os.makedirs(self.conf_dir)
        with open(self.conf, 'w') as f:
            f.write('[DEFAULT]\n')
        self.phase('clean')
        self.assertEqual([('-m', 'mftvm_openstack.nova.virt_shim', 'remove')],
                         self.calls('python3'))
        self.assertFalse(os.path.exists(self.state))
        self.assertFalse(os.path.exists(self.conf_dir))
        self.assertTrue(os.path.exists(self.nova_conf))

    # every phase

    def test_phases_do_only_their_own_work(self):
        # python3 calls by module (and command)
        work = ('install_package', 'setup_develop', 'restart_service',
                'iniset', 'run_process', 'stop_process', 'python3')
        shim = 'python3 -m mftvm_openstack.nova.virt_shim'
        deploy = 'python3 -m mftvm_openstack.deploy'
        expected = {
            ('stack', 'pre-install'): {'install_package'},
            ('stack', 'install'): {'setup_develop', 'restart_service',
                                   f'{shim} install'},
            ('stack', 'post-config'): {f'{deploy} agent',
                                       f'{deploy} nova'},
            ('stack', 'extra'): {'run_process'},
            ('stack', 'test-config'): set(),
            ('unstack',): {'stop_process'},
            ('clean',): {f'{shim} remove'},
        }
        for phase, names in expected.items():
            self.reset()
            self.phase(*phase, **REDIS)
            done = {' '.join(c[:4]) if c[0] == 'python3' else c[0]
                    for c in self.calls() if c[0] in work}
            self.assertEqual(names, done, phase)

    def test_xtrace_restored(self):
        for before, after in (('set +o xtrace', 'set +o xtrace'),
                              ('set -o xtrace', 'set -o xtrace')):
            self.reset()
            self.bash('eval', f'{before}; devstack_run_phase stack extra')
            self.assertEqual([(after,)], self.calls('xtrace'))
