"""``mftvm demo``: protect a guest, kill its primary, watch it carry on.

The demo builds the project's guest (busybox initramfs, Debian's cloud
kernel), protects it with a disk writer and a TCP counter service
running, drives a client against the counter, SIGKILLs the primary QEMU
at a random moment and reports what a client saw: the failover time and
whether the first answer after it was exactly the last one seen plus one.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import sys
import time
from typing import Any, Optional

from mftvm_openstack.contract.states import Role, State
from mftvm_openstack.contract.status import InstanceStatus
from mftvm_openstack.ft import vm
from mftvm_openstack.images import builder, records, workload
from mftvm_openstack.local import operations
from mftvm_openstack.local.operations import UserError
from mftvm_openstack.waiting import wait_until

NAME = 'mftvm-demo'


def cache_dir() -> str:
    return os.environ.get('MFTVM_CACHE_DIR') or os.path.expanduser(
        '~/.cache/mftvm')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port: int = s.getsockname()[1]
        return port


def _progress(text: str) -> None:
    if sys.stdout.isatty():
        sys.stdout.write('\r\033[K' + text)
    else:
        sys.stdout.write(text + '\n')
    sys.stdout.flush()


def _side(state_dir: str, role: Role) -> InstanceStatus:
    """What ``role`` last published (STARTING before it published)."""
    return operations.status_of(operations.guest_dir(state_dir, NAME),
                                role) or \
        InstanceStatus(role=role, state=State.STARTING)


def plot_timeline(pauses_ms: list[float], kill_epoch: Optional[int],
                  path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 3.5))
    ax.plot(range(1, len(pauses_ms) + 1), pauses_ms, lw=0.8,
            label='checkpoint pause')
    if kill_epoch:
        ax.axvline(kill_epoch, color='red', ls='--',
                   label='primary QEMU killed')
    ax.set_xlabel('epoch')
    ax.set_ylabel('pause (ms)')
    ax.set_title('mftvm demo: guest pause per epoch')
    ax.legend(loc='upper right')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args: Any, state_dir: str) -> int:
    print('mftvm demo: building the demo guest ...', flush=True)
    try:
        image = builder.build_guest_image(cache_dir())
    except builder.ImageError as exc:
        raise UserError(str(exc)) from None
    os.makedirs(state_dir, exist_ok=True)
    disk = os.path.join(state_dir, f'{NAME}-disk.raw')
    guest_dir_ = operations.guest_dir(state_dir, NAME)
    if os.path.exists(os.path.join(guest_dir_, 'guest.json')):
        operations.stop(state_dir, NAME)
    with open(disk, 'wb') as f:
        f.truncate(64 << 20)
    port = free_port()
    spec = operations.make_spec(
        NAME, image.kernel, image.initrd, disk,
        append='console=ttyS0 quiet mftvm.run=writer,counter '
               'mftvm.writer_interval_ms=50',
        memory_mib=args.memory,
        nic=f'user,hostfwd=tcp:127.0.0.1:{port}-:7000')
    opts = operations.ProtectOptions(epoch_ms=args.epoch_ms)
    print(f'mftvm demo: protecting {NAME} ({args.memory} MiB, epoch '
          f'{args.epoch_ms} ms, {spec.accel}) ...', flush=True)
    gdir = operations.protect(spec, opts, state_dir)
    try:
        return _drive(args, state_dir, gdir, port)
    finally:
        operations.stop(state_dir, NAME)


def _drive(args: Any, state_dir: str, gdir: str, port: int) -> int:
    # Ask only once the service listens: user-mode networking would hold
    # an early request and deliver it later, unseen by this client.
    serial = os.path.join(gdir, Role.PRIMARY, 'serial.log')
    if not wait_until(lambda: 'COUNTER-READY' in workload.read_text(serial),
                      120, interval=0.2):
        raise UserError('the demo guest did not start its service '
                        f'within 120s (logs in {gdir})')
    value = workload.counter_request('127.0.0.1', port, 10)
    if value is None:
        raise UserError(f'the demo guest does not answer (logs in {gdir})')
    kill_after = args.kill_after if args.kill_after is not None else \
        random.uniform(6, 12)
    print(f'mftvm demo: guest answers (counter={value}); killing the '
          f'primary QEMU in {kill_after:.1f}s', flush=True)
    last_seen = value
    answers = 1
    t_protected = time.monotonic()
    while time.monotonic() - t_protected < kill_after:
        got = workload.counter_request('127.0.0.1', port)
        if got is not None:
            if got != last_seen + 1:
                print(f'\nmftvm demo: counter jumped {last_seen} -> {got}')
            last_seen, answers = got, answers + 1
        prim = _side(state_dir, Role.PRIMARY)
        _progress(f'epoch {prim.epochs} committed '
                  f'{prim.last_committed_epoch} pause p50 '
                  f'{prim.pause_ms_p50} ms p99 '
                  f'{prim.pause_ms_p99} ms  counter {last_seen}')
        time.sleep(0.1)
    prim = _side(state_dir, Role.PRIMARY)
    qemu_pid = prim.qemu_pid
    if not qemu_pid:
        raise UserError(f'the primary QEMU is not running (logs in {gdir})')
    kill_epoch = prim.epochs
    before_kill = prim
    os.kill(qemu_pid, signal.SIGKILL)
    t_kill = time.monotonic()
    print(f'\nmftvm demo: SIGKILL primary QEMU pid {qemu_pid} at epoch '
          f'{kill_epoch}; last counter value seen {last_seen}', flush=True)
    after: Optional[int] = None
    while after is None and time.monotonic() - t_kill < 60:
        after = workload.counter_request('127.0.0.1', port, timeout=5)
    t_answer = time.monotonic()
    wait_until(lambda: _side(state_dir, Role.SECONDARY).state
               is State.ACTIVE, 5, interval=0.1)
    consistent = after == last_seen + 1
    time.sleep(2)  # let the guest write on, then check its disk
    sec = _side(state_dir, Role.SECONDARY)
    serial = workload.read_text(os.path.join(gdir, Role.SECONDARY,
                                             'serial.log'))
    acks = workload.serial_acks(serial)
    futures = workload.future_records(serial)
    operations.stop(state_dir, NAME)
    chain_ok, chain_last = True, -1
    try:
        chain_last = workload.check_disk_chain(
            list(sec.disk_layers))
    except (records.ChainError, OSError, ValueError) as exc:
        chain_ok = False
        print(f'mftvm demo: disk chain broken: {exc}')
    pauses = []
    try:
        with open(os.path.join(gdir, Role.PRIMARY, 'pauses.json')) as f:
            pauses = json.load(f)
    except (OSError, ValueError):
        pass
    report = {
        'guest_memory_mib': args.memory, 'epoch_ms': args.epoch_ms,
        'accelerator': vm.probe_accelerator(),
        'epochs_before_kill': kill_epoch,
        'last_committed_before_kill': before_kill.last_committed_epoch,
        'pause_ms_p50': before_kill.pause_ms_p50,
        'pause_ms_p99': before_kill.pause_ms_p99,
        'dirty_mib_total': before_kill.dirty_mib_total,
        'restore_ms': sec.failover_ms,
        'kill_to_next_answer_ms': round((t_answer - t_kill) * 1000, 1)
        if after is not None else None,
        'counter_last_seen_before_kill': last_seen,
        'counter_first_after_failover': after,
        'client_consistent': consistent,
        'answers_before_kill': answers,
        'writer_acks_after_failover': len(acks),
        'writer_future_records': futures,
        'disk_chain_intact': chain_ok,
        'disk_records': chain_last + 1,
    }
    os.makedirs(args.report_dir, exist_ok=True)
    json_path = os.path.join(args.report_dir, 'mftvm-demo.json')
    png_path = os.path.join(args.report_dir, 'mftvm-demo.png')
    with open(json_path, 'w') as f:
        json.dump(report, f, indent=1)
    if pauses:
        plot_timeline(pauses, kill_epoch, png_path)
    ok = consistent and chain_ok and not futures and after is not None
    print('\nmftvm demo report')
    print(f'  epochs before kill     {kill_epoch} (committed '
          f'{report["last_committed_before_kill"]})')
    print(f'  pause p50 / p99        {report["pause_ms_p50"]} / '
          f'{report["pause_ms_p99"]} ms')
    print(f'  dirty RAM shipped      {report["dirty_mib_total"]} MiB')
    print(f'  restore on secondary   {report["restore_ms"]} ms')
    print(f'  kill -> next answer    {report["kill_to_next_answer_ms"]} ms')
    print(f'  client saw             {last_seen} then {after} '
          f'({"consistent" if consistent else "INCONSISTENT"})')
    print(f'  disk chain             {chain_last + 1} records, '
          f'{"intact" if chain_ok and not futures else "BROKEN"}')
    print(f'  report                 {json_path}' +
          (f', {png_path}' if pauses else ''))
    print('  result                 ' + ('PASS' if ok else 'FAIL'))
    return 0 if ok else 1
