"""Agents on three "hosts" (network namespaces) protect a real guest.

Each host runs a real ``mftvm-agent``; they talk over a real RabbitMQ and
fence through a real Redis, both in the lab's core namespace. The guest
runs in real QEMU (TCG). A host dies as a whole: every process in its
namespace — agent, instance process, QEMU — gets SIGKILL at once.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import sys
import tempfile
import time

import testtools

from mftvm_openstack.agent import rpcapi
from mftvm_openstack.images import workload
from mftvm_openstack.standalone import demo, manager
from tests.functional import base
from tests.integration import lab as ftlab

HOSTS = ('h1', 'h2', 'h3')
AGENT = os.path.join(os.path.dirname(sys.executable), 'mftvm-agent')

AGENT_CONF = """\
[DEFAULT]
host = {host}
state_path = {state}
transport_url = {rabbit}
rpc_response_timeout = 20
debug = {debug}

[agent]
my_ip = {ip}
peers = {peers}

[fencing]
backend_url = {redis}

[ft]
epoch_ms = 200
"""


class AgentLab(testtools.TestCase):
    """Three hosts with an agent each, a broker and a backend."""

    def setUp(self) -> None:
        super().setUp()
        self.image = base.guest_image()
        self.lab = self.useFixture(ftlab.Lab(HOSTS))
        self.rabbit = self.useFixture(ftlab.RabbitMQ(self.lab))
        self.redis = self.useFixture(ftlab.Redis(self.lab))
        self.tmp = tempfile.mkdtemp(prefix='mftvm-agents-', dir='/var/tmp')
        if not os.environ.get('MFTVM_KEEP_TEST_DIRS'):
            self.addCleanup(shutil.rmtree, self.tmp, True)
        self.name = f'ft{os.getpid()}'
        self.addCleanup(self._remove_ram_files)
        self.agents = {h: self.start_agent(h) for h in HOSTS}
        self.api = rpcapi.AgentAPI(
            rpcapi.get_transport(url=self.rabbit.url), timeout=10)
        for host in HOSTS:
            base.wait_for(lambda h=host: self._answers(h), 60, 0.5,
                          f'agent {host} to answer')

    def _remove_ram_files(self) -> None:
        for path in glob.glob(f'/dev/shm/mftvm-{self.name}-*.ram'):
            os.unlink(path)

    def start_agent(self, host: str) -> object:
        state = os.path.join(self.tmp, host)
        os.makedirs(state, exist_ok=True)
        conf = os.path.join(self.tmp, f'{host}.conf')
        with open(conf, 'w') as f:
            f.write(AGENT_CONF.format(
                host=host, state=state, rabbit=self.rabbit.url,
                redis=self.redis.url, ip=self.lab.ip(host),
                peers=','.join(HOSTS),
                debug='true' if os.environ.get('MFTVM_DEBUG') else 'false'))
        log = open(os.path.join(self.tmp, f'{host}-agent.log'), 'ab')
        self.addCleanup(log.close)
        return self.lab.popen(host, [AGENT, '--config-file', conf],
                              stdout=log, stderr=log)

    def _answers(self, host: str) -> bool:
        try:
            self.api.list({}, host)
            return True
        except Exception:
            return False

    def instance_dir(self, host: str) -> str:
        return os.path.join(self.tmp, host, 'instances', self.name)

    def status(self, host: str) -> dict:
        try:
            return self.api.status({}, host, self.name)
        except Exception:
            return {}

    def protect(self, port: int) -> None:
        disk = os.path.join(self.tmp, 'disk.raw')
        with open(disk, 'wb') as f:
            f.truncate(64 << 20)
        spec = manager.make_spec(
            self.name, self.image.kernel, self.image.initrd, disk,
            append='console=ttyS0 quiet mftvm.run=writer,counter '
                   'mftvm.writer_interval_ms=50',
            memory_mib=128,
            nic=f'user,hostfwd=tcp:0.0.0.0:{port}-:7000')
        self.api.protect({}, 'h1', self.name, spec.to_json(),
                         {'epoch_ms': 200}, secondary_host='h2')

    def qemu_pids(self) -> list[int]:
        return base.qemu_pids_for(self.name)


class HostLossTest(AgentLab):

    def talk(self, host: str, port: int, last: int, seconds: float) -> int:
        """Count for a while against ``host``; every answer is last + 1."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            got = workload.counter_request(self.lab.ip(host), port)
            if got is not None:
                self.assertEqual(last + 1, got)
                last = got
        return last

    def fail_over(self, dead: str, survivor: str, port: int,
                  last: int) -> tuple[int, float]:
        """Kill host ``dead`` whole; the guest answers on ``survivor``
        with exactly last + 1. Returns (that answer, seconds it took)."""
        time.sleep(random.uniform(0, 0.2))
        self.lab.kill_all(dead)
        killed = time.monotonic()
        got = base.wait_for(
            lambda: workload.counter_request(self.lab.ip(survivor), port,
                                             2),
            60, 0, f'an answer from the guest on {survivor}')
        took = time.monotonic() - killed
        # Output commit across the failover: nothing seen was taken back.
        self.assertEqual(last + 1, got)
        return got, took

    def test_host_loss_fails_over_and_reprotects_twice(self) -> None:
        port = demo.free_port()
        self.protect(port)
        st = self.status('h1')
        self.assertEqual(('protected', 'h2'), (st['state'], st['peer']))
        serial = os.path.join(self.instance_dir('h1'), 'primary',
                              'serial.log')
        base.wait_for(lambda: 'COUNTER-READY' in workload.read_text(serial),
                      90, 0.2, 'the guest counter service')
        last = workload.counter_request(self.lab.ip('h1'), port, 10)
        self.assertIsNotNone(last)
        last = self.talk('h1', port, last, random.uniform(2, 4))
        self.assertEqual(1, len(self.qemu_pids()))

        # h1 dies: the guest goes on at h2, which re-protects it on h3.
        last, took1 = self.fail_over('h1', 'h2', port, last)
        self.assertEqual(1, len(self.qemu_pids()))
        st = base.wait_for(
            lambda: (s := self.status('h2')).get('state') == 'protected'
            and s.get('last_committed_epoch', 0) >= 1 and s, 120, 0.5,
            'the guest to be re-protected from h2')
        self.assertEqual('h3', st['peer'])
        restore1 = self._restore_ms('h2')
        last = self.talk('h2', port, last, random.uniform(1, 3))

        # Then h2 dies too: the guest goes on at h3.
        last, took2 = self.fail_over('h2', 'h3', port, last)
        self.assertEqual(1, len(self.qemu_pids()))
        st = base.wait_for(lambda: (s := self.status('h3')).get('state')
                           in ('active', 'syncing', 'protected') and s,
                           30, 0.5, 'h3 to run the guest')
        self.assertEqual('primary', st['role'])
        last = self.talk('h3', port, last, 1)
        print(f'kill -> next answer: {took1 * 1000:.0f} ms (h1 -> h2, '
              f'restore {restore1} ms), {took2 * 1000:.0f} ms (h2 -> h3)')

    def _restore_ms(self, host: str) -> object:
        return self.status(host).get('failover_ms')
