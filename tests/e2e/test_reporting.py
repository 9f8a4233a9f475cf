"""What the lab's agents report, and what an operator sees of a lost
secondary: Prometheus metrics, notifications, the FT API and the CLI.

Each host's agent is configured by ``python -m mftvm_openstack.deploy
agent`` (as the DevStack plugin does) with its defaults: versioned
notifications on (``messagingv2``, topic ``versioned_notifications`` on
the agents' broker, cell1's vhost) and the Prometheus endpoint on port
9787, bound here to the host's management address. The tests read both
as an operator's tools would: an HTTP scrape from the control network,
and a real oslo.messaging notification listener on the lab's RabbitMQ
(:class:`tests.e2e.lab.Notifications`). What happens when an FT
server's secondary dies, on three FT hosts::

    kill the secondary (h2)   -> unprotected: the FT API, the CLI, and
                                 mftvm.instance.secondary_lost
    Nova's status keeper      -> the lost host's Placement hold released,
                                 a new secondary (h3) chosen and held
    its first committed epoch -> protected again: the FT API, the CLI,
                                 mftvm.instance.reprotect.end, ft_status

Nova re-protects within seconds, so the guest runs unprotected only
briefly: the FT API and the CLI are each watched without pause
(:class:`Watch`), the CLI through one ``openstack`` process in its
interactive mode (:class:`OpenStackShell`: a one-shot ``openstack``
spends about 3 s starting before it asks anything). Times from the kill
to each view are printed and kept as the test's ``lost secondary``
detail, not asserted (a shared machine): ``benchmarks/lost_secondary.py``
runs the same steps again and again and sums them up.
"""

from __future__ import annotations

import json
import os
import queue
import shlex
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable
from typing import Any, Optional

from testtools import content

from mftvm_openstack.contract.notifications import InstanceFTPayload
from tests.e2e import lab
from tests.e2e.lab import HOSTS

#: an FT flavor as an admin makes it: FT on, and only FT-capable hosts
FT_FLAVOR_SPECS = ('ft:enabled=true', 'trait:CUSTOM_MFTVM_FT=required')
#: kill -> protected again by Nova onto another host: its keeper's next
#: look (every [ft] handoff_interval, 2 s), a secondary chosen through
#: Placement and started, the first checkpoint committed (two busy cores)
REPROTECT_TIMEOUT = 300


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


def metric(text: str, name: str) -> float:
    """The value of sample ``name`` (with its labels, if any) in a
    Prometheus text exposition; 0 if it is not there::

        >>> metric('# TYPE x counter\\nx_total 2.0\\n', 'x_total')
        2.0
    """
    for line in text.splitlines():
        sample, _, value = line.rpartition(' ')
        if sample == name:
            return float(value)
    return 0.0


class OpenStackShell:
    """One ``openstack`` process in its interactive mode (``openstack``
    with no command reads one command a line from its standard input),
    asked one command after another::

        with OpenStackShell(env, cwd, log) as shell:
            shell.json('ft', 'server', 'show', server_id)   # {...}

    Each command is then one request with the token the shell already
    holds, where a one-shot ``openstack`` spends about 3 s starting
    (imports, entry points, a token) before it asks anything. Each
    answer is read up to a marker the shell echoes after it
    (``!echo``: its shell escape); what a command says on stderr goes to
    ``log``.
    """

    def __init__(self, env: dict[str, str], cwd: str, log: str) -> None:
        self._log = open(log, 'ab')
        self._proc = subprocess.Popen(
            [os.path.join(lab.VENV_BIN, 'openstack')],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._log, text=True, cwd=cwd,
            env={**env, 'PYTHONUNBUFFERED': '1'})
        self._lines: queue.Queue[Optional[str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True,
                         name='openstack-shell').start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def json(self, *args: str, timeout: float = 60) -> Any:
        """``openstack ARGS -f json``'s answer; AssertionError if it
        failed."""
        assert self._proc.stdin is not None
        marker = f'--end-{uuid.uuid4().hex}--'
        self._proc.stdin.write(f'{shlex.join(args)} -f json\n'
                               f'!echo {marker}\n')
        self._proc.stdin.flush()
        deadline = time.monotonic() + timeout
        out = []
        while True:
            try:
                line = self._lines.get(
                    timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f'openstack {shlex.join(args)}: no '
                                     f'answer in {timeout} s') from None
            if line is None:
                raise AssertionError('the openstack shell ended')
            if line.strip() == marker:
                break
            out.append(line)
        text = ''.join(out).strip()
        try:
            return json.loads(text)
        except ValueError:
            raise AssertionError(f'openstack {shlex.join(args)} failed '
                                 f'(its stderr in {self._log.name}): '
                                 f'{text[:200]}') from None

    def close(self) -> None:
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._log.close()

    def __enter__(self) -> OpenStackShell:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Watch:
    """Asks ``probe`` again and again in a thread of its own (``interval``
    seconds after each answer) and keeps every change of its answer with
    the time it came (``time.monotonic()``)::

        with Watch(lambda: api(server)['protection']) as watch:
            t0 = time.monotonic(); ...        # something happens
            watch.first(t0, 'unprotected'.__eq__)  # its time, or None

    A probe that raises counts as the answer ``error: ...``.
    """

    def __init__(self, probe: Callable[[], Any],
                 interval: float = 0.2) -> None:
        self._probe = probe
        self._interval = interval
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.changes: list[tuple[float, Any]] = []
        #: answers had, and the seconds they took in all
        self.asked = 0
        self.busy = 0.0
        #: the latest answer, and when its question was asked
        self.latest: Any = None
        self.latest_asked = -1.0
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name='watch')

    def _run(self) -> None:
        last: Any = object()
        while not self._stop.is_set():
            t0 = time.monotonic()
            try:
                value = self._probe()
            except Exception as exc:
                value = f'error: {exc}'[:200]
            at = time.monotonic()
            with self._lock:
                self.asked += 1
                self.busy += at - t0
                self.latest, self.latest_asked = value, t0
                if value != last:
                    self.changes.append((at, value))
                    last = value
            self._stop.wait(self._interval)

    def first(self, since: float, predicate: Callable[[Any], bool]
              ) -> Optional[float]:
        """When an answer first came, at ``since`` or later, that
        ``predicate`` holds for (None: none yet)."""
        with self._lock:
            return next((at for at, value in self.changes
                         if at >= since and predicate(value)), None)

    def wait_answer(self, since: float, predicate: Callable[[Any], bool],
                    timeout: float) -> Any:
        """The latest answer, once it answers a question asked at
        ``since`` or later and ``predicate`` holds for it
        (AssertionError with the latest answer after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                if self.latest_asked >= since and predicate(self.latest):
                    return self.latest
            time.sleep(0.1)
        raise AssertionError(f'not so in {timeout} s: {self.latest!r}')

    def history(self, since: float) -> list[tuple[float, Any]]:
        """The changes at ``since`` or later, their times from it."""
        with self._lock:
            return [(round(at - since, 2), value)
                    for at, value in self.changes if at >= since]

    @property
    def period(self) -> float:
        """The mean time from one answer to the next."""
        with self._lock:
            return (self.busy / self.asked + self._interval) \
                if self.asked else 0.0

    def __enter__(self) -> Watch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)


def _view(shown: Any) -> Any:
    """What a watch of the FT API or the CLI keeps of an FT server."""
    if not isinstance(shown, dict):
        return shown
    return (shown.get('protection'), shown.get('secondary_host'),
            shown.get('unprotected_since'))


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

    # -- a lost secondary --------------------------------------------------

    #: secondaries killed one after another, each once the one before
    #: was replaced (benchmarks/lost_secondary.py asks for more)
    rounds = 1

    def ft_server(self) -> dict:
        """A protected FT server (the project's guest, one port) on the
        lab's FT hosts; returns ``openstack ft server show``."""
        self.add_hosts(*HOSTS)
        self.only_hosts(*HOSTS)
        name = self.unique('e2e-report')
        _, _, image, _ = self.upload_guest(
            name, 'os_command_line=console=ttyS0 mftvm.run=counter')
        port = self.guest_port(name)
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

    def api_show(self, server_id: str, token: str) -> Any:
        """``GET /v1/servers/ID`` of the FT API, over plain HTTP."""
        req = urllib.request.Request(
            f'{self.lab.ft_api()}/v1/servers/{server_id}')
        req.add_header('X-Auth-Token', token)
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read()).get('server')

    def test_a_lost_secondary_shows_unprotected_then_protected_again(self):
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
            consumer = self.secondary_consumer(sid)
            self.assertTrue(self.placement)

            log = os.path.join(self.tmp, f'{self.unique("shell")}.log')
            with OpenStackShell(self.env, self.tmp, log) as ft_cli, \
                    OpenStackShell(self.env, self.tmp, log) as nova_cli, \
                    Watch(lambda: _view(self.api_show(sid, token))) as api, \
                    Watch(lambda: _view(ft_cli.json(
                        'ft', 'server', 'show', sid))) as cli, \
                    Watch(lambda: nova_cli.json(
                        'server', 'show', sid, '-c', 'properties'
                    )['properties'].get('ft_status')) as nova:
                figures = [self.lose_secondary(seen, sid, primary,
                                               consumer, token, api, cli,
                                               nova)
                           for _ in range(self.rounds)]
                periods = {'api': api.period, 'cli': cli.period,
                           'nova': nova.period}
        # what the watches saw, how often they looked, and the times
        report = json.dumps({'rounds': figures, 'periods': periods})
        self.addDetail('lost secondary', content.text_content(report))
        #: for benchmarks/lost_secondary.py
        self.lost_secondary = figures
        for i, round_ in enumerate(figures):
            print(f'lost secondary, round {i + 1}: kill -> unprotected: '
                  f'API {round_["api"]:.2f} s, CLI {round_["cli"]:.2f} s, '
                  f'notification {round_["notification"]:.2f} s; kill -> '
                  f'protected again {round_["reprotected"]:.1f} s '
                  f'(reprotect.end {round_["reprotect.end"]:.1f} s); '
                  f'seen by the API: {round_["api history"]}',
                  file=sys.stderr)
        print('lost secondary: watched every ' + ', '.join(
            f'{k} {v:.2f} s' for k, v in periods.items()), file=sys.stderr)

    def protected_onto(self, sid: str, token: str) -> str:
        """The secondary host of ``sid`` once the FT API shows it
        protected (now, as a rule)."""
        deadline = time.monotonic() + REPROTECT_TIMEOUT
        while True:
            shown = self.api_show(sid, token)
            if shown.get('protection') == 'protected':
                return str(shown['secondary_host'])
            if time.monotonic() > deadline:
                self.fail(f'{sid} not protected in {REPROTECT_TIMEOUT} s: '
                          f'{shown}')
            time.sleep(0.5)

    def lose_secondary(self, seen: lab.Notifications, sid: str,
                       primary: str, consumer: str, token: str,
                       api: Watch, cli: Watch, nova: Watch
                       ) -> dict[str, Any]:
        """Kill the server's secondary; see it shown unprotected, then
        protected again onto a new secondary; returns the times from the
        kill to each (seconds), and the hosts.
        """
        # The secondary right now, just before the kill: on a loaded
        # machine one may have been lost and replaced since the last
        # look (seen at a load average of 20: the secondary heard
        # nothing for 0.8 s, its takeover was refused by the fence, and
        # Nova protected the server again elsewhere).
        secondary = self.protected_onto(sid, token)
        self.assertIn(secondary, set(HOSTS) - {primary})
        self.assertEqual({secondary}, self.held_by(consumer, token))
        lost_before = metric(self.metrics(primary),
                             'mftvm_secondaries_lost_total')
        # Every watch shows it protected onto that host, answering a
        # question asked from now on (the CLI's first answer, the
        # shell's start, took about 10 s at a load average of 14).
        now = time.monotonic()
        for watch in (api, cli):
            watch.wait_answer(now, lambda view: isinstance(view, tuple) and
                              view[:2] == ('protected', secondary), 120)
        nova.wait_answer(now, 'protected'.__eq__, 120)
        # The secondary dies: its host's agent, which Nova cannot use
        # meanwhile (so its first try goes elsewhere anyway), and every
        # process of the guest's there (its instance process and QEMU).
        agent = f'{secondary}-mftvm-agent'
        self.addCleanup(self.agent_back, agent)
        os.killpg(self.lab.state()['pids'][agent], signal.SIGKILL)
        killed_at = time.monotonic()
        killed_wall = time.time()
        self.assertTrue(kill_matching(self.ns(secondary), sid))

        # Unprotected: in the FT API (HTTP), the CLI, on the bus.
        lost = seen.wait_for('mftvm.instance.secondary_lost',
                             since=killed_wall, instance=sid,
                             secondary_host=secondary)
        self.assertEqual(('error', f'mftvm-agent:{primary}'),
                         (lost['priority'], lost['publisher_id']))
        payload = InstanceFTPayload.from_versioned(lost['payload'])
        self.assertEqual(('unprotected', primary, secondary),
                         (str(payload.state), payload.primary_host,
                          payload.secondary_host))

        # Protected again, onto another host, once its first epoch is
        # committed (the agent says reprotect.end then)
        again = seen.wait_for('mftvm.instance.reprotect.end',
                              timeout=REPROTECT_TIMEOUT, since=killed_wall,
                              instance=sid)
        self.assertEqual(('info', f'mftvm-agent:{primary}'),
                         (again['priority'], again['publisher_id']))
        payload = InstanceFTPayload.from_versioned(again['payload'])
        new = payload.secondary_host
        self.assertEqual(('protected', primary), (str(payload.state),
                                                  payload.primary_host))
        self.assertIn(new, set(HOSTS) - {primary, secondary})
        self.assertGreaterEqual(payload.last_committed_epoch, 1)

        def protected(view: Any) -> bool:
            return isinstance(view, tuple) and view[:2] == ('protected',
                                                            new)

        def unprotected(view: Any) -> bool:
            return isinstance(view, tuple) and view[0] == 'unprotected'

        deadline = time.monotonic() + 120
        while not (api.first(killed_at, protected) and
                   cli.first(killed_at, protected)):
            if time.monotonic() > deadline:
                self.fail(f'{sid}: reprotect.end onto {new}, but not '
                          f'shown so in 120 s: API '
                          f'{api.history(killed_at)}, CLI '
                          f'{cli.history(killed_at)}')
            time.sleep(0.5)
        # both showed it unprotected in between: times from the kill
        times: dict[str, float] = {}
        for name, watch in (('api', api), ('cli', cli)):
            went = watch.first(killed_at, unprotected)
            back = watch.first(killed_at, protected)
            if went is None or back is None or went > back:
                self.fail(f'the {name} did not show {sid} unprotected '
                          f'before protected again onto {new}: '
                          f'{watch.history(killed_at)}')
            times[name] = went - killed_at
            times[f'{name} protected'] = back - killed_at
        # and since when, in the primary's own word (wall clock)
        since = next(view[2] for _, view in api.history(killed_at)
                     if unprotected(view))
        self.assertIsInstance(since, float)
        self.assertGreaterEqual(since, killed_wall)

        # Nova: protected again, the new secondary held in Placement and
        # the lost one's hold released; the primary's agent counted it
        self.wait_ft_status(sid, 'protected', timeout=120)
        self.assertEqual({new}, self.held_by(consumer, token))
        self.assertEqual(lost_before + 1, metric(
            self.metrics(primary), 'mftvm_secondaries_lost_total'))

        # the lost host's agent back, for the next round and the next
        # test
        self.agent_back(agent)
        return {
            'lost secondary': secondary, 'new secondary': new,
            'api': times['api'], 'cli': times['cli'],
            'notification': lost['at'] - killed_wall,
            'unprotected since': since - killed_wall,
            'reprotected': times['api protected'],
            'reprotect.end': again['at'] - killed_wall,
            'api history': api.history(killed_at),
            'cli history': cli.history(killed_at),
            'nova history': nova.history(killed_at),
        }
