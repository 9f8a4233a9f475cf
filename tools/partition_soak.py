"""Run the partition suite many times over, one test at a time.

CI runs each partition test once; a split-brain bug may show once in
twenty. This runs each named test ``--runs`` times, round-robin (so a
run cut short still samples every test), each run in a fresh Python and
under the machine's heavy-test lock (taken per run, so other heavy tests
can interleave), and checks between runs that no guest QEMU outlived
its test (the tests themselves count running copies of their guest
every 20 ms, across every namespace). A failed run's agent directories
(logs) are kept and named; a passing run's are removed. It prints and
writes (``--out``) per test: runs, failures, and the seconds each run
took::

    .venv/bin/python tools/partition_soak.py --runs 20
    .venv/bin/python tools/partition_soak.py --runs 3 \\
        tests.integration.test_partitions.EtcdPartitions.test_an_etcd_member_partitioned_away

Needs root and what ``tools/run.sh test`` installs.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = [
    'tests.integration.test_partitions.EtcdPartitions.'
    'test_an_etcd_member_partitioned_away',
    'tests.integration.test_partitions.EtcdPartitions.'
    'test_primary_and_secondary_split_both_reaching_etcd',
    'tests.integration.test_partitions.EtcdPartitions.'
    'test_primary_cut_off_from_etcd_but_not_from_its_secondary',
    'tests.integration.test_agent_failover.EtcdPartitionTest.'
    'test_cut_off_primary_fences_itself_one_copy_ever',
]
#: where the tests keep their agents' directories (kept for a failed run:
#: logs, ended instance directories)
AGENT_DIRS_IN = '/var/tmp'
#: the agents' guests are named ft<pid of the test process>
GUEST_QEMU = r'qemu-system-[^ ]* -name ft[0-9]+ '


def leftover_qemus() -> list[str]:
    out = subprocess.run(['pgrep', '-af', GUEST_QEMU], capture_output=True,
                         text=True).stdout
    return [line for line in out.splitlines() if 'pgrep' not in line]


def agent_dirs() -> set[str]:
    return set(glob.glob(os.path.join(AGENT_DIRS_IN, 'mftvm-agents-*')))


def run_once(test: str, lock: str, log: str) -> tuple[bool, float, list[str]]:
    """One run of ``test``: (passed, seconds, the agents' directories kept
    for a failed run). A passing run's directories are removed."""
    argv = [sys.executable, '-m', 'testtools.run', test]
    if lock:
        argv = ['flock', lock] + argv
    before = agent_dirs()
    with open(log, 'ab') as out:
        out.write(f'\n==== {test} {time.ctime()}\n'.encode())
        out.flush()
        start = time.monotonic()
        rc = subprocess.run(argv, cwd=ROOT, stdout=out,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, 'MFTVM_KEEP_TEST_DIRS': '1'}
                            ).returncode
    took = time.monotonic() - start
    new = sorted(agent_dirs() - before)
    if rc == 0:
        for path in new:
            shutil.rmtree(path, ignore_errors=True)
        new = []
    return rc == 0, took, new


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('tests', nargs='*', default=SUITE)
    parser.add_argument('--runs', type=int, default=20)
    parser.add_argument('--lock', default='/tmp/mftvm-heavy.lock',
                        help="the heavy tiers' lock ('' for none)")
    parser.add_argument('--log', default='/tmp/partition-soak.log')
    parser.add_argument('--out', default='')
    args = parser.parse_args()
    if not 1 <= args.runs <= 1000:
        parser.error('--runs: 1 to 1000')
    results: dict[str, dict] = {
        t: {'passed': 0, 'failed': 0, 'leftover_qemu': 0, 'seconds': []}
        for t in args.tests}
    for n in range(args.runs):
        for test in args.tests:
            ok, took, kept = run_once(test, args.lock, args.log)
            res = results[test]
            res['passed' if ok else 'failed'] += 1
            res['seconds'].append(round(took, 1))
            left = leftover_qemus()
            if left:
                res['leftover_qemu'] += 1
            short = test.rsplit('.', 1)[-1]
            print(f'run {n + 1}/{args.runs} {short}: '
                  f'{"ok" if ok else "FAILED"} in {took:.0f}s'
                  + (f'; QEMU left over: {left}' if left else '')
                  + (f'; its agents\' logs kept in {", ".join(kept)}'
                     if kept else ''),
                  flush=True)
            if args.out:
                with open(args.out, 'w') as f:
                    json.dump(results, f, indent=1)
    bad = 0
    for test, res in results.items():
        secs = res['seconds']
        print(f'{test.rsplit(".", 1)[-1]}: {res["passed"]} passed, '
              f'{res["failed"]} failed, {res["leftover_qemu"]} with QEMU '
              f'left over; median {statistics.median(secs):.0f}s')
        bad += res['failed'] + res['leftover_qemu']
    return 1 if bad else 0


if __name__ == '__main__':
    sys.exit(main())
