"""What mutual TLS on a pair costs per epoch: with it and without, in one
run, side by side, as ratios.

* **Stream**: the data stream alone (no QEMU): checkpoint frames of a
  typical delta over a unix socket, plain and TLS 1.3 with the pair's
  credentials, each acknowledged as the secondary does: ms per epoch and
  MB/s.
* **Guest**: a protected guest (disk writer + counter, fixed epochs,
  the checkpoint stream and the NBD replica over TCP on 127.0.0.1, as
  between two hosts), with ``[replication] tls`` on and off in
  alternating rounds: pause per epoch (p50/p99), epochs per second, the
  counter's round trip (a reply waits for its epoch's ACK, so it carries
  the stream's cost), and the CPU the pair's processes spend per epoch
  (both instance processes, both QEMUs and the replica's storage daemon:
  TLS is encryption on each end).

Usage::

    .venv/bin/python benchmarks/tls_cost.py [--quick] \\
        [--out benchmarks/results-tls.json] [--plot benchmarks/tls_cost.png]

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
import statistics
import sys
import tempfile
import time
from typing import Any

import numpy as np

from mftvm_openstack.ft import pair_tls, transport
from mftvm_openstack.ft.trackers import PAGE_SIZE, RamDelta
from mftvm_openstack.images import builder, workload
from mftvm_openstack.instance import client
from mftvm_openstack.local import demo, operations

CLK_TCK = os.sysconf('SC_CLK_TCK')


def p(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 2)


# -- the stream alone ------------------------------------------------------

async def _stream(tmp: str, tls: bool, epochs: int, pages: int) -> dict:
    creds = pair_tls.PairCredentials.generate()
    server_dir = creds.write_server(os.path.join(tmp, f'server-{tls}'))
    client_dir = pair_tls.write_client(creds.client_bundle(),
                                       os.path.join(tmp, f'client-{tls}'))
    addr = transport.DataAddress(path=os.path.join(tmp, f'd-{tls}.sock'))
    done = asyncio.Event()

    async def secondary(chan: transport.Channel) -> None:
        # receive and decode each checkpoint, then ACK it
        while True:
            try:
                msg = await chan.recv()
            except ConnectionError:
                break
            transport.decode_checkpoint(msg.payload)
            await chan.send(transport.Kind.ACK, msg.epoch)
        done.set()
    server_tls = client_tls = None
    if tls:
        server_tls = transport.ServerTls(
            pair_tls.server_context(server_dir), lambda cert: None)
        client_tls = transport.ClientTls(
            pair_tls.client_context(client_dir),
            pair_tls.server_name(creds.pair_key))
    server = await transport.serve(addr, secondary, tls=server_tls)
    chan = await transport.Channel.connect(addr, tls=client_tls)
    rng = np.random.default_rng(1)
    delta = RamDelta(np.arange(pages, dtype=np.uint32),
                     rng.integers(0, 255, (pages, PAGE_SIZE),
                                  dtype=np.uint8))
    devstate = bytes(200_000)
    times = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        await chan.send(transport.Kind.CHECKPOINT, epoch,
                        *transport.encode_checkpoint(devstate, delta))
        await chan.recv()
        times.append((time.perf_counter() - t0) * 1000)
    chan.close()
    await done.wait()
    server.close()
    mb = (len(devstate) + pages * (PAGE_SIZE + 4)) / 1e6
    return {'tls': tls, 'epochs': epochs, 'delta_mb': round(mb, 2),
            'ms_per_epoch_p50': p(times, 50), 'ms_per_epoch_p99': p(times, 99),
            'mb_per_s': round(mb * 1000 / statistics.median(times))}


def stream(tmp: str, quick: bool) -> list[dict]:
    out = []
    for pages in (256, 4096):          # 1 MiB and 16 MiB deltas
        for tls in (False, True):
            out.append(dict(asyncio.run(_stream(
                tmp, tls, 30 if quick else 100, pages)), pages=pages))
    return out


# -- a protected guest -----------------------------------------------------

def _cpu_ticks(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            with open(f'/proc/{pid}/stat') as f:
                fields = f.read().rsplit(') ', 1)[1].split()
            total += int(fields[11]) + int(fields[12])   # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return total


class GuestBench:
    def __init__(self, quick: bool) -> None:
        self.quick = quick
        self.image = builder.build_guest_image(demo.cache_dir())
        self.tmp = tempfile.mkdtemp(prefix='mftvm-tls-', dir='/var/tmp')
        self.state = os.path.join(self.tmp, 'state')

    def run(self, tls: bool, round_no: int, seconds: float) -> dict:
        name = f't{int(tls)}r{round_no}'
        disk = os.path.join(self.tmp, f'{name}.raw')
        with open(disk, 'wb') as f:
            f.truncate(256 << 20)
        port = demo.free_port()
        spec = operations.make_spec(
            name, self.image.kernel, self.image.initrd, disk,
            append='console=ttyS0 quiet mftvm.run=writer,counter '
                   'mftvm.writer_interval_ms=5', memory_mib=256,
            nic=f'user,hostfwd=tcp:127.0.0.1:{port}-:7000')
        data = f'tcp:127.0.0.1:{demo.free_port()}'
        gdir = operations.protect(
            spec, operations.ProtectOptions(epoch_ms=100, idle_epoch_ms=0,
                                            tls=tls),
            self.state, host_options={'listen': data, 'secondary': data,
                                      'nbd_host': '127.0.0.1'})
        try:
            serial = os.path.join(gdir, 'primary', 'serial.log')
            deadline = time.monotonic() + 120
            while 'COUNTER-READY' not in workload.read_text(serial):
                if time.monotonic() > deadline:
                    raise RuntimeError(f'guest in {gdir} did not boot')
                time.sleep(0.2)
            time.sleep(2)      # past the boot's own dirtying
            st = operations.status(self.state, name)
            pids = [st.primary.host_pid, st.secondary.host_pid,
                    *st.child_pids.get('primary', ()),
                    *st.child_pids.get('secondary', ())]
            prim = client.read_status(gdir, 'primary') or {}
            start_epochs = prim.get('epochs', 0)
            start_mib = prim.get('shipped_mib') or 0.0
            ticks0, t0 = _cpu_ticks(pids), time.monotonic()
            rtts = []
            while time.monotonic() - t0 < seconds:
                s = time.monotonic()
                if workload.counter_request('127.0.0.1', port, 5) is not None:
                    rtts.append((time.monotonic() - s) * 1000)
            ticks1, elapsed = _cpu_ticks(pids), time.monotonic() - t0
            prim = client.read_status(gdir, 'primary') or {}
            epochs = prim.get('epochs', 0) - start_epochs
            with open(os.path.join(gdir, 'primary', 'pauses.json')) as f:
                pauses = json.load(f)[-max(epochs, 1):]
        finally:
            operations.stop(self.state, name)
        return {'tls': tls, 'round': round_no, 'epochs': epochs,
                'epochs_per_s': round(epochs / elapsed, 2),
                'pause_ms_p50': p(pauses, 50), 'pause_ms_p99': p(pauses, 99),
                'counter_rtt_ms_p50': p(rtts, 50),
                'counter_rtt_ms_p99': p(rtts, 99),
                'mib_per_epoch': round(((prim.get('shipped_mib') or 0)
                                        - start_mib) / max(epochs, 1), 3),
                'cpu_ms_per_epoch': round((ticks1 - ticks0) / CLK_TCK
                                          * 1000 / max(epochs, 1), 2)}


GUEST_KEYS = ('pause_ms_p50', 'pause_ms_p99', 'counter_rtt_ms_p50',
              'epochs_per_s', 'cpu_ms_per_epoch', 'mib_per_epoch')


def summarize(rounds: list[dict]) -> dict:
    """Per round, TLS / plain for each figure; the medians of those."""
    plain = [r for r in rounds if not r['tls']]
    tls = [r for r in rounds if r['tls']]
    ratios: dict[str, list[float]] = {k: [] for k in GUEST_KEYS}
    for a, b in zip(plain, tls):
        for k in GUEST_KEYS:
            if a[k]:
                ratios[k].append(b[k] / a[k])
    return {k: round(statistics.median(v), 2) for k, v in ratios.items()
            if v}


def plot(results: dict, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f'{s["pages"] * 4 // 1024} MiB delta' for s in
              results['stream'] if not s['tls']]
    x = np.arange(len(labels))
    for i, tls in enumerate((False, True)):
        ax1.bar(x + i * 0.4, [s['ms_per_epoch_p50'] for s in
                              results['stream'] if s['tls'] == tls], 0.4,
                label='TLS 1.3' if tls else 'plain')
    ax1.set_xticks(x + 0.2, labels)
    ax1.set_ylabel('ms per checkpoint (send → ACK), p50')
    ax1.set_title('data stream alone')
    ax1.legend()
    keys = list(results['guest_ratio_tls_to_plain'])
    ax2.bar(keys, [results['guest_ratio_tls_to_plain'][k] for k in keys])
    ax2.axhline(1.0, color='grey', linewidth=0.8)
    ax2.set_ylabel('TLS / plain (median of rounds)')
    ax2.set_title('protected 256 MiB guest, 100 ms epochs')
    ax2.tick_params(axis='x', rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--rounds', type=int, default=None,
                        help='guest rounds of (plain, TLS); 3, 1 with '
                             '--quick')
    parser.add_argument('--seconds', type=float, default=None,
                        help='measured seconds per guest run (30; 10 '
                             'with --quick)')
    parser.add_argument('--out', default='benchmarks/results-tls.json')
    parser.add_argument('--plot', default='benchmarks/tls_cost.png')
    args = parser.parse_args()
    if os.geteuid() != 0:
        print('needs root (QEMU, /dev/shm, ports)', file=sys.stderr)
        return 2
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (10 if args.quick else 30)
    results: dict[str, Any] = {'host': platform.node(), 'when': time.time(),
                               'quick': args.quick}
    tmp = tempfile.mkdtemp(prefix='mftvm-tls-stream-')
    try:
        print('== the data stream alone (checkpoint → ACK, unix socket)')
        results['stream'] = stream(tmp, args.quick)
        for s in results['stream']:
            print(f'  {s["delta_mb"]:6.2f} MB/epoch '
                  f'{"TLS  " if s["tls"] else "plain"} p50 '
                  f'{s["ms_per_epoch_p50"]:7.2f} ms  p99 '
                  f'{s["ms_per_epoch_p99"]:7.2f} ms  {s["mb_per_s"]} MB/s')
        pairs = [results['stream'][i:i + 2]
                 for i in range(0, len(results['stream']), 2)]
        results['stream_ratio_tls_to_plain'] = {
            str(a['pages']): round(b['ms_per_epoch_p50']
                                   / a['ms_per_epoch_p50'], 2)
            for a, b in pairs}
        print(f'  TLS / plain, ms per epoch (p50), by pages per delta: '
              f'{results["stream_ratio_tls_to_plain"]}')
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bench = GuestBench(args.quick)
    print(f'== protected guest ({rounds} rounds, {seconds:.0f} s each)')
    guest = []
    try:
        for r in range(rounds):
            # alternate the order: the machine drifts
            for tls in ((False, True) if r % 2 == 0 else (True, False)):
                res = bench.run(tls, r, seconds)
                guest.append(res)
                print(f'  round {r + 1} {"TLS  " if tls else "plain"} '
                      + ' '.join(f'{k}={res[k]}' for k in GUEST_KEYS))
    except BaseException:
        print(f'benchmark failed; its guests and logs are in {bench.tmp}')
        raise
    shutil.rmtree(bench.tmp, ignore_errors=True)
    guest.sort(key=lambda g: (g['round'], g['tls']))
    results['guest'] = guest
    results['guest_ratio_tls_to_plain'] = summarize(guest)
    print('  TLS / plain (median of rounds): ' + ', '.join(
        f'{k} {v}x' for k, v in results['guest_ratio_tls_to_plain'].items()))
    with open(args.out, 'w') as f:
        json.dump(results, f, indent=1)
    plot(results, args.plot)
    print(f'results in {args.out}, plot in {args.plot}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
