"""An attacker on the replication network against a real agent pair.

Agents on h1 and h2 protect a real guest from h1 onto h2; a fourth
namespace, ``evil``, on the same lab network, has no credentials. From
there it tries the secondary's data port (a HELLO and a PRIMARY_LOST,
over plain TCP, with a stranger's certificate, with another pair's) and
the replica's NBD export (qemu-io, read and write, without TLS). Nothing
gets through: the pair stays protected, no failover happens, and a real
host loss still fails over.
"""

from __future__ import annotations

import json
import os
import re
import sys

from mftvm_openstack.local import demo
from tests.integration.test_agent_failover import AgentLab

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


class AttackerTest(AgentLab):

    # two agents, each other's only peers, and the attacker's namespace
    agent_hosts = ('h1', 'h2')
    other_hosts = ('evil',)

    def from_evil(self, argv: list[str]):
        return self.lab.run('evil', argv, capture_output=True, text=True,
                            check=False, cwd=ROOT, timeout=120)

    def nbd_port(self, data_port: int) -> int:
        out = self.lab.run('h2', ['ss', '-Hltnp'], capture_output=True,
                           text=True).stdout
        for line in out.splitlines():
            m = re.search(rf'{re.escape(self.lab.ip("h2"))}:(\d+) .*'
                          r'qemu-storage', line)
            if m and int(m.group(1)) != data_port:
                return int(m.group(1))
        self.fail(f'no NBD export on h2:\n{out}')

    def test_attacker_reaches_neither_data_port_nor_replica(self) -> None:
        port = demo.free_port()
        last = self.protect(port)
        sec = self.status('h2')
        self.assertEqual('standby', sec['state'])
        host, data_port = sec['listen'].removeprefix('tcp:').rsplit(':', 1)
        self.assertEqual(self.lab.ip('h2'), host)
        # the data port: every attempt closed before a single frame
        run = self.from_evil([sys.executable, '-m', 'tests.intruder', host,
                              data_port, str(64 << 20)])
        self.assertEqual(0, run.returncode, run.stderr)
        got = json.loads(run.stdout)
        self.assertEqual(3, len(got))
        self.assertEqual({0}, set(got.values()), got)
        # the replica: no read, no write without the primary's cert
        nbd = f'nbd://{host}:{self.nbd_port(int(data_port))}/disk0'
        for command in ('read 0 4k', 'write -P 0x66 0 4k'):
            run = self.from_evil(['qemu-io', '-f', 'raw', '-c', command,
                                  nbd])
            self.assertNotEqual(0, run.returncode, command)
            self.assertNotIn('bytes', run.stdout, command)
        # no failover, the pair protected as before
        last = self.talk('h1', port, last, 2)
        st = self.status('h1')
        self.assertEqual(('protected', 'h2'), (st['state'], st['peer']))
        self.assertEqual('standby', self.status('h2')['state'])
        self.assertEqual(1, len(self.qemu_pids()))
        log = os.path.join(self.instance_dir('h2'), 'secondary-host.log')
        with open(log) as f:
            refused = [ln for ln in f if 'refused a data connection from '
                       f'{self.lab.ip("evil")}' in ln]
        self.assertEqual(3, len(refused))
        # and a real host loss still fails over
        self.fail_over('h1', 'h2', port, last)
        self.assertEqual(1, len(self.qemu_pids()))
