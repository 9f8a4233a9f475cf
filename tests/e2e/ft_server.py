"""An FT server through the ``openstack`` CLI, and the loss of its host.

Pending: not collected yet. Once it passes whole, mix it into
:class:`tests.e2e.test_cloud.CloudTest`, on the tier's one lab::

    class CloudTest(FTServerTests, lab.LabTestCase): ...

Run it alone meanwhile with a class of one's own, e.g. ``class
T(FTServerTests, lab.LabTestCase): pass`` in a scratch module. Its lab
runs of stop 20: the power-off part passed twice (kill -> the next
answer 15 s and 18 s, the last answer + 1; Nova showing the new host 28
and 27 s; protected again onto the third host 45 and 37 s, at a load
average of about 15), after two fixes it found (the secondary's taps
unplugged while it failed over; Nova's stop failing the guest over).
Nova's start on the new host then failed (the kernel image fetched
again from Glance and refused); fixed since (the settle step copies
kernel and ramdisk). On main after those fixes: the power-off part
passed twice more (next answer 7.1 s and 9.0 s, Nova 16 s and 13 s,
protected again 22 s and 21 s); the whole test, stop, start and hard
reboot included, passed once (322 s), after its wait for the restarted
counter was put right. It is collected once
``benchmarks/host_poweroff.py`` has shown 10 power-offs in a row.
Stop 21: the series stopped three times at the check that a skipped
value belongs to an unanswered request (the guest counted a request
seconds after the client gave up on it, after later requests had been
answered: the client closed a failed request normally and its kernel
went on sending it; it now resets it). After the test's stop, start and
hard reboot, the server is deleted and nothing of it may be left on the
hosts that run, nor in Placement, nor on its port (:meth:`leftovers`).

A user boots a server with ``--property ft=true`` (an FT flavor): it is
protected, its secondary on another host; the guest's counter answers a
client on the third host (through a probe port, :mod:`.counter_net`).
Its primary host is then powered off; the client's answers go on
increasing (nothing repeated or taken back, no reboot; a value is
skipped only for a request that got no answer, whose answer died with
the host: :meth:`CounterLog.check_nothing_taken_back`), Nova shows the
server on the old secondary's host, and it is protected again onto the
third. Then Nova's stop, start and hard reboot on its new host.

It powers a host off, so it runs on hosts of its own (:data:`HOSTS`,
not the ``h1``-``h3`` other modules share), the others' nova-compute
disabled meanwhile (``only_hosts``). A failure keeps the lab's logs and
state (:mod:`.diagnostics`).

A host is *powered off* as a machine dies: its links cut first, then
every process of its namespaces SIGKILLed at once (QEMU, libvirtd,
nova-compute, mftvm-agent, OVS), nothing told beforehand
(:func:`power_off`). ``benchmarks/host_poweroff.py`` does it N times in
a row and keeps the figures (:class:`Recovery`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from testtools import content

from tests.e2e import counter_net, diagnostics
from tests.e2e.lab import PYTHON

#: hosts of this test alone: it powers one of them off
HOSTS = ('f1', 'f2', 'f3')
#: run in a host's network namespace: asks the guest's counter service
#: at 10.0.2.15:7000 without end (a new connection each time), one JSON
#: line per request: [CLOCK_MONOTONIC, value], value null for a request
#: that got no answer (the guest may still have counted it: its answer
#: lost with a dead host). Monotonic time is the machine's, the same in
#: every namespace: the test compares it with the moment it killed a
#: host.
COUNTER_LOGGER = """
import json, sys, time
from mftvm_openstack.images.workload import counter_request
while True:
    value = counter_request('10.0.2.15', 7000, 1.0)
    print(json.dumps([time.monotonic(), value]), flush=True)
    if value is not None:
        time.sleep(0.05)
"""
#: an FT flavor as an admin makes it: FT on, and only FT-capable hosts
FT_FLAVOR_SPECS = ('ft:enabled=true', 'trait:CUSTOM_MFTVM_FT=required')
#: run in a host's namespaces with a server's uuid, its domain's name
#: and the host's instances_path: what of the server is left there, one
#: JSON list (the agent's instance directory, data it kept under ended/
#: (its logs and records may stay), a RAM file of the agent's or of
#: libvirt's, Nova's instance directory, a domain)
LEFTOVERS = """
import glob, json, os, subprocess, sys
uuid, domain, instances = sys.argv[1:]
state = '/run/mftvm'
left = [p for p in (f'{state}/instances/{uuid}', f'{instances}/{uuid}')
        if os.path.exists(p)]
for d, _, names in os.walk(f'{state}/ended/{uuid}'):
    left += [os.path.join(d, n) for n in names
             if not n.endswith(('.log', '.json'))]
left += glob.glob(f'/dev/shm/mftvm-{uuid}-*')
left += glob.glob(f'/run/libvirt-ram/**/*{domain}*', recursive=True)
domains = subprocess.run(['virsh', 'list', '--all', '--uuid'],
                         capture_output=True, text=True).stdout.split()
left += [f'domain {uuid}'] if uuid in domains else []
print(json.dumps(left))
"""


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


@dataclass(frozen=True)
class Recovery:
    """One power-off's figures, in seconds from the kill (CLOCK_MONOTONIC
    moment ``killed_at``): the guest's next answer, Nova's ``server
    show`` naming the new host, and ``ft_status`` protected there again
    (each CLI look takes 1-3 s: Nova's figures are that coarse)."""

    killed_at: float
    last_before: int
    first_after: int
    answered: float
    nova_moved: float
    reprotected: float

    def __str__(self) -> str:
        return (f'kill -> next answer {self.answered:.1f} s '
                f'({self.last_before} then {self.first_after}), -> Nova '
                f'shows the new host {self.nova_moved:.0f} s, -> protected '
                f'again {self.reprotected:.0f} s')


class CounterLog:
    """:data:`COUNTER_LOGGER` running in namespace ``ns``."""

    def __init__(self, python: str, ns: str, cwd: str) -> None:
        self.out = tempfile.NamedTemporaryFile('w+', dir=cwd,
                                               suffix='.counter')
        self.proc = subprocess.Popen(
            ['ip', 'netns', 'exec', ns, python, '-c', COUNTER_LOGGER],
            stdout=self.out, stderr=subprocess.DEVNULL, cwd=cwd,
            start_new_session=True)

    def requests(self) -> list[tuple[float, int | None]]:
        """Every request so far: (when, value or None: no answer)."""
        with open(self.out.name) as f:
            lines = f.read().splitlines()
        return [tuple(json.loads(line)) for line in lines
                if line.endswith(']')]

    def answers(self) -> list[tuple[float, int]]:
        return [(t, v) for t, v in self.requests() if v is not None]

    def check_nothing_taken_back(self) -> None:
        """Each answer is greater than the one before (nothing repeated
        or taken back, no reboot), and each value skipped between two
        answers belongs to a request in between that got no answer (the
        guest counted it; its answer went with a dead host). AssertionError
        otherwise."""
        last: int | None = None
        unanswered = 0
        requests = self.requests()
        for i, (t, value) in enumerate(requests):
            if value is None:
                unanswered += 1
                continue
            if last is not None and not \
                    last < value <= last + 1 + unanswered:
                raise AssertionError(
                    f'answer {value} at {t:.3f} after {last}, with '
                    f'{unanswered} request(s) unanswered in between '
                    f'(the requests before: {requests[max(0, i - 8):i]})')
            last, unanswered = value, 0

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
    """The power-off of an FT server's host (see the module docstring);
    mixed into a :class:`~tests.e2e.lab.LabTestCase`."""

    # (LabTestCase's, for the type checker's sake)
    tmp: str
    lab_dir: str
    lab: Any

    def ft_server(self, name: str, hosts: tuple[str, ...] = HOSTS
                  ) -> tuple[dict, counter_net.CounterNet]:
        """An FT server booted through the CLI on ``hosts`` only (each
        an FT host), its guest's counter at 10.0.2.15:7000 (see
        :mod:`~tests.e2e.counter_net`; a host reaches it through the
        probe port); returns (server, its network)."""
        self.add_hosts(*hosts)
        self.only_hosts(*hosts)
        net = counter_net.make(self, name)
        flavor = f'm1.{name}'
        self.assertEqual(dict(p.split('=') for p in FT_FLAVOR_SPECS),
                         self.flavor(flavor, *FT_FLAVOR_SPECS))
        server = self.server(
            name, '--image', net.image['id'], '--flavor', flavor,
            '--nic', f'port-id={net.port["id"]}', '--property', 'ft=true')
        return server, net

    def protected_pair(self, server_id: str, hosts: tuple[str, ...] = HOSTS,
                       host: str | None = None) -> tuple[dict, str, str]:
        """(server show, primary host, secondary host) once protected,
        as Nova and the agents see it, both sides among ``hosts``."""
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
        self.assertIn(secondary, set(hosts) - {primary})
        listed = {i['instance']: i for i in json.loads(self.mftvm(
            'list', '--host', secondary, '--json').stdout)}
        self.assertEqual('secondary', listed[server_id]['role'])
        return shown, primary, secondary

    def counter_from(self, host: str, probe_id: str) -> CounterLog:
        """The guest's counter asked without end from ``host`` (the
        probe port plugged there)."""
        self.probe(host, probe_id)
        log = CounterLog(PYTHON, self.ns(host), self.tmp)
        self.addCleanup(log.stop)
        return log

    def power_off_primary(self, server_id: str, primary: str,
                          secondary: str, counter: CounterLog,
                          timeout: float = 300) -> Recovery:
        """Power ``primary`` off (:func:`power_off`), then watch, through
        the counter's log and ``openstack server show``, until the guest
        answered again, Nova shows it on ``secondary``, and its
        ``ft_status`` is ``protected`` there again; fails with what was
        seen otherwise (after ``timeout`` seconds)."""
        last = counter.answers()[-1][1]
        killed_at = power_off(self.ns(primary))
        moved_at = protected_at = None
        shown: dict = {}
        while True:
            shown = self.openstack_json('server', 'show', server_id)
            now = time.monotonic()
            on_secondary = shown['OS-EXT-SRV-ATTR:host'] == secondary
            if on_secondary and moved_at is None:
                moved_at = now
            if on_secondary and protected_at is None and \
                    shown['properties'].get('ft_status') == 'protected':
                protected_at = now
            after = [(t, v) for t, v in counter.answers() if t > killed_at]
            if after and moved_at and protected_at:
                break
            if now - killed_at > timeout:
                self.fail(
                    f'after {primary} was powered off, within {timeout} s: '
                    f'answers since {after[:3]} (the last before: {last}); '
                    f'Nova on {secondary} '
                    f'{"at" if moved_at else "not"} '
                    f'{moved_at - killed_at if moved_at else ""}; '
                    f'server show: {json.dumps(shown)[:2500]}')
            time.sleep(1)
        return Recovery(killed_at=killed_at, last_before=last,
                        answered=after[0][0] - killed_at,
                        first_after=after[0][1],
                        nova_moved=moved_at - killed_at,
                        reprotected=protected_at - killed_at)

    def test_ft_server_survives_the_power_off_of_its_host(self):
        diagnostics.keep_on_failure(self)
        server, net = self.ft_server(self.unique('e2e-ft'))
        sid = server['id']
        shown, primary, secondary = self.protected_pair(sid)
        (third,) = set(HOSTS) - {primary, secondary}
        # The guest's job answers, from a host that is neither side's.
        counter = self.counter_from(third, net.probe['id'])
        before = counter.wait(lambda a: len(a) >= 5, 300,
                              'answers from the guest')
        recovery = self.power_off_primary(sid, primary, secondary, counter)
        # No answer repeated or taken back, no reboot (a counter that
        # restarted would answer 1 again).
        counter.check_nothing_taken_back()
        self.assertGreater(len(counter.answers()), len(before))
        # Nova shows the new host, and protection onto the third host.
        shown, new_primary, new_secondary = self.protected_pair(
            sid, host=secondary)
        self.assertEqual((secondary, third), (new_primary, new_secondary))
        print(f'host power-off: {recovery}', file=sys.stderr)
        self.addDetail('recovery', content.text_content(str(recovery)))

        # Nova's operations on the failed-over server, on its new host.
        last = counter.answers()[-1][1]
        self.openstack('server', 'stop', sid)
        self.wait_server(sid, 'SHUTOFF')
        started = time.monotonic()
        self.openstack('server', 'start', sid)
        self.wait_server(sid, 'ACTIVE')
        self.protected_pair(sid, host=new_primary)
        # A new boot: the counter keeps its value on the server's disk
        # (guestd reads it back at start), so the disk the guest ran on
        # through the failover is the one Nova started, and it counts
        # on from it.
        answers = counter.wait(lambda a: a[-1][0] > started, 300,
                               'the restarted guest answering')
        self.assertGreater(answers[-1][1], last)
        self.openstack('server', 'reboot', '--hard', '--wait', sid)
        self.protected_pair(sid, host=new_primary)
        since = len(counter.answers())
        counter.wait(lambda a: len(a) > since + 2, 300,
                     'the rebooted guest answering')

        # Deleted, it leaves nothing behind on the hosts that run (the
        # powered-off one's leftovers are Nova's evacuation clean-up's,
        # once it comes back), nor in Placement, nor on its port.
        consumer = self.secondary_consumer(sid)
        domain = shown['OS-EXT-SRV-ATTR:instance_name']
        self.openstack('server', 'delete', '--wait', sid)
        self.assertEqual({new_primary: [], new_secondary: []},
                         self.leftovers(sid, domain,
                                        (new_primary, new_secondary)))
        token = self.openstack('token', 'issue', '-f', 'value', '-c',
                               'id').stdout.strip()
        self.assertEqual((set(), set()), (self.held_by(sid, token),
                                          self.held_by(consumer, token)))
        port = self.openstack_json('port', 'show', net.port['id'])
        self.assertEqual(('', 'DOWN'), (port['binding_host_id'] or '',
                                        port['status']))

    def leftovers(self, server_id: str, domain: str,
                  hosts: tuple[str, ...], timeout: float = 60
                  ) -> dict[str, list[str]]:
        """What of ``server_id`` (libvirt domain ``domain``) is left on
        each of ``hosts``
        (:data:`LEFTOVERS`), once nothing more goes within ``timeout``
        (an agent may end an instance process a moment after Nova's
        delete returned)."""
        deadline = time.monotonic() + timeout
        while True:
            left = {}
            for host in hosts:
                enter = self.lab.state()['hosts'][host]['enter']
                instances = os.path.join(self.lab_dir, 'hosts', host,
                                         'instances')
                out = subprocess.run(
                    [*enter, PYTHON, '-c', LEFTOVERS, server_id, domain,
                     instances],
                    capture_output=True, text=True, timeout=60)
                self.assertEqual(0, out.returncode, out.stderr[-2000:])
                left[host] = json.loads(out.stdout)
            if not any(left.values()) or time.monotonic() > deadline:
                return left
            time.sleep(2)

    def wait_server(self, server_id: str, status: str,
                    timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            shown = self.openstack_json('server', 'show', server_id)
            if shown['status'] == status:
                return shown
            if shown['status'] == 'ERROR' or time.monotonic() > deadline:
                self.fail(f'server {server_id} is {shown["status"]}, not '
                          f'{status}: {json.dumps(shown)[:3000]}')
            time.sleep(2)
