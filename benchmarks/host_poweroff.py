"""An FT server's host powered off, N times in a row, in the cloud lab.

One cloud lab (``tests/e2e/lab.py``, without Ceph and Cinder), one FT
server booted with ``openstack server create --property ft=true`` (the
project's counter guest, :mod:`tests.e2e.counter_net`), and a client
that asks its counter without end from a host that never runs it (the
probe host, its nova-compute disabled). Then, ``--runs`` times: the host
that runs the server is powered off (its links cut, then every process
of its namespaces SIGKILLed: :func:`tests.e2e.ft_server.power_off`), and
the benchmark watches, through the client's log and ``openstack server
show``, until the guest answered again, Nova shows it on its old
secondary's host, and ``ft_status`` is ``protected`` again (onto another
host). Meanwhile a fresh compute host is added, so that every run has a
third host to re-protect onto. Each run records, in seconds from the
kill:

* ``answered``: the client's next answer (from its own log, on the
  system-wide monotonic clock; greater than the last before, and by more
  than 1 only for requests in between that got no answer:
  ``CounterLog.check_nothing_taken_back``);
* ``nova_moved``: ``openstack server show`` names the new host;
* ``reprotected``: ``ft_status`` is ``protected`` on the new host;

and the machine's load average (1, 5 and 15 minutes) at the kill and
once protected again (``load_at_kill``, ``load_after``).

The CLI's own looks take 1-3 s each, so the last two are that coarse.

A lab should be up 20 minutes at most here (two labs share two cores):
five runs fit in one; ``--append`` goes on with a series in a new lab.

Usage (root, after ``tools/run.sh test`` made ``.cloud-venv``)::

    .venv/bin/python benchmarks/host_poweroff.py [--runs 10] [--append] \\
        [--out FILE]

Results go to ``benchmarks/results-host-poweroff.json`` (written after
every run, so an interrupted series keeps what it measured) and
``host_poweroff.png``; the lab is torn down at the end (kept up with
``MFTVM_E2E_KEEP_LAB=1``; a failed run's logs are kept as
:mod:`tests.e2e.diagnostics` says).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

import testtools  # noqa: E402

from tests.e2e import diagnostics, ft_server, lab  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
#: the host the client asks from (never a server's: disabled in Nova)
PROBE_HOST = 'bprobe'
#: the figures of a run
FIGURES = ('answered', 'nova_moved', 'reprotected')


def host_name(n: int) -> str:
    """The ``n``-th server host of the series (``b1``, ``b2``, ...)."""
    return f'b{n}'


def summary(values: list[float]) -> dict[str, float]:
    return {'median': round(statistics.median(values), 2),
            'min': round(min(values), 2), 'max': round(max(values), 2)}


class PowerOffSeries(ft_server.FTServerTests, lab.LabTestCase):
    """The series as one test of the e2e lab's kind (its helpers and its
    clean-ups); ``runs`` and ``out`` are set before it runs."""

    runs = 10
    out = ''
    report: dict[str, Any] = {}

    def test_series(self) -> None:
        diagnostics.keep_on_failure(self)
        report = type(self).report
        report.setdefault('runs', [])
        report.setdefault('labs', []).append(
            {'started': time.time(),
             'lab_up_s': round(self.lab.up_seconds, 1)})
        done = len(report['runs'])
        hosts = [host_name(n) for n in (1, 2, 3)]
        self.add_hosts(PROBE_HOST)
        t0 = time.monotonic()
        server, net = self.ft_server(self.unique('bench'), tuple(hosts))
        sid = server['id']
        _, primary, secondary = self.protected_pair(sid, tuple(hosts))
        report['labs'][-1]['protected_after_create_s'] = round(
            time.monotonic() - t0, 1)
        counter = self.counter_from(PROBE_HOST, net.probe['id'])
        counter.wait(lambda a: len(a) >= 5, 300, 'answers from the guest')
        for run in range(done + 1, done + self.runs + 1):
            # a host to re-protect onto once this run's primary is gone
            # (before the kill, not during it: a host's start-up would
            # take the two cores from the recovery being measured)
            new = host_name(len(hosts) + 1)
            t_add = time.monotonic()
            self.add_hosts(new)
            add_s = time.monotonic() - t_add
            hosts.append(new)
            load_at_kill = os.getloadavg()
            recovery = self.power_off_primary(sid, primary, secondary,
                                              counter)
            load_after = os.getloadavg()
            # (the dead host is left as it is: Nova counts its service
            # down a minute later and no secondary goes there; disabling
            # it would wait out an RPC call to the dead nova-compute)
            _, new_primary, new_secondary = self.protected_pair(
                sid, tuple(hosts), host=secondary)
            counter.check_nothing_taken_back()
            row = {'run': run, 'killed': primary, 'new_primary': new_primary,
                   'new_secondary': new_secondary,
                   'last_before': recovery.last_before,
                   'first_after': recovery.first_after,
                   'host_added_s': round(add_s, 1),
                   # the machine's load average (1, 5, 15 min) at the
                   # kill and once protected again: two shared cores
                   'load_at_kill': [round(x, 2) for x in load_at_kill],
                   'load_after': [round(x, 2) for x in load_after],
                   **{k: round(getattr(recovery, k), 2) for k in FIGURES}}
            report['runs'].append(row)
            write(report, self.out)
            print(f'run {run}: {primary} powered off: {recovery}; now '
                  f'{new_primary} with secondary {new_secondary}',
                  file=sys.stderr, flush=True)
            primary, secondary = new_primary, new_secondary


def write(report: dict[str, Any], out: str) -> None:
    rows = report['runs']
    if rows:
        report['summary'] = {k: summary([r[k] for r in rows])
                             for k in FIGURES}
    with open(out, 'w') as f:
        json.dump(report, f, indent=1)


def plot(report: dict[str, Any], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    rows = report['runs']
    fig, ax = plt.subplots(figsize=(9, 4.5))
    runs = [r['run'] for r in rows]
    labels = {'answered': 'kill → next client answer',
              'nova_moved': 'kill → Nova shows the new host',
              'reprotected': 'kill → protected again (third host)'}
    for key, marker in zip(FIGURES, 'o^s'):
        ax.plot(runs, [r[key] for r in rows], marker=marker,
                label=labels[key])
    ax.set_xlabel('power-off (in a row, one server)')
    ax.set_ylabel('seconds after the kill')
    ax.set_xticks(runs)
    ax.set_title('FT server, its host powered off: recovery through '
                 'the real CLI')
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--runs', type=int, default=10)
    parser.add_argument('--out', default=os.path.join(
        HERE, 'results-host-poweroff.json'))
    parser.add_argument('--plot', default=os.path.join(
        HERE, 'host_poweroff.png'))
    parser.add_argument('--append', action='store_true',
                        help='go on with the series in --out (its runs '
                        'kept, this lab\'s numbered after them)')
    args = parser.parse_args()
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            PowerOffSeries.report = json.load(f)
    lab.Lab.up_options = ()
    PowerOffSeries.runs, PowerOffSeries.out = args.runs, args.out
    PowerOffSeries.setUpClass()
    case = PowerOffSeries('test_series')
    result = testtools.TestResult()
    case.run(result)
    for _, error in result.errors + result.failures:
        print(error, file=sys.stderr)
    report = PowerOffSeries.report
    if report.get('runs'):
        report['passed'] = result.wasSuccessful()
        write(report, args.out)
        plot(report, args.plot)
        print(json.dumps(report.get('summary'), indent=1))
    print(f'{len(report.get("runs", []))} power-offs recovered in all '
          f'({args.runs} asked of this lab); results in {args.out}')
    return 0 if result.wasSuccessful() else 1


if __name__ == '__main__':
    sys.exit(main())
