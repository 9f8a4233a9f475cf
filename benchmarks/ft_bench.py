"""Measure protection costs side by side, in one run, and print ratios.

* pause per epoch (p50/p99) for a 128 MiB and a 512 MiB guest, idle and
  under the disk writer;
* failover time: SIGKILL of the primary QEMU (or, ``--kill host``, of
  the primary's instance process) → the guest's next ACK on the serial
  console, and → the next answer of its counter service;
* guest 4 KiB O_DSYNC write IOPS: unprotected; protected with
  async-replication (ours, the default: the benchmark guest sends no
  packets, so its epochs run to ``idle_epoch_ms``); the same with every
  epoch ``epoch_ms`` long; with write-blocking replication
  (every write waits for the replica); with block-copy (MFTVM 3's
  baseline).

Usage::

    .venv/bin/python benchmarks/ft_bench.py [--quick] [--out results.json]

Needs root and the packages ``tools/run.sh`` installs. The numbers are
from a noisy 2-core machine under TCG: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable

from mftvm_openstack.ft import vm
from mftvm_openstack.ft.monitor import QMPMonitor
from mftvm_openstack.images import builder, workload
from mftvm_openstack.instance import client
from mftvm_openstack.local import demo, operations

#: QEMU COLO on this machine (FACTS.md): first checkpoint of a 128 MiB
#: guest, and 4 KiB sync-write IOPS protected/unprotected.
COLO_PAUSE_128_MS = 138
COLO_IOPS_RATIO = 0.4
#: where guestd's iobench writes on its disk (bytes)
IOBENCH_AREA = (512 << 20, 576 << 20)


class Bench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.image = builder.build_guest_image(demo.cache_dir())
        self.tmp = tempfile.mkdtemp(prefix='mftvm-bench-', dir='/var/tmp')
        self.state = os.path.join(self.tmp, 'state')

    def disk(self, name: str, mib: int = 640) -> str:
        # Sparse, except where the guest's iobench writes (512-576 MiB):
        # written once here, so that every run overwrites blocks the host
        # file system already holds, as on a disk in use. Into holes,
        # each sync write would also pay for allocating host blocks.
        path = os.path.join(self.tmp, f'{name}.raw')
        with open(path, 'wb') as f:
            f.truncate(mib << 20)
            if name.startswith('io-'):
                f.seek(IOBENCH_AREA[0])
                block = b'\0' * (1 << 20)
                for _ in range((IOBENCH_AREA[1] - IOBENCH_AREA[0]) >> 20):
                    f.write(block)
                f.flush()
                os.fsync(f.fileno())
        return path

    def protect(self, name: str, run: str, memory: int, port: int,
                **opts: object) -> str:
        spec = operations.make_spec(
            name, self.image.kernel, self.image.initrd, self.disk(name),
            append=f'console=ttyS0 quiet mftvm.run={run} '
                   f'mftvm.writer_interval_ms=0',
            memory_mib=memory,
            nic=f'user,hostfwd=tcp:127.0.0.1:{port}-:7000')
        return operations.protect(spec, operations.ProtectOptions(**opts),
                               self.state)

    def side(self, name: str, role: str) -> dict:
        return client.read_status(operations.guest_dir(self.state, name),
                                  role) or {}

    def wait_ready(self, gdir: str, role: str = 'primary',
                   timeout: float = 120) -> None:
        path = os.path.join(gdir, role, 'serial.log')
        deadline = time.monotonic() + timeout
        while 'MFTVM-GUEST-READY' not in workload.read_text(path):
            if time.monotonic() > deadline:
                raise RuntimeError(f'guest in {gdir} did not boot')
            time.sleep(0.2)

    # -- pauses ---------------------------------------------------------
    def pauses(self, memory: int, load: str, fixed: bool = False) -> dict:
        # fixed: every epoch epoch_ms long, as for a guest that keeps
        # sending (these guests send nothing: by default their epochs
        # run to idle_epoch_ms)
        name = f'p{memory}{load}{"-fixed" if fixed else ""}'
        run = 'writer' if load == 'writer' else 'idle'
        gdir = self.protect(name, run, memory, demo.free_port(),
                            **({'idle_epoch_ms': 0} if fixed else {}))
        # Enough epochs for a p50 and p99 worth the name: idle epochs come
        # about once a second.
        seconds = (10 if self.quick else 30) * (1 if fixed else 3)
        try:
            self.wait_ready(gdir)
            time.sleep(2)  # past the boot's own dirtying
            start = self.side(name, 'primary').get('epochs', 0)
            time.sleep(seconds)
            with open(os.path.join(gdir, 'primary', 'pauses.json')) as f:
                pauses = json.load(f)[start:]
        finally:
            operations.stop(self.state, name)
        pauses.sort()
        return {'guest_mib': memory, 'load': load,
                'epochs': 'fixed' if fixed else 'idle-epochs',
                'epochs_per_s': round(len(pauses) / seconds, 2),
                'pause_ms_p50': round(statistics.median(pauses), 1),
                'pause_ms_p99': round(pauses[int(len(pauses) * 0.99) - 1],
                                      1)}

    # -- failover -------------------------------------------------------
    def failover(self, runs: int, kill: str = 'qemu') -> dict:
        to_ack, to_answer, restore = [], [], []
        stamps: dict[str, list[float]] = {'detected': [], 'fenced': [],
                                          'resumed': []}
        for i in range(runs):
            name = f'fo{i}'
            port = demo.free_port()
            gdir = self.protect(name, 'writer,counter', 128, port)
            try:
                self.wait_ready(gdir)
                time.sleep(1 + (i % 3) * 0.37)
                sec_serial = os.path.join(gdir, 'secondary', 'serial.log')
                prim = self.side(name, 'primary')
                os.kill(prim[f'{kill}_pid'], signal.SIGKILL)
                t0 = time.monotonic()
                ack_at: list[float] = []

                def watch_ack() -> None:
                    while time.monotonic() - t0 < 60:
                        if workload.serial_acks(
                                workload.read_text(sec_serial)):
                            ack_at.append(time.monotonic())
                            return
                        time.sleep(0.005)
                watcher = threading.Thread(target=watch_ack)
                watcher.start()
                answer = None
                while answer is None and time.monotonic() - t0 < 60:
                    answer = workload.counter_request('127.0.0.1', port, 5)
                to_answer.append(time.monotonic() - t0)
                watcher.join()
                if ack_at:
                    to_ack.append(ack_at[0] - t0)
                # status.json is published every 0.25 s
                deadline = time.monotonic() + 5
                sec = self.side(name, 'secondary')
                while sec.get('failover_ms') is None and \
                        time.monotonic() < deadline:
                    time.sleep(0.1)
                    sec = self.side(name, 'secondary')
                if sec.get('failover_ms') is not None:
                    restore.append(sec['failover_ms'] / 1000)
                # the takeover's stamps are CLOCK_MONOTONIC, as t0
                for stage, at in (sec.get('takeover') or {}).items():
                    if stage in stamps and at is not None:
                        stamps[stage].append(at - t0)
            finally:
                operations.stop(self.state, name)

        def ms(xs: list[float]) -> dict:
            return {'median_ms': round(statistics.median(xs) * 1000),
                    'max_ms': round(max(xs) * 1000), 'runs': len(xs)}
        return {'killed': kill, 'kill_to_next_ack': ms(to_ack),
                'kill_to_next_answer': ms(to_answer),
                'restore_on_secondary': ms(restore),
                **{f'kill_to_{stage}': ms(xs)
                   for stage, xs in stamps.items() if xs}}

    # -- IOPS -----------------------------------------------------------
    def iops_protected(self, disk_sync: str, seconds: int,
                       run: int = 0, **opts: object) -> float:
        name = f'io-{disk_sync}-{run}' + ''.join(f'-{v}' for v in
                                                  opts.values())
        gdir = self.protect(name, f'iobench:{seconds}', 128,
                            demo.free_port(), disk_sync=disk_sync, **opts)
        try:
            return self._wait_iops(os.path.join(gdir, 'primary',
                                                'serial.log'), seconds)
        finally:
            operations.stop(self.state, name)

    def iops_unprotected(self, seconds: int, run: int = 0) -> float:
        return asyncio.run(self._iops_plain(seconds, f'io-plain-{run}'))

    async def _iops_plain(self, seconds: int, name: str) -> float:
        spec = vm.GuestSpec(
            name=name, kernel=self.image.kernel,
            initrd=self.image.initrd, disk=self.disk(name),
            append=f'console=ttyS0 quiet mftvm.run=iobench:{seconds}',
            accel=vm.probe_accelerator())
        paths = vm.Paths(os.path.join(self.tmp, name))
        os.makedirs(paths.root, exist_ok=True)
        ram = vm.ram_path(name, 'bench')
        with open(ram, 'wb') as f:
            f.truncate(spec.memory_bytes)
        proc = await vm.ChildProcess.start(vm.qemu_argv(spec, paths, ram),
                                           paths.log)
        try:
            mon = await QMPMonitor.connect(paths.qmp)
            iops = await asyncio.to_thread(self._wait_iops, paths.serial,
                                           seconds)
            await mon.close()
            return iops
        finally:
            await proc.kill()
            os.unlink(ram)

    def _wait_iops(self, serial: str, seconds: int) -> float:
        """The guest's writes per second of *host* time.

        The guest's own figure would leave out the checkpoint pauses:
        its clock stands still while a checkpoint has it stopped. So the
        run is timed here, from its start line to its result line, both
        seen on the serial console within milliseconds.
        """
        deadline = time.monotonic() + 120 + seconds
        started = None
        while time.monotonic() < deadline:
            text = workload.read_text(serial)
            if started is None and workload.IOBENCH_START in text:
                started = time.monotonic()
            m = workload.IOPS_RE.search(text)
            if m:
                if started is None:
                    raise RuntimeError(f'{serial}: no start line seen')
                return int(m.group(2)) / (time.monotonic() - started)
            time.sleep(0.002)
        raise RuntimeError(f'no IOPS line in {serial}')

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--out', default='benchmarks/results.json')
    parser.add_argument('--failover-runs', type=int, default=10)
    parser.add_argument('--kill', choices=['qemu', 'host'], default='qemu',
                        help="failover: SIGKILL the primary's QEMU, or its "
                        'instance (host) process')
    parser.add_argument('--iops-rounds', type=int, default=None,
                        help='rounds of the IOPS comparison (default 4, '
                             '2 with --quick)')
    parser.add_argument('--only', choices=['iops', 'pauses', 'failover'],
                        action='append', help='run only these parts (an '
                        'existing --out file keeps the other parts)')
    args = parser.parse_args()
    bench = Bench(args.quick)
    seconds = 10 if args.quick else 20
    results: dict = {'machine': platform.node(),
                     'accelerator': vm.probe_accelerator(),
                     'date': time.strftime('%Y-%m-%d %H:%M')}
    parts = set(args.only or ['iops', 'pauses', 'failover'])
    try:
        if 'iops' in parts:
            rounds = args.iops_rounds or (2 if args.quick else 4)
            iops(bench, seconds, rounds, results)
        if 'pauses' in parts:
            pauses(bench, results)
        if 'failover' in parts:
            failover(bench, args.failover_runs, results, args.kill)
    except BaseException:
        print(f'benchmark failed; its guests and logs are in {bench.tmp}')
        raise
    bench.close()
    if args.only and os.path.exists(args.out):
        # Only some parts were run: keep the others' last results.
        with open(args.out) as f:
            results = {**json.load(f), **results}
    with open(args.out, 'w') as f:
        json.dump(results, f, indent=1)
    print(f'results in {args.out}')
    return 0


def iops(bench: Bench, seconds: int, rounds: int, results: dict) -> None:
    """Rounds of unprotected, ours and the baselines, back to back.

    A sync write here costs a host fdatasync, whose latency drifts by 2x
    over minutes on these machines: a ratio is only fair between runs
    close in time, so each round gives its own ratios and the report
    takes their medians. The order rotates between rounds.
    """
    runs: dict[str, Callable[[int], float]] = {
        'unprotected': lambda r: bench.iops_unprotected(seconds, r),
        # ours: the default disk sync and epochs (iobench sends no
        # packets, so its epochs run to idle_epoch_ms)
        'async_replication': lambda r: bench.iops_protected(
            'async-replication', seconds, r),
        # ours with every epoch epoch_ms long (a guest that keeps talking)
        'async_replication_fixed_epochs': lambda r: bench.iops_protected(
            'async-replication', seconds, r, idle_epoch_ms=0),
        # every write waits for the replica (write-blocking mirror)
        'write_replication': lambda r: bench.iops_protected(
            'write-replication', seconds, r),
        # MFTVM 3: the epoch's blocks copied inside the pause
        'block_copy_baseline': lambda r: bench.iops_protected(
            'block-copy', seconds, r)}
    names = list(runs)
    print(f'== 4 KiB O_DSYNC write IOPS ({rounds} rounds of '
          f'{", ".join(names)}; {seconds} s each)')
    table: list[dict[str, float]] = []
    for r in range(rounds):
        row = {}
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            row[name] = runs[name](r)
        table.append(row)
        plain = row['unprotected']
        print(f'  round {r + 1}: unprotected {plain:.0f}' + ''.join(
            f'  {name} {row[name]:.0f} ({row[name] / plain:.2f}x)'
            for name in names[1:]), flush=True)

    def median(name: str) -> float:
        return round(statistics.median(row[name] for row in table), 1)

    def ratio(name: str) -> float:
        return round(statistics.median(
            row[name] / row['unprotected'] for row in table), 3)
    results['iops'] = {
        'seconds_per_run': seconds, 'rounds': table,
        **{name: median(name) for name in names},
        'ratio_ours': ratio('async_replication'),
        'ratio_ours_fixed_epochs': ratio('async_replication_fixed_epochs'),
        'ratio_write_blocking': ratio('write_replication'),
        'ratio_baseline': ratio('block_copy_baseline'),
        'ratio_colo_reference': COLO_IOPS_RATIO}
    r = results['iops']
    print(f'  median ratio: ours (async-replication) {r["ratio_ours"]:.2f}x'
          f' (fixed epochs {r["ratio_ours_fixed_epochs"]:.2f}x)'
          f'  write-blocking {r["ratio_write_blocking"]:.2f}x  block-copy '
          f'{r["ratio_baseline"]:.2f}x  COLO here {COLO_IOPS_RATIO}x')


def pauses(bench: Bench, results: dict) -> None:
    print('== pause per epoch')
    results['pauses'] = []
    for memory in (128, 512):
        for load in ('idle', 'writer'):
            for fixed in (False, True):
                r = bench.pauses(memory, load, fixed)
                results['pauses'].append(r)
                print(f'  {memory:4d} MiB {load:6s} {r["epochs"]:11s} p50 '
                      f'{r["pause_ms_p50"]} ms p99 {r["pause_ms_p99"]} ms '
                      f'({r["epochs_per_s"]} epochs/s)', flush=True)
    idle128 = results['pauses'][0]['pause_ms_p50']
    results['pause_ratio_vs_colo_first_checkpoint'] = round(
        idle128 / COLO_PAUSE_128_MS, 3)
    print(f'  128 MiB idle p50 / COLO first checkpoint '
          f'{COLO_PAUSE_128_MS} ms = {idle128 / COLO_PAUSE_128_MS:.2f}x')


def failover(bench: Bench, runs: int, results: dict, kill: str) -> None:
    print(f'== failover ({runs} runs, SIGKILL of the primary {kill})')
    key = 'failover' if kill == 'qemu' else f'failover_kill_{kill}'
    results[key] = bench.failover(runs, kill)
    for k, v in results[key].items():
        if not isinstance(v, dict):
            continue
        print(f'  {k:22s} median {v["median_ms"]} ms max {v["max_ms"]} ms')


if __name__ == '__main__':
    sys.exit(main())
