"""``mftvm``: fault-tolerant guests on one machine, no OpenStack needed.

::

    mftvm demo
    mftvm protect NAME --kernel K --initrd I --disk D [--append A]
          [--memory MiB] [--smp N] [--epoch-ms MS]
          [--nic user,hostfwd=tcp:127.0.0.1:PORT-:GPORT] [--state-dir DIR]
          [--foreground]
    mftvm status NAME [--json]
    mftvm failover NAME
    mftvm stop NAME
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import time
from typing import Any, Optional

from mftvm_openstack.standalone import manager
from mftvm_openstack.standalone.manager import UserError


def _fmt(value: Any, unit: str = '') -> str:
    return '-' if value is None else f'{value}{unit}'


def print_status(st: dict[str, Any]) -> None:
    print(f'guest {st["name"]}')
    for role in manager.ROLES:
        side = st.get(role)
        if side is None:
            print(f'  {role:9} side: not started')
            continue
        alive = 'running' if side.get('alive') else 'gone'
        print(f'  {role:9} side: role={side.get("role")} '
              f'state={side.get("state")} host-pid={side.get("host_pid")} '
              f'({alive}) qemu-pid={_fmt(side.get("qemu_pid"))}')
        if side.get('child_pids'):
            print(f'              children: {side["child_pids"]}')
        if 'epochs' in side:
            print(f'              epochs={side["epochs"]} last-committed='
                  f'{side["last_committed_epoch"]} lag='
                  f'{side["replication_lag_epochs"]} pause p50='
                  f'{_fmt(side["pause_ms_p50"], "ms")} p99='
                  f'{_fmt(side["pause_ms_p99"], "ms")} dirty='
                  f'{side["dirty_mib_total"]}MiB')
        if side.get('failover_ms') is not None:
            print(f'              failover took {side["failover_ms"]} ms')
        if side.get('reason'):
            print(f'              reason: {side["reason"]}')
        if side.get('error'):
            print(f'              error: {side["error"]}')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='mftvm', description='Fault-tolerant QEMU guests (standalone).')
    parser.add_argument('--state-dir', default=None,
                        help='where guests keep their state (default: '
                        '$MFTVM_STATE_DIR or /var/lib/mftvm)')
    sub = parser.add_subparsers(dest='command', required=True)

    demo = sub.add_parser('demo', help='protect a demo guest, kill its '
                          'primary, fail over, report')
    demo.add_argument('--memory', type=int, default=128, help='MiB')
    demo.add_argument('--epoch-ms', type=int, default=200)
    demo.add_argument('--kill-after', type=float, default=None,
                      help='seconds of protection before the kill '
                      '(default: random 6-12)')
    demo.add_argument('--report-dir', default='.',
                      help='where mftvm-demo.json and .png go')

    prot = sub.add_parser('protect', help='start a guest protected')
    prot.add_argument('name')
    prot.add_argument('--kernel', required=True)
    prot.add_argument('--initrd', required=True)
    prot.add_argument('--append', default=None)
    prot.add_argument('--disk', required=True)
    prot.add_argument('--memory', type=int, default=128, help='MiB')
    prot.add_argument('--smp', type=int, default=1)
    prot.add_argument('--epoch-ms', type=int, default=200)
    prot.add_argument('--tracker', default='auto',
                      help='dirty tracker: auto, scan, soft-dirty')
    prot.add_argument('--disk-sync', default='write-replication',
                      help='write-replication (default) or block-copy')
    prot.add_argument('--nic', default=None,
                      help='user,hostfwd=tcp:127.0.0.1:PORT-:GUESTPORT')
    prot.add_argument('--foreground', action='store_true',
                      help='stay attached; Ctrl-C stops the guest')

    st = sub.add_parser('status', help='show both sides of a guest')
    st.add_argument('name')
    st.add_argument('--json', action='store_true')

    fo = sub.add_parser('failover', help='move the guest to its secondary')
    fo.add_argument('name')
    sp = sub.add_parser('stop', help='stop both sides of a guest')
    sp.add_argument('name')
    return parser


def cmd_protect(args: argparse.Namespace, state_dir: str) -> int:
    spec = manager.make_spec(
        args.name, args.kernel, args.initrd, args.disk, args.append,
        args.memory, args.smp, args.nic)
    opts = manager.ProtectOptions(epoch_ms=args.epoch_ms,
                                  tracker=args.tracker,
                                  disk_sync=args.disk_sync)
    gdir = manager.protect(spec, opts, state_dir)
    print(f'{args.name} is protected (state in {gdir})')
    if not args.foreground:
        return 0
    try:
        while True:
            st = manager.status(state_dir, args.name)
            if not any((st.get(r) or {}).get('alive')
                       for r in manager.ROLES):
                print(f'{args.name}: both sides have ended')
                return 0
            time.sleep(1)
    except KeyboardInterrupt:
        manager.stop(state_dir, args.name)
        print(f'{args.name} stopped')
        return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    state_dir = args.state_dir or manager.default_state_dir()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if args.command == 'demo':
            from mftvm_openstack.standalone import demo
            return demo.run(args, state_dir)
        if args.command == 'protect':
            return cmd_protect(args, state_dir)
        if args.command == 'status':
            st = manager.status(state_dir, args.name)
            if args.json:
                print(json.dumps(st, indent=1))
            else:
                print_status(st)
            return 0
        if args.command == 'failover':
            sec = manager.failover(state_dir, args.name)
            print(f'{args.name} now runs on the former secondary '
                  f'(failover {sec.get("failover_ms")} ms)')
            return 0
        if args.command == 'stop':
            manager.stop(state_dir, args.name)
            print(f'{args.name} stopped')
            return 0
    except UserError as exc:
        print(f'mftvm: error: {exc}', file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 2


if __name__ == '__main__':
    sys.exit(main())
