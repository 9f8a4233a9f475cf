"""A real OpenStack control plane on one machine, in a network namespace.

Brings up, from the Python packages of ``.cloud-venv`` (PyPI releases
pinned by ``tools/cloud/constraints.txt``) and Debian's MariaDB,
RabbitMQ, Open vSwitch, OVN and libvirt, the services of DevStack's
default topology: Keystone, Glance (file store), Placement, Neutron
(ML2/OVN), and Nova's API, super-conductor, scheduler and the conductor
of cell1, whose messages travel on their own RabbitMQ vhost
(``nova_cell1``) as in DevStack's superconductor mode, and etcd, the
agents' fencing store; then compute hosts, each in namespaces of its
own with nova-compute and mftvm-agent, configured by
``python -m mftvm_openstack.deploy`` as the DevStack plugin does.  Run
it with the cloud venv's Python, as root::

    .cloud-venv/bin/python tools/cloud/cloudlab.py up     # 2-4 min
    .cloud-venv/bin/python tools/cloud/cloudlab.py add-host h1
    source /var/lib/mftvm-cloud/openrc
    openstack hypervisor list
    .cloud-venv/bin/python tools/cloud/cloudlab.py down

(``tools/run.sh cloud`` and ``tools/run.sh cloud-down`` do the same
after installing what is needed.)

Everything lives under ``--dir``: configuration, databases, logs (each
bounded by size), images, the admin's ``openrc``.  Every daemon runs at
``nice 10`` inside the namespace ``mfc-<name>``, whose bridge ``br0``
(``10.78.N.1/24``) the root namespace reaches through a veth
(``10.78.N.254``); compute hosts are meant to join that bridge, each in
its own namespace (doc/cloud-lab.rst).  ``down`` ends every process in
the namespace, then removes it: nothing is left running.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, Optional

IP = shutil.which('ip') or '/usr/sbin/ip'
NET_PREFIX = '10.78'            # control networks are NET_PREFIX.N.0/24
LOCK_PATH = '/tmp/mftvm-cloud.lock'
NAME_RE = re.compile(r'^[a-z0-9]{1,10}$')
# Labs of the e2e tier are named after their test process (p<pid>, or
# with a letter before it for a module's own lab beside the tier's
# shared one: hp<pid>, vp<pid>); a lab whose process is dead is removed
# by the next `up`.
OWNED_NAME_RE = re.compile(r'^mfc-[a-z]?p(\d+)(-[a-z0-9]+)?$')
HOST_RE = re.compile(r'^[a-z][a-z0-9]{0,7}$')
FIRST_HOST_OCTET = 11
UNDERLAY_PREFIX = '10.79'       # hosts' Geneve underlay: UNDERLAY_PREFIX.N.*
HOST_RAM_DIR = '/run/libvirt-ram'   # in a host's private /run (a tmpfs)
#: the agent's state_path, in a host's private /run too: an instance's
#: sockets are <state_path>/instances/<uuid>/<role>/<name>.sock, and a
#: unix socket's path may have 107 bytes at most (under the lab's
#: directory in /tmp, a secondary's control.sock has 112)
HOST_STATE_DIR = '/run/mftvm'

VENV = os.path.dirname(os.path.dirname(os.path.abspath(sys.executable)))
BIN = os.path.join(VENV, 'bin')
#: the source tree this script belongs to
SOURCE = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
#: the ft: flavor properties for Glance's metadefs catalog (Horizon's
#: "Update Metadata" dialog offers them; doc/admin.rst)
FT_METADEFS = os.path.join(SOURCE, 'etc', 'metadefs', 'mftvm-ft.json')

# Debian's daemons, run as root with our own paths (no systemd here).
MARIADB_INSTALL_DB = '/usr/bin/mariadb-install-db'
MARIADBD = '/usr/sbin/mariadbd'
MARIADB = '/usr/bin/mariadb'
EPMD = shutil.which('epmd') or '/usr/bin/epmd'
# Under /usr/sbin they su to the rabbitmq user and force its config.
RABBITMQ_SERVER = '/usr/lib/rabbitmq/bin/rabbitmq-server'
RABBITMQCTL = '/usr/lib/rabbitmq/bin/rabbitmqctl'

PORTS = {'keystone': 5000, 'glance': 9292, 'placement': 8778,
         'nova-api': 8774, 'neutron': 9696, 'rabbit': 5672, 'mysql': 3306,
         'ovn-nb': 6641, 'ovn-sb': 6642, 'mftvm-api': 8790, 'etcd': 2379,
         'etcd-peer': 2380, 'horizon': 80}
SERVICE_USERS = ('glance', 'placement', 'nova', 'neutron')

# Debian's Open vSwitch and OVN (openvswitch-switch, ovn-central,
# ovn-host), each daemon run in the foreground by start().
OVSDB_TOOL = '/usr/bin/ovsdb-tool'
OVSDB_SERVER = '/usr/sbin/ovsdb-server'
OVS_VSWITCHD = '/usr/sbin/ovs-vswitchd'
OVS_VSCTL = '/usr/bin/ovs-vsctl'
OVN_NORTHD = '/usr/bin/ovn-northd'
OVN_CONTROLLER = '/usr/bin/ovn-controller'
OVS_SCHEMA = '/usr/share/openvswitch/vswitch.ovsschema'
OVN_SCHEMAS = {'nb': '/usr/share/ovn/ovn-nb.ovsschema',
               'sb': '/usr/share/ovn/ovn-sb.ovsschema'}
# Debian's etcd-server: the agents' fencing store
ETCD = shutil.which('etcd') or '/usr/bin/etcd'
#: nova-compute's default driver on the lab's hosts (add-host --driver)
FT_DRIVER = 'mftvm.FTLibvirtDriver'
#: guest memory an FT host offers, MiB (all of it file-backed)
HOST_GUEST_MEMORY_MIB = 4096
LOG_MAX_MB = 10                 # per log file, two files kept
#: where Horizon answers (its WEBROOT): http://<lab>/
HORIZON_ROOT = '/'
START_TIMEOUT = 300.0


class LabError(Exception):
    """The lab cannot be brought up; the message says what failed."""


def log(msg: str) -> None:
    print(f'[cloudlab {time.strftime("%H:%M:%S")}] {msg}', flush=True)


# -- the state of one lab ------------------------------------------------


class Lab:
    """One control plane: its directory, namespace, addresses, secrets.

    ``lab.json`` in the directory (mode 0600) remembers what ``down``
    needs: the namespace, the subnet and the passwords.
    """

    def __init__(self, state_dir: str) -> None:
        self.dir = os.path.abspath(state_dir)
        self.state_file = os.path.join(self.dir, 'lab.json')
        self.state: dict[str, Any] = {}
        if os.path.exists(self.state_file):
            with open(self.state_file) as f:
                self.state = json.load(f)

    def path(self, *parts: str) -> str:
        return os.path.join(self.dir, *parts)

    def save(self) -> None:
        os.makedirs(self.dir, exist_ok=True)
        tmp = self.state_file + '.tmp'
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC,
                          0o600), 'w') as f:
            json.dump(self.state, f, indent=1)
        os.replace(tmp, self.state_file)

    @property
    def ns(self) -> str:
        return self.state['ns']

    @property
    def ip(self) -> str:
        """The control plane's address (the bridge in its namespace)."""
        return f'{NET_PREFIX}.{self.state["subnet"]}.1'

    @property
    def root_ip(self) -> str:
        return f'{NET_PREFIX}.{self.state["subnet"]}.254'

    def password(self, who: str) -> str:
        return self.state['passwords'][who]

    def db_url(self, db: str) -> str:
        return (f'mysql+pymysql://cloud:{self.password("mysql")}'
                f'@127.0.0.1:{PORTS["mysql"]}/{db}?charset=utf8')

    def rabbit_url(self, vhost: str = '') -> str:
        return (f'rabbit://cloud:{self.password("rabbit")}@{self.ip}:'
                f'{PORTS["rabbit"]}/{vhost}')

    def url(self, service: str) -> str:
        return f'http://{self.ip}:{PORTS[service]}'

    @property
    def fencing_url(self) -> str:
        """The agents' fencing store: the lab's etcd."""
        return f'etcd3+http://{self.ip}:{PORTS["etcd"]}'


# -- processes -----------------------------------------------------------


def run(argv: list[str], ns: Optional[str] = None, check: bool = True,
        **kwargs: Any) -> subprocess.CompletedProcess:
    if ns is not None:
        argv = [IP, 'netns', 'exec', ns, *argv]
    kwargs.setdefault('capture_output', True)
    kwargs.setdefault('text', True)
    result = subprocess.run(argv, **kwargs)
    if check and result.returncode:
        raise LabError(f'{" ".join(argv)} failed ({result.returncode}):\n'
                       f'{result.stdout}{result.stderr}')
    return result


def start(lab: Lab, name: str, argv: list[str], *,
          enter: Optional[list[str]] = None, **env: str) -> int:
    """Start a daemon in the lab's namespace at nice 10, with
    :func:`service_env` plus ``env``; its output goes to
    ``log/<name>.out`` (start-up and crash messages only: each service
    logs to its own size-bounded file).  ``enter`` replaces ``ip netns
    exec <lab ns>`` (a compute host's daemons enter its namespaces with
    nsenter).  ``lab.json`` keeps how it was started, for
    :func:`restart`."""
    out_path = lab.path('log', f'{name}.out')
    prefix = enter if enter is not None else [IP, 'netns', 'exec', lab.ns]
    with open(out_path, 'ab') as out:
        proc = subprocess.Popen(
            [*prefix, 'nice', '-n', '10', *argv],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            env=service_env(lab, **env), cwd=lab.dir,
            start_new_session=True)
    lab.state.setdefault('pids', {})[name] = proc.pid
    lab.state.setdefault('how', {})[name] = {'argv': argv, 'env': env,
                                             'enter': enter}
    lab.save()
    return proc.pid


def stop(pid: int, grace: float = 15.0) -> None:
    """SIGTERM ``pid``'s process group, SIGKILL it after ``grace`` s;
    returns once no process of the group is left (a uwsgi worker that
    outlives its master still holds the port a restart binds)."""
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        deadline = time.monotonic() + wait
        while group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if not group_alive(pid):
            return


def group_alive(pgid: int) -> bool:
    """Is a process of group ``pgid`` left, other than zombies?"""
    for entry in os.listdir('/proc'):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError):
            with open(f'/proc/{entry}/stat') as f:
                fields = f.read().rsplit(')', 1)[1].split()
            # (state, ppid, pgrp, ...)
            if int(fields[2]) == pgid and fields[0] != 'Z':
                return True
    return False


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(OSError):
        with open(f'/proc/{pid}/stat') as f:
            if f.read().rsplit(')', 1)[1].split()[0] == 'Z':
                return False
    return True


def wait_for(what: str, predicate: Callable[[], Any], lab: Lab,
             name: Optional[str] = None,
             timeout: float = START_TIMEOUT) -> None:
    """Poll ``predicate`` until true; fail early if daemon ``name`` died."""
    deadline = time.monotonic() + timeout
    while not predicate():
        pid = lab.state.get('pids', {}).get(name) if name else None
        if pid is not None and not alive(pid):
            raise LabError(f'{name} exited while waiting for {what}:\n'
                           f'{tail(lab.path("log", f"{name}.out"))}')
        if time.monotonic() > deadline:
            raise LabError(f'timed out after {timeout:.0f}s waiting for '
                           f'{what}')
        time.sleep(0.5)


def tail(path: str, lines: int = 40) -> str:
    try:
        with open(path, errors='replace') as f:
            return ''.join(f.readlines()[-lines:])
    except OSError as e:
        return str(e)


def tcp_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def http_up(url: str) -> bool:
    """Does ``url`` answer HTTP at all (any status)?"""
    try:
        with urllib.request.urlopen(url, timeout=5):
            return True
    except urllib.error.HTTPError:
        return True
    except (OSError, ValueError):
        return False


# -- the namespace -------------------------------------------------------


def ns_pids(ns: str) -> list[int]:
    out = run([IP, 'netns', 'pids', ns], check=False).stdout
    return [int(p) for p in out.split()]


def kill_namespace(ns: str, grace: float = 15.0) -> None:
    """SIGTERM every process in ``ns``, SIGKILL what is left after
    ``grace`` seconds, then delete the namespace and its links."""
    if not os.path.exists(f'/run/netns/{ns}'):
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        for pid in ns_pids(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline and \
                any(alive(p) for p in ns_pids(ns)):
            time.sleep(0.2)
    run([IP, 'netns', 'del', ns], check=False)


def reap_stale() -> None:
    """Remove labs of e2e test processes that died without cleaning up."""
    for line in run([IP, 'netns', 'list'], check=False).stdout.split('\n'):
        match = OWNED_NAME_RE.match(line.split(' ')[0])
        if match and not alive(int(match.group(1))):
            log(f'removing stale lab {match.group(0)}')
            kill_namespace(match.group(0), grace=2.0)


def make_namespace(lab: Lab) -> None:
    """The namespace with bridge br0 at .1 and a veth to the root at .254;
    the subnet is picked under a lock so that labs never share one."""
    with open(LOCK_PATH, 'a') as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        reap_stale()
        if os.path.exists(f'/run/netns/{lab.ns}'):
            raise LabError(f'namespace {lab.ns} exists: another lab of this '
                           f'name is up (cloudlab.py down --dir ...)')
        addrs = run([IP, '-o', '-4', 'addr', 'show']).stdout
        free = [n for n in range(1, 254)
                if f' {NET_PREFIX}.{n}.' not in addrs]
        if not free:
            raise LabError(f'no free {NET_PREFIX}.N.0/24')
        lab.state['subnet'] = free[0]
        lab.save()
        ns, veth = lab.ns, f'mfc{free[0]}r'
        run([IP, 'netns', 'add', ns])
        run([IP, '-n', ns, 'link', 'set', 'lo', 'up'])
        run([IP, '-n', ns, 'link', 'add', 'br0', 'type', 'bridge'])
        run([IP, '-n', ns, 'addr', 'add', f'{lab.ip}/24', 'dev', 'br0'])
        run([IP, '-n', ns, 'link', 'set', 'br0', 'up'])
        run([IP, 'link', 'add', veth, 'type', 'veth', 'peer', 'name',
             'up0', 'netns', ns])
        run([IP, 'addr', 'add', f'{lab.root_ip}/24', 'dev', veth])
        run([IP, 'link', 'set', veth, 'up'])
        run([IP, '-n', ns, 'link', 'set', 'up0', 'master', 'br0', 'up'])


# -- configuration files -------------------------------------------------


def write_ini(path: str, sections: dict[str, dict[str, Any]]) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
              'w') as f:
        for section, options in sections.items():
            f.write(f'[{section}]\n')
            for key, value in options.items():
                f.write(f'{key} = {value}\n')
            f.write('\n')


def oslo_log(lab: Lab, name: str) -> dict[str, Any]:
    """[DEFAULT] options: log to a file that rotates by size."""
    return {'log_file': lab.path('log', f'{name}.log'),
            'log_rotation_type': 'size',
            'max_logfile_size_mb': LOG_MAX_MB, 'max_logfile_count': 2,
            'debug': False}


def authtoken(lab: Lab, user: str) -> dict[str, Any]:
    return {'www_authenticate_uri': lab.url('keystone'),
            'auth_url': lab.url('keystone'), 'auth_type': 'password',
            'project_domain_name': 'Default', 'user_domain_name': 'Default',
            'project_name': 'service', 'username': user,
            'password': lab.password(user),
            'memcached_servers': ''}


def service_auth(lab: Lab, user: str) -> dict[str, Any]:
    """Credentials a service uses to call another (nova -> placement)."""
    return {'auth_type': 'password', 'auth_url': lab.url('keystone'),
            'project_domain_name': 'Default', 'user_domain_name': 'Default',
            'project_name': 'service', 'username': user,
            'password': lab.password(user), 'region_name': 'RegionOne'}


def uwsgi(lab: Lab, name: str, module: str, port: int,
          extra: tuple[str, ...] = ()) -> list[str]:
    """uwsgi serving ``module:application`` over HTTP on ``port``.

    One process, two threads: enough for a lab, and light on a small
    machine.  ``--log-maxsize`` bounds its log.  uwsgi's http-socket
    does not keep connections alive, so every answer says so (as
    DevStack's uwsgi configuration does); clients that reuse a
    connection would otherwise see it reset.
    """
    return [os.path.join(BIN, 'uwsgi'), '--master', '--die-on-term',
            '--need-app', '--enable-threads', '--lazy-apps',
            '--processes', '1', '--threads', '2',
            '--http-socket', f'0.0.0.0:{port}', '--module',
            f'{module}:application', '--buffer-size', '65535',
            '--logto', lab.path('log', f'{name}-uwsgi.log'),
            '--log-maxsize', str(LOG_MAX_MB * 1024 * 1024),
            '--disable-logging', '--add-header', 'Connection: close',
            *extra]


def configure(lab: Lab) -> None:
    ip = lab.ip
    etc = lab.path('etc')
    venv_etc = os.path.join(VENV, 'etc')
    for d in ('keystone', 'glance', 'placement', 'nova', 'neutron'):
        os.makedirs(os.path.join(etc, d), exist_ok=True)
    lock_path = lab.path('lock')
    os.makedirs(lock_path, exist_ok=True)

    write_ini(os.path.join(etc, 'keystone', 'keystone.conf'), {
        'DEFAULT': oslo_log(lab, 'keystone'),
        'database': {'connection': lab.db_url('keystone')},
        'token': {'provider': 'fernet'},
        'fernet_tokens': {'key_repository': lab.path('keystone', 'fernet')},
        'credential': {'key_repository': lab.path('keystone', 'credential')},
    })

    shutil.copy(os.path.join(venv_etc, 'glance', 'glance-api-paste.ini'),
                os.path.join(etc, 'glance'))
    write_ini(os.path.join(etc, 'glance', 'glance-api.conf'), {
        'DEFAULT': {**oslo_log(lab, 'glance'),
                    'enabled_backends': 'file:file',
                    'bind_host': ip,
                    'worker_self_reference_url': lab.url('glance')},
        'glance_store': {'default_backend': 'file'},
        'file': {'filesystem_store_datadir': lab.path('glance', 'images')},
        'os_glance_staging_store': {
            'filesystem_store_datadir': lab.path('glance', 'staging')},
        'os_glance_tasks_store': {
            'filesystem_store_datadir': lab.path('glance', 'tasks')},
        'database': {'connection': lab.db_url('glance')},
        'keystone_authtoken': authtoken(lab, 'glance'),
        'paste_deploy': {'flavor': 'keystone'},
        'oslo_concurrency': {'lock_path': lock_path},
    })

    write_ini(os.path.join(etc, 'placement', 'placement.conf'), {
        'DEFAULT': oslo_log(lab, 'placement'),
        'placement_database': {'connection': lab.db_url('placement')},
        'api': {'auth_strategy': 'keystone'},
        'keystone_authtoken': authtoken(lab, 'placement'),
    })

    # nova.conf: the API, the super-conductor and the scheduler (API
    # database, cell0, the top-level vhost "/").
    shutil.copy(os.path.join(venv_etc, 'nova', 'api-paste.ini'),
                os.path.join(etc, 'nova'))
    common = {
        'keystone_authtoken': authtoken(lab, 'nova'),
        'placement': service_auth(lab, 'placement'),
        'glance': {'api_servers': lab.url('glance')},
        'oslo_concurrency': {'lock_path': lock_path},
        'conductor': {'workers': 1},
        'scheduler': {'workers': 1},
        'api': {'auth_strategy': 'keystone'},
        'wsgi': {'api_paste_config': os.path.join(etc, 'nova',
                                                  'api-paste.ini')},
        'oslo_messaging_notifications': {'driver': 'noop'},
        'neutron': service_auth(lab, 'neutron'),
    }
    write_ini(os.path.join(etc, 'nova', 'nova.conf'), {
        'DEFAULT': {**oslo_log(lab, 'nova'), 'my_ip': ip,
                    'transport_url': lab.rabbit_url(),
                    'osapi_compute_workers': 1},
        'api_database': {'connection': lab.db_url('nova_api')},
        'database': {'connection': lab.db_url('nova_cell0')},
        **common,
    })
    # Each Nova daemon logs to a file of its own (size rotation is not
    # safe with several writers): one more config file each, whose
    # [DEFAULT] log_file overrides nova.conf's (which nova-manage uses).
    for name in ('nova-api', 'nova-scheduler', 'nova-conductor'):
        write_ini(os.path.join(etc, 'nova', f'log-{name}.conf'),
                  {'DEFAULT': oslo_log(lab, name)})
    # nova_cell1.conf: cell1's conductor, on its own vhost and database,
    # with no API database: it cannot call up (DevStack's superconductor).
    write_ini(os.path.join(etc, 'nova', 'nova_cell1.conf'), {
        'DEFAULT': {**oslo_log(lab, 'nova-cond-cell1'), 'my_ip': ip,
                    'transport_url': lab.rabbit_url('nova_cell1')},
        'database': {'connection': lab.db_url('nova_cell1')},
        **common,
    })

    configure_neutron(lab)

    env = (f'export OS_AUTH_URL={lab.url("keystone")}/v3\n'
           'export OS_IDENTITY_API_VERSION=3\n'
           'export OS_USERNAME=admin\n'
           'export OS_PROJECT_NAME=admin\n'
           'export OS_USER_DOMAIN_NAME=Default\n'
           'export OS_PROJECT_DOMAIN_NAME=Default\n'
           'export OS_REGION_NAME=RegionOne\n'
           f'export OS_PASSWORD={lab.password("admin")}\n'
           # the agents' broker, for "mftvm list --host h1" and the like
           f'export MFTVM_TRANSPORT_URL={lab.rabbit_url("nova_cell1")}\n'
           f'export PATH={BIN}:$PATH\n')
    with open(os.open(lab.path('openrc'),
                      os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
              'w') as f:
        f.write(env)


def configure_neutron(lab: Lab) -> None:
    """neutron.conf and ml2_conf.ini: ML2 with the OVN mechanism driver,
    Geneve tenant networks, OVN's own DHCP; no metadata service (the
    project's guests need none) and no agents.  Neutron tells Nova when
    a port goes up (the "network-vif-plugged" event a boot waits for)."""
    etc = lab.path('etc', 'neutron')
    shutil.copy(os.path.join(VENV, 'etc', 'neutron', 'api-paste.ini'), etc)
    write_ini(os.path.join(etc, 'neutron.conf'), {
        'DEFAULT': {**oslo_log(lab, 'neutron'),
                    'core_plugin': 'ml2', 'service_plugins': 'ovn-router',
                    'auth_strategy': 'keystone',
                    'transport_url': lab.rabbit_url(),
                    'state_path': lab.path('neutron'),
                    'api_workers': 1, 'rpc_workers': 0,
                    'api_paste_config': os.path.join(etc, 'api-paste.ini'),
                    'notify_nova_on_port_status_changes': True,
                    'notify_nova_on_port_data_changes': True},
        'database': {'connection': lab.db_url('neutron')},
        'keystone_authtoken': authtoken(lab, 'neutron'),
        'nova': service_auth(lab, 'nova'),
        'placement': service_auth(lab, 'placement'),
        'oslo_concurrency': {'lock_path': lab.path('lock')},
        'oslo_messaging_notifications': {'driver': 'noop'},
    })
    write_ini(os.path.join(etc, 'ml2_conf.ini'), {
        'ml2': {'mechanism_drivers': 'ovn',
                'type_drivers': 'local,flat,geneve',
                'tenant_network_types': 'geneve',
                'extension_drivers': 'port_security',
                'overlay_ip_version': 4},
        'ml2_type_geneve': {'vni_ranges': '1:65536',
                            'max_header_size': 38},
        'securitygroup': {'enable_security_group': True},
        'ovn': {'ovn_nb_connection': f'tcp:{lab.ip}:{PORTS["ovn-nb"]}',
                'ovn_sb_connection': f'tcp:{lab.ip}:{PORTS["ovn-sb"]}',
                'ovn_metadata_enabled': False},
    })
    # One log file per writer (see nova's log-*.conf)
    write_ini(os.path.join(etc, 'log-neutron-ovn-maint.conf'),
              {'DEFAULT': oslo_log(lab, 'neutron-ovn-maint')})


def service_env(lab: Lab, **extra: str) -> dict[str, str]:
    """Our environment without OpenStack's, RabbitMQ's and Erlang's
    variables, the venv's bin first on PATH, and ``extra``."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(('OS_', 'RABBITMQ_', 'ERL_'))}
    env['PATH'] = f'{BIN}:{env.get("PATH", os.defpath)}'
    env.update(extra)
    return env


# -- MariaDB and RabbitMQ ------------------------------------------------


def start_mariadb(lab: Lab) -> None:
    data = lab.path('mysql')
    sock = lab.path('mysql.sock')
    run([MARIADB_INSTALL_DB, '--no-defaults', f'--datadir={data}',
         '--user=root', '--skip-test-db',
         '--auth-root-authentication-method=socket'])
    start(lab, 'mariadb', [
        MARIADBD, '--no-defaults', f'--datadir={data}', f'--socket={sock}',
        f'--pid-file={lab.path("mysql.pid")}', '--user=root',
        f'--port={PORTS["mysql"]}', '--bind-address=127.0.0.1',
        f'--log-error={lab.path("log", "mariadb.log")}',
        '--skip-name-resolve', '--performance-schema=OFF',
        '--innodb-buffer-pool-size=64M', '--innodb-log-file-size=32M',
        '--max-connections=500', '--character-set-server=utf8mb4',
        '--collation-server=utf8mb4_general_ci'])
    wait_for('MariaDB', lambda: os.path.exists(sock) and run(
        [MARIADB, '--no-defaults', f'--socket={sock}', '-uroot', '-e',
         'select 1'], check=False).returncode == 0, lab, 'mariadb')
    pw = lab.password('mysql')
    sql = [f"CREATE USER 'cloud'@'127.0.0.1' IDENTIFIED BY '{pw}';"]
    for db in ('keystone', 'glance', 'placement', 'nova_api', 'nova_cell0',
               'nova_cell1', 'neutron'):
        sql.append(f'CREATE DATABASE {db};')
        sql.append(f"GRANT ALL ON {db}.* TO 'cloud'@'127.0.0.1';")
    run([MARIADB, '--no-defaults', f'--socket={sock}', '-uroot', '-e',
         ' '.join(sql)])


def rabbit_env(lab: Lab) -> dict[str, str]:
    """RabbitMQ's variables: every path in the lab, our own node name."""
    d = lab.path('rabbitmq')
    return {
        'HOME': d, 'LC_ALL': 'C.UTF-8',
        'RABBITMQ_NODENAME': f'{lab.ns}@localhost',
        'RABBITMQ_NODE_IP_ADDRESS': '0.0.0.0',
        'RABBITMQ_NODE_PORT': str(PORTS['rabbit']),
        'RABBITMQ_CONF_ENV_FILE': os.path.join(d, 'rabbitmq-env.conf'),
        'RABBITMQ_CONFIG_FILE': os.path.join(d, 'rabbitmq.config'),
        'RABBITMQ_ADVANCED_CONFIG_FILE': os.path.join(d, 'advanced.config'),
        'RABBITMQ_ENABLED_PLUGINS_FILE': os.path.join(d, 'enabled_plugins'),
        'RABBITMQ_MNESIA_BASE': os.path.join(d, 'mnesia'),
        'RABBITMQ_LOG_BASE': lab.path('log'),
        'RABBITMQ_PID_FILE': os.path.join(d, 'rabbit.pid'),
        'RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS':
            '-start_epmd false -kernel inet_dist_use_interface {127,0,0,1}',
        'RABBITMQ_CTL_ERL_ARGS': '-start_epmd false',
    }


def rabbitmqctl(lab: Lab, *args: str) -> str:
    return run([RABBITMQCTL, '-n', f'{lab.ns}@localhost', *args], lab.ns,
               env=service_env(lab, **rabbit_env(lab)),
               cwd=lab.path('rabbitmq')).stdout


def start_rabbitmq(lab: Lab) -> None:
    """The broker: vhost "/" for the API level, "nova_cell1" for cell1."""
    d = lab.path('rabbitmq')
    os.makedirs(os.path.join(d, 'mnesia'), exist_ok=True)
    cookie = os.path.join(d, '.erlang.cookie')
    with open(os.open(cookie, os.O_WRONLY | os.O_CREAT, 0o400), 'w') as f:
        f.write(secrets.token_hex(16).upper())
    # Classic Erlang-term config: skips cuttlefish, boots faster.
    with open(os.path.join(d, 'rabbitmq.config'), 'w') as f:
        f.write('[{rabbit, [{loopback_users, []},\n'
                '  {default_user, <<"cloud">>},\n'
                f'  {{default_pass, <<"{lab.password("rabbit")}">>}},\n'
                '  {default_permissions, [<<".*">>, <<".*">>, <<".*">>]},\n'
                '  {log, [{file, [{level, warning}]}]}]}].\n')
    with open(os.path.join(d, 'enabled_plugins'), 'w') as f:
        f.write('[].\n')
    open(os.path.join(d, 'rabbitmq-env.conf'), 'w').close()
    env: dict[str, Any] = rabbit_env(lab)
    # Its own epmd, in the namespace, so that none outlives the lab.
    start(lab, 'epmd', [EPMD], **env)
    start(lab, 'rabbitmq', [RABBITMQ_SERVER], **env)
    wait_for('RabbitMQ', lambda: run(
        [RABBITMQCTL, '-n', f'{lab.ns}@localhost', 'await_startup'],
        lab.ns, check=False, env=service_env(lab, **env), cwd=d,
        timeout=120).returncode == 0, lab, 'rabbitmq')
    rabbitmqctl(lab, 'add_vhost', 'nova_cell1')
    rabbitmqctl(lab, 'set_permissions', '-p', 'nova_cell1', 'cloud',
                '.*', '.*', '.*')


def start_etcd(lab: Lab) -> None:
    """One etcd member (Debian's etcd-server), the agents' fencing store,
    on the control plane's address; small, as a fence needs a few keys."""
    client = f'http://{lab.ip}:{PORTS["etcd"]}'
    peer = f'http://127.0.0.1:{PORTS["etcd-peer"]}'
    start(lab, 'etcd', [
        ETCD, '--name', 'lab', '--data-dir', lab.path('etcd'),
        '--listen-client-urls', f'{client},http://127.0.0.1:{PORTS["etcd"]}',
        '--advertise-client-urls', client,
        '--listen-peer-urls', peer, '--initial-advertise-peer-urls', peer,
        '--initial-cluster', f'lab={peer}',
        '--quota-backend-bytes', str(16 * 1024 * 1024),
        '--snapshot-count', '10000', '--logger', 'zap',
        '--log-level', 'warn',
        '--log-outputs', lab.path('log', 'etcd.log')])


def etcd_healthy(lab: Lab) -> bool:
    try:
        with urllib.request.urlopen(
                f'http://{lab.ip}:{PORTS["etcd"]}/health', timeout=2) as r:
            return bool(json.load(r).get('health') == 'true')
    except (OSError, ValueError):
        return False


# -- the OpenStack services ----------------------------------------------


def manage(lab: Lab, *argv: str) -> None:
    """A ``*-manage`` command, in the namespace (the database is there)."""
    t0 = time.monotonic()
    run([os.path.join(BIN, argv[0]), *argv[1:]], lab.ns,
        env=service_env(lab))
    log(f'  {" ".join(argv[:4])} ... ({time.monotonic() - t0:.1f}s)')


def start_keystone(lab: Lab) -> None:
    conf = lab.path('etc', 'keystone', 'keystone.conf')
    for d in ('fernet', 'credential'):
        os.makedirs(lab.path('keystone', d), mode=0o700, exist_ok=True)
    manage(lab, 'keystone-manage', '--config-file', conf, 'db_sync')
    manage(lab, 'keystone-manage', '--config-file', conf, 'fernet_setup',
           '--keystone-user', 'root', '--keystone-group', 'root')
    manage(lab, 'keystone-manage', '--config-file', conf,
           'credential_setup', '--keystone-user', 'root',
           '--keystone-group', 'root')
    url = lab.url('keystone')
    manage(lab, 'keystone-manage', '--config-file', conf, 'bootstrap',
           '--bootstrap-password', lab.password('admin'),
           '--bootstrap-admin-url', url, '--bootstrap-internal-url', url,
           '--bootstrap-public-url', url,
           '--bootstrap-region-id', 'RegionOne')
    start(lab, 'keystone', uwsgi(lab, 'keystone', 'keystone.wsgi.api',
                                 PORTS['keystone']),
          OS_KEYSTONE_CONFIG_FILES=conf)


def register_services(lab: Lab) -> None:
    """The service project and users, roles, services and endpoints, as
    DevStack makes them (each service user is admin and service)."""
    import openstack

    conn = openstack.connect(
        auth_url=lab.url('keystone') + '/v3', username='admin',
        password=lab.password('admin'), project_name='admin',
        user_domain_name='Default', project_domain_name='Default',
        region_name='RegionOne')
    idn: Any = conn.identity    # v3 (the sdk types it v2 or v3)
    project = idn.create_project(name='service', domain_id='default')
    roles = {r.name: r for r in idn.roles()}
    for name in ('service', 'member', 'reader'):
        if name not in roles:
            roles[name] = idn.create_role(name=name)
    for user_name in SERVICE_USERS:
        user = idn.create_user(name=user_name, domain_id='default',
                               password=lab.password(user_name),
                               default_project_id=project.id)
        for role in ('admin', 'service'):
            idn.assign_project_role_to_user(project, user, roles[role])
    for name, kind, url in (
            ('glance', 'image', lab.url('glance')),
            ('placement', 'placement', lab.url('placement')),
            ('nova', 'compute', lab.url('nova-api') + '/v2.1'),
            ('neutron', 'network', lab.url('neutron'))):
        service = idn.create_service(name=name, type=kind)
        for interface in ('public', 'internal', 'admin'):
            idn.create_endpoint(service_id=service.id, interface=interface,
                                url=url, region_id='RegionOne')


def start_glance(lab: Lab) -> None:
    etc = lab.path('etc', 'glance')
    for d in ('images', 'staging', 'tasks'):
        os.makedirs(lab.path('glance', d), exist_ok=True)
    manage(lab, 'glance-manage', '--config-file',
           os.path.join(etc, 'glance-api.conf'), 'db_sync')
    # Image uploads are chunked: uwsgi must pass the raw body through.
    start(lab, 'glance', uwsgi(
        lab, 'glance', 'glance.wsgi.api', PORTS['glance'],
        ('--http-chunked-input', '--http-raw-body', '--http-auto-chunked',
         '--chunked-input-limit', str(10 * 1024 * 1024))),
        OS_GLANCE_CONFIG_DIR=etc)


def load_ft_metadefs(lab: Lab) -> None:
    """The ft: flavor properties into Glance's metadefs catalog.

    The DevStack plugin loads the same document with ``glance-manage db
    load_metadefs``; the metadefs API takes it as it is, in a second
    where glance-manage takes twenty to start."""
    import openstack

    with open(FT_METADEFS) as f:
        body = json.load(f)
    conn = openstack.connect(
        auth_url=lab.url('keystone') + '/v3', username='admin',
        password=lab.password('admin'), project_name='admin',
        user_domain_name='Default', project_domain_name='Default',
        region_name='RegionOne')
    response = conn.image.post('/metadefs/namespaces', json=body,
                               raise_exc=False)
    if response.status_code != 201:
        raise LabError(f'Glance refused {FT_METADEFS}: '
                       f'{response.status_code} {response.text[:500]}')
    log(f'  metadefs namespace {body["namespace"]} loaded')


def start_placement(lab: Lab) -> None:
    etc = lab.path('etc', 'placement')
    manage(lab, 'placement-manage', '--config-file',
           os.path.join(etc, 'placement.conf'), 'db', 'sync')
    start(lab, 'placement', uwsgi(lab, 'placement', 'placement.wsgi.api',
                                  PORTS['placement']),
          OS_PLACEMENT_CONFIG_DIR=etc)


def start_ovn_central(lab: Lab) -> None:
    """OVN's northbound and southbound databases (ovsdb-server each, on
    TCP for the hosts' ovn-controllers and Neutron) and ovn-northd."""
    d = lab.path('ovn')
    os.makedirs(d, exist_ok=True)
    for db, schema in OVN_SCHEMAS.items():
        path = os.path.join(d, f'ovn{db}_db.db')
        run([OVSDB_TOOL, 'create', path, schema])
        start(lab, f'ovsdb-{db}', [
            OVSDB_SERVER, path,
            f'--remote=punix:{d}/ovn{db}_db.sock',
            f'--remote=ptcp:{PORTS["ovn-" + db]}:{lab.ip}',
            f'--pidfile={d}/ovsdb-{db}.pid',
            f'--unixctl={d}/ovsdb-{db}.ctl',
            f'--log-file={lab.path("log", f"ovsdb-{db}.log")}'])
    for db in OVN_SCHEMAS:
        port = PORTS['ovn-' + db]
        wait_for(f'OVN {db} database', lambda: tcp_open(lab.ip, port),
                 lab, f'ovsdb-{db}')
    start(lab, 'ovn-northd', [
        OVN_NORTHD, f'--ovnnb-db=unix:{d}/ovnnb_db.sock',
        f'--ovnsb-db=unix:{d}/ovnsb_db.sock',
        f'--pidfile={d}/ovn-northd.pid', f'--unixctl={d}/ovn-northd.ctl',
        f'--log-file={lab.path("log", "ovn-northd.log")}'])


def start_neutron(lab: Lab) -> None:
    """The Neutron API under uwsgi (Neutron 29 has no eventlet server)
    and the OVN maintenance worker, which keeps OVN's databases in step
    with Neutron's.  No RPC server: ML2/OVN has no agents to talk to."""
    etc = lab.path('etc', 'neutron')
    os.makedirs(lab.path('neutron'), exist_ok=True)
    manage(lab, 'neutron-db-manage', '--config-file',
           os.path.join(etc, 'neutron.conf'), '--config-file',
           os.path.join(etc, 'ml2_conf.ini'), 'upgrade', 'heads')
    start(lab, 'neutron', uwsgi(lab, 'neutron', 'neutron.wsgi.api',
                                PORTS['neutron']),
          OS_NEUTRON_CONFIG_DIR=etc,
          OS_NEUTRON_CONFIG_FILES='neutron.conf;ml2_conf.ini')
    start(lab, 'neutron-ovn-maint', [
        os.path.join(BIN, 'neutron-ovn-maintenance-worker'),
        '--config-file', os.path.join(etc, 'neutron.conf'),
        '--config-file', os.path.join(etc, 'ml2_conf.ini'),
        '--config-file', os.path.join(etc, 'log-neutron-ovn-maint.conf')])


def sync_nova(lab: Lab) -> None:
    """API database, cell0 and cell1 mapped and synced (nova-manage)."""
    conf = lab.path('etc', 'nova', 'nova.conf')
    cell1 = lab.path('etc', 'nova', 'nova_cell1.conf')
    manage(lab, 'nova-manage', '--config-file', conf, 'api_db', 'sync')
    manage(lab, 'nova-manage', '--config-file', conf, 'cell_v2',
           'map_cell0', '--database_connection', lab.db_url('nova_cell0'))
    manage(lab, 'nova-manage', '--config-file', conf, 'db', 'sync')
    manage(lab, 'nova-manage', '--config-file', conf, 'cell_v2',
           'create_cell', '--name', 'cell1',
           '--transport-url', lab.rabbit_url('nova_cell1'),
           '--database_connection', lab.db_url('nova_cell1'))
    # cell1's own database only: its config has no API database
    manage(lab, 'nova-manage', '--config-file', cell1, 'db', 'sync',
           '--local_cell')


def start_nova(lab: Lab) -> None:
    etc = lab.path('etc', 'nova')
    conf = os.path.join(etc, 'nova.conf')
    cell1 = os.path.join(etc, 'nova_cell1.conf')
    start(lab, 'nova-api', uwsgi(lab, 'nova-api', 'nova.wsgi.osapi_compute',
                                 PORTS['nova-api']),
          OS_NOVA_CONFIG_DIR=etc,
          OS_NOVA_CONFIG_FILES='api-paste.ini;nova.conf;log-nova-api.conf')
    for name in ('nova-scheduler', 'nova-conductor'):
        start(lab, name, [os.path.join(BIN, name), '--config-file', conf,
                          '--config-file',
                          os.path.join(etc, f'log-{name}.conf')])
    start(lab, 'nova-cond-cell1',
          [os.path.join(BIN, 'nova-conductor'), '--config-file', cell1])


def wait_http(lab: Lab, name: str, url: str) -> None:
    t0 = time.monotonic()
    wait_for(f'{name} at {url}', lambda: http_up(url), lab, name)
    log(f'  {name} answers ({time.monotonic() - t0:.1f}s)')


def compute_services_up(lab: Lab) -> bool:
    """Are the scheduler and both conductors registered and up?"""
    result = run([os.path.join(BIN, 'openstack'), 'compute', 'service',
                  'list', '-f', 'json'], check=False,
                 env=openrc_env(lab))
    if result.returncode:
        return False
    services = {(s['Binary'], s['State']) for s in json.loads(result.stdout)}
    return ({('nova-scheduler', 'up'), ('nova-conductor', 'up')}
            <= services)


def openrc_env(lab: Lab) -> dict[str, str]:
    env = service_env(lab)
    with open(lab.path('openrc')) as f:
        for line in f:
            key, _, value = line.removeprefix('export ').strip().partition(
                '=')
            if key.startswith('OS_'):
                env[key] = value
    return env


# -- up, down, status ----------------------------------------------------


def up(state_dir: str, name: str, with_cinder: bool = False) -> Lab:
    if os.geteuid() != 0:
        raise LabError('cloudlab needs root (a network namespace)')
    if not NAME_RE.match(name):
        raise LabError(f'bad lab name {name!r}')
    lab = Lab(state_dir)
    if lab.state.get('ns') and os.path.exists(f'/run/netns/{lab.ns}'):
        raise LabError(f'a lab is already up in {lab.dir} '
                       f'(namespace {lab.ns}); run "down" first')
    if os.path.exists(lab.dir):
        # Only ever empty a directory that is a lab's (or empty).
        if os.listdir(lab.dir) and not os.path.exists(lab.state_file):
            raise LabError(f'{lab.dir} is not empty and holds no lab.json: '
                           f'not a lab directory, left alone')
        shutil.rmtree(lab.dir)
    os.makedirs(lab.path('log'))
    os.chmod(lab.dir, 0o700)
    lab.state = {'ns': f'mfc-{name}', 'started': time.time(),
                 'passwords': {who: secrets.token_hex(12) for who in (
                     'admin', 'mysql', 'rabbit', *SERVICE_USERS)}}
    lab.save()
    t0 = time.monotonic()
    try:
        make_namespace(lab)
        configure(lab)
        log(f'namespace {lab.ns}, control plane at {lab.ip}')
        start_etcd(lab)
        start_mariadb(lab)
        start_rabbitmq(lab)
        wait_for('etcd', lambda: etcd_healthy(lab), lab, 'etcd')
        log(f'etcd, MariaDB and RabbitMQ up ({time.monotonic() - t0:.0f}s)')
        start_keystone(lab)
        wait_http(lab, 'keystone', lab.url('keystone') + '/v3')
        register_services(lab)
        start_glance(lab)
        start_placement(lab)
        start_ovn_central(lab)
        start_neutron(lab)
        sync_nova(lab)
        start_nova(lab)
        wait_http(lab, 'glance', lab.url('glance'))
        load_ft_metadefs(lab)
        wait_http(lab, 'placement', lab.url('placement'))
        wait_http(lab, 'nova-api', lab.url('nova-api'))
        wait_http(lab, 'neutron', lab.url('neutron'))
        wait_for('nova-scheduler and nova-conductors to report up',
                 lambda: compute_services_up(lab), lab)
        if with_cinder:
            # Ceph and Cinder (tools/cloud/storage.py)
            import storage
            storage.up(lab)
    except BaseException:
        log(f'bring-up failed after {time.monotonic() - t0:.0f}s; '
            f'stopping what started (logs in {lab.path("log")})')
        down(state_dir)
        raise
    lab.state['up_seconds'] = round(time.monotonic() - t0, 1)
    lab.save()
    log(f'control plane up in {lab.state["up_seconds"]}s')
    return lab


def down(state_dir: str) -> None:
    lab = Lab(state_dir)
    if not lab.state.get('ns'):
        log(f'no lab in {lab.dir}')
        return
    # A compute host keeps nothing worth a long graceful stop (its guests
    # end with it): a short grace keeps down quick with several hosts.
    for host in lab.state.get('hosts', {}).values():
        kill_namespace(host['ns'], grace=5.0)
    kill_namespace(lab.ns)
    log(f'stopped; namespace {lab.ns} removed (state kept in {lab.dir})')


def add_host(state_dir: str, host: str, network_only: bool = False,
             driver: str = FT_DRIVER) -> dict[str, Any]:
    """A compute host ``host``: the network namespace ``<lab ns>-<host>``
    with ``eth0`` on the lab's ``br0`` at ``10.78.N.11`` (the next host
    ``.12``, ...), so that it reaches the control plane at ``10.78.N.1``;
    then (unless ``network_only``) its daemons, see :func:`build_host`.
    """
    lab = Lab(state_dir)
    if not lab.state.get('ns') or not os.path.exists(
            f'/run/netns/{lab.ns}'):
        raise LabError(f'no lab up in {lab.dir}')
    if not HOST_RE.match(host):
        raise LabError(f'bad host name {host!r} (a-z0-9, at most 8)')
    hosts = lab.state.setdefault('hosts', {})
    if host in hosts:
        raise LabError(f'host {host} exists')
    octet = FIRST_HOST_OCTET + len(hosts)
    ip = f'{NET_PREFIX}.{lab.state["subnet"]}.{octet}'
    ns = f'{lab.ns}-{host}'
    hosts[host] = {'ns': ns, 'ip': ip,
                   'underlay_ip': f'{UNDERLAY_PREFIX}.{lab.state["subnet"]}'
                                  f'.{octet}'}
    lab.save()                  # before anything exists: down removes it
    run([IP, 'netns', 'add', ns])
    run([IP, '-n', ns, 'link', 'set', 'lo', 'up'])
    # eth0: the management network; eth1: Geneve's underlay, which only
    # the host's ovs-vswitchd uses (a port of its userspace bridge br-phy)
    for peer, veth in (('eth0', f'v-{host}'), ('eth1', f'u-{host}')):
        run([IP, '-n', lab.ns, 'link', 'add', veth, 'type', 'veth', 'peer',
             'name', peer, 'netns', ns])
        run([IP, '-n', lab.ns, 'link', 'set', veth, 'master', 'br0', 'up'])
        run([IP, '-n', ns, 'link', 'set', peer, 'up'])
    run([IP, '-n', ns, 'addr', 'add', f'{ip}/24', 'dev', 'eth0'])
    log(f'host {host}: namespace {ns}, {ip}')
    if not network_only:
        build_host(lab, host, driver)
    return hosts[host]


def host_dir(lab: Lab, host: str, *parts: str) -> str:
    return lab.path('hosts', host, *parts)


def build_host(lab: Lab, host: str, driver: str) -> None:
    """Make ``host`` a compute host: a mount and UTS namespace of its own
    (held by a ``sleep`` process) in which the Debian daemons find their
    default paths private (``/run`` a tmpfs; ``/etc/libvirt``,
    ``/var/lib/libvirt``, ``/var/log/libvirt`` bound to the host's
    directory), then libvirtd and virtlogd, Open vSwitch on the
    userspace datapath with ovn-controller, and nova-compute on cell1's
    vhost; the host is then mapped into cell1 (``discover_hosts``)."""
    t0 = time.monotonic()
    info = lab.state['hosts'][host]
    for d in ('log/libvirt', 'etc', 'instances', 'state', 'ovs', 'lock',
              'libvirt-lib'):
        os.makedirs(host_dir(lab, host, d), exist_ok=True)
    holder = subprocess.Popen(
        [IP, 'netns', 'exec', info['ns'], 'unshare', '--mount', '--uts',
         '--propagation', 'private', 'sleep', 'infinity'],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    info['holder'] = holder.pid
    lab.save()
    wait_for(f'{host}\'s namespaces', lambda: _comm(holder.pid) == 'sleep',
             lab, timeout=30)
    enter = ['nsenter', '-t', str(holder.pid), '-m', '-u', '-n', '--']
    info['enter'] = enter
    lab.save()
    configure_libvirt(lab, host)
    mounts = [f'hostname {host}',
              'mount -t tmpfs -o mode=0755 tmpfs /run',
              'mkdir -p /run/openvswitch /run/ovn /run/libvirt /run/lock '
              f'{HOST_RAM_DIR}',
              'mount -t tmpfs tmpfs /var/cache/libvirt']
    for src, dst in (('etc-libvirt', '/etc/libvirt'),
                     ('libvirt-lib', '/var/lib/libvirt'),
                     ('log/libvirt', '/var/log/libvirt')):
        mounts.append(f'mount --bind {host_dir(lab, host, src)} {dst}')
    run([*enter, 'sh', '-ec', '; '.join(mounts)])
    start_host_ovs(lab, host, enter)
    start(lab, f'{host}-virtlogd', ['/usr/sbin/virtlogd'], enter=enter)
    start(lab, f'{host}-libvirtd', ['/usr/sbin/libvirtd'], enter=enter)
    wait_for(f'{host}\'s libvirtd', lambda: run(
        [*enter, 'virsh', '-c', 'qemu:///system', 'version'],
        check=False).returncode == 0, lab, f'{host}-libvirtd', timeout=60)
    conf = configure_compute(lab, host, driver)
    extra_conf = []
    if lab.state.get('storage'):
        # a Ceph client, RBD volumes for nova-compute
        import storage
        extra_conf = ['--config-file',
                      storage.configure_host(lab, host, enter)]
    agent_conf = configure_agent(lab, host, conf)
    start(lab, f'{host}-mftvm-agent',
          [os.path.join(BIN, 'mftvm-agent'), '--config-file', agent_conf],
          enter=enter)
    start(lab, f'{host}-nova-compute',
          [os.path.join(BIN, 'nova-compute'), '--config-file', conf,
           *extra_conf], enter=enter)
    wait_for(f'mftvm-agent on {host} to answer over RabbitMQ',
             lambda: agent_answers(lab, host), lab, f'{host}-mftvm-agent')
    wait_for(f'nova-compute on {host} to report up',
             lambda: compute_service_up(lab, host), lab,
             f'{host}-nova-compute')
    manage(lab, 'nova-manage', '--config-file',
           lab.path('etc', 'nova', 'nova.conf'), 'cell_v2',
           'discover_hosts')
    info['up_seconds'] = round(time.monotonic() - t0, 1)
    lab.save()
    log(f'host {host} up in {info["up_seconds"]}s')


def _comm(pid: int) -> str:
    try:
        with open(f'/proc/{pid}/comm') as f:
            return f.read().strip()
    except OSError:
        return ''


def configure_libvirt(lab: Lab, host: str) -> None:
    """A copy of Debian's /etc/libvirt for this host: QEMU runs as root
    (instances live in the lab's private directory), no security driver
    (none is loaded here), libvirt's default network not started, and
    file-backed guest RAM on the host's private ``/run`` (a tmpfs, where
    the agent can read it; it goes with the host's mount namespace)."""
    etc = host_dir(lab, host, 'etc-libvirt')
    shutil.copytree('/etc/libvirt', etc, symlinks=True)
    shutil.rmtree(os.path.join(etc, 'qemu', 'networks', 'autostart'),
                  ignore_errors=True)
    with open(os.path.join(etc, 'qemu.conf'), 'a') as f:
        f.write('\n# cloudlab\nuser = "root"\ngroup = "root"\n'
                'security_driver = "none"\n'
                f'memory_backing_dir = "{HOST_RAM_DIR}"\n')


def start_host_ovs(lab: Lab, host: str, enter: list[str]) -> None:
    """ovsdb-server (also on 127.0.0.1:6640, where os-vif looks),
    ovs-vswitchd with the userspace datapath, br-phy holding the
    underlay address, and ovn-controller on the lab's southbound DB.
    ``userspace-tso-enable`` lets TCP through veths (LAB-NOTES.md)."""
    info = lab.state['hosts'][host]
    db = host_dir(lab, host, 'ovs', 'conf.db')
    run([OVSDB_TOOL, 'create', db, OVS_SCHEMA])
    log_dir = host_dir(lab, host, 'log')
    start(lab, f'{host}-ovsdb', [
        OVSDB_SERVER, db, '--remote=punix:/run/openvswitch/db.sock',
        '--remote=ptcp:6640:127.0.0.1', '--pidfile',
        f'--log-file={log_dir}/ovsdb-server.log'], enter=enter)
    wait_for(f'{host}\'s ovsdb-server', lambda: run(
        [*enter, OVS_VSCTL, '--timeout=5', 'show'],
        check=False).returncode == 0, lab, f'{host}-ovsdb', timeout=60)

    def vsctl(*args: str) -> None:
        run([*enter, OVS_VSCTL, '--timeout=30', *args])

    vsctl('--no-wait', 'init')
    vsctl('--no-wait', 'set', 'open_vswitch', '.',
          'other_config:userspace-tso-enable=true',
          f'external_ids:system-id={host}',
          f'external_ids:hostname={host}',
          f'external_ids:ovn-remote=tcp:{lab.ip}:{PORTS["ovn-sb"]}',
          'external_ids:ovn-encap-type=geneve',
          f'external_ids:ovn-encap-ip={info["underlay_ip"]}',
          'external_ids:ovn-bridge-datapath-type=netdev')
    start(lab, f'{host}-ovs-vswitchd', [
        OVS_VSWITCHD, 'unix:/run/openvswitch/db.sock', '--pidfile',
        f'--log-file={log_dir}/ovs-vswitchd.log'], enter=enter)
    vsctl('add-br', 'br-phy', '--', 'set', 'bridge', 'br-phy',
          'datapath_type=netdev', '--', 'add-port', 'br-phy', 'eth1')
    run([*enter, IP, 'addr', 'add', f'{info["underlay_ip"]}/24', 'dev',
         'br-phy'])
    run([*enter, IP, 'link', 'set', 'br-phy', 'up'])
    start(lab, f'{host}-ovn-controller', [
        OVN_CONTROLLER, 'unix:/run/openvswitch/db.sock', '--pidfile',
        f'--log-file={log_dir}/ovn-controller.log'], enter=enter)


def configure_compute(lab: Lab, host: str, driver: str) -> str:
    """nova-compute's configuration for ``host``: the libvirt driver
    (``virt_type = qemu``: guests run under TCG here) on cell1's vhost;
    privsep helpers run as they are (we are root, there is no sudo)."""
    info = lab.state['hosts'][host]
    conf = host_dir(lab, host, 'etc', 'nova-compute.conf')
    helper = {'helper_command':
              f'{os.path.join(BIN, "privsep-helper")} --config-file {conf}'}
    options: dict[str, dict[str, Any]] = {
        'DEFAULT': {**oslo_log(lab, f'{host}-nova-compute'),
                    'host': host, 'my_ip': info['ip'],
                    'transport_url': lab.rabbit_url('nova_cell1'),
                    'compute_driver': driver,
                    'state_path': host_dir(lab, host, 'state'),
                    'instances_path': host_dir(lab, host, 'instances')},
        'libvirt': {'virt_type': 'qemu'},
        'placement': service_auth(lab, 'placement'),
        'glance': {'api_servers': lab.url('glance')},
        'neutron': service_auth(lab, 'neutron'),
        'oslo_concurrency': {'lock_path': host_dir(lab, host, 'lock')},
        'oslo_messaging_notifications': {'driver': 'noop'},
        'vnc': {'enabled': False},
        'nova_sys_admin': helper,
        'vif_plug_ovs_privileged': helper,
        'vif_plug_linux_bridge_privileged': helper,
    }
    write_ini(conf, options)
    if driver.startswith('mftvm.'):
        # the FT options, by the code the DevStack plugin calls
        # (OVS's userspace datapath does not finish guests' partial
        # checksums into Geneve: the guests' NICs must not leave them)
        deploy(lab, 'nova', '--nova-conf', conf, '--compute-driver',
               driver, '--file-backed-memory', str(HOST_GUEST_MEMORY_MIB),
               '--nic-checksum-offload', 'false')
    return conf


def deploy(lab: Lab, *argv: str) -> None:
    """``python -m mftvm_openstack.deploy ARGV``, as the DevStack plugin
    runs it; the URLs (passwords) through the environment."""
    run([sys.executable, '-m', 'mftvm_openstack.deploy', *argv],
        env=service_env(lab, MFTVM_TRANSPORT_URL=lab.rabbit_url('nova_cell1'),
                        MFTVM_FENCING_URL=lab.fencing_url))


def configure_agent(lab: Lab, host: str, nova_conf: str) -> str:
    """The host's ``mftvm.conf``: the agent on nova-compute's broker and
    vhost (cell1's: the driver calls it there), fencing on the lab's
    etcd, its state in the host's private /run (:data:`HOST_STATE_DIR`),
    its log beside the host's other logs; deploy's defaults for its
    versioned notifications (on that broker, topic
    ``versioned_notifications``) and its Prometheus endpoint (port 9787),
    bound to the host's management address, which the control namespace
    and the root namespace reach over ``br0``."""
    info = lab.state['hosts'][host]
    conf = host_dir(lab, host, 'etc', 'mftvm.conf')
    deploy(lab, 'agent', '--conf', conf, '--host', host, '--nova-conf',
           nova_conf, '--my-ip', info['ip'], '--state-path',
           HOST_STATE_DIR, '--log-file',
           lab.path('log', f'{host}-mftvm-agent.log'),
           '--log-max-mb', str(LOG_MAX_MB),
           '--metrics-bind-address', info['ip'])
    return conf


def agent_answers(lab: Lab, host: str) -> bool:
    """Does ``host``'s agent answer RPC (``mftvm list --host``)?"""
    return run([os.path.join(BIN, 'mftvm'), '--timeout', '5', 'list',
                '--host', host], check=False, env=service_env(
                    lab, MFTVM_TRANSPORT_URL=lab.rabbit_url('nova_cell1'))
               ).returncode == 0


def compute_service_up(lab: Lab, host: str) -> bool:
    result = run([os.path.join(BIN, 'openstack'), 'compute', 'service',
                  'list', '--service', 'nova-compute', '--host', host,
                  '-f', 'json'], check=False, env=openrc_env(lab))
    return result.returncode == 0 and any(
        s['State'] == 'up' for s in json.loads(result.stdout or '[]'))


def probe(state_dir: str, host: str, port_id: str) -> str:
    """Plug Neutron port ``port_id`` into ``host``'s ``br-int`` as an
    interface of the host itself (an OVS internal port named after the
    port, with its MAC, address and MTU), so that the host can talk to
    servers on that tenant network through OVN, as a guest would.
    Returns the interface's name.

    Its transmit checksum offload is turned off: OVS's userspace Geneve
    cannot finish partial checksums, so TCP to another host would fail
    (guests need ``virtio_net.csum=0`` for the same reason)."""
    lab = Lab(state_dir)
    info = lab.state.get('hosts', {}).get(host)
    if info is None or 'enter' not in info:
        raise LabError(f'no compute host {host!r} in {lab.dir}')
    env = openrc_env(lab)
    openstack = os.path.join(BIN, 'openstack')
    port = json.loads(run([openstack, 'port', 'show', port_id, '-f',
                           'json'], env=env).stdout)
    fixed = port['fixed_ips'][0]
    subnet = json.loads(run([openstack, 'subnet', 'show',
                             fixed['subnet_id'], '-f', 'json'],
                            env=env).stdout)
    network = json.loads(run([openstack, 'network', 'show',
                              port['network_id'], '-f', 'json'],
                             env=env).stdout)
    dev = f'pr{port["id"][:11]}'
    prefix = subnet['cidr'].split('/')[1]
    enter = info['enter']
    run([*enter, OVS_VSCTL, '--timeout=30', 'add-port', 'br-int', dev,
         '--', 'set', 'interface', dev, 'type=internal',
         f'external_ids:iface-id={port["id"]}',
         f'external_ids:attached-mac={port["mac_address"]}'])
    run([*enter, IP, 'link', 'set', dev, 'address', port['mac_address'],
         'mtu', str(network['mtu']), 'up'])
    run([*enter, IP, 'addr', 'add', f'{fixed["ip_address"]}/{prefix}',
         'dev', dev])
    run([*enter, sys.executable, os.path.abspath(__file__),
         'tx-checksum-off', dev])
    log(f'host {host}: {dev} {fixed["ip_address"]}/{prefix} on '
        f'network {network["name"]}')
    return dev


def tx_checksum_off(dev: str) -> None:
    """``ethtool -K DEV tx off`` (no ethtool here): ETHTOOL_STXCSUM."""
    value = ctypes.create_string_buffer(struct.pack('II', 0x17, 0))
    ifreq = struct.pack('16sQ', dev.encode(), ctypes.addressof(value))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        fcntl.ioctl(sock.fileno(), 0x8946, ifreq)      # SIOCETHTOOL


def restart(state_dir: str, name: str) -> None:
    """Stop daemon ``name`` and start it again as it was started (e.g.
    nova-api, to load a newly installed extra-spec validator)."""
    lab = Lab(state_dir)
    how = lab.state.get('how', {}).get(name)
    if how is None or not os.path.exists(f'/run/netns/{lab.state["ns"]}'):
        raise LabError(f'no daemon {name!r} in a lab that is up in '
                       f'{lab.dir}')
    t0 = time.monotonic()
    stop(lab.state['pids'][name])
    start(lab, name, how['argv'], enter=how.get('enter'), **how['env'])
    if name in PORTS:
        wait_http(lab, name, lab.url(name))
    log(f'{name} restarted ({time.monotonic() - t0:.1f}s)')


def start_ft_api(state_dir: str) -> str:
    """mftvm-api (doc/api.rst) in the control namespace, as the service
    user ``mftvm`` (admin and service in ``service``, made here), on
    cell1's vhost where nova-compute reaches the agents.  The catalog
    entry is the operator's step (doc/api.rst), left to the caller.
    Returns the API's URL."""
    import openstack

    lab = Lab(state_dir)
    if not os.path.exists(f'/run/netns/{lab.state.get("ns")}'):
        raise LabError(f'no lab up in {lab.dir}')
    lab.state['passwords'].setdefault('mftvm', secrets.token_hex(12))
    lab.save()
    conn = openstack.connect(
        auth_url=lab.url('keystone') + '/v3', username='admin',
        password=lab.password('admin'), project_name='admin',
        user_domain_name='Default', project_domain_name='Default',
        region_name='RegionOne')
    idn: Any = conn.identity
    project = idn.find_project('service', domain_id='default')
    user = idn.find_user('mftvm', domain_id='default') or idn.create_user(
        name='mftvm', domain_id='default', password=lab.password('mftvm'),
        default_project_id=project.id)
    for role in ('admin', 'service'):
        idn.assign_project_role_to_user(project, user, idn.find_role(role))
    conf = lab.path('etc', 'mftvm-api.conf')
    write_ini(conf, {
        'DEFAULT': {**oslo_log(lab, 'mftvm-api'),
                    'transport_url': lab.rabbit_url('nova_cell1')},
        'ft_api': {'bind_host': '0.0.0.0',
                   'bind_port': PORTS['mftvm-api'], 'agent_timeout': 5},
        'keystone_authtoken': authtoken(lab, 'mftvm'),
        'nova': service_auth(lab, 'mftvm')})
    start(lab, 'mftvm-api', [os.path.join(BIN, 'mftvm-api'),
                             '--config-file', conf])
    wait_http(lab, 'mftvm-api', lab.url('mftvm-api'))
    return lab.url('mftvm-api')


HORIZON_SETTINGS = """\
# Horizon's local_settings for the lab, written by cloudlab.py horizon.
# openstack_dashboard.settings imports it as local.local_settings: this
# directory comes first on PYTHONPATH, so the venv holds no lab's state.
WEBROOT = {root!r}
ALLOWED_HOSTS = ['*']
SECRET_KEY = {secret!r}
OPENSTACK_HOST = {ip!r}
OPENSTACK_KEYSTONE_URL = {keystone!r}
OPENSTACK_KEYSTONE_DEFAULT_ROLE = 'member'
TIME_ZONE = 'UTC'
# one uwsgi process: its memory holds the sessions (no memcached here)
CACHES = {{'default': {{
    'BACKEND': 'django.core.cache.backends.locmem.LocMemCache'}}}}
STATIC_ROOT = {static!r}
COMPRESS_OFFLINE = True
"""


def start_horizon(state_dir: str) -> str:
    """Horizon (the dashboard) in the control namespace, under uwsgi
    as the other services are; its collected and compressed static
    files are served by uwsgi itself (``--static-map``).  Optional: the
    lab runs without it.  Returns its URL."""
    lab = Lab(state_dir)
    if not os.path.exists(f'/run/netns/{lab.state.get("ns")}'):
        raise LabError(f'no lab up in {lab.dir}')
    t0 = time.monotonic()
    pid = lab.state.get('pids', {}).get('horizon')
    if pid is not None and alive(pid):     # started again: anew
        stop(pid)
    home = lab.path('horizon')
    static = os.path.join(home, 'static')
    os.makedirs(os.path.join(home, 'local'), exist_ok=True)
    with open(os.path.join(home, 'local', '__init__.py'), 'w'):
        pass
    secret = lab.state['passwords'].setdefault('horizon',
                                               secrets.token_hex(24))
    lab.save()
    with open(os.open(os.path.join(home, 'local', 'local_settings.py'),
                      os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
              'w') as f:
        f.write(HORIZON_SETTINGS.format(
            root=HORIZON_ROOT, secret=secret, ip=lab.ip,
            keystone=lab.url('keystone') + '/v3', static=static))
    env = {'PYTHONPATH': home,
           'DJANGO_SETTINGS_MODULE': 'openstack_dashboard.settings'}
    # What a packager does once per release: static files gathered in
    # one place, then Horizon's SCSS and JavaScript compressed offline
    # (COMPRESS_OFFLINE: the pages name the compressed files).
    for argv in (('collectstatic', '--noinput'), ('compress', '--force')):
        t1 = time.monotonic()
        run([os.path.join(BIN, 'django-admin'), *argv],
            env=service_env(lab, **env), cwd=home)
        log(f'  django-admin {argv[0]} ({time.monotonic() - t1:.1f}s)')
    start(lab, 'horizon', uwsgi(
        lab, 'horizon', 'openstack_dashboard.wsgi', PORTS['horizon'],
        ('--static-map', f'{HORIZON_ROOT}static={static}')),
        PYTHONPATH=env['PYTHONPATH'],
        DJANGO_SETTINGS_MODULE=env['DJANGO_SETTINGS_MODULE'])
    url = lab.url('horizon') + HORIZON_ROOT
    wait_http(lab, 'horizon', url)
    log(f'Horizon up in {time.monotonic() - t0:.1f}s at {url}')
    return url


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            with open(f'/proc/{pid}/status') as f:
                for line in f:
                    if line.startswith('VmRSS:'):
                        total += int(line.split()[1])
    return total / 1024


def status(state_dir: str) -> int:
    lab = Lab(state_dir)
    if not lab.state.get('ns') or not os.path.exists(
            f'/run/netns/{lab.ns}'):
        print(f'no lab up in {lab.dir}')
        return 1
    pids = ns_pids(lab.ns)
    print(f'namespace {lab.ns}, control plane {lab.ip}, '
          f'{len(pids)} processes, {rss_mb(pids):.0f} MB RSS')
    for name, pid in sorted(lab.state.get('pids', {}).items()):
        print(f'  {name:16} pid {pid:7} '
              f'{"running" if alive(pid) else "DEAD"}')
    for name, host in sorted(lab.state.get('hosts', {}).items()):
        host_pids = ns_pids(host['ns'])
        print(f'  host {name:11} {host["ip"]:15} namespace {host["ns"]}, '
              f'{len(host_pids)} processes, {rss_mb(host_pids):.0f} MB RSS')
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description='An OpenStack control plane in a network namespace.')
    parser.add_argument('command', choices=('up', 'down', 'status',
                                            'restart', 'add-host', 'probe',
                                            'tx-checksum-off', 'ft-api',
                                            'horizon'))
    parser.add_argument('what', nargs='?',
                        help='for restart: the daemon, e.g. nova-api; '
                             'for add-host and probe: the host\'s name, '
                             'e.g. h1')
    parser.add_argument('port', nargs='?',
                        help='for probe: the Neutron port to plug into '
                             'the host')
    parser.add_argument('--dir', default=os.environ.get(
        'MFTVM_CLOUD_DIR', '/var/lib/mftvm-cloud'),
        help='state directory (default $MFTVM_CLOUD_DIR or '
             '/var/lib/mftvm-cloud); "up" empties it first (only if '
             'it is empty or a lab\'s)')
    parser.add_argument('--with-horizon', action='store_true',
                        help='up: Horizon too (as "horizon" does later: '
                             'about a minute and 200 MB more)')
    parser.add_argument('--network-only', action='store_true',
                        help='add-host: only the namespace and its links')
    parser.add_argument('--driver', default=FT_DRIVER,
                        help='add-host: nova-compute\'s compute_driver '
                             f'(default {FT_DRIVER}; libvirt.LibvirtDriver '
                             'for a host without FT)')
    parser.add_argument('--with-cinder', action='store_true',
                        help='up: also a single-node Ceph and Cinder '
                             '(RBD driver) in the lab (tools/cloud/'
                             'storage.py)')
    parser.add_argument('--name', default='cloud',
                        help='the lab\'s namespace is mfc-NAME')
    args = parser.parse_args(argv)
    try:
        if args.command == 'up':
            lab = up(args.dir, args.name, args.with_cinder)
            if args.with_horizon:
                try:
                    start_horizon(args.dir)
                except BaseException:
                    down(args.dir)
                    raise
            print(f'\nThe control plane is up.  Try:\n'
                  f'    source {lab.path("openrc")}\n'
                  f'    openstack service list\n'
                  f'    openstack network list\n'
                  f'Add compute hosts (about 40 s each; nova-compute '
                  f'with {FT_DRIVER} and mftvm-agent):\n'
                  f'    {sys.executable} {os.path.abspath(__file__)} '
                  f'add-host h1 --dir {lab.dir}\n'
                  f'    mftvm list --host h1      # its agent answers\n'
                  f'(doc/cloud-lab.rst boots a server on them.)\n'
                  f'Stop it with:  tools/run.sh cloud-down\n')
        elif args.command == 'down':
            down(args.dir)
        elif args.command == 'restart':
            if not args.what:
                parser.error('restart needs a service name')
            restart(args.dir, args.what)
        elif args.command == 'add-host':
            if not args.what:
                parser.error('add-host needs a host name')
            add_host(args.dir, args.what, args.network_only, args.driver)
        elif args.command == 'probe':
            if not args.what or not args.port:
                parser.error('probe needs a host and a port')
            print(probe(args.dir, args.what, args.port))
        elif args.command == 'ft-api':
            print(start_ft_api(args.dir))
        elif args.command == 'horizon':
            print(start_horizon(args.dir))
        elif args.command == 'tx-checksum-off':     # used by probe
            if not args.what:
                parser.error('tx-checksum-off needs an interface')
            tx_checksum_off(args.what)
        else:
            return status(args.dir)
    except LabError as e:
        print(f'cloudlab: {e}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    # storage.py imports this module as "cloudlab": one copy, not two
    sys.modules.setdefault('cloudlab', sys.modules[__name__])
    sys.exit(main())
