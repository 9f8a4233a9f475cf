"""``mftvm``: fault-tolerant guests on one machine, no OpenStack needed.

::

    mftvm demo
    mftvm protect NAME --kernel K --initrd I --disk D [--append A]
          [--disk-dir DIR ...] [--memory MiB] [--smp N] [--epoch-ms MS]
          [--idle-epoch-ms MS]
          [--nic user,hostfwd=tcp:127.0.0.1:PORT-:GPORT] [--state-dir DIR]
          [--foreground]
    mftvm status NAME [--json]
    mftvm failover NAME
    mftvm stop NAME

Remote mode: with ``--host HOST`` (and a broker given by
``$MFTVM_TRANSPORT_URL``, ``[DEFAULT] transport_url`` of a
``--config-file`` or ``--transport-url URL``), ``status``, ``failover`` and
``stop`` go to the agent (``mftvm-agent``) of HOST over RPC, and ``list``
shows the agent's instances::

    export MFTVM_TRANSPORT_URL=rabbit://mftvm:PASSWORD@10.0.0.5:5672/
    mftvm list --host hv1
    mftvm --host hv1 status vm0 --json
    mftvm --config-file /etc/mftvm/mftvm.conf failover vm0 --host hv2

A password in ``--transport-url`` is in the command line, which every
user of the machine can read (``ps``): prefer the environment or a config
file only its owner reads.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import sys
import time
from typing import Any, Optional

from mftvm_openstack.contract import plugins
from mftvm_openstack.contract.record import ContractError
from mftvm_openstack.contract.spec import HOST_PATTERN, FailoverResult
from mftvm_openstack.contract.status import InstanceStatus
from mftvm_openstack.local import operations
from mftvm_openstack.local.operations import LocalGuestStatus, UserError

TRANSPORT_URL_ENV = 'MFTVM_TRANSPORT_URL'
#: seconds a remote call waits for the agent (--timeout)
REMOTE_TIMEOUT = 30


def _fmt(value: Any, unit: str = '') -> str:
    return '-' if value is None else f'{value}{unit}'


def print_status(st: LocalGuestStatus) -> None:
    print(f'guest {st.name}')
    for role in operations.ROLES:
        side = st.side(role)
        if side is None:
            print(f'  {role:9} side: not started')
            continue
        alive = 'running' if side.alive else 'gone'
        print(f'  {role:9} side: role={side.role} '
              f'state={side.state} host-pid={side.host_pid} '
              f'({alive}) qemu-pid={_fmt(side.qemu_pid)}')
        children = st.child_pids.get(role.value)
        if children:
            print(f'              children: {list(children)}')
        print(f'              epochs={side.epochs} last-committed='
              f'{side.last_committed_epoch} lag='
              f'{side.replication_lag_epochs} pause p50='
              f'{_fmt(side.pause_ms_p50, "ms")} p99='
              f'{_fmt(side.pause_ms_p99, "ms")} dirty='
              f'{side.dirty_mib_total}MiB')
        if side.held_output_full:
            print(f'              held output full ({side.held_bytes} '
                  f'bytes): the guest is paused until the secondary acks')
        if side.failover_ms is not None:
            print(f'              failover took {side.failover_ms} ms')
        if side.reason:
            print(f'              reason: {side.reason}')
        if side.error:
            print(f'              error: {side.error}')


def failover_line(name: str, result: FailoverResult) -> str:
    """What ``mftvm failover --host`` says about the agent's answer."""
    where = result.runs_on or f'the peer of {result.host}'
    took = (f' (failover {result.failover_ms} ms)'
            if result.failover_ms is not None else '')
    return f'{name} now runs on {where}{took}'


def seconds(text: str) -> float:
    """An argparse type: a finite number of seconds, 0 or more (``nan``,
    ``inf`` and negative waits are refused as the argument's error, not
    met later as a hang or a traceback)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'{text!r} is not a number of seconds') from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f'{text!r}: give a finite number of seconds, 0 or more')
    return value


def timeout_seconds(text: str) -> float:
    """An argparse type: a wait for the agent, more than 0 seconds."""
    value = seconds(text)
    if value == 0:
        raise argparse.ArgumentTypeError(f'{text!r}: give more than 0 '
                                         f'seconds')
    return value


_HOST_RE = re.compile(HOST_PATTERN)


def check_names(args: argparse.Namespace, host: Optional[str]) -> None:
    """UserError unless the host name and a local guest's name are
    tokens: a local name becomes a directory under the state dir, never
    a path of the caller's choosing (a remote one is the agent's to
    check, and it does); a host name, a message's routing key."""
    name = getattr(args, 'name', None)
    if name is not None and host is None and \
            not operations.NAME_RE.fullmatch(name):
        raise UserError(f'guest name {name!r}: use letters, digits, "_", '
                        f'"." and "-" (at most 63)')
    if host is not None and not _HOST_RE.fullmatch(host):
        raise UserError(f'--host {host!r}: give a host name (letters, '
                        f'digits, "_", "." and "-")')


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog='mftvm', description='Fault-tolerant QEMU guests (standalone).')
    parser.add_argument('--state-dir', default=None,
                        help='where guests keep their state (default: '
                        '$MFTVM_STATE_DIR or /var/lib/mftvm)')
    parser.add_argument('--transport-url', default=None,
                        help='messaging broker of the agents, for --host '
                        f'(default: ${TRANSPORT_URL_ENV}, then '
                        '--config-file). Its password is visible to all '
                        f'users in ps: prefer ${TRANSPORT_URL_ENV} or '
                        '--config-file')
    parser.add_argument('--config-file', action='append', default=[],
                        metavar='PATH',
                        help='oslo.config file whose [DEFAULT] '
                        'transport_url names the broker, for --host '
                        '(may be repeated)')
    parser.add_argument('--host', dest='global_host', default=None,
                        metavar='HOST',
                        help='ask the agent of this host over RPC instead '
                        'of the local standalone guests')
    parser.add_argument('--timeout', type=timeout_seconds,
                        default=REMOTE_TIMEOUT,
                        help='seconds to wait for the agent (--host; '
                        f'default {REMOTE_TIMEOUT})')
    sub = parser.add_subparsers(dest='command', required=True)

    demo = sub.add_parser('demo', help='protect a demo guest, kill its '
                          'primary, fail over, report')
    demo.add_argument('--memory', type=int, default=128, help='MiB')
    demo.add_argument('--epoch-ms', type=int, default=200)
    demo.add_argument('--kill-after', type=seconds, default=None,
                      help='seconds of protection before the kill '
                      '(default: random 6-12)')
    demo.add_argument('--report-dir', default='.',
                      help='where mftvm-demo.json and .png go')

    prot = sub.add_parser('protect', help='start a guest protected')
    prot.add_argument('name')
    prot.add_argument('--kernel', required=True)
    prot.add_argument('--initrd', required=True)
    prot.add_argument('--append', default=None)
    prot.add_argument('--disk', required=True, action='append',
                      help='a disk image (raw or qcow2); again for more '
                           '(the first is the root disk; each is '
                           'replicated)')
    prot.add_argument('--disk-dir', dest='disk_dirs', action='append',
                      default=None, metavar='DIR',
                      help='a directory the disk may be in (again for '
                           'more); default: $' + operations.DISK_DIRS_ENV
                           + ' (colon-separated), else the current '
                           'directory. The disk must be a regular file '
                           'reached there without a symbolic link')
    prot.add_argument('--memory', type=int, default=128, help='MiB')
    prot.add_argument('--smp', type=int, default=1)
    defaults = operations.ProtectOptions()
    prot.add_argument('--epoch-ms', type=int, default=defaults.epoch_ms,
                      help='epoch length while the guest sends packets '
                           '(they wait for the commit; default '
                           f'{defaults.epoch_ms})')
    prot.add_argument('--idle-epoch-ms', type=int,
                      default=defaults.idle_epoch_ms,
                      help='longest epoch while the guest sends nothing '
                           f'(fewer pauses; default {defaults.idle_epoch_ms}'
                           ', 0: always --epoch-ms)')
    prot.add_argument('--tracker', default=defaults.tracker,
                      help='dirty tracker: '
                           f'{", ".join(plugins.tracker_choices())} '
                           f'(default {defaults.tracker})')
    prot.add_argument('--disk-sync', default=defaults.disk_sync,
                      help=f'{" | ".join(plugins.disk_sync_choices())} '
                           f'(default {defaults.disk_sync})')
    prot.add_argument('--nic', default=None, action='append',
                      help='user,hostfwd=tcp:127.0.0.1:PORT-:GUESTPORT; '
                           'again for more NICs (the second on '
                           '10.0.3.0/24, ...; each one\'s output held '
                           'until its epoch commits)')
    prot.add_argument('--no-tls', dest='tls', action='store_false',
                      help='data stream and disk replica without TLS: '
                           'anyone who can reach the pair\'s sockets '
                           'could pose as its primary or read and write '
                           'the replica (here they are unix sockets in '
                           'the 0700 state dir)')
    prot.add_argument('--foreground', action='store_true',
                      help='stay attached; Ctrl-C stops the guest')

    st = sub.add_parser('status', help='show both sides of a guest')
    st.add_argument('name')
    st.add_argument('--json', action='store_true')

    fo = sub.add_parser('failover', help='move the guest to its secondary')
    fo.add_argument('name')
    sp = sub.add_parser('stop', help='stop both sides of a guest')
    sp.add_argument('name')
    ls = sub.add_parser('list', help='the instances of an agent (--host)')
    ls.add_argument('--json', action='store_true')
    for remote in (st, fo, sp, ls):
        remote.add_argument('--host', default=None,
                            help='ask the agent of this host over RPC')
        remote.add_argument('--timeout', dest='sub_timeout',
                            type=timeout_seconds,
                            default=None, help='as the global --timeout')
    return parser


def _remote_value(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return _fmt(value)


def print_remote_status(st: dict[str, Any], indent: str = '  ') -> None:
    """An agent's status of an instance, one key per line."""
    for key in sorted(st):
        value = st[key]
        if isinstance(value, dict) and value:
            print(f'{indent}{key}:')
            print_remote_status(value, indent + '  ')
        else:
            print(f'{indent}{key}: {_remote_value(value)}')


#: what ``mftvm list --host`` shows of each instance (``--json``: all)
LIST_FIELDS = ('role', 'state', 'alive', 'peer', 'epochs',
               'last_committed_epoch', 'pause_ms_p50', 'error')


def print_remote_list(items: list[InstanceStatus]) -> None:
    if not items:
        print('no instances')
        return
    for item in items:
        shown = item.to_dict()
        rest = ' '.join(f'{key}={_remote_value(shown[key])}'
                        for key in LIST_FIELDS
                        if shown[key] not in (None, ''))
        print(f'{item.instance or "?"} {rest}'.rstrip())


def cmd_remote(args: argparse.Namespace, host: str) -> int:
    """status / failover / stop / list through the agent of ``host``."""
    url = args.transport_url or os.environ.get(TRANSPORT_URL_ENV)
    if not url and not args.config_file:
        raise UserError(f'--host needs a broker: set ${TRANSPORT_URL_ENV}, '
                        f'give --config-file or --transport-url')
    for path in args.config_file:
        if not os.access(path, os.R_OK):
            raise UserError(f'--config-file {path}: cannot read it')
    import logging
    import warnings

    warnings.filterwarnings('ignore', message=r'\s*Eventlet is deprecated')
    # one-line errors: the messaging library's warnings stay unprinted
    logging.getLogger().addHandler(logging.NullHandler())
    from mftvm_openstack import conf
    from mftvm_openstack.agent import exception, rpcapi

    try:
        conf.CONF([], project='mftvm',
                  default_config_files=list(args.config_file))
        if not url and not rpcapi.configured_transport_url(conf.CONF):
            raise UserError(f'--host needs a broker: no transport_url in '
                            f'[DEFAULT] of {", ".join(args.config_file)}')
        transport = rpcapi.get_transport(conf.CONF, url)
    except exception.MftvmError as exc:
        raise UserError(str(exc)) from None
    try:
        rpcapi.check_transport(transport, conf.CONF, url)
        timeout = getattr(args, 'sub_timeout', None) or args.timeout
        api = rpcapi.AgentAPI(transport, timeout=timeout, retry=1)
        if args.command == 'list':
            items = [InstanceStatus.from_dict(item, 'list entry')
                     for item in api.list({}, host)]
            if args.json:
                print(json.dumps([i.to_dict() for i in items], indent=1))
            else:
                print_remote_list(items)
        elif args.command == 'status':
            st = InstanceStatus.from_dict(api.status({}, host, args.name),
                                          'status').to_dict()
            if args.json:
                print(json.dumps(st, indent=1))
            else:
                print(f'guest {args.name} on {host}')
                print_remote_status(st)
        elif args.command == 'failover':
            print(failover_line(args.name, FailoverResult.from_dict(
                api.failover({}, host, args.name), 'failover')))
        elif args.command == 'stop':
            api.stop_instance({}, host, args.name)
            print(f'{args.name} stopped on {host}')
        return 0
    except exception.MftvmError as exc:
        raise UserError(str(exc)) from None
    except ContractError as exc:
        raise UserError(f'the agent on {host} answered what this mftvm '
                        f'cannot read: {exc}') from None
    except Exception as exc:     # a broker or driver failure: one line
        text = str(exc).strip().splitlines()
        raise UserError(rpcapi.mask_url(
            f'{type(exc).__name__}: {text[0]}' if text
            else type(exc).__name__)) from None
    finally:
        transport.cleanup()


def cmd_protect(args: argparse.Namespace, state_dir: str) -> int:
    spec = operations.make_spec(
        args.name, args.kernel, args.initrd, args.disk[0], args.append,
        args.memory, args.smp, args.nic[0] if args.nic else None,
        more_disks=args.disk[1:], more_nics=(args.nic or [])[1:])
    operations.check_disk(spec, args.disk_dirs or
                          operations.default_disk_dirs())
    opts = operations.ProtectOptions(epoch_ms=args.epoch_ms,
                                  idle_epoch_ms=args.idle_epoch_ms,
                                  tracker=args.tracker,
                                  disk_sync=args.disk_sync,
                                  tls=args.tls)
    gdir = operations.protect(spec, opts, state_dir)
    print(f'{args.name} is protected (state in {gdir})')
    if not args.foreground:
        return 0
    try:
        while True:
            st = operations.status(state_dir, args.name)
            if not any((side := st.side(r)) and side.alive
                       for r in operations.ROLES):
                print(f'{args.name}: both sides have ended')
                return 0
            time.sleep(1)
    except KeyboardInterrupt:
        operations.stop(state_dir, args.name)
        print(f'{args.name} stopped')
        return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    state_dir = args.state_dir or operations.default_state_dir()
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        host = getattr(args, 'host', None) or args.global_host
        check_names(args, host)
        if host and args.command in ('status', 'failover', 'stop', 'list'):
            return cmd_remote(args, host)
        if args.command == 'list':
            raise UserError('list needs --host HOST (and --transport-url '
                            f'or ${TRANSPORT_URL_ENV})')
        if host:
            raise UserError(f'{args.command} runs locally; --host is for '
                            'status, failover, stop and list')
        if args.command == 'demo':
            from mftvm_openstack.local import demo
            return demo.run(args, state_dir)
        if args.command == 'protect':
            return cmd_protect(args, state_dir)
        if args.command == 'status':
            st = operations.status(state_dir, args.name)
            if args.json:
                print(json.dumps(st.to_dict(), indent=1))
            else:
                print_status(st)
            return 0
        if args.command == 'failover':
            sec = InstanceStatus.from_dict(
                operations.failover(state_dir, args.name))
            print(f'{args.name} now runs on the former secondary '
                  f'(failover {_fmt(sec.failover_ms)} ms)')
            return 0
        if args.command == 'stop':
            operations.stop(state_dir, args.name)
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
