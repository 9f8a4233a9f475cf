"""An FT server through the ``openstack`` CLI, and the loss of its host.

Pending: not collected yet. Its last run in the lab (stop 19) got the
server protected, its secondary on another host and the guest's counter
answering from the third host; after the primary host's power-off no
answer came within 300 s, and why is not known yet (the takeover, or the
port's binding on the new host). Once it passes, mix it into
:class:`tests.e2e.test_cloud.CloudTest` again, on the tier's one lab
(:class:`tests.e2e.lab.LabTestCase`'s helpers: ``cloud``,
``cloud_json``, ``mftvm``, ``add_hosts``, ``upload_guest``, ``flavor``,
``ns``)::

    class CloudTest(FTServerTests, lab.LabTestCase): ...

Run it alone meanwhile with a test class of one's own, e.g.
``class T(FTServerTests, lab.LabTestCase): pass`` in a scratch module.

It powers a host off, so it runs on hosts of its own (:data:`HOSTS`,
not the ``h1``-``h3`` other modules share), the others' nova-compute
disabled meanwhile (``only_hosts``).

A host is *powered off* as a machine dies: its links cut first, then
every process of its namespaces SIGKILLed at once (QEMU, libvirtd,
nova-compute, mftvm-agent, OVS), nothing told beforehand
(:func:`power_off`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time

#: hosts of this test alone: it powers one of them off
HOSTS = ('f1', 'f2', 'f3')
#: run in a host's network namespace: asks the guest's counter service
#: at 10.0.2.15:7000 without end (a new connection each time), one JSON
#: line per answer: [CLOCK_MONOTONIC, value]. Monotonic time is the
#: machine's, the same in every namespace: the test compares it with
#: the moment it killed a host.
COUNTER_LOGGER = """
import json, sys, time
from mftvm_openstack.images.workload import counter_request
while True:
    value = counter_request('10.0.2.15', 7000, 1.0)
    if value is not None:
        print(json.dumps([time.monotonic(), value]), flush=True)
        time.sleep(0.05)
"""
#: an FT flavor as an admin makes it: FT on, and only FT-capable hosts
FT_FLAVOR_SPECS = ('ft:enabled=true', 'trait:CUSTOM_MFTVM_FT=required')


def ns_pids(ns: str) -> list[int]:
    out = subprocess.run(['ip', 'netns', 'pids', ns], capture_output=True,
                         text=True).stdout
    return [int(p) for p in out.split()]


def power_off(ns: str) -> float:
    """Kill host namespace ``ns`` as a power cut does; returns the
    CLOCK_MONOTONIC moment its processes were killed. Its links go down
    first (no packet leaves after), then every process in it is
    SIGKILLed, again until none is left (a dying libvirtd's children)."""
    for dev in ('eth0', 'eth1'):
        subprocess.run(['ip', '-n', ns, 'link', 'set', dev, 'down'],
                       check=True)
    killed_at = time.monotonic()
    for _ in range(100):
        pids = ns_pids(ns)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    else:
        raise AssertionError(f'processes of {ns} outlive SIGKILL: '
                             f'{ns_pids(ns)}')
    return killed_at


class CounterLog:
    """:data:`COUNTER_LOGGER` running in namespace ``ns``."""

    def __init__(self, python: str, ns: str, cwd: str) -> None:
        self.out = tempfile.NamedTemporaryFile('w+', dir=cwd,
                                               suffix='.counter')
        self.proc = subprocess.Popen(
            ['ip', 'netns', 'exec', ns, python, '-c', COUNTER_LOGGER],
            stdout=self.out, stderr=subprocess.DEVNULL, cwd=cwd,
            start_new_session=True)

    def answers(self) -> list[tuple[float, int]]:
        with open(self.out.name) as f:
            lines = f.read().splitlines()
        return [tuple(json.loads(line)) for line in lines
                if line.endswith(']')]

    def wait(self, predicate, timeout: float, what: str
             ) -> list[tuple[float, int]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.answers()
            if predicate(got):
                return got
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f'{what}: not within {timeout}s '
                                     f'(last answers {got[-3:]})')
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.out.close()


class FTServerTests:
    """Mixed into CloudTest (see the module docstring)."""

    # (CloudTest's, for the type checker's sake)
    tmp: str
    lab_dir: str
    hosts: list[str]

    def ft_server(self, name: str) -> tuple[dict, str]:
        """An FT server booted through the CLI on the lab's FT hosts,
        reachable at 10.0.2.15:7000 (counter service) from a probe port;
        returns (server, probe port id)."""
        self.add_hosts(*HOSTS)
        self.only_hosts(*HOSTS)
        _, _, image, _ = self.upload_guest(
            name, 'os_command_line=console=ttyS0 mftvm.run=counter '
            'virtio_net.csum=0')
        network = self.cloud_json('network', 'create', f'{name}-net')
        self.addCleanup(self.cloud, 'network', 'delete', network['id'],
                        check=False)
        self.cloud('subnet', 'create', '--network', network['id'],
                   '--subnet-range', '10.0.2.0/24', '--gateway',
                   '10.0.2.2', f'{name}-subnet')
        group = self.cloud_json('security', 'group', 'create', name)
        self.addCleanup(self.cloud, 'security', 'group', 'delete',
                        group['id'], check=False)
        self.cloud('security', 'group', 'rule', 'create', '--protocol',
                   'tcp', '--dst-port', '7000', group['id'])
        port = self.cloud_json(
            'port', 'create', '--network', network['id'], '--fixed-ip',
            f'subnet={name}-subnet,ip-address=10.0.2.15',
            '--security-group', group['id'], f'{name}-guest')
        self.addCleanup(self.cloud, 'port', 'delete', port['id'],
                        check=False)
        probe = self.cloud_json('port', 'create', '--network',
                                network['id'], f'{name}-probe')
        self.addCleanup(self.cloud, 'port', 'delete', probe['id'],
                        check=False)
        flavor = f'm1.{name}'
        self.assertEqual(dict(p.split('=') for p in FT_FLAVOR_SPECS),
                         self.flavor(flavor, *FT_FLAVOR_SPECS))
        server = self.cloud_json(
            'server', 'create', '--image', image['id'], '--flavor', flavor,
            '--nic', f'port-id={port["id"]}', '--property', 'ft=true',
            '--wait', name)
        self.addCleanup(self.cloud, 'server', 'delete', '--wait',
                        server['id'], check=False)
        return server, probe['id']

    def wait_ft_status(self, server_id: str, want: str = 'protected',
                       timeout: float = 600, host: str | None = None
                       ) -> dict:
        """``server show`` once ``ft_status`` is ``want`` (and the
        server's host ``host``, if given); fails with what it last
        showed otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            shown = self.cloud_json('server', 'show', server_id)
            status = shown['properties'].get('ft_status')
            if status == want and host in (
                    None, shown['OS-EXT-SRV-ATTR:host']):
                return shown
            if time.monotonic() > deadline:
                self.fail(f'ft_status {status!r}, not {want!r} within '
                          f'{timeout}s: {json.dumps(shown)[:3000]}')
            time.sleep(3)

    def protected_pair(self, server_id: str, host: str | None = None
                       ) -> tuple[dict, str, str]:
        """(server show, primary host, secondary host) once protected,
        as Nova and the agents see it."""
        shown = self.wait_ft_status(server_id, host=host)
        self.assertEqual('ACTIVE', shown['status'])
        primary = shown['OS-EXT-SRV-ATTR:host']
        deadline = time.monotonic() + 120
        while True:
            status = json.loads(self.mftvm('--host', primary, 'status',
                                           server_id, '--json').stdout)
            if status['state'] == 'protected' or \
                    time.monotonic() > deadline:
                break
            time.sleep(2)
        self.assertEqual(('primary', 'protected'),
                         (status['role'], status['state']), status)
        secondary = status['peer']
        self.assertIn(secondary, set(HOSTS) - {primary})
        listed = {i['instance']: i for i in json.loads(self.mftvm(
            'list', '--host', secondary, '--json').stdout)}
        self.assertEqual('secondary', listed[server_id]['role'])
        return shown, primary, secondary

    def counter_from(self, host: str, probe_id: str) -> CounterLog:
        from tests.e2e.test_cloud import CLOUDLAB, PYTHON, _checked
        _checked([PYTHON, CLOUDLAB, 'probe', host, probe_id, '--dir',
                  self.lab_dir])
        log = CounterLog(PYTHON, self.ns(host), self.tmp)
        self.addCleanup(log.stop)
        return log

    def test_ft_server_survives_the_power_off_of_its_host(self):
        server, probe = self.ft_server('e2e-ft')
        sid = server['id']
        shown, primary, secondary = self.protected_pair(sid)
        (third,) = set(HOSTS) - {primary, secondary}
        # The guest's job answers, from a host that is neither side's.
        counter = self.counter_from(third, probe)
        before = counter.wait(lambda a: len(a) >= 5, 300,
                              'answers from the guest')
        killed_at = power_off(self.ns(primary))
        after = counter.wait(
            lambda a: any(t > killed_at for t, _ in a), 300,
            'an answer after the primary host was powered off')
        values = [v for _, v in after]
        # No answer repeated or taken back, no reboot (a counter that
        # restarted would answer 1 again).
        self.assertEqual(list(range(values[0], values[0] + len(values))),
                         values)
        self.assertGreater(len(values), len(before))
        recovered = next(t for t, _ in after if t > killed_at) - killed_at
        # Nova shows the new host, and protection onto the third host.
        shown, new_primary, new_secondary = self.protected_pair(
            sid, host=secondary)
        shown_in = time.monotonic() - killed_at
        self.assertEqual((secondary, third), (new_primary, new_secondary))
        print(f'host power-off: kill -> next answer {recovered:.1f} s, '
              f'kill -> protected again on {new_primary} (Nova shows it) '
              f'{shown_in:.0f} s', file=sys.stderr)
        self.addDetail_text('recovery', f'{recovered:.3f}')

        # Nova's operations on the failed-over server, on its new host.
        last = counter.answers()[-1][1]
        self.cloud('server', 'stop', sid)
        self.wait_server(sid, 'SHUTOFF')
        self.cloud('server', 'start', sid)
        self.wait_server(sid, 'ACTIVE')
        self.protected_pair(sid, host=new_primary)
        counter.wait(lambda a: a[-1][1] < last, 300,
                     'the restarted guest answering anew')
        self.cloud('server', 'reboot', '--hard', '--wait', sid)
        self.protected_pair(sid, host=new_primary)
        since = len(counter.answers())
        counter.wait(lambda a: len(a) > since + 2, 300,
                     'the rebooted guest answering')

    def wait_server(self, server_id: str, status: str,
                    timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.cloud_json('server', 'show', server_id)
            if shown['status'] == status:
                return shown
            if shown['status'] == 'ERROR' or time.monotonic() > deadline:
                self.fail(f'server {server_id} is {shown["status"]}, not '
                          f'{status}: {json.dumps(shown)[:3000]}')
            time.sleep(2)

    def addDetail_text(self, name: str, text: str) -> None:  # noqa: N802
        from testtools import content
        self.addDetail(name, content.text_content(text))
