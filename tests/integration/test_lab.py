"""The lab fixtures themselves: namespaces, partitions, broker, backend.

Run: ``.venv/bin/stestr run tests.integration.test_lab`` (as root).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time

import fixtures
import testtools

from tests.integration import lab as ftlab

PY = sys.executable
PORT = 7000      # namespaces have their own port space: no clashes

# Serves "hello from <netns inode>" to every connection, on all addresses.
ECHO_SERVER = '''
import os, socket, sys
me = str(os.stat('/proc/self/ns/net').st_ino).encode()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(('0.0.0.0', int(sys.argv[1])))
s.listen()
while True:
    c, _ = s.accept()
    with c:
        c.sendall(b'hello from ' + me)
'''

# Connects to argv[1]:argv[2] with a timeout of argv[3] s; prints what
# the server said, or "error: ..." and exits 1.
CONNECT = '''
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])),
                                  timeout=float(sys.argv[3])) as c:
        print(c.recv(100).decode())
except OSError as e:
    print('error:', type(e).__name__, e)
    sys.exit(1)
'''

RPC_SERVER = '''
import os, sys
from oslo_config import cfg
import oslo_messaging as om
url, topic = sys.argv[1:3]

class Endpoint:
    def echo(self, ctxt, value):
        return {'value': value, 'pid': os.getpid()}

transport = om.get_rpc_transport(cfg.CONF, url=url)
server = om.get_rpc_server(transport, om.Target(topic=topic, server='s1'),
                           [Endpoint()])
server.start()
print('ready', flush=True)
sys.stdin.read()            # until the test closes our stdin
server.stop()
server.wait()
transport.cleanup()
'''

RPC_CLIENT = '''
import json, sys
from oslo_config import cfg
import oslo_messaging as om
url, topic = sys.argv[1:3]
transport = om.get_rpc_transport(cfg.CONF, url=url)
client = om.get_rpc_client(transport, om.Target(topic=topic), timeout=30)
print(json.dumps(client.call({}, 'echo', value='ping')))
transport.cleanup()
'''

REDIS_GET = '''
import sys, redis
r = redis.Redis.from_url(sys.argv[1], socket_connect_timeout=1,
                         socket_timeout=2)
try:
    print(r.ping(), r.get(sys.argv[2]).decode())
except redis.RedisError as e:
    print('error:', type(e).__name__, e)
    sys.exit(1)
'''


def _netns_list() -> str:
    return subprocess.run(['ip', 'netns', 'list'], capture_output=True,
                          text=True, check=True).stdout


def _root_addrs() -> str:
    return subprocess.run(['ip', '-o', '-4', 'addr', 'show'],
                          capture_output=True, text=True,
                          check=True).stdout


def _can_run_lab() -> bool:
    return os.geteuid() == 0 and shutil.which('ip') is not None


def _netns_inode(lab: ftlab.Lab, host: str) -> str:
    return str(os.stat(f'/run/netns/{lab.ns(host)}').st_ino)


@testtools.skipUnless(_can_run_lab(), 'needs root and iproute2')
class LabTest(testtools.TestCase):
    """Namespaces, addressing, partitions, host death, cleanup."""

    def setUp(self) -> None:
        super().setUp()
        self.useFixture(fixtures.Timeout(60, gentle=True))
        self.lab = self.useFixture(ftlab.Lab())

    def _serve(self, host: str) -> subprocess.Popen:
        server = self.lab.popen(host, [PY, '-c', ECHO_SERVER, str(PORT)])
        self.addCleanup(server.wait)
        self.addCleanup(server.kill)
        ftlab.wait_for(lambda: ftlab.tcp_open(self.lab.ip(host), PORT),
                       10, what=f'echo server in {host}')
        return server

    def _connect(self, host: str, ip: str,
                 timeout: float = 2.0) -> subprocess.CompletedProcess:
        return self.lab.run(host, [PY, '-c', CONNECT, ip, str(PORT),
                                   str(timeout)],
                            check=False, capture_output=True, text=True,
                            timeout=30)

    def test_addresses_and_names(self) -> None:
        lab = self.lab
        ips = [lab.ip(h) for h in ('h1', 'h2', 'h3')] + [lab.core_ip,
                                                          lab.root_ip]
        self.assertEqual(5, len(set(ips)))
        net = lab.subnet.rsplit('.', 1)[0] + '.'
        for ip in ips:
            self.assertTrue(ip.startswith(net), ip)
        self.assertEqual(lab.core_ip, lab.ip('core'))
        listed = _netns_list()
        for host in ('h1', 'h2', 'h3', 'core'):
            self.assertIn(lab.ns(host), listed)
        self.assertIn(f' {lab.root_ip}/24 ', _root_addrs())
        self.assertRaises(KeyError, lab.ip, 'h9')

    def test_tcp_between_namespaces_and_from_root(self) -> None:
        server = self._serve('h1')
        self.assertIn(server.pid, self.lab.pids('h1'))
        self.assertNotIn(server.pid, self.lab.pids('h2'))
        hello = f'hello from {_netns_inode(self.lab, "h1")}'
        # From the root namespace (the test process) ...
        with socket.create_connection((self.lab.ip('h1'), PORT), 2) as c:
            self.assertEqual(hello, c.recv(100).decode())
        # ... and from h2 over the bridge.
        result = self._connect('h2', self.lab.ip('h1'))
        self.assertEqual(0, result.returncode, result.stdout)
        self.assertEqual(hello, result.stdout.strip())
        # h2's loopback is its own: nothing listens there.
        result = self._connect('h2', '127.0.0.1')
        self.assertEqual(1, result.returncode, result.stdout)
        self.assertIn('ConnectionRefused', result.stdout)

    def test_link_down_partitions_and_link_up_heals(self) -> None:
        self._serve('h1')
        self.assertEqual(0, self._connect('h2', self.lab.ip('h1'))
                         .returncode)

        self.lab.link_down('h1')
        start = time.monotonic()
        result = self._connect('h2', self.lab.ip('h1'), timeout=1.0)
        self.assertEqual(1, result.returncode, result.stdout)
        self.assertIn('error', result.stdout)
        self.assertLess(time.monotonic() - start, 10)
        self.assertFalse(ftlab.tcp_open(self.lab.ip('h1'), PORT, 1.0))
        # h1 is cut off too, also from the core namespace.
        result = self._connect('h1', self.lab.core_ip, timeout=1.0)
        self.assertEqual(1, result.returncode, result.stdout)
        self.assertIn('unreachable', result.stdout)

        self.lab.link_up('h1')
        ftlab.wait_for(
            lambda: self._connect('h2', self.lab.ip('h1')).returncode == 0,
            10, what='h1 reachable again from h2')
        self.assertTrue(ftlab.tcp_open(self.lab.ip('h1'), PORT, 2.0))

    def test_kill_all_kills_only_that_host(self) -> None:
        sleeper = self.lab.popen('h3', ['sleep', '1000'])
        forker = self.lab.popen('h3', ['sh', '-c',
                                       'sleep 1000 & sleep 1000'])
        bystander = self.lab.popen('h2', ['sleep', '1000'])
        self.addCleanup(bystander.wait)
        self.addCleanup(bystander.kill)
        ftlab.wait_for(lambda: len(self.lab.pids('h3')) >= 4, 10,
                       what='4 processes in h3')
        self.assertIn(sleeper.pid, self.lab.pids('h3'))

        self.lab.kill_all('h3')

        self.assertEqual([], self.lab.pids('h3'))
        self.assertEqual(-9, sleeper.wait(5))
        self.assertEqual(-9, forker.wait(5))
        self.assertIsNone(bystander.poll())
        self.assertEqual([bystander.pid], self.lab.pids('h2'))

    def test_second_lab_is_separate_and_cleaned_up(self) -> None:
        other = ftlab.Lab(hosts=('x',))
        other.setUp()
        try:
            self.assertNotEqual(self.lab.subnet, other.subnet)
            names = [other.ns('x'), other.ns('core')]
            self.assertNotIn(other.ns('x'), [self.lab.ns(h)
                                             for h in self.lab.hosts])
            for name in names:
                self.assertIn(name, _netns_list())
            other.popen('x', ['sleep', '1000'])
            self.assertEqual(1, len(other.pids('x')))
        finally:
            other.cleanUp()
        listed = _netns_list()
        for name in names:
            self.assertNotIn(name, listed)
        # The root-side veth goes with the core namespace (asynchronously).
        ftlab.wait_for(lambda: f' {other.root_ip}/' not in _root_addrs(),
                       10, what='root-side veth removed')

    def test_failed_setup_cleans_up(self) -> None:
        original = ftlab.Lab._add_host

        def failing(lab: ftlab.Lab, index: int, host: str) -> None:
            if index == 1:
                raise RuntimeError('injected failure')
            original(lab, index, host)

        self.useFixture(fixtures.MockPatchObject(ftlab.Lab, '_add_host',
                                                 failing))
        broken = ftlab.Lab(hosts=('a', 'b'))
        error = self.assertRaises(fixtures.MultipleExceptions, broken.setUp)
        self.assertIn('injected failure', str(error.args[0][1]))
        prefix = broken.ns('core')[:-len('core')]
        self.assertNotIn(prefix, _netns_list())
        ftlab.wait_for(lambda: f' {broken.root_ip}/' not in _root_addrs(),
                       10, what='root-side veth removed')

    def test_stale_lab_of_dead_process_is_reaped(self) -> None:
        gone = subprocess.Popen(['true'])
        gone.wait()               # its pid now names a dead owner
        stale = f'ftl0p{gone.pid}-core'
        # Under the labs' lock, so a concurrent Lab set-up can't reap it
        # before we've seen the orphan inside.
        with ftlab._subnet_lock():
            subprocess.run(['ip', 'netns', 'add', stale], check=True)
            self.addCleanup(subprocess.run, ['ip', 'netns', 'del', stale],
                            capture_output=True)
            orphan = subprocess.Popen(['ip', 'netns', 'exec', stale,
                                       'sleep', '1000'])
            self.addCleanup(orphan.wait)
            self.addCleanup(orphan.kill)
            ftlab.wait_for(
                lambda: orphan.pid in ftlab.Lab._ns_pids(stale), 5,
                what='orphan in the stale namespace')
        self.useFixture(ftlab.Lab(hosts=('x',)))
        self.assertNotIn(stale, _netns_list())
        self.assertEqual(-9, orphan.wait(5))


class _Services(fixtures.Fixture):
    """Lab (optional) + RabbitMQ + Redis, shared by a test class."""

    def __init__(self, with_lab: bool) -> None:
        super().__init__()
        self.with_lab = with_lab

    def _setUp(self) -> None:
        self.lab = self.useFixture(ftlab.Lab()) if self.with_lab else None
        self.rabbit = self.useFixture(ftlab.RabbitMQ(self.lab))
        self.redis = self.useFixture(ftlab.Redis(self.lab))


class _SharedServices(testtools.TestCase):
    with_lab = True
    services: _Services

    @classmethod
    def setUpClass(cls) -> None:
        super().setUpClass()
        cls.services = _Services(cls.with_lab)
        cls.services.setUp()    # cleans up after itself if this fails
        cls.addClassCleanup(cls.services.cleanUp)

    def setUp(self) -> None:
        super().setUp()
        self.useFixture(fixtures.Timeout(120, gentle=True))

    def _kombu_roundtrip(self) -> None:
        import kombu

        url = self.services.rabbit.url.replace('rabbit://', 'amqp://', 1)
        name = f'lab-test-{secrets.token_hex(4)}'
        with kombu.Connection(url, connect_timeout=5) as conn:
            queue = conn.SimpleQueue(name, serializer='json')
            try:
                queue.put({'n': 1})
                message = queue.get(timeout=5)
                message.ack()
                self.assertEqual({'n': 1}, message.payload)
            finally:
                queue.close()


@testtools.skipUnless(_can_run_lab(), 'needs root and iproute2')
class LabServicesTest(_SharedServices):
    """RabbitMQ and Redis in the core namespace, used from the hosts."""

    @property
    def lab(self) -> ftlab.Lab:
        assert self.services.lab is not None
        return self.services.lab

    def test_rpc_between_host_namespaces(self) -> None:
        lab, rabbit = self.lab, self.services.rabbit
        self.assertTrue(rabbit.url.startswith('rabbit://'))
        self.assertIn(f'@{lab.core_ip}:', rabbit.url)
        topic = f'lab-test-{secrets.token_hex(4)}'
        errors = self.useFixture(fixtures.TempDir()).join('server.err')
        with open(errors, 'w') as err:
            server = lab.popen('h1', [PY, '-c', RPC_SERVER, rabbit.url,
                                      topic],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=err, text=True)
        stdin, stdout = server.stdin, server.stdout
        assert stdin is not None and stdout is not None

        def stop_server() -> None:
            stdin.close()           # the server stops on EOF
            try:
                server.wait(30)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            stdout.close()

        self.addCleanup(stop_server)
        ready = stdout.readline().strip()
        with open(errors) as err:
            self.assertEqual('ready', ready, err.read()[-2000:])

        result = lab.run('h2', [PY, '-c', RPC_CLIENT, rabbit.url, topic],
                         capture_output=True, text=True, timeout=60,
                         check=False)
        self.assertEqual(0, result.returncode, result.stderr[-2000:])
        reply = json.loads(result.stdout.strip().splitlines()[-1])
        self.assertEqual('ping', reply['value'])
        self.assertEqual(server.pid, reply['pid'])
        self.assertIn(server.pid, lab.pids('h1'))
        self.assertIn(topic, rabbit.ctl('list_queues', 'name'))

    def test_rabbit_from_root_namespace(self) -> None:
        self._kombu_roundtrip()

    def test_redis_from_h3(self) -> None:
        import redis

        lab, url = self.lab, self.services.redis.url
        self.assertEqual(f'redis://{lab.core_ip}:6379', url)
        key, value = f'k-{secrets.token_hex(4)}', secrets.token_hex(8)
        client = redis.Redis.from_url(url)
        self.addCleanup(client.close)
        client.set(key, value)

        result = lab.run('h3', [PY, '-c', REDIS_GET, url, key],
                         capture_output=True, text=True, timeout=30,
                         check=False)
        self.assertEqual(0, result.returncode, result.stdout)
        self.assertEqual(f'True {value}', result.stdout.strip())

        lab.link_down('h3')
        self.addCleanup(lab.link_up, 'h3')
        result = lab.run('h3', [PY, '-c', REDIS_GET, url, key],
                         capture_output=True, text=True, timeout=30,
                         check=False)
        self.assertEqual(1, result.returncode, result.stdout)


@testtools.skipUnless(os.geteuid() == 0, 'needs root')
class LoopbackServicesTest(_SharedServices):
    """RabbitMQ and Redis without a lab: root namespace, 127.0.0.1."""

    with_lab = False

    def test_rabbit_on_loopback(self) -> None:
        rabbit = self.services.rabbit
        self.assertIn('@127.0.0.1:', rabbit.url)
        self.assertNotIn(':5672/', rabbit.url)    # a private port
        self._kombu_roundtrip()
        self.assertIn('ftlab', rabbit.ctl('list_users'))

    def test_redis_on_loopback(self) -> None:
        import redis

        url = self.services.redis.url
        self.assertTrue(url.startswith('redis://127.0.0.1:'))
        client = redis.Redis.from_url(url)
        self.addCleanup(client.close)
        self.assertTrue(client.ping())
