"""What a fence call costs: etcd (3 members) against one Redis.

Starts a private 3-member etcd cluster and a private Redis on 127.0.0.1
(the fixtures of ``tests/integration/lab.py``), reports the cluster's
start-up time and its members' resident memory, then times the fence's
calls on each backend: ``acquire`` of a free lease, ``renew``,
``replica_valid`` and ``mark_stale``, and ``release``. Usage::

    .venv/bin/python benchmarks/fence_latency.py [--rounds 200]

Needs ``etcd`` and ``redis-server`` (``tools/run.sh test`` installs both).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

# The lab fixtures live in the source tree's tests package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))

from mftvm_openstack import fencing  # noqa: E402
from tests.integration import lab as ftlab  # noqa: E402


def rss_mib(pid: int) -> float:
    with open(f'/proc/{pid}/status') as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1]) / 1024
    return 0.0


def timings(url: str, rounds: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}

    def timed(what: str, fn: Callable[[], object]) -> None:
        start = time.perf_counter()
        fn()
        out.setdefault(what, []).append(1000 * (time.perf_counter() - start))

    fence = fencing.load_fence(url, 'bench', member='bench', lease=3,
                               state_dir='/nonexistent')
    fence.acquire(5)        # connect once
    fence.release()
    for i in range(rounds):
        timed('acquire', lambda: fence.acquire(1))
        timed('renew', fence.renew)
        timed('replica_valid', lambda: fence.replica_valid('p0'))
        timed('mark_stale', lambda i=i: fence.mark_stale(f'p{i}', 'bench'))
        timed('release', fence.release)
    fence.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--rounds', type=int, default=200)
    args = parser.parse_args()

    start = time.monotonic()
    with ftlab.EtcdCluster(None) as etcd:
        up = time.monotonic() - start
        rss = [rss_mib(etcd.process(m).pid) for m in etcd.members]
        print(f'etcd: 3 members healthy after {up:.2f} s; RSS '
              + ', '.join(f'{r:.0f}' for r in rss) + ' MiB')
        results = {'etcd': timings(etcd.url, args.rounds)}
        rss = [rss_mib(etcd.process(m).pid) for m in etcd.members]
        print('etcd RSS after the run: '
              + ', '.join(f'{r:.0f}' for r in rss) + ' MiB')
    with ftlab.Redis(None) as redis:
        results['redis'] = timings(redis.url, args.rounds)
    print(f'{"ms (median / p95)":20}' + ''.join(
        f'{name:>16}' for name in results))
    for what in results['etcd']:
        row = ''
        for samples in results.values():
            p95 = statistics.quantiles(samples[what], n=20)[-1]
            row += f'{statistics.median(samples[what]):>8.2f} /{p95:>6.2f}'
        print(f'{what:20}{row}')


if __name__ == '__main__':
    main()
