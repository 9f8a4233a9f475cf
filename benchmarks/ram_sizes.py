"""Pauses against RAM size: the hash tracker beside the scan, in one run.

For 128 MiB, 512 MiB, 1 GiB and 2 GiB guests (TCG), idle and with
guestd's dirty job writing a set share of RAM per second (``--dirty-pct``,
10 % by default, over a region of a quarter of RAM), each protected once
with ``scan`` (a shadow copy of RAM, both copies read in each pause) and
once with ``hash`` (keyed per-page hashes, RAM read once), back to back:

* pause per epoch p50/p99 (every epoch ``epoch_ms`` long: these guests
  send nothing, and idle epochs would give one sample a second), and
  its parts (device state, RAM delta);
* the pause's physical limit on this machine: the device-state save plus
  the bytes the tracker must read (scan: RAM twice; hash: RAM once; both:
  the dirty pages again, to copy them) divided by the memory bandwidth,
  which is measured in the same run (two threads reading 1 GiB, best of
  several, before and after the guests); the target is a p50 within
  1.5x of it;
* each tracker's collect() alone on a RAM file (no QEMU, 2 % of pages
  changed), and the hash tracker on one thread;
* the tracker's memory overhead: what it keeps beside RAM, as % of RAM
  (``state_bytes``), and the primary instance process's anonymous
  memory as measured.

``--smp N`` gives every guest N vCPUs (TCG runs a thread per vCPU):
the same pauses for guests that use several (a run each, e.g.
``--sizes 128 --smp 4 --out benchmarks/results-vcpus-4.json``).

Usage::

    .venv/bin/python benchmarks/ram_sizes.py [--quick] [--sizes 128,512]
        [--smp 1] [--out benchmarks/results-ram-sizes.json]
        [--plot benchmarks/ram_sizes.png]

Needs root and the packages ``tools/run.sh`` installs. The numbers are
from a noisy 2-core machine under TCG: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import mmap
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from mftvm_openstack.ft import trackers
from mftvm_openstack.images import builder, workload
from mftvm_openstack.instance import client
from mftvm_openstack.local import demo, operations

SIZES_MIB = (128, 512, 1024, 2048)
TRACKERS = ('scan', 'hash')
LOADS = ('idle', 'dirty')
#: the target: a pause p50 within this factor of its physical limit
LIMIT_FACTOR = 1.5


def p(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


def read_bandwidth(mib: int = 1024, threads: int = 2,
                   tries: int = 7) -> float:
    """Bytes per second two threads read from memory (best of ``tries``):
    a shared mapping of a /dev/shm file, as guest RAM is."""
    fd, path = tempfile.mkstemp(dir='/dev/shm', prefix='mftvm-bw-')
    try:
        os.ftruncate(fd, mib << 20)
        buf = mmap.mmap(fd, mib << 20)
    finally:
        os.close(fd)
        os.unlink(path)
    words = np.frombuffer(buf, np.uint64)
    words[:] = 1                        # fault every page in first
    parts = np.array_split(words, threads)
    best = float('inf')
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for _ in range(tries):
            t0 = time.perf_counter()
            list(pool.map(np.max, parts))   # numpy releases the GIL
            best = min(best, time.perf_counter() - t0)
    del words, parts
    buf.close()
    return (mib << 20) / best


def state_bytes(tracker: str, size: int) -> int:
    """What ``tracker`` keeps beside RAM for a guest of ``size`` bytes."""
    fd, path = tempfile.mkstemp(dir='/dev/shm', prefix='mftvm-st-')
    try:
        os.ftruncate(fd, size)
        t = trackers.tracker_class(tracker)(path, size, 0)
        t.start()
        n = t.state_bytes
        t.close()
        return n
    finally:
        os.close(fd)
        os.unlink(path)


def collect_alone(mib: int, rounds: int = 7,
                  dirty_pct: float = 2.0) -> dict[str, dict]:
    """Each tracker's collect() on a RAM file without QEMU, ``dirty_pct``
    of its pages changed before each (rounds alternate the trackers):
    ms min and p50, and the hash tracker on one thread as well."""
    size = mib << 20
    fd, path = tempfile.mkstemp(dir='/dev/shm', prefix='mftvm-ca-')
    try:
        os.ftruncate(fd, size)
        buf = mmap.mmap(fd, size)
    finally:
        os.close(fd)
    try:
        ram = np.frombuffer(buf, np.uint64).reshape(-1, 512)
        rng = np.random.default_rng(0)
        ram[:, 0] = rng.integers(1, 1 << 62, len(ram), dtype=np.uint64)
        made = {'scan': ('scan', 2), 'hash': ('hash', 2),
                'hash-1-thread': ('hash', 1)}
        ts: dict[str, list[float]] = {k: [] for k in made}
        live = {}
        for k, (name, threads) in made.items():
            live[k] = trackers.tracker_class(name)(path, size, 0,
                                                   threads=threads)
            live[k].start()
            live[k].collect()
        for r in range(rounds):
            pages = rng.choice(len(ram), int(len(ram) * dirty_pct / 100),
                               replace=False)
            ram[pages, 7] += np.uint64(1)
            order = list(made) if r % 2 == 0 else list(made)[::-1]
            for k in order:
                t0 = time.perf_counter()
                n = len(live[k].collect().indices)
                ts[k].append((time.perf_counter() - t0) * 1000)
                assert n == len(pages), (k, n, len(pages))
        for t in live.values():
            t.close()
        del ram
        return {k: {'ms_min': round(min(v), 1), 'ms_p50': p(v, 50)}
                for k, v in ts.items()}
    finally:
        buf.close()
        os.unlink(path)


def anon_bytes(pid: int) -> int:
    """The anonymous memory of a process (smaps_rollup), in bytes."""
    with open(f'/proc/{pid}/smaps_rollup') as f:
        for line in f:
            if line.startswith('Anonymous:'):
                return int(line.split()[1]) * 1024
    return 0


class Bench:
    def __init__(self, seconds: float, epoch_ms: int,
                 dirty_pct: float, smp: int = 1) -> None:
        self.seconds = seconds
        self.smp = smp
        self.epoch_ms = epoch_ms
        self.dirty_pct = dirty_pct
        self.image = builder.build_guest_image(demo.cache_dir())
        self.tmp = tempfile.mkdtemp(prefix='mftvm-ramsz-', dir='/var/tmp')
        self.state = os.path.join(self.tmp, 'state')

    def job(self, memory: int, load: str) -> str:
        if load == 'idle':
            return 'idle'
        region = memory // 4
        rate = memory * self.dirty_pct / 100
        return f'dirty:{region}:{rate:g}'

    def run(self, memory: int, load: str, tracker: str) -> dict:
        name = f'r{memory}{load[0]}{tracker}'
        disk = os.path.join(self.tmp, f'{name}.raw')
        with open(disk, 'wb') as f:
            f.truncate(64 << 20)
        spec = operations.make_spec(
            name, self.image.kernel, self.image.initrd, disk,
            append=f'console=ttyS0 quiet mftvm.run={self.job(memory, load)}',
            memory_mib=memory, smp=self.smp)
        gdir = operations.protect(
            spec, operations.ProtectOptions(
                epoch_ms=self.epoch_ms, idle_epoch_ms=0, tracker=tracker),
            self.state)
        try:
            serial = os.path.join(gdir, 'primary', 'serial.log')
            ready = 'DIRTY-READY' if load != 'idle' else 'MFTVM-GUEST-READY'
            deadline = time.monotonic() + 180
            while ready not in workload.read_text(serial):
                if time.monotonic() > deadline:
                    raise RuntimeError(f'guest in {gdir} did not boot')
                time.sleep(0.2)
            time.sleep(3)       # past the boot's and the job's first pass
            prim = client.read_status(gdir, 'primary') or {}
            start, mib0 = prim.get('epochs', 0), prim.get(
                'dirty_mib_total') or 0.0
            t0 = time.monotonic()
            time.sleep(self.seconds)
            elapsed = time.monotonic() - t0
            prim = client.read_status(gdir, 'primary') or {}
            st = operations.status(self.state, name)
            anon = anon_bytes(st.primary.host_pid)
            epochs = prim.get('epochs', 0) - start
            with open(os.path.join(gdir, 'primary', 'pauses.json')) as f:
                pauses = json.load(f)[-max(epochs, 1):]
            text = workload.read_text(serial)
        finally:
            operations.stop(self.state, name)
        if 'DIRTY-BAD' in text:
            raise RuntimeError(f'{name}: the guest found a stale page')
        parts = prim.get('pause_parts_ms_p50') or {}
        dirty_mib = ((prim.get('dirty_mib_total') or 0.0) - mib0) / max(
            epochs, 1)
        return {'guest_mib': memory, 'vcpus': self.smp, 'load': load,
                'tracker': tracker,
                'epochs': epochs,
                'epochs_per_s': round(epochs / elapsed, 2),
                'pause_ms_p50': p(pauses, 50),
                'pause_ms_p99': p(pauses, 99),
                'devstate_ms_p50': parts.get('devstate'),
                'ram_ms_p50': parts.get('ram'),
                'dirty_mib_per_epoch': round(dirty_mib, 2),
                'primary_anon_mib': round(anon / 2**20, 1)}

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def limit_ms(run: dict, bandwidth: float) -> float:
    """Device-state save + the bytes the tracker must read / bandwidth."""
    copies = 2 if run['tracker'] == 'scan' else 1
    read = (copies * run['guest_mib'] + run['dirty_mib_per_epoch']) * 2**20
    return round((run['devstate_ms_p50'] or 0) + read / bandwidth * 1000, 2)


def save(path: str, results: dict, runs: list[dict], bandwidth: float,
         partial: bool) -> None:
    """Each run beside its limit, into ``path`` (after every run too, so
    that a run cut short keeps what it measured)."""
    for r in runs:
        r['limit_ms'] = limit_ms(r, bandwidth)
        r['ratio_to_limit'] = round(r['pause_ms_p50'] / r['limit_ms'], 2)
        r['within_target'] = r['ratio_to_limit'] <= LIMIT_FACTOR
    results['runs'] = runs
    results['partial'] = partial
    with open(path, 'w') as f:
        json.dump(results, f, indent=1)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    loads = [load for load in LOADS
             if any(r['load'] == load for r in results['runs'])]
    fig, axes = plt.subplots(1, len(loads) + 1, figsize=(5 * len(loads) + 4,
                                                         4.2))
    for ax, load in zip(axes, loads):
        for tracker, colour in zip(TRACKERS, ('tab:red', 'tab:blue')):
            runs = sorted((r for r in results['runs'] if r['load'] == load
                           and r['tracker'] == tracker),
                          key=lambda r: r['guest_mib'])
            x = [r['guest_mib'] for r in runs]
            ax.plot(x, [r['pause_ms_p50'] for r in runs], 'o-',
                    color=colour, label=f'{tracker} p50')
            ax.plot(x, [r['pause_ms_p99'] for r in runs], 'x:',
                    color=colour, label=f'{tracker} p99')
            ax.plot(x, [r['limit_ms'] for r in runs], '--', color=colour,
                    alpha=0.5, label=f'{tracker} limit')
        ax.set_xscale('log', base=2)
        ax.set_xticks(list(SIZES_MIB), [str(s) for s in SIZES_MIB])
        ax.set_xlabel('guest RAM (MiB)')
        ax.set_ylabel('pause per epoch (ms)')
        ax.set_title(f'{load} guest, {results["epoch_ms"]} ms epochs')
        ax.legend(fontsize=8)
    ax = axes[-1]
    for i, tracker in enumerate(TRACKERS):
        pct = results['tracker_state_pct'][tracker]
        ax.bar([i], [pct], color=('tab:red', 'tab:blue')[i])
        ax.text(i, pct, f'{pct:g} %', ha='center', va='bottom')
    ax.set_xticks(range(len(TRACKERS)), TRACKERS)
    ax.set_yscale('log')
    ax.set_ylabel('memory kept beside RAM (% of RAM)')
    ax.axhline(2, color='grey', linewidth=0.8)
    ax.set_title('tracker overhead (target 2 %)')
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--sizes', default=','.join(map(str, SIZES_MIB)),
                        help='guest RAM sizes in MiB, comma-separated')
    parser.add_argument('--seconds', type=float, default=None,
                        help='measured seconds per run (12; 8 with '
                             '--quick)')
    parser.add_argument('--epoch-ms', type=int, default=200)
    parser.add_argument('--dirty-pct', type=float, default=10.0,
                        help='share of RAM the dirty job writes per second')
    parser.add_argument('--smp', type=int, default=1,
                        help='vCPUs of every guest')
    parser.add_argument('--out', default='benchmarks/results-ram-sizes.json')
    parser.add_argument('--plot', default='benchmarks/ram_sizes.png')
    args = parser.parse_args()
    if os.geteuid() != 0:
        print('needs root (QEMU, /dev/shm)', file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(',')]
    seconds = args.seconds or (8 if args.quick else 12)
    results: dict[str, Any] = {
        'host': platform.node(), 'when': time.strftime('%Y-%m-%d %H:%M'),
        'load_before': os.getloadavg(), 'vcpus': args.smp,
        'epoch_ms': args.epoch_ms, 'dirty_pct_per_s': args.dirty_pct,
        'limit_factor_target': LIMIT_FACTOR}
    bw = [read_bandwidth()]
    print(f'== memory read bandwidth (2 threads): {bw[0] / 1e9:.1f} GB/s')
    results['tracker_state_pct'] = {
        t: round(state_bytes(t, 256 << 20) / (256 << 20) * 100, 2)
        for t in TRACKERS}
    print('== tracker memory kept beside RAM: ' + ', '.join(
        f'{t} {v} %' for t, v in results['tracker_state_pct'].items()))
    print('== collect() alone on a RAM file, 2 % of pages changed '
          '(ms min / p50)')
    results['collect_alone'] = {}
    for memory in sizes:
        c = results['collect_alone'][str(memory)] = collect_alone(memory)
        print(f'  {memory:5d} MiB ' + '  '.join(
            f'{k} {v["ms_min"]}/{v["ms_p50"]}' for k, v in c.items()),
            flush=True)
    bench = Bench(seconds, args.epoch_ms, args.dirty_pct, args.smp)
    runs = []
    print(f'== pauses ({seconds:g} s per run, {args.epoch_ms} ms epochs, '
          f'{args.smp} vCPU{"s" if args.smp > 1 else ""}; '
          f'dirty: {args.dirty_pct:g} % of RAM per second)')
    try:
        for i, memory in enumerate(sizes):
            for load in LOADS:
                # alternate the order: the machine drifts
                order = TRACKERS if (i + len(runs) // 2) % 2 == 0 \
                    else TRACKERS[::-1]
                for tracker in order:
                    r = bench.run(memory, load, tracker)
                    runs.append(r)
                    save(args.out, results, runs, max(bw), partial=True)
                    print(f'  {memory:5d} MiB {load:5s} {tracker:4s} p50 '
                          f'{r["pause_ms_p50"]:7.1f} ms p99 '
                          f'{r["pause_ms_p99"]:7.1f} ms (device state '
                          f'{r["devstate_ms_p50"]} ms, RAM '
                          f'{r["ram_ms_p50"]} ms, '
                          f'{r["dirty_mib_per_epoch"]} MiB/epoch, '
                          f'instance anon {r["primary_anon_mib"]} MiB)',
                          flush=True)
    except BaseException:
        print(f'benchmark failed; its guests and logs are in {bench.tmp}')
        raise
    bench.close()
    bw.append(read_bandwidth())
    bandwidth = max(bw)
    results['bandwidth_gb_s'] = [round(b / 1e9, 2) for b in bw]
    print(f'== memory read bandwidth after: {bw[1] / 1e9:.1f} GB/s; '
          f'the limit uses the best, {bandwidth / 1e9:.1f} GB/s')
    results['load_after'] = os.getloadavg()
    save(args.out, results, runs, bandwidth, partial=False)
    results['hash_to_scan_p50'] = {}
    print(f'== p50 / limit (target <= {LIMIT_FACTOR}), hash / scan')
    for memory in sizes:
        for load in LOADS:
            pair = {r['tracker']: r for r in runs
                    if r['guest_mib'] == memory and r['load'] == load}
            ratio = round(pair['hash']['pause_ms_p50']
                          / pair['scan']['pause_ms_p50'], 2)
            results['hash_to_scan_p50'][f'{memory}-{load}'] = ratio
            print(f'  {memory:5d} MiB {load:5s} ' + '  '.join(
                f'{t} {pair[t]["pause_ms_p50"]:.1f}/{pair[t]["limit_ms"]:.1f}'
                f' = {pair[t]["ratio_to_limit"]:.2f}x' for t in TRACKERS)
                + f'  hash/scan {ratio:.2f}x')
    save(args.out, results, runs, bandwidth, partial=False)
    plot(results, args.plot)
    print(f'results in {args.out}, plot in {args.plot}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
