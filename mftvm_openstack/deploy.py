"""A compute host's FT configuration: the agent's file and Nova's options.

The DevStack plugin and the cloud lab both configure a hypervisor with
this one command, so what the plugin does is what the lab runs::

    export MFTVM_TRANSPORT_URL=rabbit://nova:PASSWORD@10.0.0.5:5672/nova_cell1
    export MFTVM_FENCING_URL=etcd3+http://10.0.0.5:2379
    python -m mftvm_openstack.deploy agent --conf /etc/mftvm/mftvm.conf \\
        --host hv1 --my-ip 10.0.0.11 --state-path /var/lib/mftvm
    python -m mftvm_openstack.deploy nova --nova-conf /etc/nova/nova.conf

``agent`` writes the agent's ``mftvm.conf`` anew (0600): ``[DEFAULT]
transport_url`` (the broker *and vhost nova-compute uses*: the driver
reaches the agents on nova.conf's own transport, so under DevStack's
cells v2 that is the cell's vhost, ``nova_cell1``), ``[agent]``,
``[fencing]`` (``MFTVM_FENCING_URL``, or lock files under the state
path when it is empty), ``[ft]``, versioned notifications
(``[oslo_messaging_notifications]``: ``--notification-driver
messagingv2`` on topic ``versioned_notifications``, where consumers of
Nova's versioned notifications listen; ``noop`` for none) and the
Prometheus endpoint (``[metrics]``: ``--metrics-port 9787`` on
``--metrics-bind-address``, 127.0.0.1 unless told the management
network's address; port 0 for none). The URLs hold passwords, so they
come from the environment, never from the command line (``ps`` shows
that to every user).

``nova`` sets, in place, the options nova-compute needs for FT servers:
``[DEFAULT] compute_driver``, file-backed guest memory (``[libvirt]
file_backed_memory``, the agent reads an FT guest's RAM from its file)
and the two options Nova demands with it; with ``--nic-checksum-offload
false``, ``[ft] nic_checksum_offload`` too. Every other line of the file
is kept as it was.

Every value is checked before anything is written; a bad one ends the
command with one line on stderr and exit code 2, e.g.::

    mftvm-deploy: error: --host 'hv1;rm': not a host name
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import socket
import sys
import urllib.parse
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Optional

from mftvm_openstack.contract.limits import EPOCH_MS_RANGE
from mftvm_openstack.contract.spec import HOST_PATTERN
from mftvm_openstack.files import write_private

TRANSPORT_URL_ENV = 'MFTVM_TRANSPORT_URL'
FENCING_URL_ENV = 'MFTVM_FENCING_URL'
DEFAULT_COMPUTE_DRIVER = 'mftvm.FTLibvirtDriver'
#: [fencing] lease, seconds: at least 1 (the option's minimum), at most
#: an hour (a lease that long means no failover for that long)
LEASE_RANGE = (1, 3600)
#: MiB of guest memory a host offers, file-backed (Nova's option is MiB)
FILE_BACKED_MEMORY_RANGE = (128, 1 << 30)
#: what "auto" leaves the host itself, MiB, and the least it offers
HOST_RESERVE_MIB = 1024
AUTO_MINIMUM_MIB = 1024
#: log files: one, then size rotation keeps two of at most this many MB
LOG_MAX_MB_RANGE = (1, 10240)
#: the agent's versioned notifications: as DevStack sets Nova's (on, on
#: the bus), on the topic of Nova's versioned notifications
DEFAULT_NOTIFICATION_DRIVER = 'messagingv2'
DEFAULT_NOTIFICATION_TOPIC = 'versioned_notifications'
#: oslo.messaging's notification drivers an agent may be given
NOTIFICATION_DRIVERS = ('messagingv2', 'messaging', 'log', 'routing',
                        'noop')
#: the agent's Prometheus endpoint: on, but only for this host unless a
#: bind address is given (it has no authentication)
DEFAULT_METRICS_PORT = 9787
DEFAULT_METRICS_BIND_ADDRESS = '127.0.0.1'
#: 0: no endpoint
METRICS_PORT_RANGE = (0, 65535)

_HOST_RE = re.compile(HOST_PATTERN)
_TOPIC_RE = re.compile(r'[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}')
_DRIVER_RE = re.compile(r'[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+')
_TRANSPORT_SCHEMES = ('rabbit', 'amqp', 'kafka')
_FENCING_SCHEMES = ('etcd3+http', 'etcd3+https', 'redis', 'rediss')
#: characters that would end an ini value or start a comment on the line
_UNSAFE = re.compile(r'[\x00-\x1f\x7f]')


class DeployError(ValueError):
    """A value that must not reach a configuration file; the message is
    one line, fit for an operator."""


# -- checks: each returns the value to write, or raises DeployError ------


def _clean(what: str, value: str) -> str:
    if _UNSAFE.search(value):
        raise DeployError(f'{what}: control characters are not allowed')
    return value


def check_host(value: str, what: str = '--host') -> str:
    if not _HOST_RE.fullmatch(value):
        raise DeployError(f'{what} {value!r}: not a host name')
    return value


def check_ip(value: str, what: str = '--my-ip') -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise DeployError(f'{what} {value!r}: not an IP address') from None


def check_abs_path(value: str, what: str) -> str:
    _clean(what, value)
    if not os.path.isabs(value) or '/../' in f'{value}/':
        raise DeployError(f'{what} {value!r}: not an absolute path '
                          f'(without ..)')
    return os.path.normpath(value)


def check_int(value: str | int, what: str, bounds: tuple[int, int]) -> int:
    try:
        number = int(str(value), 10)
    except ValueError:
        raise DeployError(f'{what} {value!r}: not an integer') from None
    if not bounds[0] <= number <= bounds[1]:
        raise DeployError(f'{what} {number}: out of range {bounds[0]}..'
                          f'{bounds[1]}')
    return number


def check_bool(value: str | bool, what: str) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower()
    if text in ('true', '1', 'yes', 'on'):
        return True
    if text in ('false', '0', 'no', 'off'):
        return False
    raise DeployError(f'{what} {value!r}: not a boolean')


def _url(value: str, what: str, schemes: Sequence[str]) -> str:
    _clean(what, value)
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in schemes:
        # never echo the URL: it may hold a password
        raise DeployError(f'{what}: scheme {parts.scheme!r} is not one of '
                          f'{", ".join(schemes)}')
    try:
        port = parts.port
    except ValueError:
        port = -1
    if port is not None and not 0 < port < 65536:
        raise DeployError(f'{what}: bad port')
    if not parts.netloc.rsplit('@', 1)[-1]:
        raise DeployError(f'{what}: no host')
    return value


def check_transport_url(value: str) -> str:
    """A broker URL for oslo.messaging (several hosts allowed)."""
    if not value:
        raise DeployError(f'{TRANSPORT_URL_ENV} is empty: the agent needs '
                          f'the RabbitMQ URL nova-compute uses')
    return _url(value, TRANSPORT_URL_ENV, _TRANSPORT_SCHEMES)


def check_fencing_url(value: str) -> str:
    """An etcd or Redis URL, or empty (lock files)."""
    return _url(value, FENCING_URL_ENV, _FENCING_SCHEMES) if value else ''


def check_driver(value: str) -> str:
    if not _DRIVER_RE.fullmatch(value):
        raise DeployError(f'--compute-driver {value!r}: not a module.Class '
                          f'name')
    return value


def check_notification_driver(value: str) -> str:
    if value not in NOTIFICATION_DRIVERS:
        raise DeployError(f'--notification-driver {value!r}: not one of '
                          f'{", ".join(NOTIFICATION_DRIVERS)}')
    return value


def check_topic(value: str) -> str:
    if not _TOPIC_RE.fullmatch(value):
        raise DeployError(f'--notification-topic {value!r}: not a topic '
                          f'name')
    return value


def check_peers(value: str) -> list[str]:
    return [check_host(p.strip(), '--peers')
            for p in value.split(',') if p.strip()]


# -- the agent's file ----------------------------------------------------


@dataclass(frozen=True)
class AgentConfig:
    """What ``mftvm.conf`` says; every field checked by :func:`agent_config`.
    """

    host: str
    my_ip: str
    state_path: str
    transport_url: str
    fencing_url: str = ''
    lease: int = 3
    epoch_ms: int = 200
    peers: list[str] = field(default_factory=list)
    debug: bool = False
    log_file: Optional[str] = None
    log_max_mb: Optional[int] = None
    notification_driver: str = DEFAULT_NOTIFICATION_DRIVER
    notification_topic: str = DEFAULT_NOTIFICATION_TOPIC
    metrics_port: int = DEFAULT_METRICS_PORT
    metrics_bind_address: str = DEFAULT_METRICS_BIND_ADDRESS

    def sections(self) -> dict[str, dict[str, str]]:
        default = {'transport_url': self.transport_url,
                   'debug': str(self.debug)}
        if self.log_file:
            default['log_file'] = self.log_file
            if self.log_max_mb:
                default.update(log_rotation_type='size',
                               max_logfile_size_mb=str(self.log_max_mb),
                               max_logfile_count='2')
        # [DEFAULT] holds only oslo.messaging's and oslo.log's options;
        # the agent's own host and state_path are in [agent]
        agent = {'host': self.host, 'state_path': self.state_path,
                 'my_ip': self.my_ip}
        if self.peers:
            agent['peers'] = ','.join(self.peers)
        if self.fencing_url:
            fencing = {'backend_url': self.fencing_url}
        else:
            # lock files; the default under /run may not be writable by
            # the agent's user
            fencing = {'lock_path': os.path.join(self.state_path, 'fence')}
        fencing['lease'] = str(self.lease)
        sections = {'DEFAULT': default, 'agent': agent, 'fencing': fencing,
                    'ft': {'epoch_ms': str(self.epoch_ms)},
                    # on the RPC transport (nova-compute's broker)
                    'oslo_messaging_notifications': {
                        'driver': self.notification_driver,
                        'topics': self.notification_topic}}
        if self.metrics_port:
            sections['metrics'] = {
                'port': str(self.metrics_port),
                'bind_address': self.metrics_bind_address}
        return sections


def nova_host(nova_conf: Optional[str]) -> Optional[str]:
    """``[DEFAULT] host`` of a nova.conf, if it sets one."""
    if not nova_conf or not os.path.exists(nova_conf):
        return None
    with open(nova_conf) as f:
        value = IniFile(f.read()).get('DEFAULT', 'host')
    return value or None


def agent_config(*, host: Optional[str], my_ip: str, state_path: str,
                 env: Mapping[str, str], lease: str | int = 3,
                 epoch_ms: str | int = 200, peers: str = '',
                 debug: str | bool = False, log_file: Optional[str] = None,
                 log_max_mb: Optional[str | int] = None,
                 nova_conf: Optional[str] = None,
                 notification_driver: str = DEFAULT_NOTIFICATION_DRIVER,
                 notification_topic: str = DEFAULT_NOTIFICATION_TOPIC,
                 metrics_port: str | int = DEFAULT_METRICS_PORT,
                 metrics_bind_address: str = DEFAULT_METRICS_BIND_ADDRESS,
                 ) -> AgentConfig:
    """Check every input; ``host`` empty: nova.conf's ``[DEFAULT] host``,
    else this machine's name (what nova-compute uses by default)."""
    name = host or nova_host(nova_conf) or socket.gethostname()
    return AgentConfig(
        host=check_host(name),
        my_ip=check_ip(my_ip),
        state_path=check_abs_path(state_path, '--state-path'),
        transport_url=check_transport_url(env.get(TRANSPORT_URL_ENV, '')),
        fencing_url=check_fencing_url(env.get(FENCING_URL_ENV, '')),
        lease=check_int(lease, '--lease', LEASE_RANGE),
        epoch_ms=check_int(epoch_ms, '--epoch-ms', EPOCH_MS_RANGE),
        peers=check_peers(peers),
        debug=check_bool(debug, '--debug'),
        log_file=(check_abs_path(log_file, '--log-file')
                  if log_file else None),
        log_max_mb=(check_int(log_max_mb, '--log-max-mb', LOG_MAX_MB_RANGE)
                    if log_max_mb not in (None, '') else None),
        notification_driver=check_notification_driver(notification_driver),
        notification_topic=check_topic(notification_topic),
        metrics_port=check_int(metrics_port, '--metrics-port',
                               METRICS_PORT_RANGE),
        metrics_bind_address=check_ip(metrics_bind_address,
                                      '--metrics-bind-address'))


def render(sections: Mapping[str, Mapping[str, str]]) -> str:
    lines: list[str] = []
    for section, options in sections.items():
        lines.append(f'[{section}]')
        lines.extend(f'{key} = {value}' for key, value in options.items())
        lines.append('')
    return '\n'.join(lines)


def write_agent_conf(path: str, config: AgentConfig) -> None:
    """Replace ``path`` with the agent's configuration (0600: it holds the
    broker's password)."""
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    write_private(path, render(config.sections()).encode())


# -- Nova's options ------------------------------------------------------


class IniFile:
    """An ini file edited line by line, as DevStack's ``iniset`` does:
    an option is replaced where it stands, or added at the end of its
    section (the section at the end of the file); comments, order and
    every other line stay."""

    _SECTION = re.compile(r'^\s*\[([^\]]+)\]\s*$')
    _OPTION = re.compile(r'^\s*([^#;=\s][^=]*?)\s*=(.*)$')

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()

    def _section_range(self, section: str) -> Optional[tuple[int, int]]:
        start = None
        for i, line in enumerate(self.lines):
            match = self._SECTION.match(line)
            if match is None:
                continue
            if start is not None:
                return start, i
            if match.group(1).strip() == section:
                start = i + 1
        return None if start is None else (start, len(self.lines))

    def get(self, section: str, option: str) -> Optional[str]:
        bounds = self._section_range(section)
        if bounds is None:
            return None
        for line in self.lines[bounds[0]:bounds[1]]:
            match = self._OPTION.match(line)
            if match and match.group(1) == option:
                return match.group(2).strip()
        return None

    def set(self, section: str, option: str, value: str) -> None:
        line = f'{option} = {value}'
        bounds = self._section_range(section)
        if bounds is None:
            if self.lines and self.lines[-1].strip():
                self.lines.append('')
            self.lines += [f'[{section}]', line]
            return
        start, end = bounds
        for i in range(start, end):
            match = self._OPTION.match(self.lines[i])
            if match and match.group(1) == option:
                self.lines[i] = line
                return
        # after the section's last non-blank line
        while end > start and not self.lines[end - 1].strip():
            end -= 1
        self.lines.insert(end, line)

    def text(self) -> str:
        return '\n'.join(self.lines) + '\n'


def host_memory_mib(meminfo: str = '/proc/meminfo') -> int:
    with open(meminfo) as f:
        for line in f:
            if line.startswith('MemTotal:'):
                return int(line.split()[1]) // 1024
    raise DeployError(f'no MemTotal in {meminfo}')


def file_backed_memory(value: str | int) -> int:
    """``auto``: this host's memory less 1 GiB for the host itself (Nova
    allows no reserved_host_memory_mb with file-backed memory), at least
    1 GiB; else a number of MiB."""
    if value == 'auto':
        return max(AUTO_MINIMUM_MIB, host_memory_mib() - HOST_RESERVE_MIB)
    return check_int(value, '--file-backed-memory',
                     FILE_BACKED_MEMORY_RANGE)


def nova_options(compute_driver: str = DEFAULT_COMPUTE_DRIVER,
                 memory: str | int = 'auto',
                 nic_checksum_offload: str | bool = '',
                 ) -> dict[str, dict[str, str]]:
    """The options nova-compute needs for FT servers; ``[ft]
    nic_checksum_offload`` only if ``nic_checksum_offload`` is given
    (false on hosts whose datapath cannot finish guests' checksums)."""
    options = {
        'DEFAULT': {'compute_driver': check_driver(compute_driver),
                    # Nova refuses to start with file-backed memory
                    # unless these two hold.
                    'ram_allocation_ratio': '1.0',
                    'reserved_host_memory_mb': '0'},
        # Guest RAM in a shared file (<memoryBacking> source file, access
        # shared) for every instance: the agent reads an FT guest's RAM
        # from it.
        'libvirt': {'file_backed_memory': str(file_backed_memory(memory))},
    }
    if nic_checksum_offload != '':
        options['ft'] = {'nic_checksum_offload': str(check_bool(
            nic_checksum_offload, '--nic-checksum-offload'))}
    return options


def update_nova_conf(path: str,
                     options: Mapping[str, Mapping[str, str]]) -> None:
    """Set ``options`` in ``path`` in place; its mode is kept."""
    try:
        with open(path) as f:
            text = f.read()
        mode = os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        text, mode = '', 0o600
    ini = IniFile(text)
    for section, values in options.items():
        for option, value in values.items():
            ini.set(section, option, value)
    write_private(path, ini.text().encode())
    os.chmod(path, mode)


# -- the command ---------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:   # type: ignore[override]
        self.exit(2, f'mftvm-deploy: error: {message}\n')


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog='python -m mftvm_openstack.deploy',
                     description='Write a compute host\'s FT configuration.')
    sub = parser.add_subparsers(dest='command', required=True)
    agent = sub.add_parser('agent', help='write the agent\'s mftvm.conf '
                           f'(URLs from ${TRANSPORT_URL_ENV} and '
                           f'${FENCING_URL_ENV})')
    agent.add_argument('--conf', required=True, help='the file to write')
    agent.add_argument('--host', default='',
                       help='[agent] host: the name nova-compute uses '
                            '(default: --nova-conf\'s [DEFAULT] host, '
                            'else this machine\'s name)')
    agent.add_argument('--nova-conf', default=None,
                       help='where to read [DEFAULT] host from')
    agent.add_argument('--my-ip', required=True)
    agent.add_argument('--state-path', required=True)
    agent.add_argument('--peers', default='')
    agent.add_argument('--lease', default='3')
    agent.add_argument('--epoch-ms', default='200')
    agent.add_argument('--debug', default='False')
    agent.add_argument('--log-file', default=None)
    agent.add_argument('--log-max-mb', default=None)
    agent.add_argument('--notification-driver',
                       default=DEFAULT_NOTIFICATION_DRIVER,
                       help='[oslo_messaging_notifications] driver '
                            f'(default {DEFAULT_NOTIFICATION_DRIVER}; noop: '
                            'none)')
    agent.add_argument('--notification-topic',
                       default=DEFAULT_NOTIFICATION_TOPIC,
                       help='[oslo_messaging_notifications] topics '
                            f'(default {DEFAULT_NOTIFICATION_TOPIC})')
    agent.add_argument('--metrics-port', default=str(DEFAULT_METRICS_PORT),
                       help='[metrics] port of the Prometheus endpoint '
                            f'(default {DEFAULT_METRICS_PORT}; 0: none)')
    agent.add_argument('--metrics-bind-address',
                       default=DEFAULT_METRICS_BIND_ADDRESS,
                       help='[metrics] bind_address (default '
                            f'{DEFAULT_METRICS_BIND_ADDRESS}: this host '
                            'only; the management network\'s address for '
                            'a Prometheus elsewhere, never one tenants '
                            'reach)')
    nova = sub.add_parser('nova', help='set nova-compute\'s FT options in '
                          'a nova.conf, in place')
    nova.add_argument('--nova-conf', required=True)
    nova.add_argument('--compute-driver', default=DEFAULT_COMPUTE_DRIVER)
    nova.add_argument('--file-backed-memory', default='auto',
                      help='MiB, or auto (this host\'s memory less 1 GiB)')
    nova.add_argument('--nic-checksum-offload', default='',
                      help='[ft] nic_checksum_offload: false where the '
                           'host cannot finish guests\' checksums (OVS\'s '
                           'userspace datapath with tunnels); default: '
                           'left as it is')
    return parser


def main(argv: Optional[list[str]] = None,
         env: Optional[Mapping[str, str]] = None) -> int:
    args = _parser().parse_args(argv)
    environ = os.environ if env is None else env
    try:
        if args.command == 'agent':
            config = agent_config(
                host=args.host, my_ip=args.my_ip,
                state_path=args.state_path, env=environ, lease=args.lease,
                epoch_ms=args.epoch_ms, peers=args.peers, debug=args.debug,
                log_file=args.log_file, log_max_mb=args.log_max_mb,
                nova_conf=args.nova_conf,
                notification_driver=args.notification_driver,
                notification_topic=args.notification_topic,
                metrics_port=args.metrics_port,
                metrics_bind_address=args.metrics_bind_address)
            conf = check_abs_path(os.path.abspath(args.conf), '--conf')
            write_agent_conf(conf, config)
        else:
            conf = check_abs_path(os.path.abspath(args.nova_conf),
                                  '--nova-conf')
            update_nova_conf(conf, nova_options(
                args.compute_driver, args.file_backed_memory,
                args.nic_checksum_offload))
    except (DeployError, OSError) as exc:
        print(f'mftvm-deploy: error: {exc}', file=sys.stderr)
        return 2
    return 0


if __name__ == '__main__':
    sys.exit(main())
