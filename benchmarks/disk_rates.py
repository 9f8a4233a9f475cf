"""The thesis' result: pause per epoch against the guest's disk write
rate, write replication beside copying the dirty blocks in each pause,
in one run.

The claim: replicating the guest's disk writes while the epoch runs
keeps the checkpoint short whatever the guest writes, where copying the
epoch's dirty blocks inside the pause (MFTVM 3's way) makes the pause
grow with the write rate. Each disk mode is the engine's own
(``--disk-sync``):

* **write-replication**: a write-blocking mirror, each guest write done
  once it is on both disks; the pause waits for no disk work;
* **async-replication** (ours, the default): the mirror copies in the
  background, and the pause drains what is still on its way;
* **block-copy**: the baseline, a dirty bitmap and an incremental
  ``blockdev-backup`` of the epoch's dirty blocks inside the pause.

The guest (128 MiB, TCG) runs guestd's ``diskrate`` job from boot:
``RATE`` MiB/s of ``--kib`` KiB direct writes at random offsets of a
256 MiB area, paced in 10 ms steps (rate 0: no job). It boots
unprotected and writes for ``--start-delay`` seconds, so that every
protected epoch has the guest at its rate. Epochs are fixed
(``--epoch-ms``; the guest sends nothing). For each mode and rate:

* pause per epoch p50/p99 (the primary's per-epoch record, over the
  measured seconds) and its disk part (``pause_parts_ms_p50.disk_mark``:
  the disk's work in the pause, its sync's checkpoint then the MARK, over
  every protected epoch; the device-state save waits for the sync's
  checkpoint and runs beside the MARK, the RAM delta beside both, so the
  pause is at least the disk part);
* the write rate the guest reached, timed with the host's clock from
  the totals it prints (a guest's clock stands still while a checkpoint
  has it stopped).

Then the guest's write rate against the epoch length (``--sweep-epochs``
at ``--sweep-rate`` MiB/s, asked for more than the modes may give).

Usage::

    .venv/bin/python benchmarks/disk_rates.py [--quick] \\
        [--rates 0,1,4,16,64] [--kib 16] \\
        [--out benchmarks/results-disk-rates.json] \\
        [--plot benchmarks/disk_rates.png]

Needs root and the packages ``tools/run.sh`` installs. The numbers are
from a noisy 2-core machine under TCG: compare ratios, not absolutes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from mftvm_openstack.images import builder, workload
from mftvm_openstack.instance import client
from mftvm_openstack.local import demo, operations

MODES = ('write-replication', 'async-replication', 'block-copy')
#: what the ratios compare: the baseline against ours
BASELINE, OURS = 'block-copy', 'write-replication'
RATES_MIB_S = (0, 1, 4, 16, 64)
SWEEP_EPOCHS_MS = (50, 100, 200, 400)
#: the diskrate area is [576 MiB, 832 MiB) of the guest's disk
DISK_MIB = 896
_TOTAL = re.compile(r'^DISKRATE (\d+)\r?$', re.MULTILINE)


def p(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


def written(serial: str) -> int:
    """The bytes the guest's diskrate job says it wrote so far."""
    totals = _TOTAL.findall(workload.read_text(serial))
    return int(totals[-1]) if totals else 0


def timed_total(serial: str, timeout: float = 5.0) -> tuple[float, int]:
    """(host time, total) as the guest prints a new total: the host's
    clock, within a poll of when it was written."""
    last = written(serial)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = written(serial)
        if now != last:
            return time.monotonic(), now
        time.sleep(0.01)
    return time.monotonic(), last


class Bench:
    def __init__(self, seconds: float, kib: int, start_delay: float) -> None:
        self.seconds = seconds
        self.kib = kib
        self.start_delay = start_delay
        self.image = builder.build_guest_image(demo.cache_dir())
        self.tmp = tempfile.mkdtemp(prefix='mftvm-dskrt-', dir='/var/tmp')
        self.state = os.path.join(self.tmp, 'state')
        self.count = 0

    def run(self, mode: str, rate: float, epoch_ms: int) -> dict[str, Any]:
        self.count += 1
        name = f'd{self.count}'
        disk = os.path.join(self.tmp, f'{name}.raw')
        with open(disk, 'wb') as f:
            f.truncate(DISK_MIB << 20)
        job = f'diskrate:{rate:g}:{self.kib}' if rate > 0 else 'idle'
        spec = operations.make_spec(
            name, self.image.kernel, self.image.initrd, disk,
            append=f'console=ttyS0 quiet mftvm.run={job}')
        gdir = operations.protect(
            spec, operations.ProtectOptions(
                epoch_ms=epoch_ms, idle_epoch_ms=0, disk_sync=mode,
                start_delay=self.start_delay), self.state)
        try:
            serial = os.path.join(gdir, 'primary', 'serial.log')
            # Was the job writing before the first epoch? (else the disk
            # part's p50, over every epoch, holds some of its boot)
            ready = ('DISKRATE-START' if rate > 0 else
                     'MFTVM-GUEST-READY') in workload.read_text(serial)
            time.sleep(2)       # past the first epochs after the sync
            prim = client.read_status(gdir, 'primary') or {}
            start = prim.get('epochs', 0)
            t0, w0 = timed_total(serial) if rate > 0 else (
                time.monotonic(), 0)
            time.sleep(self.seconds)
            t1, w1 = timed_total(serial) if rate > 0 else (
                time.monotonic(), 0)
            prim = client.read_status(gdir, 'primary') or {}
            epochs = prim.get('epochs', 0) - start
            with open(os.path.join(gdir, 'primary', 'pauses.json')) as f:
                pauses = json.load(f)[-max(epochs, 1):]
        finally:
            operations.stop(self.state, name)
            os.unlink(disk)
        if prim.get('state') != 'protected':
            raise operations.UserError(
                f'{name} ended {prim.get("state")}: {prim.get("reason")} '
                f'{prim.get("error")}')
        parts = prim.get('pause_parts_ms_p50') or {}
        return {'mode': mode, 'rate_mib_s': rate, 'epoch_ms': epoch_ms,
                'epochs': epochs,
                'epochs_per_s': round(epochs / (t1 - t0), 2),
                'pause_ms_p50': p(pauses, 50),
                'pause_ms_p99': p(pauses, 99),
                'disk_ms_p50': parts.get('disk_mark'),
                'devstate_ms_p50': parts.get('devstate'),
                'ram_ms_p50': parts.get('ram'),
                'written_mib_s': round((w1 - w0) / 2**20 / (t1 - t0), 2),
                'job_ran_before_protection': ready}

    def attempt(self, mode: str, rate: float,
                epoch_ms: int) -> dict[str, Any]:
        """:meth:`run`, or what made protection fail (recorded: a mode
        that cannot hold a rate is a result too)."""
        try:
            return self.run(mode, rate, epoch_ms)
        except operations.UserError as exc:
            # (the primary's own word on it, if it said one)
            name = f'd{self.count}'
            prim = client.read_status(operations.guest_dir(
                self.state, name), 'primary') or {}
            # (a protection that failed leaves its RAM files behind)
            with contextlib.suppress(operations.UserError):
                operations.stop(self.state, name)
            return {'mode': mode, 'rate_mib_s': rate, 'epoch_ms': epoch_ms,
                    'failed': str(exc)[-300:],
                    'primary_reason': prim.get('reason') or prim.get(
                        'error')}

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def ratios(runs: list[dict]) -> dict[str, dict[str, Any]]:
    """Per rate: the baseline's pause and disk part over ours."""
    out = {}
    done = [r for r in runs if not r.get('failed')]
    for rate in sorted({r['rate_mib_s'] for r in done
                        if r.get('sweep') is None}):
        pair = {r['mode']: r for r in done if r['rate_mib_s'] == rate
                and r.get('sweep') is None}
        if BASELINE not in pair or OURS not in pair:
            continue
        b, o = pair[BASELINE], pair[OURS]
        out[f'{rate:g}'] = {
            'pause_p50': round(b['pause_ms_p50'] / o['pause_ms_p50'], 2),
            'disk_part_p50_ms': [b['disk_ms_p50'], o['disk_ms_p50']],
            'written_mib_s': [b['written_mib_s'], o['written_mib_s']]}
    return out


def save(path: str, results: dict, runs: list[dict], partial: bool) -> None:
    results['runs'] = runs
    results['baseline_over_ours'] = ratios(runs)
    results['partial'] = partial
    with open(path, 'w') as f:
        json.dump(results, f, indent=1)


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    colours = {'write-replication': 'tab:blue',
               'async-replication': 'tab:green', 'block-copy': 'tab:red'}
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4.4))
    for mode, colour in colours.items():
        runs = sorted((r for r in results['runs'] if r['mode'] == mode
                       and r.get('sweep') is None and not r.get('failed')),
                      key=lambda r: r['rate_mib_s'])
        if not runs:
            continue
        x = [r['rate_mib_s'] for r in runs]
        ax.plot(x, [r['pause_ms_p50'] for r in runs], 'o-', color=colour,
                label=f'{mode}: pause p50')
        ax.plot(x, [r['disk_ms_p50'] or 0 for r in runs], 's--',
                color=colour, alpha=0.6, label=f'{mode}: its disk part')
        sweep = sorted((r for r in results['runs'] if r['mode'] == mode
                        and r.get('sweep') and not r.get('failed')),
                       key=lambda r: r['epoch_ms'])
        if sweep:
            ax2.plot([r['epoch_ms'] for r in sweep],
                     [r['written_mib_s'] for r in sweep], 'o-',
                     color=colour, label=mode)
    ax.set_xscale('symlog', linthresh=1)
    ax.set_xlabel('guest disk write rate asked (MiB/s, '
                  f'{results["kib"]} KiB writes; reached: see the JSON)')
    ax.set_ylabel('pause per epoch (ms)')
    ax.set_title(f'pause against write rate, {results["epoch_ms"]} ms '
                 'epochs')
    ax.legend(fontsize=7)
    ax2.set_xlabel('epoch length (ms)')
    ax2.set_ylabel('guest write rate reached (MiB/s)')
    ax2.set_title(f'guest writes against epoch length (asks '
                  f'{results["sweep_rate_mib_s"]:g} MiB/s)')
    if ax2.lines:
        ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--quick', action='store_true',
                        help='shorter runs, no epoch sweep')
    parser.add_argument('--rates', default=','.join(map(str, RATES_MIB_S)),
                        help='MiB/s the guest writes, comma-separated')
    parser.add_argument('--kib', type=int, default=16,
                        help='size of each guest write (4-64 KiB)')
    parser.add_argument('--seconds', type=float, default=None,
                        help='measured seconds per run (10; 6 with '
                             '--quick)')
    parser.add_argument('--epoch-ms', type=int, default=200)
    parser.add_argument('--start-delay', type=float, default=15.0,
                        help='seconds the guest writes before protection')
    parser.add_argument('--sweep-epochs',
                        default=','.join(map(str, SWEEP_EPOCHS_MS)))
    parser.add_argument('--sweep-rate', type=float, default=64.0)
    parser.add_argument('--out', default='benchmarks/results-disk-rates.json')
    parser.add_argument('--plot', default='benchmarks/disk_rates.png')
    args = parser.parse_args()
    if os.geteuid() != 0:
        print('needs root (QEMU, /dev/shm)', file=sys.stderr)
        return 2
    if not 4 <= args.kib <= 64 or args.kib % 4:
        print('--kib: 4 to 64, a multiple of 4', file=sys.stderr)
        return 2
    rates = [float(s) for s in args.rates.split(',')]
    sweep = [] if args.quick else [int(s) for s in
                                   args.sweep_epochs.split(',') if s]
    seconds = args.seconds or (6 if args.quick else 10)
    results: dict[str, Any] = {
        'host': platform.node(), 'when': time.strftime('%Y-%m-%d %H:%M'),
        'load_before': os.getloadavg(), 'epoch_ms': args.epoch_ms,
        'kib': args.kib, 'seconds': seconds,
        'sweep_rate_mib_s': args.sweep_rate}
    bench = Bench(seconds, args.kib, args.start_delay)
    runs: list[dict] = []
    print(f'== pause against write rate ({seconds:g} s per run, '
          f'{args.epoch_ms} ms epochs, {args.kib} KiB writes)')
    try:
        for i, rate in enumerate(rates):
            # rotate the order: the machine drifts
            order = MODES[i % 3:] + MODES[:i % 3]
            for mode in order:
                r = bench.attempt(mode, rate, args.epoch_ms)
                runs.append(r)
                save(args.out, results, runs, partial=True)
                if r.get('failed'):
                    print(f'  {rate:5g} MiB/s asked  {mode:17s} FAILED: '
                          f'{r["primary_reason"] or r["failed"]}',
                          flush=True)
                    continue
                print(f'  {rate:5g} MiB/s asked, {r["written_mib_s"]:6.2f} '
                      f'reached  {mode:17s} pause p50 '
                      f'{r["pause_ms_p50"]:7.1f} p99 {r["pause_ms_p99"]:7.1f}'
                      f' ms, disk part {r["disk_ms_p50"]} ms '
                      f'({r["epochs_per_s"]} epochs/s)', flush=True)
        if sweep:
            print(f'== guest writes against epoch length (asks '
                  f'{args.sweep_rate:g} MiB/s)')
        for epoch_ms in sweep:
            for mode in MODES:
                r = bench.attempt(mode, args.sweep_rate, epoch_ms)
                r['sweep'] = True
                runs.append(r)
                save(args.out, results, runs, partial=True)
                if r.get('failed'):
                    print(f'  {epoch_ms:4d} ms epochs {mode:17s} FAILED: '
                          f'{r["failed"]}', flush=True)
                    continue
                print(f'  {epoch_ms:4d} ms epochs {mode:17s} '
                      f'{r["written_mib_s"]:6.2f} MiB/s, pause p50 '
                      f'{r["pause_ms_p50"]:7.1f} ms', flush=True)
    except BaseException:
        print(f'benchmark failed; its guests and logs are in {bench.tmp}')
        raise
    bench.close()
    results['load_after'] = os.getloadavg()
    save(args.out, results, runs, partial=False)
    print(f'== {BASELINE} over {OURS}, per rate asked: pause p50 ratio; '
          f'disk part ms ({BASELINE} / {OURS})')
    for rate, q in results['baseline_over_ours'].items():
        print(f'  {rate:>4s} MiB/s  {q["pause_p50"]:5.2f}x   disk part '
              f'{q["disk_part_p50_ms"][0]} / {q["disk_part_p50_ms"][1]} ms'
              f'   reached {q["written_mib_s"][0]} / '
              f'{q["written_mib_s"][1]} MiB/s')
    plot(results, args.plot)
    print(f'results in {args.out}, plot in {args.plot}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
