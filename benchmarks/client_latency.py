"""What a client of a protected guest feels: request latency and
throughput against the guest's counter service, unprotected and
protected, side by side in one run, as ratios.

Each client asks again as soon as it has its answer (closed loop), 1, 4
and 16 clients at once, in two modes: a new connection per request (as
a web client does; the guest's ``counter`` service) and one persistent
connection per client (its ``session`` service: an answer per line).
Both services persist each count to the guest's disk before answering.
Variants:

* **unprotected**: the same guest in a plain QEMU;
* **ours**: protected with the defaults (adaptive epochs: an epoch ends
  ``output_batch_ms`` after the guest's first packet in it, or once the
  guest's QEMU is quiet if it is still busy then, up to a pause later);
* **ours, shortest**: adaptive epochs cut as short as they go
  (``output_batch_ms=0``, ``min_epoch_ms=1``, ``max_pause_percent=100``);
* **fixed 200 ms**: epochs of ``epoch_ms`` while the guest talks, as
  before adaptive epochs (``adaptive_epochs=False``);
* **fixed 20 ms**: the shortest fixed epoch (Remus runs 25 ms epochs).

A held packet waits for its epoch's commit: the checkpoint's pause, then
shipping it, then the secondary's ACK. A request on a new connection
waits for two commits (the SYN-ACK's, then the answer's), so the
latency protection adds is at best 2 × (pause + ship + ack); on a
persistent connection, one commit. The primary's status gives the three
(p50), and the report sets the added latency beside them, with the
epochs taken per request and the machine's load average as each level
began.

Usage::

    .venv/bin/python benchmarks/client_latency.py [--seconds 10] \\
        [--out benchmarks/results-latency.json] \\
        [--plot benchmarks/client_latency.png]

Needs root and the packages ``tools/run.sh`` installs. The numbers are
from a noisy 2-core machine under TCG (the clients share it with both
QEMUs): compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from mftvm_openstack.ft import vm
from mftvm_openstack.ft.monitor import QMPMonitor
from mftvm_openstack.images import builder, workload
from mftvm_openstack.instance import client
from mftvm_openstack.local import demo, operations

CLIENTS = (1, 4, 16)
#: how clients connect: a new connection per request, or one per client
MODES = ('new', 'persistent')
#: name → ProtectOptions (None: unprotected)
VARIANTS: dict[str, dict[str, Any] | None] = {
    'unprotected': None,
    'ours': {},
    'ours-shortest': {'output_batch_ms': 0, 'min_epoch_ms': 1,
                      'max_pause_percent': 100},
    'fixed-200ms': {'adaptive_epochs': False, 'epoch_ms': 200},
    'fixed-20ms': {'adaptive_epochs': False, 'epoch_ms': 20,
                   'idle_epoch_ms': 0},
}
#: what the targets compare against
TARGET_ADDED_VS_COMMIT = 2.0     # added p50 ≤ 2 × (pause + ship + ack)
TARGET_THROUGHPUT_16 = 0.5       # ≥ 0.5 × unprotected at 16 clients


def pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def session(port: int, end: float, answered: Callable[[float | None],
                                                      None]) -> None:
    """One client on one connection: a line, its answer, again."""
    while time.monotonic() < end:
        try:
            with socket.create_connection(('127.0.0.1', port), 5) as s:
                s.settimeout(5)
                reader = s.makefile('rb')
                while time.monotonic() < end:
                    t0 = time.monotonic()
                    s.sendall(b'INC\n')
                    line = reader.readline()
                    if not line.strip().isdigit():
                        raise OSError('no answer')
                    answered((time.monotonic() - t0) * 1000)
        except OSError:
            answered(None)


def load(port: int, clients: int, seconds: float, mode: str) -> dict:
    """``clients`` closed-loop clients for ``seconds``: latency (ms) and
    answers per second."""
    lat: list[float] = []
    failed = [0]
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def answered(ms: float | None) -> None:
        with lock:
            if ms is None:
                failed[0] += 1
            else:
                lat.append(ms)

    def one() -> None:
        if mode == 'persistent':
            session(port, end, answered)
            return
        while time.monotonic() < end:
            t0 = time.monotonic()
            got = workload.counter_request('127.0.0.1', port, 5)
            answered(None if got is None
                     else (time.monotonic() - t0) * 1000)
    threads = [threading.Thread(target=one) for _ in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t0
    return {'mode': mode, 'clients': clients, 'requests': len(lat),
            'failed': failed[0],
            'latency_ms_p50': pct(lat, 50), 'latency_ms_p99': pct(lat, 99),
            'throughput_rps': round(len(lat) / elapsed, 1),
            'elapsed_s': round(elapsed, 2)}


class Bench:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.image = builder.build_guest_image(demo.cache_dir())
        self.tmp = tempfile.mkdtemp(prefix='mftvm-lat-', dir='/var/tmp')
        self.state = os.path.join(self.tmp, 'state')

    def spec(self, name: str, ports: tuple[int, int]) -> vm.GuestSpec:
        disk = os.path.join(self.tmp, f'{name}.raw')
        with open(disk, 'wb') as f:
            f.truncate(64 << 20)
        return operations.make_spec(
            name, self.image.kernel, self.image.initrd, disk,
            append='console=ttyS0 quiet mftvm.run=counter,session',
            memory_mib=128,
            nic=f'user,hostfwd=tcp:127.0.0.1:{ports[0]}-:7000,'
                f'hostfwd=tcp:127.0.0.1:{ports[1]}-:7001')

    @staticmethod
    def wait_counter(serial: str) -> None:
        deadline = time.monotonic() + 120
        while not all(ready in workload.read_text(serial)
                      for ready in ('COUNTER-READY', 'SESSION-READY')):
            if time.monotonic() > deadline:
                raise RuntimeError(f'{serial}: the counter never listened')
            time.sleep(0.2)

    def levels(self, ports: tuple[int, int],
               gdir: str | None = None) -> list[dict]:
        # one request first: the first connection also pays for ARP
        workload.counter_request('127.0.0.1', ports[0], 10)
        rows = []
        for mode, port in zip(MODES, ports):
            for clients in CLIENTS:
                rows.append(self.level(mode, port, clients, gdir))
        return rows

    def level(self, mode: str, port: int, clients: int,
              gdir: str | None) -> dict:
        before = primary_status(gdir) if gdir else {}
        # (the machine's load as the level starts: other jobs share it)
        load_avg = round(os.getloadavg()[0], 2)
        row = load(port, clients, self.seconds, mode)
        row['load_avg_1m'] = load_avg
        if gdir:
            row.update(commit_parts(gdir, before, row['elapsed_s']))
            # (a request on a new connection needs two commits at least)
            row['epochs_per_request'] = round(
                row['epochs_per_s'] * row['elapsed_s']
                / max(row['requests'], 1), 2)
        print(f'    {mode:10s} {clients:2d} clients: p50 '
              f'{row["latency_ms_p50"]} ms, p99 {row["latency_ms_p99"]} ms, '
              f'{row["throughput_rps"]} req/s, load {load_avg}'
              + (f'; {row["epochs_per_request"]} epochs/request, pause '
                 f'{row["pause_ms_p50"]} ship {row["ship_ms_p50"]} '
                 f'ack {row["ack_ms_p50"]} ms, {row["epochs_per_s"]} '
                 f'epochs/s, {row["paused_percent"]} % paused'
                 if gdir else ''))
        return row

    def unprotected(self) -> list[dict]:
        return asyncio.run(self._unprotected())

    async def _unprotected(self) -> list[dict]:
        ports = (demo.free_port(), demo.free_port())
        spec = self.spec('plain', ports)
        paths = vm.Paths(os.path.join(self.tmp, 'plain'))
        os.makedirs(paths.root, exist_ok=True)
        ram = vm.ram_path(spec.name, 'bench')
        with open(ram, 'wb') as f:
            f.truncate(spec.memory_bytes)
        proc = await vm.ChildProcess.start(vm.qemu_argv(spec, paths, ram),
                                           paths.log)
        try:
            mon = await QMPMonitor.connect(paths.qmp)
            await asyncio.to_thread(self.wait_counter, paths.serial)
            rows = await asyncio.to_thread(self.levels, ports)
            await mon.close()
            return rows
        finally:
            await proc.kill()
            os.unlink(ram)

    def protected(self, name: str, options: dict[str, Any]) -> list[dict]:
        ports = (demo.free_port(), demo.free_port())
        with self.guest(name, ports, options) as gdir:
            return self.levels(ports, gdir)

    @contextmanager
    def guest(self, name: str, ports: tuple[int, int],
              options: dict[str, Any]) -> Iterator[str]:
        gdir = operations.protect(self.spec(name, ports),
                                  operations.ProtectOptions(**options),
                                  self.state)
        try:
            self.wait_counter(os.path.join(gdir, 'primary', 'serial.log'))
            time.sleep(1)
            yield gdir
        finally:
            operations.stop(self.state, name)


def primary_status(gdir: str) -> dict:
    return client.read_status(gdir, 'primary') or {}


def commit_parts(gdir: str, before: dict, seconds: float) -> dict:
    """What a commit cost over one level: the pause p50 of its own
    epochs (from the primary's per-epoch record), ship and ack p50 (the
    status's, over the guest's protection so far: the levels run from 1
    client up, so the 1-client figures are that level's own), epochs
    per second, the share of time paused."""
    after = primary_status(gdir)
    with open(os.path.join(gdir, 'primary', 'pauses.json')) as f:
        pauses = json.load(f)[before.get('epochs', 0):]
    return {'epochs_per_s': round(len(pauses) / seconds, 1),
            'paused_percent': round(sum(pauses) / seconds / 10, 1),
            'pause_ms_p50': pct(pauses, 50),
            'ship_ms_p50': after.get('ship_ms_p50'),
            'ack_ms_p50': after.get('ack_ms_p50')}


def summarize(results: dict) -> dict:
    plain = {(r['mode'], r['clients']): r for r in results['unprotected']}
    out: dict[str, Any] = {}
    for variant, rows in results.items():
        if variant == 'unprotected' or not isinstance(rows, list):
            continue
        per: dict[str, Any] = {}
        for r in rows:
            base = plain[r['mode'], r['clients']]
            added = r['latency_ms_p50'] - base['latency_ms_p50']
            commit = sum(r[k] or 0 for k in ('pause_ms_p50', 'ship_ms_p50',
                                              'ack_ms_p50'))
            per[f'{r["mode"]}/{r["clients"]}'] = {
                'added_latency_ms_p50': round(added, 2),
                'commit_ms_p50': round(commit, 2),
                'added_over_commit': round(added / commit, 2)
                if commit else None,
                'latency_ratio_p50': round(r['latency_ms_p50']
                                           / base['latency_ms_p50'], 2),
                'throughput_ratio': round(r['throughput_rps']
                                          / base['throughput_rps'], 2)}
        out[variant] = per
    ours = out.get('ours', {})
    one, sixteen = ours.get('new/1', {}), ours.get('new/16', {})
    out['targets'] = {
        'added_p50_at_1_client_over_commit': one.get('added_over_commit'),
        'added_p50_at_1_client_met': (
            one.get('added_over_commit') is not None
            and one['added_over_commit'] <= TARGET_ADDED_VS_COMMIT),
        'throughput_at_16_clients_ratio': sixteen.get('throughput_ratio'),
        'throughput_at_16_clients_met': (
            sixteen.get('throughput_ratio') is not None
            and sixteen['throughput_ratio'] >= TARGET_THROUGHPUT_16)}
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    variants = [v for v in VARIANTS if v in results]
    x = np.arange(len(CLIENTS))
    width = 0.8 / len(variants)
    for (ax1, ax2), mode in zip(axes, MODES):
        for i, v in enumerate(variants):
            rows = [r for r in results[v] if r['mode'] == mode]
            p50 = [r['latency_ms_p50'] for r in rows]
            p99 = [r['latency_ms_p99'] for r in rows]
            bars = ax1.bar(x + i * width, p50, width, label=v)
            ax1.scatter(x + i * width, p99, marker='_', s=120,
                        color=bars[0].get_facecolor())
            ax2.bar(x + i * width, [r['throughput_rps'] for r in rows],
                    width, label=v)
        for ax in (ax1, ax2):
            ax.set_xticks(x + 0.4 - width / 2,
                          [f'{c} clients' for c in CLIENTS])
        what = ('new connection per request' if mode == 'new'
                else 'persistent connection')
        ax1.set_yscale('log')
        ax1.set_ylabel('request latency, ms (bar p50, tick p99)')
        ax1.set_title(f'{what}, closed loop')
        ax1.legend(fontsize=8)
        ax2.set_ylabel('requests per second')
        ax2.set_title(f'throughput, {what} (128 MiB guest)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--seconds', type=float, default=8,
                        help='seconds per client count and variant')
    parser.add_argument('--only', action='append', choices=list(VARIANTS),
                        help='run only these variants (unprotected always '
                             'runs: it is what the others are set against)')
    parser.add_argument('--out', default='benchmarks/results-latency.json')
    parser.add_argument('--plot', default='benchmarks/client_latency.png')
    args = parser.parse_args()
    if os.geteuid() != 0:
        print('needs root (QEMU, /dev/shm, ports)', file=sys.stderr)
        return 2
    bench = Bench(args.seconds)
    results: dict[str, Any] = {'host': platform.node(), 'when': time.time(),
                               'seconds': args.seconds,
                               'accelerator': vm.probe_accelerator()}
    chosen = [v for v in VARIANTS
              if v == 'unprotected' or not args.only or v in args.only]
    try:
        for variant in chosen:
            options = VARIANTS[variant]
            print(f'== {variant}')
            if options is None:
                results[variant] = bench.unprotected()
            else:
                results[variant] = bench.protected(
                    variant.replace('-', ''), options)
    except BaseException:
        print(f'benchmark failed; its guests and logs are in {bench.tmp}')
        raise
    shutil.rmtree(bench.tmp, ignore_errors=True)
    results['summary'] = summarize(results)
    for variant, per in results['summary'].items():
        if variant == 'targets':
            continue
        print(f'{variant}: ' + '; '.join(
            f'{c} clients: +{s["added_latency_ms_p50"]} ms p50 '
            f'({s["added_over_commit"]}x pause+ship+ack '
            f'{s["commit_ms_p50"]} ms), latency {s["latency_ratio_p50"]}x, '
            f'throughput {s["throughput_ratio"]}x'
            for c, s in per.items()))
    print(f'targets: {results["summary"]["targets"]}')
    with open(args.out, 'w') as f:
        json.dump(results, f, indent=1)
    plot(results, args.plot)
    print(f'results in {args.out}, plot in {args.plot}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
