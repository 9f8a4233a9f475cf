"""``python -m mftvm_openstack.deploy``: a compute host's FT configuration.

The DevStack plugin (tests/unit/test_devstack_plugin.py runs it through
the plugin) and the cloud lab call this one command; here it is run
directly, as ``main(argv, env)``, on files in a temporary directory.
"""

from __future__ import annotations

import configparser
import contextlib
import io
import os
import socket

import fixtures
import oslo_messaging
import testtools

from mftvm_openstack import conf as mftvm_conf
from mftvm_openstack import deploy

RABBIT = 'rabbit://nova:s3cret@10.0.0.5:5672/nova_cell1'
ETCD = 'etcd3+http://10.0.0.5:2379?endpoints=10.0.0.6:2379'
ENV = {deploy.TRANSPORT_URL_ENV: RABBIT, deploy.FENCING_URL_ENV: ETCD}


def _ini(path: str) -> dict[str, dict[str, str]]:
    parser = configparser.RawConfigParser(default_section='\0')
    parser.optionxform = str    # type: ignore[assignment,method-assign]
    parser.read(path)
    return {s: dict(parser.items(s)) for s in parser.sections()}


class DeployTest(testtools.TestCase):

    def setUp(self) -> None:
        super().setUp()
        self.tmp = self.useFixture(fixtures.TempDir()).path
        self.conf = os.path.join(self.tmp, 'etc', 'mftvm.conf')
        self.nova_conf = os.path.join(self.tmp, 'nova.conf')

    def run_main(self, *argv: str, env: dict[str, str] | None = None
                 ) -> tuple[int, str]:
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            try:
                code = deploy.main(list(argv), ENV if env is None else env)
            except SystemExit as exc:       # argparse's own errors
                code = int(exc.code or 0)
        return code, err.getvalue()

    def agent(self, *extra: str, env: dict[str, str] | None = None
              ) -> tuple[int, str]:
        return self.run_main('agent', '--conf', self.conf, '--host', 'hv1',
                             '--my-ip', '10.0.0.11', '--state-path',
                             '/var/lib/mftvm', *extra, env=env)

    # -- the agent's file ------------------------------------------------

    def test_agent_conf(self):
        self.assertEqual((0, ''), self.agent('--peers', 'hv2, hv3',
                                             '--lease', '5', '--epoch-ms',
                                             '100', '--debug', 'true'))
        self.assertEqual({
            'DEFAULT': {'transport_url': RABBIT, 'debug': 'True'},
            'agent': {'host': 'hv1', 'state_path': '/var/lib/mftvm',
                      'my_ip': '10.0.0.11', 'peers': 'hv2,hv3'},
            'fencing': {'backend_url': ETCD, 'lease': '5'},
            'ft': {'epoch_ms': '100'},
            # by default: versioned notifications on the bus, where
            # Nova's go, and metrics for this host only
            'oslo_messaging_notifications': {
                'driver': 'messagingv2', 'topics': 'versioned_notifications'},
            'metrics': {'port': '9787', 'bind_address': '127.0.0.1'},
        }, _ini(self.conf))
        # the broker's and the store's passwords: its owner only
        self.assertEqual(0o600, os.stat(self.conf).st_mode & 0o777)

    def test_agent_conf_is_read_by_the_agent(self):
        # what the agent's options make of the file
        self.assertEqual((0, ''), self.agent('--peers', 'hv2'))
        conf = mftvm_conf.cfg.ConfigOpts()
        mftvm_conf.register_opts(conf)
        conf(['--config-file', self.conf], project='mftvm')
        self.assertEqual(('hv1', '10.0.0.11', ['hv2'], ETCD, 3, 200),
                         (conf.agent.host, conf.agent.my_ip,
                          conf.agent.peers, conf.fencing.backend_url,
                          conf.fencing.lease, conf.ft.epoch_ms))
        self.assertEqual((9787, '127.0.0.1'),
                         (conf.metrics.port, conf.metrics.bind_address))
        # oslo.messaging's own options, as the agent's notifier reads them
        transport = oslo_messaging.get_notification_transport(
            conf, url='fake:/')
        self.addCleanup(transport.cleanup)
        self.assertEqual((['messagingv2'], ['versioned_notifications']),
                         (conf.oslo_messaging_notifications.driver,
                          conf.oslo_messaging_notifications.topics))

    def test_agent_reporting_options(self):
        self.assertEqual((0, ''), self.agent(
            '--notification-driver', 'noop', '--notification-topic',
            'ft_notifications', '--metrics-port', '9100',
            '--metrics-bind-address', '10.0.0.11'))
        ini = _ini(self.conf)
        self.assertEqual({'driver': 'noop', 'topics': 'ft_notifications'},
                         ini['oslo_messaging_notifications'])
        self.assertEqual({'port': '9100', 'bind_address': '10.0.0.11'},
                         ini['metrics'])
        # port 0: no endpoint at all
        self.assertEqual((0, ''), self.agent('--metrics-port', '0'))
        self.assertNotIn('metrics', _ini(self.conf))

    def test_agent_conf_replaced_not_merged(self):
        os.makedirs(os.path.dirname(self.conf))
        with open(self.conf, 'w') as f:
            f.write('[agent]\npeers = stale\nreprotect = false\n')
        self.assertEqual((0, ''), self.agent())
        self.assertEqual({'host', 'state_path', 'my_ip'},
                         set(_ini(self.conf)['agent']))

    def test_agent_conf_without_fencing_url_uses_lock_files(self):
        self.assertEqual((0, ''), self.agent(
            env={deploy.TRANSPORT_URL_ENV: RABBIT}))
        self.assertEqual({'lock_path': '/var/lib/mftvm/fence',
                          'lease': '3'}, _ini(self.conf)['fencing'])

    def test_agent_log_file_rotates_by_size(self):
        self.assertEqual((0, ''), self.agent(
            '--log-file', '/var/log/mftvm/agent.log', '--log-max-mb', '10'))
        self.assertEqual({'transport_url': RABBIT, 'debug': 'False',
                          'log_file': '/var/log/mftvm/agent.log',
                          'log_rotation_type': 'size',
                          'max_logfile_size_mb': '10',
                          'max_logfile_count': '2'},
                         _ini(self.conf)['DEFAULT'])

    def test_agent_host_defaults_to_novas(self):
        with open(self.nova_conf, 'w') as f:
            f.write('[DEFAULT]\n# host = commented\nhost = compute-7\n'
                    '[libvirt]\nhost = not-this-one\n')
        self.assertEqual((0, ''), self.run_main(
            'agent', '--conf', self.conf, '--host', '', '--nova-conf',
            self.nova_conf, '--my-ip', '10.0.0.11', '--state-path', '/s'))
        self.assertEqual('compute-7', _ini(self.conf)['agent']['host'])
        # no host in nova.conf (or none at all): Nova's default
        os.unlink(self.nova_conf)
        self.assertEqual((0, ''), self.run_main(
            'agent', '--conf', self.conf, '--nova-conf', self.nova_conf,
            '--my-ip', '10.0.0.11', '--state-path', '/s'))
        self.assertEqual(socket.gethostname(),
                         _ini(self.conf)['agent']['host'])

    def test_hostile_values_refused_with_one_line(self):
        cases = (
            (('--host', 'hv1\n[fencing]'), ENV, "--host 'hv1\\n[fencing]'"),
            (('--host', '-x;rm'), ENV, '--host'),
            (('--my-ip', '10.0.0.1\nx=1'), ENV, '--my-ip'),
            (('--state-path', 'relative'), ENV, '--state-path'),
            (('--state-path', '/var/../etc'), ENV, '--state-path'),
            (('--state-path', '/a\nb'), ENV, 'control characters'),
            (('--peers', 'hv2,hv3\nx'), ENV, '--peers'),
            (('--lease', '0'), ENV, '--lease 0: out of range'),
            (('--lease', '3.5'), ENV, "--lease '3.5': not an integer"),
            (('--epoch-ms', '99999'), ENV, '--epoch-ms 99999: out of range'),
            (('--debug', 'maybe'), ENV, "--debug 'maybe': not a boolean"),
            (('--log-file', 'agent.log'), ENV, '--log-file'),
            (('--notification-driver', 'eventlet\nx'), ENV,
             '--notification-driver'),
            (('--notification-topic', 'a\n[x]'), ENV,
             '--notification-topic'),
            (('--metrics-port', '70000'), ENV,
             '--metrics-port 70000: out of range'),
            (('--metrics-bind-address', '0.0.0.0\nx'), ENV,
             '--metrics-bind-address'),
            ((), {}, 'MFTVM_TRANSPORT_URL is empty'),
            ((), {deploy.TRANSPORT_URL_ENV: 'http://u:s3cret@h/'},
             "MFTVM_TRANSPORT_URL: scheme 'http'"),
            ((), {deploy.TRANSPORT_URL_ENV: 'rabbit://u:s3cret@h:x/'},
             'MFTVM_TRANSPORT_URL: bad port'),
            ((), {deploy.TRANSPORT_URL_ENV: f'{RABBIT}\nx = 1'},
             'control characters'),
            ((), {**ENV, deploy.FENCING_URL_ENV: 'file:///etc/passwd'},
             "MFTVM_FENCING_URL: scheme 'file'"),
            ((), {**ENV, deploy.FENCING_URL_ENV: 'redis://:s3cret@'},
             'MFTVM_FENCING_URL: no host'),
        )
        for extra, env, says in cases:
            code, err = self.agent(*extra, env=env)
            self.assertEqual(2, code, extra)
            self.assertEqual(1, len(err.splitlines()), err)
            self.assertTrue(err.startswith('mftvm-deploy: error: '), err)
            self.assertIn(says, err, extra)
            # a password is never echoed
            self.assertNotIn('s3cret', err)
            self.assertFalse(os.path.exists(self.conf), extra)

    # -- Nova's options --------------------------------------------------

    NOVA = ('# written by DevStack\n'
            '[DEFAULT]\n'
            'compute_driver = libvirt.LibvirtDriver\n'
            'my_ip = 10.0.0.11\n'
            '\n'
            '[libvirt]\n'
            '# keep me\n'
            'virt_type = qemu\n'
            '\n'
            '[vnc]\n'
            'enabled = False\n')

    def test_nova_options_set_in_place(self):
        with open(self.nova_conf, 'w') as f:
            f.write(self.NOVA)
        os.chmod(self.nova_conf, 0o640)
        self.assertEqual((0, ''), self.run_main(
            'nova', '--nova-conf', self.nova_conf,
            '--file-backed-memory', '4096'))
        with open(self.nova_conf) as f:
            self.assertEqual(
                '# written by DevStack\n'
                '[DEFAULT]\n'
                'compute_driver = mftvm.FTLibvirtDriver\n'
                'my_ip = 10.0.0.11\n'
                'ram_allocation_ratio = 1.0\n'
                'reserved_host_memory_mb = 0\n'
                '\n'
                '[libvirt]\n'
                '# keep me\n'
                'virt_type = qemu\n'
                'file_backed_memory = 4096\n'
                '\n'
                '[vnc]\n'
                'enabled = False\n', f.read())
        self.assertEqual(0o640, os.stat(self.nova_conf).st_mode & 0o777)
        # a second run changes nothing
        self.assertEqual((0, ''), self.run_main(
            'nova', '--nova-conf', self.nova_conf,
            '--file-backed-memory', '4096'))
        with open(self.nova_conf) as f:
            self.assertEqual(1, f.read().count('file_backed_memory'))

    def test_nova_options_new_sections_and_file(self):
        self.assertEqual((0, ''), self.run_main(
            'nova', '--nova-conf', self.nova_conf, '--compute-driver',
            'libvirt.LibvirtDriver', '--file-backed-memory', '2048'))
        self.assertEqual({
            'DEFAULT': {'compute_driver': 'libvirt.LibvirtDriver',
                        'ram_allocation_ratio': '1.0',
                        'reserved_host_memory_mb': '0'},
            'libvirt': {'file_backed_memory': '2048'}},
            _ini(self.nova_conf))

    def test_nova_nic_checksum_offload(self):
        # hosts whose datapath cannot finish guests' checksums (the lab)
        self.assertEqual((0, ''), self.run_main(
            'nova', '--nova-conf', self.nova_conf, '--file-backed-memory',
            '2048', '--nic-checksum-offload', 'false'))
        self.assertEqual({'nic_checksum_offload': 'False'},
                         _ini(self.nova_conf)['ft'])

    def test_nova_file_backed_memory_auto(self):
        with open('/proc/meminfo') as f:
            total = next(int(line.split()[1]) // 1024 for line in f
                         if line.startswith('MemTotal:'))
        self.assertEqual((0, ''), self.run_main(
            'nova', '--nova-conf', self.nova_conf))
        self.assertEqual(str(max(1024, total - 1024)),
                         _ini(self.nova_conf)['libvirt'][
                             'file_backed_memory'])

    def test_nova_hostile_values_refused(self):
        with open(self.nova_conf, 'w') as f:
            f.write(self.NOVA)
        for extra, says in (
                (('--file-backed-memory', 'lots'), 'not an integer'),
                (('--file-backed-memory', '1'), 'out of range'),
                (('--compute-driver', 'mftvm.FT\n[DEFAULT]'),
                 'not a module.Class name'),
                (('--compute-driver', 'FTLibvirtDriver'),
                 'not a module.Class name'),
                (('--nic-checksum-offload', 'sometimes'),
                 "--nic-checksum-offload 'sometimes': not a boolean")):
            code, err = self.run_main('nova', '--nova-conf', self.nova_conf,
                                      *extra)
            self.assertEqual(2, code, extra)
            self.assertEqual(1, len(err.splitlines()), err)
            self.assertIn(says, err)
            with open(self.nova_conf) as f:
                self.assertEqual(self.NOVA, f.read())

    def test_usage_errors_are_one_line(self):
        code, err = self.run_main('agent', '--conf', self.conf)
        self.assertEqual(2, code)
        self.assertEqual(1, len(err.splitlines()), err)
        self.assertIn('mftvm-deploy: error: the following arguments are '
                      'required', err)
