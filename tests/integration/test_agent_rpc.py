"""A real ``mftvm-agent`` process over a real RabbitMQ.

One private broker (:class:`tests.integration.lab.RabbitMQ`, on 127.0.0.1)
and one agent with the real manager serve the whole class; the agents
that a test stops or that must fail are its own. The client side is this
process: :class:`~mftvm_openstack.agent.rpcapi.AgentAPI` and the ``mftvm``
CLI.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Optional

import oslo_messaging
import testtools

from mftvm_openstack import conf
from mftvm_openstack.agent import exception, rpcapi
from tests.integration import lab as ftlab

CONF = conf.CONF
BIN = os.path.dirname(sys.executable)
AGENT = os.path.join(BIN, 'mftvm-agent')
MFTVM = os.path.join(BIN, 'mftvm')


def write_config(tmp: str, host: str, url: Optional[str]) -> str:
    path = os.path.join(tmp, 'mftvm.conf')
    lines = ['[DEFAULT]',
             f'log_file = {os.path.join(tmp, "agent.log")}', 'debug = true']
    if url is not None:
        lines.append(f'transport_url = {url}')
    lines += ['[agent]', f'host = {host}',
              f'state_path = {os.path.join(tmp, "state")}',
              'monitor_interval = 0.2', '']
    with open(path, 'w') as f:
        f.write('\n'.join(lines))
    return path


class Agent:
    """An ``mftvm-agent`` process with its own temp dir."""

    def __init__(self, host: str, url: Optional[str]) -> None:
        self.host = host
        self.tmp = tempfile.mkdtemp(prefix=f'mftvm-{host}-')
        self.config = write_config(self.tmp, host, url)
        self.out = open(os.path.join(self.tmp, 'stdout+stderr'), 'w+')
        self.proc = subprocess.Popen(
            [AGENT, '--config-file', self.config], stdin=subprocess.DEVNULL,
            stdout=self.out, stderr=subprocess.STDOUT,
            start_new_session=True)

    def wait_ready(self, api: rpcapi.AgentAPI, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f'agent {self.host} exited with '
                                   f'{self.proc.returncode}:\n'
                                   f'{self.output()}')
            try:
                api.list({}, self.host)
                return
            except exception.PeerUnreachable:
                if time.monotonic() > deadline:
                    raise

    def log(self) -> str:
        try:
            with open(os.path.join(self.tmp, 'agent.log')) as f:
                return f.read()
        except OSError:
            return ''

    def output(self) -> str:
        self.out.flush()
        self.out.seek(0)
        return self.out.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.out.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


@testtools.skipUnless(os.path.exists(ftlab.RABBITMQ_SERVER),
                      'RabbitMQ is not installed')
class AgentOverRabbitMQTest(testtools.TestCase):

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.rabbit = ftlab.RabbitMQ()
        cls.rabbit.setUp()
        try:
            cls.transport = rpcapi.get_transport(CONF, cls.rabbit.url)
            cls.api = rpcapi.AgentAPI(cls.transport, timeout=2)
            cls.agent = Agent(f'hv-it{os.getpid()}', cls.rabbit.url)
            cls.agent.wait_ready(cls.api)
        except BaseException:
            cls.rabbit.cleanUp()
            raise

    @classmethod
    def tearDownClass(cls) -> None:
        cls.agent.close()
        cls.transport.cleanup()
        cls.rabbit.cleanUp()
        super().tearDownClass()

    def mftvm(self, *args: str, url: Optional[str] = None,
              **kwargs: Any) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        env.pop('MFTVM_TRANSPORT_URL', None)
        if url is not None:
            env['MFTVM_TRANSPORT_URL'] = url
        return subprocess.run([MFTVM, *args], capture_output=True,
                              text=True, env=env, timeout=60, **kwargs)

    def assertAlive(self) -> None:
        self.assertIsNone(self.agent.proc.poll(), self.agent.output())
        self.assertEqual([], self.api.list({}, self.agent.host))

    def test_fresh_agent_lists_nothing(self):
        self.assertEqual([], self.api.list({}, self.agent.host))
        result = self.mftvm('--transport-url', self.rabbit.url, 'list',
                            '--host', self.agent.host)
        self.assertEqual((0, 'no instances\n', ''),
                         (result.returncode, result.stdout, result.stderr))
        self.assertRaises(exception.InstanceNotFound, self.api.status, {},
                          self.agent.host, 'vm0')

    def test_malformed_payloads_are_refused_and_the_agent_lives(self):
        api, host = self.api, self.agent.host
        spec = {'name': 'vm0', 'memory_mib': 128}
        cases = [
            ('instance', api.status, ({}, host, 'bad name')),
            ('instance', api.failover, ({}, host, 7)),
            ('instance', api.stop_instance, ({}, host, 'x' * 64)),
            ('spec', api.protect, ({}, host, 'vm0', ['not', 'a dict'], {})),
            ('spec', api.prepare_secondary,
             ({}, host, 'vm0', 'spec', {}, 'hv1')),
            ('options.bogus', api.protect, ({}, host, 'vm0', spec,
                                            {'bogus': 1})),
            ('options', api.protect, ({}, host, 'vm0', spec, 'fast')),
            ('options.epoch_ms', api.protect, ({}, host, 'vm0', spec,
                                               {'epoch_ms': '200'})),
            ('options.epoch_ms', api.protect, ({}, host, 'vm0', spec,
                                               {'epoch_ms': 10001})),
            ('options.disk_sync', api.protect,
             ({}, host, 'vm0', spec, {'disk_sync': 'rsync'})),
            ('options.tracker', api.protect,
             ({}, host, 'vm0', spec, {'tracker': 'magic'})),
            ('options.start_delay', api.protect,
             ({}, host, 'vm0', spec, {'start_delay': -1})),
            ('primary_host', api.prepare_secondary,
             ({}, host, 'vm0', spec, {}, 'bad host')),
            ('secondary_host', api.protect,
             ({}, host, 'vm0', spec, {}, ['hv2'])),
        ]
        for field, call, args in cases:
            exc = self.assertRaises(exception.InvalidRequest, call, *args)
            self.assertEqual(field, exc.kwargs['field'], str(exc))
            self.assertNotIn('\n', str(exc))
        # what AgentAPI cannot send: missing and unknown arguments
        client = oslo_messaging.get_rpc_client(
            self.transport, oslo_messaging.Target(
                exchange=rpcapi.EXCHANGE, topic=rpcapi.TOPIC, server=host,
                version='1.0'), timeout=5)
        exc = self.assertRaises(exception.InvalidRequest, client.call, {},
                                'protect', instance='vm0', options={})
        self.assertEqual('spec', exc.kwargs['field'])
        exc = self.assertRaises(exception.InvalidRequest, client.call, {},
                                'status', instance='vm0', verbose=True)
        self.assertEqual('verbose', exc.kwargs['field'])
        self.assertAlive()
        self.assertNotIn('Traceback', self.agent.log())
        # nothing was created for the refused requests
        self.assertEqual([], os.listdir(os.path.join(
            self.agent.tmp, 'state', 'instances')))

    def test_unknown_version_and_method_and_the_agent_lives(self):
        host = self.agent.host
        target = oslo_messaging.Target(exchange=rpcapi.EXCHANGE,
                                       topic=rpcapi.TOPIC, server=host,
                                       version='2.0')
        client = oslo_messaging.get_rpc_client(self.transport, target,
                                               timeout=5)
        exc = self.assertRaises(oslo_messaging.UnsupportedVersion,
                                client.call, {}, 'list')
        self.assertIn('Endpoint does not support RPC version 2.0',
                      str(exc))
        self.assertRaises(oslo_messaging.NoSuchMethod,
                          client.prepare(version='1.0').call, {}, 'reboot')
        self.assertRaises(oslo_messaging.NoSuchMethod,
                          client.prepare(version='1.0').call, {},
                          '_instance', name='vm0')
        self.assertAlive()

    def test_cli_remote_errors_are_one_line(self):
        url, host = self.rabbit.url, self.agent.host
        for args, expected in (
                (('status', 'bad name', '--host', host),
                 'invalid request: instance must match'),
                (('--host', host, 'failover', 'vm0'),
                 'instance vm0 is not known to this agent'),
                (('list', '--host', 'hv-nobody', '--timeout', '1'),
                 'the agent on host hv-nobody is unreachable')):
            result = self.mftvm(*args, url=url)
            self.assertEqual(1, result.returncode, result)
            self.assertEqual(1, len(result.stderr.splitlines()),
                             result.stderr)
            self.assertIn(expected, result.stderr)
            self.assertNotIn(self.rabbit.password, result.stderr)
        bad = url.replace(self.rabbit.password, 'wrong-pw-123')
        result = self.mftvm('--transport-url', bad, 'list', '--host', host)
        self.assertEqual(1, result.returncode)
        self.assertEqual(1, len(result.stderr.splitlines()), result.stderr)
        self.assertNotIn('wrong-pw-123', result.stderr)

    def test_bad_transport_urls_end_the_agent_with_one_line(self):
        port = ftlab._free_ports(1)[0]
        password = 'Sup3rS3cret'
        url = self.rabbit.url
        for bad, expected in (
                (None, 'no transport_url'),
                (f'rabbit://u:{password}@127.0.0.1:notaport/',
                 'malformed URL'),
                (f'rabbit://u:{password}@[::1/', 'malformed URL'),
                (f'nosuch://u:{password}@127.0.0.1/', 'no messaging driver'),
                (f'rabbit://u:{password}@127.0.0.1:{port}/',
                 'cannot reach or log in to the broker'),
                (url.replace(self.rabbit.password, password),
                 'cannot reach or log in to the broker')):
            agent = Agent('hv-bad', bad)
            try:
                started = time.monotonic()
                rc = agent.proc.wait(timeout=30)
                took = time.monotonic() - started
                out = agent.output()
                self.assertEqual(1, rc, out)
                self.assertLess(took, 15)
                self.assertEqual(1, len(out.splitlines()), out)
                self.assertTrue(out.startswith('mftvm-agent: error: '), out)
                self.assertIn(expected, out)
                self.assertNotIn(password, out + agent.log())
                self.assertNotIn('Traceback', out + agent.log())
            finally:
                agent.close()

    def test_sigterm_stops_the_agent_cleanly(self):
        agent = Agent(f'hv-term{os.getpid()}', self.rabbit.url)
        self.addCleanup(agent.close)
        agent.wait_ready(self.api)
        self.assertEqual([], self.api.list({}, agent.host))
        started = time.monotonic()
        agent.proc.send_signal(signal.SIGTERM)
        rc = agent.proc.wait(timeout=15)
        took = time.monotonic() - started
        self.assertEqual(0, rc, agent.output())
        self.assertLess(took, 5)
        self.assertEqual('', agent.output())
        log = agent.log()
        self.assertIn('mftvm-agent stopped', log)
        self.assertNotIn('Traceback', log)
        self.assertNotIn(self.rabbit.password, log)
        self.assertIn('***', log)        # the broker, masked, at start
        self.assertRaises(exception.PeerUnreachable, rpcapi.AgentAPI(
            self.transport, timeout=1).list, {}, agent.host)
        # the agent serving the class was not disturbed
        self.assertAlive()
        self.assertNotIn(self.rabbit.password, self.agent.log())
